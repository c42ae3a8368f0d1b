"""A night end to end: frames per hour, each stage's share, and the extrapolation to LAMOST and DR10.

Usage: ``python bench/night.py [--instrument mini] [--cameras b1,r1] [--n-science 3]
[--lamost-frame-seconds 88.7]``

Simulates a night (one bias, flat and arc per camera, ``--n-science`` science and one standard
exposure), then times in this process, one after the other: ingest (``ingest_night``), the
calibration sets (``process_night`` stopped before the first frame), and the frames with their
products (``process_night``). The frames' own seconds come from the ``reductions`` markers; the
stages after the frames (products: flux calibration and coadds; the denoise and classify stages)
are timed by wrapping them; the rest of that step is commits. Printed: seconds and
share of each stage, frames per hour end to end.

The extrapolation uses one LAMOST frame's CPU seconds (``--lamost-frame-seconds``; default the
1-core, 8-tile figure of ``bench/prepare.py``, box + optimal, cosmics, rectification, measured at
load 8), this run's seconds per spectrum row of the stages after the frames (x 250 fibers x the
extractions), and ``--lamost-calib-seconds`` per camera and night: a full LAMOST night (32
cameras x ``--lamost-exposures`` exposures) and DR10 (11.4 M spectra = 11.4 M / 4000 plates x 3
exposures x 32 cameras frames) on N nodes of ``--node-cores`` cores, the work spread evenly.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where bench/typing.py would shadow the
# standard library's typing module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from fiberlake.ingest.simulate import simulate_night  # noqa: E402
from fiberlake.jobs.ingest import ingest_night  # noqa: E402
from fiberlake.jobs.process import process_night  # noqa: E402
from fiberlake.processors.params import ReductionParams  # noqa: E402
from fiberlake.storage.layout import Lake  # noqa: E402
from fiberlake.storage.tables import TableStore  # noqa: E402

NIGHT = "2026-12-07"
DR10_SPECTRA = 11.4e6
SPECTRA_PER_PLATE = 4000  # 16 spectrographs x 250 fibers


def _time_stages_after_frames() -> dict[str, float]:
    """Wrap the stages that run after the frames with timers; their seconds land in the dict returned."""
    from fiberlake.jobs import classify_stage, denoise_stage, products

    seconds: dict[str, float] = {}

    def timer(module, attr: str, name: str) -> None:
        real = getattr(module, attr)

        def wrapped(*a, **k):
            t0 = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0

        setattr(module, attr, wrapped)

    timer(products, "build_products", "products (fluxcal, coadds)")
    timer(denoise_stage, "run_after_products", "denoise stage")
    timer(classify_stage, "run_after_products", "classify stage")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instrument", default="mini")
    ap.add_argument("--cameras", default="b1,r1")
    ap.add_argument("--n-science", type=int, default=3)
    ap.add_argument("--extract", default="box,optimal")
    ap.add_argument("--lamost-frame-seconds", type=float, default=88.7)
    ap.add_argument("--lamost-exposures", type=int, default=9, help="science + standard exposures of a LAMOST night")
    ap.add_argument("--lamost-calib-seconds", type=float, default=177.5,
                    help="CPU seconds of one LAMOST calibration set (box + optimal, rectification; measured apart)")
    ap.add_argument("--node-cores", type=int, default=16)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fiberlake-night-"))
    cameras = args.cameras.split(",")
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    simulate_night(args.instrument, NIGHT, work / "raw", seed=77, n_bias=1, n_flat=1, n_arc=1,
                   n_science=args.n_science, n_standard=1, cameras=cameras)
    t_sim = time.perf_counter() - t0
    lake = Lake.at(work / "lake")
    config = ReductionParams().updated({"extractions": tuple(args.extract.split(","))})
    stages = {}
    t0 = time.perf_counter()
    ingest_night(lake, work / "raw" / NIGHT)
    stages["ingest"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    process_night(lake, NIGHT, config=config, stop=lambda: True)
    stages["calibration sets"] = time.perf_counter() - t0
    timed = _time_stages_after_frames()
    t0 = time.perf_counter()
    report = process_night(lake, NIGHT, config=config)
    t_rest = time.perf_counter() - t0
    markers = TableStore(lake.root / "tables").read("reductions").to_pylist()
    frame_s = sum(m["seconds"] or 0.0 for m in markers)
    frames = len(report.done)
    stages["frames (reductions)"] = frame_s
    stages |= timed
    stages["commits and the rest"] = max(0.0, t_rest - frame_s - sum(timed.values()))
    total = sum(stages.values())
    print(f"\n{args.instrument} night: {len(cameras)} cameras, {frames} frames reduced ({len(report.failed)} failed), "
          f"{report.n_spectra} spectra rows; simulated in {t_sim:.0f} s (not counted)")
    print(f"{'stage':24s} {'s':>8s} {'share':>7s}")
    for name, s in stages.items():
        print(f"{name:24s} {s:8.1f} {100 * s / total:6.1f}%")
    print(f"{'total':24s} {total:8.1f}   frames per hour end to end: {3600 * frames / total:.0f}")
    # extrapolation: the stages after the frames cost per spectrum row as in this run; calibration
    # sets per camera and night at the LAMOST figure measured apart
    after = sum(timed.values()) / max(report.n_spectra, 1)
    rows_per_frame = 250 * len(config.extractions)
    lamost_frame = args.lamost_frame_seconds + after * rows_per_frame
    night_frames = 32 * args.lamost_exposures
    night_cpu = night_frames * lamost_frame + 32 * args.lamost_calib_seconds
    dr10_frames = DR10_SPECTRA / SPECTRA_PER_PLATE * 3 * 32
    dr10_cpu = dr10_frames / night_frames * night_cpu
    print(f"\nextrapolation: a LAMOST frame {args.lamost_frame_seconds:.1f} CPU-s reduced + {after * rows_per_frame:.1f} CPU-s "
          f"after the frames ({after:.2f} s per spectrum row here x {rows_per_frame} rows) = {lamost_frame:.1f} CPU-s; "
          f"32 calibration sets a night at {args.lamost_calib_seconds:.0f} CPU-s each")
    print(f"{'nodes x cores':16s} {'LAMOST night (' + str(night_frames) + ' frames), h':>30s} "
          f"{'DR10 (' + f'{dr10_frames:,.0f}' + ' frames), days':>32s}")
    for nodes in (1, 10, 100):
        cores = nodes * args.node_cores
        print(f"{f'{nodes} x {args.node_cores}':16s} {night_cpu / cores / 3600:30.2f} {dr10_cpu / cores / 86400:32.1f}")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
