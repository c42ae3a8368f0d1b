"""A full-size LAMOST frame reduced in-process: the frame's preparation whole against in column tiles.

Usage: ``python bench/prepare.py [--camera b1] [--cache /tmp/lamost-b1.npz]``

Simulates one camera's bias, flat, arc and science frame (LAMOST, 250 fibers, 4096 x 4096),
builds its calibration set (box + optimal, aberration map on: the frames are rectified) once,
or reads it from ``--cache``, then reduces the science frame in-process in separate
subprocesses, each with its own ``OMP_NUM_THREADS``:

* ``before, 1 core``: ``prepare_tiles = 1`` (the whole frame at once, as before issue 19), one thread;
* ``before, 2 cores``: the same with astroscrappy's own OpenMP threads on both cores;
* ``tiles, 1 core``: 8 column tiles one after the other (the tiles' margins are the extra work);
* ``tiles, 2 threads``: 8 tiles on 2 threads (OpenMP 1 thread each).

For each: ``prepare`` (read, CCD correction, cosmic rays, rectification, slabs), extraction of
the 10 bundles, finish (sky, metrics), the frame's total, and the ratios to ``before, 1 core``. The spectra of every mode
are compared with ``before, 1 core`` (largest |difference| in sigma, and mask bits that differ).
Then astroscrappy's ``niter`` (2, 3 against 4) on one tile: pixels whose flag changes.
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
MODES = {  # name: (prepare_tiles, prepare_threads, OMP_NUM_THREADS)
    "before, 1 core": (1, 1, 1),
    "before, 2 cores (OpenMP)": (1, 1, 2),
    "tiles, 1 core": (8, 1, 1),
    "tiles, 2 threads": (8, 2, 1),
}


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


def run_mode(cache: Path, tiles: int, threads: int, out: Path) -> None:
    from fiberlake.processors.pipeline import ReductionParams, extract_bundle, finish_frame, prepare_frame

    calib, raw, cp, sky = load(cache)
    params = ReductionParams().updated({"extractions": ("box", "optimal"), "execution.prepare_tiles": tiles,
                                        "execution.prepare_threads": threads})
    times = {}
    t = time.perf_counter()
    constants, slabs = prepare_frame(raw, cp, calib, params)
    times["prepare"] = t_prepare = time.perf_counter() - t
    t = time.perf_counter()
    parts = [extract_bundle(s, constants, calib, params) for s in slabs]
    times["extract (10 bundles)"] = time.perf_counter() - t
    t = time.perf_counter()
    reduced = finish_frame(parts, calib, sky, params)
    times["finish"] = time.perf_counter() - t
    times["frame"] = t_prepare + times["extract (10 bundles)"] + times["finish"]
    np.savez(out, **{f"{m}/{k}": getattr(r.spectra, k) for m, r in reduced.items() for k in ("flux", "ivar", "mask")},
             read_noise=constants.read_noise)
    out.with_suffix(".json").write_text(json.dumps(times))


def niter_check(cache: Path) -> None:
    from fiberlake.processors import ccd, frame_tiles
    from fiberlake.processors.pipeline import ReductionParams, camera_ccd_params
    import dataclasses

    calib, raw, cp, _ = load(cache)
    camera = camera_ccd_params(cp, ReductionParams())
    adu, mask = ccd.correct_counts(raw, camera, calib.master_bias)
    tile = frame_tiles.plan_tiles(adu.shape[1], 8, calib.rectification.map)[3]
    a, m = np.ascontiguousarray(adu[:, slice(*tile.read)]), np.ascontiguousarray(mask[:, slice(*tile.read)])
    masks = {}
    for niter in (4, 3, 2):
        t = time.perf_counter()
        masks[niter] = ccd.cosmic_mask(a, m, dataclasses.replace(camera, cr_niter=niter))
        print(f"  niter {niter}: {time.perf_counter() - t:6.2f} s, {int(masks[niter].sum())} cosmic pixels, "
              f"{int((masks[niter] != masks[4]).sum())} differ from niter 4", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--camera", default="b1")
    parser.add_argument("--instrument", default="lamost", help="mini: a quick check of this script")
    parser.add_argument("--cache", type=Path, default=None, help="calibration + science frame (.npz), built when missing")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip-niter", action="store_true")
    parser.add_argument("--modes", default=None, help="comma-separated indices of the modes to run (0 first; 0 is "
                        "the baseline and always runs)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fiberlake-prepbench-"))
    cache = args.cache or work / "lamost.npz"
    if args.mode == "niter":
        niter_check(cache)
        return
    if args.mode is not None:
        tiles, threads, _ = MODES[args.mode]
        run_mode(cache, tiles, threads, args.out)
        return
    if not cache.exists():
        build(args.camera, cache, args.instrument)
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    chosen = {0} | ({int(m) for m in args.modes.split(",")} if args.modes else set(range(len(MODES))))
    for i, (name, (_, _, omp)) in enumerate(MODES.items()):
        if i not in chosen:
            continue
        out = work / f"mode{i}.npz"
        env = dict(os.environ, OMP_NUM_THREADS=str(omp), MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        subprocess.run([sys.executable, __file__, "--cache", str(cache), "--mode", name, "--out", str(out)],
                       env=env, check=True)
        results[name] = (json.loads(out.with_suffix(".json").read_text()), dict(np.load(out)))
    stages = list(next(iter(results.values()))[0])
    base_times, base = results["before, 1 core"]
    print(f"\n{args.instrument} {args.camera} science frame, box + optimal, cosmic rays, rectification, in-process "
          f"(seconds; load average at end {os.getloadavg()[0]:.1f})")
    print(f"{'stage':24s}" + "".join(f"{n:>26s}" for n in results))
    for s in stages:
        print(f"{s:24s}" + "".join(f"{r[0][s]:26.2f}" for r in results.values()))
    print(f"{'speed-up (frame)':24s}" + "".join(f"{base_times['frame'] / r[0]['frame']:26.2f}" for r in results.values()))
    print(f"{'speed-up (prepare)':24s}" + "".join(f"{base_times['prepare'] / r[0]['prepare']:26.2f}"
                                                   for r in results.values()))
    for m in ("box", "optimal"):
        worst, bits = [], []
        for _, arr in results.values():
            a, b = base[f"{m}/flux"], arr[f"{m}/flux"]
            worst.append(float(np.max(np.abs(a - b) * np.sqrt(base[f"{m}/ivar"]))))
            bits.append(int(np.count_nonzero(base[f"{m}/mask"] != arr[f"{m}/mask"])))
        print(f"{m + ' max |d| sigma':24s}" + "".join(f"{w:26.2e}" for w in worst))
        print(f"{m + ' mask px differ':24s}" + "".join(f"{b:26d}" for b in bits))
    print(f"{'read noise (e-)':24s}" + "".join(f"{float(r[1]['read_noise']):26.5f}" for r in results.values()))
    if not args.skip_niter:
        print("\nastroscrappy niter on tile 3 (one core):")
        subprocess.run([sys.executable, __file__, "--cache", str(cache), "--mode", "niter"],
                       env=dict(os.environ, OMP_NUM_THREADS="1"), check=True)


if __name__ == "__main__":
    main()
