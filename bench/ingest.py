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

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

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

    mb = raw_bytes / 1e6
    print(f"{len(files)} full-size LAMOST frames ({LAMOST.raw_shape[0]}x{LAMOST.raw_shape[1]} uint16), "
          f"{mb:.0f} MB of pixels; simulated in {t_sim:.1f} s ({t_sim / len(files):.2f} s/frame)")
    print(f"{'path':<44}{'seconds':>9}{'MB/s':>9}{'vs baseline':>13}")
    print(f"{'baseline: astropy read + numpy.save + fsync':<44}{t_base:9.2f}{mb / t_base:9.1f}{1.0:13.2f}")
    print(f"{'fiberlake ingest (validate+hash+zarr+delta)':<44}{t_ingest:9.2f}{mb / t_ingest:9.1f}{t_base / t_ingest:13.2f}")
    print(f"{'re-ingest (all duplicates, hash only)':<44}{t_again:9.2f}{mb / t_again:9.1f}{t_base / t_again:13.2f}")
    print(f"compression ratio of stored raw arrays: {raw_bytes / stored:.2f}x "
          f"({stored / 1e6:.0f} MB on disk); duplicates on re-ingest: {len(again.duplicates)}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
