"""Benchmark: a simulated night arriving over time, taken by ``fiberlake watch``.

Prints two tables, all figures measured in this run:

1. Burst ingest of the whole night (every file already there): frames/s and MB/s of
   :func:`~fiberlake.jobs.ingest.ingest_files` against the baseline of plain reading and writing
   the same bytes (read each file, write it to a new file, fsync), i.e. the floor of any ingest
   that keeps a copy.
2. Streaming: the same frames land in a watched directory one by one (calibrations first, in
   observation order, each written in 4 MiB pieces as an acquisition system would) with
   ``--interval`` seconds between frames. Latency from a file being complete in the directory
   to (a) its row in ``exposures`` and (b) for science frames, its spectra being queryable
   (its ``reductions`` row, committed after the spectra), p50/p95/max.

Usage::

    python bench/nightly.py --instrument lamost --cameras b1 --n-science 3 --interval 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
from astropy.io import fits

from fiberlake.ingest.simulate import simulate_night
from fiberlake.jobs.ingest import ingest_files, list_delivered
from fiberlake.jobs.query import sql
from fiberlake.jobs.watch import watch_night
from fiberlake.processors.params import ReductionParams
from fiberlake.storage.layout import Lake
from fiberlake.storage.lock import LakeLock

NIGHT = "2026-12-01"
PIECE = 4 << 20


def baseline_read_write(files: list[Path], scratch: Path) -> float:
    """Seconds to read every file and write it to a new file with fsync."""
    scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for path in files:
        data = path.read_bytes()
        with open(scratch / path.name, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return time.perf_counter() - t0


def observation_order(files: list[Path]) -> list[Path]:
    """Calibrations first, then fiber maps with their science frames, by exposure id."""
    rank = {"BIAS": 0, "FLAT": 1, "ARC": 2}

    def key(path: Path):
        header = fits.getheader(path)
        obstype = header.get("OBSTYPE", "")
        return (rank.get(obstype, 3), int(header.get("EXPID", 0)), "fibermap" not in path.name, path.name)

    return sorted(files, key=key)


def deliver(files: list[Path], night_dir: Path, interval: float, landed: dict[str, float], stop: threading.Event) -> None:
    """Write each file into ``night_dir`` piece by piece, ``interval`` seconds apart."""
    for path in files:
        if stop.is_set():
            return
        data = path.read_bytes()
        with open(night_dir / path.name, "wb") as handle:
            for start in range(0, len(data), PIECE):
                handle.write(data[start:start + PIECE])
                handle.flush()
        landed[path.name] = time.time()
        stop.wait(interval)


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    v = np.asarray(values)
    return f"{np.percentile(v, 50):7.1f} {np.percentile(v, 95):7.1f} {v.max():7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instrument", default="lamost", choices=["lamost", "mini"])
    parser.add_argument("--cameras", default="b1", help="comma-separated cameras")
    parser.add_argument("--n-science", type=int, default=3)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between two frames landing")
    parser.add_argument("--extract", default="box,optimal")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--no-stream", action="store_true", help="burst ingest table only")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fiberlake-nightly-"))
    staged = work / "staged"
    t0 = time.perf_counter()
    if not (staged / NIGHT).is_dir():  # a kept --workdir reuses its simulated night
        simulate_night(args.instrument, NIGHT, staged, seed=args.seed, n_bias=2, n_flat=1, n_arc=1,
                       n_science=args.n_science, n_standard=0, cameras=args.cameras.split(","))
    files = list_delivered(staged / NIGHT)
    frames = [p for p in files if "fibermap" not in p.name]
    nbytes = sum(p.stat().st_size for p in files)
    print(f"simulated {len(frames)} {args.instrument} frames ({nbytes / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")

    # 1. burst ingest against plain read + write of the same bytes
    for scratch in ("copy", "lake-burst", "incoming", "lake-stream"):
        shutil.rmtree(work / scratch, ignore_errors=True)
    t_base = baseline_read_write(files, work / "copy")
    lake = Lake.at(work / "lake-burst")
    t0 = time.perf_counter()
    with LakeLock(lake.root, "bench"):
        report = ingest_files(lake, files, NIGHT)
    t_ingest = time.perf_counter() - t0
    assert len(report.ingested) == len(frames), report.summary()
    mb = nbytes / 1e6
    print("\nburst ingest of the night (all files present)")
    print(f"{'path':58s} {'frames/s':>9s} {'MB/s':>8s} {'vs baseline':>12s}")
    print(f"{'read + write + fsync of the same bytes (baseline)':58s} {len(frames) / t_base:9.2f} {mb / t_base:8.0f} {1.0:12.2f}")
    print(f"{'fiberlake ingest (validate, hash, zarr publish, delta)':58s} {len(frames) / t_ingest:9.2f} "
          f"{mb / t_ingest:8.0f} {t_base / t_ingest:12.2f}")

    if args.no_stream:
        return
    # 2. streaming: frames land over time while the watcher ingests and reduces
    night_dir = work / "incoming" / NIGHT
    night_dir.mkdir(parents=True)
    lake = Lake.at(work / "lake-stream")
    stop, landed = threading.Event(), {}
    config = ReductionParams().updated({"extractions": tuple(args.extract.split(","))})
    watcher_report = {}
    watcher = threading.Thread(target=lambda: watcher_report.setdefault("r", watch_night(
        lake, night_dir, poll=0.5, settle=0.5, config=config, stop=stop)))
    t_start = time.time()
    watcher.start()
    order = observation_order(files)
    deliver(order, night_dir, args.interval, landed, threading.Event())
    n_science = sum(1 for p in frames if fits.getheader(p)["OBSTYPE"] in ("SCIENCE", "STANDARD"))
    deadline = time.time() + 3600
    while time.time() < deadline:
        if (lake.root / "tables" / "reductions").exists() and \
                sql(lake, "SELECT count(*) AS n FROM reductions")["n"][0] >= n_science:
            break
        time.sleep(0.5)
    stop.set()
    watcher.join()
    t_total = time.time() - t_start

    def epoch(column: pl.Series) -> list[float]:
        return [v.replace(tzinfo=dt.timezone.utc).timestamp() if v.tzinfo is None else v.timestamp() for v in column]

    exposures = sql(lake, "SELECT filename, obstype, ingested_at FROM exposures")
    ingest_lat = [t - landed[f] for f, t in zip(exposures["filename"], epoch(exposures["ingested_at"]))]
    reductions = sql(lake, "SELECT r.reduced_at, e.filename FROM reductions r JOIN exposures e "
                           "ON r.night = e.night AND r.expid = e.expid AND r.camera = e.camera")
    reduce_lat = [t - landed[f] for f, t in zip(reductions["filename"], epoch(reductions["reduced_at"]))]
    print(f"\nstreaming: {len(order)} files landing {args.interval:.0f} s apart, {args.extract} extraction, "
          f"{t_total:.0f} s wall in all")
    print(f"{'latency from landing (s)':42s} {'n':>4s} {'p50':>7s} {'p95':>7s} {'max':>7s}")
    print(f"{'-> row in exposures (raw queryable)':42s} {len(ingest_lat):4d} {percentiles(ingest_lat)}")
    print(f"{'-> spectra queryable (science frames)':42s} {len(reduce_lat):4d} {percentiles(reduce_lat)}")
    print(f"frames ingested per second of wall time: {len(exposures) / t_total:.2f} "
          f"(bounded by the arrival rate, 1/{args.interval:.0f} s)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
