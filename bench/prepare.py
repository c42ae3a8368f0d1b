"""A full-size LAMOST frame reduced in-process: the code before issue 19's frame work against now.

Usage: ``python bench/prepare.py [--camera b1] [--cache /tmp/lamost-b1.npz] [--reference 7e24edd]``

Simulates one camera's bias, flat, arc and science frame (LAMOST, 250 fibers, 4096 x 4096),
builds its calibration set (box + optimal, aberration map on: the frames are rectified) once,
or reads it from ``--cache``, then reduces the science frame in-process, twice in a row (the
first frame of a calibration set, then the next one), each mode in its own subprocess with its
own ``OMP_NUM_THREADS`` (1):

* ``before``: the modules ``processors/{cosmics,quality,chunks,ccd,rectify,extract,frame_tiles,pipeline}.py``
  of the ``--reference`` commit (read with ``git show``, so the old code runs in the same run, on
  the same machine), 8 column tiles on one thread;
* ``before, 2 threads``: the same code on 2 threads (as ``now, 2 threads``);
* ``now, 1 core``: the working tree, 8 tiles on one thread;
* ``now, 2 threads``: 8 tiles on 2 threads, the 10 bundles extracted on 2 threads.

For each: ``prepare`` (read, CCD correction, cosmic rays, rectification, slabs), extraction of
the 10 bundles, finish (sky, metrics), the frame's total, and the ratios to ``before``. The
spectra of every mode are compared with ``before`` (largest |difference| in sigma, mask bits
that differ). Then the floor: the bytes the frame's work must
touch and its arithmetic, counted, at this machine's measured memory and numpy speeds.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where bench/typing.py would shadow the
# standard library's typing module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

NIGHT = "2026-11-21"
REFERENCE = "7e24edd"
"""main before issue 19's frame work (extraction, cosmic rays, rectification plan)."""
REFERENCE_MODULES = ("cosmics", "quality", "chunks", "ccd", "rectify", "extract", "frame_tiles", "pipeline")
"""Loaded from the reference commit in this order (each before the modules that import it); those
the commit does not have are skipped."""
MODES = {  # name: (code, prepare_tiles, threads)
    "before": ("reference", 8, 1),
    "before, 2 threads": ("reference", 8, 2),
    "now, 1 core": ("now", 8, 1),
    "now, 2 threads": ("now", 8, 2),
}


def use_reference(commit: str) -> None:
    """Load the ``REFERENCE_MODULES`` of ``commit`` in place of the working tree's (before any
    other fiberlake module imports them)."""
    import types

    import fiberlake.processors as package

    root = Path(__file__).resolve().parents[1]
    for name in REFERENCE_MODULES:
        shown = subprocess.run(["git", "-C", str(root), "show", f"{commit}:processors/{name}.py"],
                               capture_output=True, text=True)
        if shown.returncode != 0:  # not at that commit: the working tree's (nothing imports it there)
            continue
        source = shown.stdout
        full = f"fiberlake.processors.{name}"
        module = types.ModuleType(full)
        module.__file__ = f"{commit}:processors/{name}.py"
        module.__package__ = "fiberlake.processors"
        sys.modules[full] = module
        setattr(package, name, module)
        exec(compile(source, module.__file__, "exec"), module.__dict__)


def build(camera: str, cache: Path, instrument: str = "lamost") -> None:
    from fiberlake.ingest.simulate import simulate_frame
    from fiberlake.processors import ccd
    from fiberlake.processors.pipeline import ReductionParams, build_calibration
    from fiberlake.schemas.instrument import get_instrument

    inst = get_instrument(instrument)
    frames = {o: simulate_frame(inst, camera, o, night=NIGHT, expid=2150000 + i, seed=11)
              for i, o in enumerate(("BIAS", "FLAT", "ARC", "SCIENCE"))}
    cp = ccd.CCDParams.from_header(dict(frames["FLAT"].header), saturation=65535)
    params = ReductionParams().updated({"extractions": ("box", "optimal")})
    t0 = time.perf_counter()
    calib = build_calibration([frames["BIAS"].raw], [frames["FLAT"].raw], [frames["ARC"].raw], cp, inst,
                              camera[0], params)
    print(f"calibration set built in {time.perf_counter() - t0:.0f} s", flush=True)
    sky = np.asarray(frames["SCIENCE"].truth["TARGETS"]["OBJTYPE"]) == "SKY"
    arrays = {f"calib/{k}": v for k, v in calib.to_arrays().items()}
    np.savez(cache, raw=frames["SCIENCE"].raw, sky=sky, header=json.dumps(dict(frames["SCIENCE"].header)),
             info=json.dumps(calib.info), **arrays)


def load(cache: Path):
    from fiberlake.processors import ccd
    from fiberlake.processors.pipeline import Calibration

    with np.load(cache) as z:
        arrays = {k[len("calib/"):]: z[k] for k in z.files if k.startswith("calib/")}
        calib = Calibration.from_arrays(arrays, json.loads(str(z["info"])))
        header = json.loads(str(z["header"]))
        return calib, z["raw"], ccd.CCDParams.from_header(header, saturation=65535), z["sky"]


def run_mode(cache: Path, code: str, tiles: int, threads: int, out: Path, reference: str) -> None:
    if code == "reference":
        use_reference(reference)
    from concurrent.futures import ThreadPoolExecutor

    from fiberlake.processors.pipeline import ReductionParams, extract_bundle, finish_frame, prepare_frame

    calib, raw, cp, sky = load(cache)
    params = ReductionParams().updated({"extractions": ("box", "optimal"), "execution.prepare_tiles": tiles,
                                        "execution.prepare_threads": threads})
    times = {}
    for frame in ("first", "next"):
        t = time.perf_counter()
        constants, slabs = prepare_frame(raw, cp, calib, params)
        times[f"{frame}: prepare"] = t_prepare = time.perf_counter() - t
        t = time.perf_counter()
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                parts = list(pool.map(lambda s: extract_bundle(s, constants, calib, params), slabs))
        else:
            parts = [extract_bundle(s, constants, calib, params) for s in slabs]
        times[f"{frame}: extract"] = time.perf_counter() - t
        t = time.perf_counter()
        reduced = finish_frame(parts, calib, sky, params)
        times[f"{frame}: finish"] = time.perf_counter() - t
        times[f"{frame}: frame"] = t_prepare + times[f"{frame}: extract"] + times[f"{frame}: finish"]
    np.savez(out, **{f"{m}/{k}": getattr(r.spectra, k) for m, r in reduced.items() for k in ("flux", "ivar", "mask")},
             read_noise=constants.read_noise)
    root = Path(__file__).resolve().parents[1]
    tree = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                          text=True).stdout.strip()
    times["code"] = reference if code == "reference" else tree
    out.with_suffix(".json").write_text(json.dumps(times))


def floor(cache: Path, frame_seconds: float) -> None:
    """The frame's work counted, at this machine's measured speeds (one core)."""
    from fiberlake.processors import ccd, cosmics, extract
    from fiberlake.processors.pipeline import ReductionParams, camera_ccd_params

    calib, raw, cp, _ = load(cache)
    ny, nx = calib.master_flat.shape
    nf = calib.traces.n_fibers
    params = ReductionParams()
    camera = camera_ccd_params(cp, params)
    adu, mask = ccd.correct_counts(raw, camera, calib.master_bias)
    # measured: numpy float32 arithmetic on arrays in cache, memory bandwidth on large arrays
    a, b, c = (np.random.default_rng(0).random(1 << 15, np.float32) for _ in range(3))
    t = time.perf_counter()
    for _ in range(2000):
        np.multiply(a, b, out=c)
        np.add(c, a, out=c)
    rate = 2 * 2000 * a.size / (time.perf_counter() - t)
    big = np.ones(1 << 26, np.float32)
    dst = np.empty_like(big)
    t = time.perf_counter()
    for _ in range(3):
        np.copyto(dst, big)
    bandwidth = 3 * 2 * big.nbytes / (time.perf_counter() - t)
    del big, dst
    # measured: one L.A.Cosmic detection over the whole frame (astroscrappy's kernels): the least any
    # number of iterations costs
    clean = np.ascontiguousarray(adu * np.float32(camera.gain))
    t = time.perf_counter()
    cosmics._detect(clean, clean + np.float32(camera.read_noise) ** 2, (mask != 0).astype(np.uint8), 5.0, 1.5, 5.0)
    t_cosmic = time.perf_counter() - t
    # counted: the flops of each stage (operations per element, written out in its code)
    pixels = ny * nx
    hw = extract.default_deblend_halfwidth(calib.traces, params.optimal.halfwidth, profile=calib.profile)
    nw_opt = int(np.floor(2 * hw)) + 2
    nw_box = int(np.floor(2 * params.box.halfwidth)) + 2
    windows_opt = nf * ny * nw_opt
    flops = {
        "CCD correction (overscan, bias, gain, ivar)": 8 * pixels,
        "rectification (2 passes: cubic cumulative flux, variance, cover)": 2 * 30 * pixels,
        "box (profile edges 16, sums 10)": 26 * nf * ny * nw_box,
        "optimal (profile 25; per iteration 21, 6 solves)": windows_opt * (25 + 6 * 21),
    }
    touched = {  # bytes each stage must read and write at least once
        "CCD correction (overscan, bias, gain, ivar)": raw.nbytes + 4 * pixels + 12 * pixels,
        "rectification (2 passes: cubic cumulative flux, variance, cover)": 2 * 2 * 12 * pixels,
        "box (profile edges 16, sums 10)": 12 * pixels + 12 * nf * ny,
        "optimal (profile 25; per iteration 21, 6 solves)": 12 * pixels + 16 * nf * ny,
    }
    print(f"\nfloor (one core): numpy float32 {rate / 1e9:.2f} Gflop/s in cache, memory {bandwidth / 1e9:.1f} GB/s")
    total = t_cosmic
    print(f"  {'L.A.Cosmic, one detection over the frame (measured)':66s} {t_cosmic:6.2f} s")
    for name in flops:
        s = max(flops[name] / rate, touched[name] / bandwidth)
        total += s
        print(f"  {name:66s} {s:6.2f} s  ({flops[name] / 1e9:.2f} Gflop, {touched[name] / 1e6:.0f} MB)")
    print(f"  {'floor of the frame':66s} {total:6.2f} s; the frame now (1 core, next frame): "
          f"{frame_seconds:.2f} s = {frame_seconds / total:.1f}x the floor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--camera", default="b1")
    parser.add_argument("--instrument", default="lamost", help="mini: a quick check of this script")
    parser.add_argument("--cache", type=Path, default=None, help="calibration + science frame (.npz), built when missing")
    parser.add_argument("--reference", default=REFERENCE, help="commit whose modules the 'before' mode runs")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip-floor", action="store_true")
    parser.add_argument("--modes", default=None, help="comma-separated indices of the modes to run (0 first; 0 is "
                        "the baseline and always runs)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fiberlake-prepbench-"))
    cache = args.cache or work / "lamost.npz"
    if args.mode is not None:
        code, tiles, threads = MODES[args.mode]
        run_mode(cache, code, tiles, threads, args.out, args.reference)
        return
    if not cache.exists():
        build(args.camera, cache, args.instrument)
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    chosen = {0} | ({int(m) for m in args.modes.split(",")} if args.modes else set(range(len(MODES))))
    for i, name in enumerate(MODES):
        if i not in chosen:
            continue
        out = work / f"mode{i}.npz"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        subprocess.run([sys.executable, __file__, "--cache", str(cache), "--mode", name, "--out", str(out),
                        "--reference", args.reference], env=env, check=True)
        results[name] = (json.loads(out.with_suffix(".json").read_text()), dict(np.load(out)))
        print(f"  {name}: done, load average {os.getloadavg()[0]:.1f}", flush=True)
    for name, (times, _) in results.items():
        print(f"  {name}: code {times.pop('code')}")
    stages = list(next(iter(results.values()))[0])
    base_times, base = results["before"]
    print(f"\n{args.instrument} {args.camera} science frame, box + optimal, cosmic rays, rectification, in-process "
          f"(seconds; before = {args.reference}; load average at end {os.getloadavg()[0]:.1f})")
    print(f"{'stage':24s}" + "".join(f"{n:>18s}" for n in results))
    for s in stages:
        print(f"{s:24s}" + "".join(f"{r[0][s]:18.2f}" for r in results.values()))
    for frame in ("first", "next"):
        for stage in ("frame", "prepare", "extract"):
            key = f"{frame}: {stage}"
            print(f"{'speed-up ' + key:24s}" + "".join(f"{base_times[key] / r[0][key]:18.2f}" for r in results.values()))
    for m in ("box", "optimal"):
        worst, bits = [], []
        for _, arr in results.values():
            a, b = base[f"{m}/flux"], arr[f"{m}/flux"]
            worst.append(float(np.max(np.abs(a - b) * np.sqrt(base[f"{m}/ivar"]))))
            bits.append(int(np.count_nonzero(base[f"{m}/mask"] != arr[f"{m}/mask"])))
        print(f"{m + ' max |d| sigma':24s}" + "".join(f"{w:18.2e}" for w in worst))
        print(f"{m + ' mask px differ':24s}" + "".join(f"{b:18d}" for b in bits))
    print(f"{'read noise (e-)':24s}" + "".join(f"{float(r[1]['read_noise']):18.5f}" for r in results.values()))
    if not args.skip_floor and "now, 1 core" in results:
        floor(cache, results["now, 1 core"][0]["next: frame"])


if __name__ == "__main__":
    main()
