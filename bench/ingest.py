"""Ingest throughput on full-size LAMOST frames, against a raw read+write of the same bytes.

Usage: ``python bench/ingest.py [--frames 8] [--keep DIR]``

Writes N simulated full-size raw frames (4096 x 4136 uint16, science exposures with sky, stars
and cosmic rays), then measures in the same run, each with ``os.sync`` included:

* baseline: astropy read of each file + ``numpy.save`` of its pixels (uncompressed disk write);
* fiberlake ingest: validation (CHECKSUM), hashing, Zarr write (blosc-zstd1-bitshuffle, one
  shard per frame), Delta commit.

and prints MB/s (raw pixel bytes / wall time), the ratio to the baseline, and the compression
ratio of the stored arrays.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where bench/typing.py would shadow the
# standard library's typing module; timing.py is imported from it by name, after the rest.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
from astropy.io import fits


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--keep", help="work directory to keep (default: a temporary one)")
    args = parser.parse_args()

    from fiberlake.ingest.simulate import simulate_frame
    from fiberlake.jobs.ingest import ingest_night
    from fiberlake.schemas.instrument import LAMOST
    from fiberlake.storage.layout import Lake

    work = Path(args.keep or tempfile.mkdtemp(prefix="fiberlake-bench-"))
    night = work / "2026-11-21"
    night.mkdir(parents=True, exist_ok=True)
    cameras = LAMOST.cameras
    t0 = time.perf_counter()
    for i in range(args.frames):
        camera = cameras[i % len(cameras)]
        frame = simulate_frame(LAMOST, camera, "SCIENCE", night="2026-11-21", expid=2150100 + i // len(cameras), seed=i)
        fits.PrimaryHDU(data=frame.raw, header=frame.header).writeto(night / f"fl-{i:04d}-{camera}.fits", checksum=True)
    t_sim = time.perf_counter() - t0
    files = sorted(night.glob("*.fits"))
    raw_bytes = sum(int(np.prod(LAMOST.raw_shape)) * 2 for _ in files)
    os.sync()

    base_dir = work / "baseline"
    base_dir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for path in files:
        data = fits.getdata(path, uint=True)
        with open(base_dir / (path.stem + ".npy"), "wb") as handle:
            np.save(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
    os.sync()
    t_base = time.perf_counter() - t0

    lake = Lake.at(work / "lake")
    t0 = time.perf_counter()
    report = ingest_night(lake, night)
    os.sync()
    t_ingest = time.perf_counter() - t0
    assert len(report.ingested) == len(files), report.summary()
    stored = _dir_size(lake.root / "raw")

    t0 = time.perf_counter()
    again = ingest_night(lake, night)
    t_again = time.perf_counter() - t0

    floor = _floor(files[0], len(files))
    mb = raw_bytes / 1e6
    print(f"{len(files)} full-size LAMOST frames ({LAMOST.raw_shape[0]}x{LAMOST.raw_shape[1]} uint16), "
          f"{mb:.0f} MB of pixels; simulated in {t_sim:.1f} s ({t_sim / len(files):.2f} s/frame)")
    print(f"{'path':<44}{'seconds':>9}{'MB/s':>9}{'vs baseline':>13}")
    print(f"{'baseline: astropy read + numpy.save + fsync':<44}{t_base:9.2f}{mb / t_base:9.1f}{1.0:13.2f}")
    print(f"{'fiberlake ingest (validate+hash+zarr+delta)':<44}{t_ingest:9.2f}{mb / t_ingest:9.1f}{t_base / t_ingest:13.2f}")
    print(f"{'re-ingest (all duplicates, hash only)':<44}{t_again:9.2f}{mb / t_again:9.1f}{t_base / t_again:13.2f}")
    print(f"compression ratio of stored raw arrays: {raw_bytes / stored:.2f}x "
          f"({stored / 1e6:.0f} MB on disk); duplicates on re-ingest: {len(again.duplicates)}")
    print(f"\nfloor, counted per frame on {os.cpu_count()} cores (load {os.getloadavg()[0]:.1f}); ms per frame, MB/s of "
          "raw pixels:")
    for name, seconds in floor["stages"].items():
        print(f"  {name:<52}{1e3 * seconds:8.1f} ms{raw_bytes / len(files) / seconds / 1e6:9.0f} MB/s")
    cpu = sum(floor["stages"].values())
    floor_s = max(cpu * len(files) / (os.cpu_count() or 1), t_base)
    print(f"  every stage once, spread over the cores, or the baseline's I/O if slower: {floor_s:.2f} s for "
          f"{len(files)} frames = {mb / floor_s:.0f} MB/s = {t_base / floor_s:.2f}x the baseline; ingest takes "
          f"{t_ingest / floor_s:.2f}x this floor")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _floor(path: Path, n_frames: int) -> dict:
    """Seconds of each unavoidable stage of ingest on one frame (file in the page cache)."""
    import hashlib
    import io

    import numcodecs

    from fiberlake.storage.rawstore import RAW_CHUNK, RAW_CODEC, pixel_sha256
    from timing import best_of

    data = path.read_bytes()
    stages = {}
    stages["read the file (page cache)"], _ = best_of(path.read_bytes, 3)
    stages["SHA-256 of the file"], _ = best_of(lambda: hashlib.sha256(data).hexdigest(), 3)

    def validate():
        with fits.open(io.BytesIO(data), memmap=False, checksum=True, uint=True) as hdul:
            return np.array(hdul[0].data)
    stages["astropy parse + CHECKSUM/DATASUM + pixels"], pixels = best_of(validate, 3)
    stages["SHA-256 of the pixels"], _ = best_of(lambda: pixel_sha256(pixels), 3)
    codec = numcodecs.Blosc(cname=RAW_CODEC["cname"], clevel=RAW_CODEC["clevel"], shuffle=numcodecs.Blosc.BITSHUFFLE,
                            typesize=2)
    cols = RAW_CHUNK[1]
    chunks = [np.ascontiguousarray(pixels[:, c:c + cols]) for c in range(0, pixels.shape[1], cols)]
    t, packed = best_of(lambda: [codec.encode(c) for c in chunks], 3)
    stages[f"blosc {RAW_CODEC['cname']}-{RAW_CODEC['clevel']} bitshuffle, {numcodecs.blosc.get_nthreads()} threads "
           "(x cores: wall)"] = t * (os.cpu_count() or 1)
    out = path.with_suffix(".floor")
    def write():
        with open(out, "wb") as handle:
            for p in packed:
                handle.write(p)
            handle.flush()
            os.fsync(handle.fileno())
    stages["write + fsync of the compressed bytes"], _ = best_of(write, 3)
    out.unlink()
    return {"stages": stages, "frames": n_frames}


if __name__ == "__main__":
    main()
