"""Ingest throughput on full-size LAMOST frames, against a raw read+write of the same bytes.

Usage: ``python bench/ingest.py [--frames 8] [--keep DIR] [--before PKG] [--rounds 2]``

Writes N simulated full-size raw frames (4096 x 4136 uint16, science exposures with sky, stars
and cosmic rays; kept and reused with ``--keep``), then measures in the same run, each with
``os.sync`` included:

* baseline: astropy read of each file + ``numpy.save`` of its pixels (uncompressed disk write);
* fiberlake ingest of this tree, with frame typing (the shipped model) and without
  (``--no-typing``): validation (CHECKSUM/DATASUM), both hashes, Zarr write, Delta commits;
* with ``--before PKG``, the same two runs of another revision: ``PKG`` is a folder holding a
  ``fiberlake`` package of that revision (e.g. links to the folders of a ``git worktree``);
  ``--typing-model FOLDER`` gives every run the same typing model (the default is each
  revision's shipped model, whose pre-processing may differ).

Each ingest runs in its own process with the typing model already loaded (its one-off load is
not a per-frame cost), rounds interleaved. It prints MB/s (raw pixel bytes / wall time), the
ratio to the baseline, the compression ratio of the stored arrays, and the floor: each stage of
ingest timed alone on one frame (CPU seconds), spread over the cores, or the baseline's I/O if
that is slower.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where bench/typing.py would shadow the
# standard library's typing module; timing.py is imported from it by name, after the rest.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
from astropy.io import fits


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _frames(night: Path, n: int) -> list[Path]:
    """The night's simulated frames (made once; reused when ``--keep`` already holds them)."""
    from fiberlake.ingest.simulate import simulate_frame
    from fiberlake.schemas.instrument import LAMOST

    night.mkdir(parents=True, exist_ok=True)
    cameras = LAMOST.cameras
    for i in range(n):
        camera = cameras[i % len(cameras)]
        path = night / f"fl-{i:04d}-{camera}.fits"
        if not path.exists():
            frame = simulate_frame(LAMOST, camera, "SCIENCE", night=night.name, expid=2150100 + i // len(cameras), seed=i)
            fits.PrimaryHDU(data=frame.raw, header=frame.header).writeto(path, checksum=True)
    return [night / f"fl-{i:04d}-{cameras[i % len(cameras)]}.fits" for i in range(n)]


def _baseline(files: list[Path], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.sync()
    t0 = time.perf_counter()
    for path in files:
        data = fits.getdata(path, uint=True)
        with open(out / (path.stem + ".npy"), "wb") as handle:
            np.save(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
    os.sync()
    return time.perf_counter() - t0


def run_one(lake_dir: Path, night: Path, typing: bool, model: str = "default") -> dict:
    """One ingest of ``night`` into a new lake (this process's ``fiberlake``), timed; then a re-ingest."""
    from fiberlake.jobs.ingest import declare_instrument, ingest_night
    from fiberlake.jobs.typing_stage import IngestTyper
    from fiberlake.processors.params import TypingParams
    from fiberlake.storage.layout import Lake

    shutil.rmtree(lake_dir, ignore_errors=True)
    lake = Lake.at(lake_dir)
    declare_instrument(lake, "lamost")
    params = TypingParams(enabled=typing, model=model)
    IngestTyper.load(lake, params)              # the model's one-off load, kept by the process
    os.sync()
    t0 = time.perf_counter()
    report = ingest_night(lake, night, typing=params)
    os.sync()
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = ingest_night(lake, night, typing=params)
    return {"seconds": seconds, "again": time.perf_counter() - t0, "ingested": len(report.ingested),
            "duplicates": len(again.duplicates), "stored": _dir_size(lake.root / "raw")}


def _subprocess(lake_dir: Path, night: Path, typing: bool, package: str | None, model: str) -> dict:
    env = dict(os.environ)
    if package:
        env["PYTHONPATH"] = package + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", str(lake_dir), str(night)]
    if not typing:
        cmd.append("--no-typing")
    cmd += ["--typing-model", model]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"ingest run failed ({package or 'this tree'}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--keep", help="work directory to keep and reuse (default: a temporary one)")
    parser.add_argument("--before", help="folder holding the fiberlake package of the revision to compare")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--typing-model", default="default",
                        help="typing model of every run: 'default' (each revision's shipped one) or a model folder")
    parser.add_argument("--run-one", nargs=2, metavar=("LAKE", "NIGHT"), help=argparse.SUPPRESS)
    parser.add_argument("--no-typing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(Path(args.run_one[0]), Path(args.run_one[1]), typing=not args.no_typing,
                                 model=args.typing_model)))
        return

    from fiberlake.schemas.instrument import LAMOST

    work = Path(args.keep or tempfile.mkdtemp(prefix="fiberlake-bench-"))
    t0 = time.perf_counter()
    files = _frames(work / "2026-11-21", args.frames)
    t_sim = time.perf_counter() - t0
    night = files[0].parent
    raw_bytes = len(files) * int(np.prod(LAMOST.raw_shape)) * 2
    mb = raw_bytes / 1e6
    variants = [("now", None)] + ([("before", args.before)] if args.before else [])
    times: dict[str, list[float]] = {"baseline": []}
    results: dict[str, dict] = {}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        times["baseline"].append(_baseline(files, work / "baseline"))
        for name, package in variants:
            for typing in (True, False):
                key = f"{name}, {'with' if typing else 'without'} typing"
                result = _subprocess(work / "lake", night, typing, package, args.typing_model)
                assert result["ingested"] == len(files) and result["duplicates"] == len(files), result
                times.setdefault(key, []).append(result["seconds"])
                times.setdefault(key + ": re-ingest", []).append(result["again"])
                results[key] = result
        load.append(os.getloadavg()[0])
    base = min(times["baseline"])
    print(f"{len(files)} full-size LAMOST frames ({LAMOST.raw_shape[0]}x{LAMOST.raw_shape[1]} uint16), {mb:.0f} MB of "
          f"pixels (made in {t_sim:.0f} s); {args.rounds} round(s), best of each; load average {min(load):.1f}-{max(load):.1f} "
          f"on {os.cpu_count()} cores")
    print(f"{'path':<46}{'seconds':>9}{'MB/s':>8}{'vs baseline':>13}{'compression':>13}")
    print(f"{'baseline: astropy read + numpy.save + fsync':<46}{base:9.2f}{mb / base:8.0f}{1.0:13.3f}{'1.00x':>13}")
    for key, values in times.items():
        if key == "baseline":
            continue
        t = min(values)
        stored = results[key.split(":")[0]]["stored"]
        ratio = f"{raw_bytes / stored:.2f}x" if ":" not in key else ""
        print(f"{key:<46}{t:9.2f}{mb / t:8.0f}{base / t:13.3f}{ratio:>13}")

    print(f"typing model: {args.typing_model}")
    floor = _floor(files[0], args.typing_model)
    print(f"\nfloor, counted per frame on {os.cpu_count()} cores: CPU ms per stage on one frame (file in the page cache),"
          " MB/s of raw pixels")
    for name, seconds in floor.items():
        print(f"  {name:<64}{1e3 * seconds:8.1f} ms{raw_bytes / len(files) / seconds / 1e6:8.0f} MB/s")
    cores = os.cpu_count() or 1
    for typing in (False, True):
        cpu = sum(s for n, s in floor.items() if not n.startswith("(") and (typing or not n.startswith("typing")))
        floor_s = max(cpu * len(files) / cores, base)
        key = f"now, {'with' if typing else 'without'} typing"
        print(f"  {'with' if typing else 'without'} typing: every stage once, spread over the cores, or the baseline's I/O if "
              f"slower: {floor_s:.2f} s for {len(files)} frames = {mb / floor_s:.0f} MB/s = {base / floor_s:.3f}x the baseline;"
              f" ingest takes {min(times[key]) / floor_s:.2f}x this floor")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _floor(path: Path, model: str = "default") -> dict[str, float]:
    """CPU seconds of each unavoidable stage of ingest on one frame (file in the page cache), with the
    fastest implementation the lake has of each; rows in parentheses are for comparison only."""
    import hashlib
    import io

    from fiberlake.ingest.fitsreader import _read_plain_uint16
    from fiberlake.processors.typing_route import prepare_for_typing
    from fiberlake.storage.rawshard import blosc_codec
    from fiberlake.storage.rawstore import RAW_CHUNK, RAW_CODEC, pixel_sha256

    def cpu(fn, repeat: int = 3):
        best, result = float("inf"), None
        for _ in range(repeat):
            c0 = time.process_time()
            result = fn()
            best = min(best, time.process_time() - c0)
        return best, result

    stages: dict[str, float] = {}
    stages["read the file (page cache)"], data = cpu(path.read_bytes)
    stages["SHA-256 of the file"], _ = cpu(lambda: hashlib.sha256(data).hexdigest())
    stages["header parse + CHECKSUM/DATASUM + pixel decode (fitsreader)"], plain = cpu(lambda: _read_plain_uint16(data))
    pixels = plain[1]

    def astropy_read():
        with fits.open(io.BytesIO(data), memmap=False, checksum=True, uint=True) as hdul:
            return np.array(hdul[0].data)
    stages["(astropy fits.open + CHECKSUM/DATASUM + pixels, before)"], _ = cpu(astropy_read)
    stages["SHA-256 of the pixels"], _ = cpu(lambda: pixel_sha256(pixels))
    codec = blosc_codec(RAW_CODEC, 2)
    cols = RAW_CHUNK[1]
    chunks = [np.ascontiguousarray(pixels[:, c:c + cols]) for c in range(0, pixels.shape[1], cols)]
    name = f"blosc {RAW_CODEC['cname']}-{RAW_CODEC['clevel']} {RAW_CODEC['shuffle']}, {RAW_CODEC.get('blocksize', 0) >> 10} KiB blocks"
    stages[name], packed = cpu(lambda: [codec.encode(c) for c in chunks])
    out = path.with_suffix(".floor")

    def write():
        with open(out, "wb") as handle:
            for p in packed:
                handle.write(p)
            handle.flush()
            os.fsync(handle.fileno())
    stages["write + fsync of the compressed bytes"], _ = cpu(write)
    out.unlink()
    from fiberlake.jobs.train import load_typing_model

    typer = load_typing_model(model, None, device="cpu")
    stages["typing: the model's pre-processing ("
           f"{'+'.join(typer.channels)}; {len(typer.scalars)} scalars)"], _ = cpu(
        lambda: prepare_for_typing(pixels, channels=typer.channels, scalars=typer.scalars))
    return stages


if __name__ == "__main__":
    main()
