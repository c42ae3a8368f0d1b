"""Benchmark: processing on Ray actors against in-process (``--no-ray``) on the same frames.

A simulated night is ingested once into a template lake whose calibration sets are built once;
each mode then reduces the same science frames in a fresh copy of it, so the figures compare
frame reduction only. Printed, all measured in this run: frames/s in process, on 1 and on 2
Ray actors of 1 CPU and on 1 actor of 2 CPUs (on a machine with GPUs, actors take one GPU
each), the scaling efficiency of 2
actors over 1, and Ray's overhead against in-process (including the actors' start, which loads
the calibration sets into each actor); then the same for one frame alone, where the only
parallelism is the frame's fiber bundles spread over the actors. Ray's own start-up
(``ray.init``) is printed apart.

Usage::

    python bench/ray.py --instrument mini --n-science 8
"""

from __future__ import annotations

import sys
from pathlib import Path

# This script is named like the library it measures: keep `import ray` from importing itself.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from fiberlake.ingest.simulate import simulate_night  # noqa: E402
from fiberlake.jobs.executors import init_ray  # noqa: E402
from fiberlake.jobs.ingest import ingest_night  # noqa: E402
from fiberlake.jobs.process import Executor, process_night  # noqa: E402
from fiberlake.processors.chunks import n_bundles  # noqa: E402
from fiberlake.processors.params import ReductionParams  # noqa: E402
from fiberlake.schemas.instrument import get_instrument  # noqa: E402
from fiberlake.storage.layout import Lake  # noqa: E402

NIGHT = "2026-12-03"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instrument", default="mini", choices=["mini", "lamost"])
    parser.add_argument("--camera", default="b1")
    parser.add_argument("--n-science", type=int, default=8)
    parser.add_argument("--extract", default="box,optimal")
    parser.add_argument("--chunk-fibers", type=int, default=25, help="fibers per bundle (0: whole frames)")
    parser.add_argument("--prepare-tiles", default="8",
                        help="column tiles of a frame's preparation, or several (e.g. 1,8: each measured in this run; "
                             "1 prepares the whole frame on one actor, as before issue 19)")
    parser.add_argument("--quick", action="store_true", help="in-process and 2 actors only")
    args = parser.parse_args()
    for tiles in [int(t) for t in args.prepare_tiles.split(",")]:
        bench(args, tiles)


def bench(args, tiles: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="fiberlake-raybench-"))
    config = ReductionParams().updated({"extractions": tuple(args.extract.split(",")), "execution.chunk_fibers": args.chunk_fibers,
                                        "execution.prepare_tiles": tiles})
    simulate_night(args.instrument, NIGHT, work / "nights", seed=9, n_bias=1, n_flat=1, n_arc=1,
                   n_science=args.n_science, n_standard=0, cameras=[args.camera])
    template = Lake.at(work / "template")
    ingest_night(template, work / "nights" / NIGHT)
    # calibration sets once, in the template: the runs below time frame reduction only
    process_night(template, NIGHT, config=config, stop=lambda: True)
    t0 = time.perf_counter()
    init_ray()
    t_init = time.perf_counter() - t0

    def run(executor: Executor, frames: int | None = None) -> float:
        lake_dir = work / f"lake-{executor.kind}-{executor.actors}-{executor.cpus_per_actor}-{frames}"
        shutil.copytree(template.root, lake_dir)
        left = [frames if frames is not None else args.n_science]

        def stop() -> bool:  # checked before each frame is handed out
            left[0] -= 1
            return left[0] < 0

        start = time.perf_counter()
        report = process_night(Lake.at(lake_dir), NIGHT, config=config, executor=executor, stop=stop)
        seconds = time.perf_counter() - start
        assert len(report.done) == (frames or args.n_science) and not report.failed, report.summary()
        return seconds

    t_local = run(Executor(kind="local"))
    t_two = run(Executor(kind="ray", actors=2))
    lat_local = run(Executor(kind="local"), frames=1)
    lat_two = run(Executor(kind="ray", actors=2), frames=1)
    modes = [("in-process (--no-ray)", t_local, lat_local), ("Ray, 2 CPU actors", t_two, lat_two)]
    if not args.quick:
        t_one = run(Executor(kind="ray", actors=1))
        wide = Executor(kind="ray", actors=1, cpus_per_actor=2)
        t_wide = run(wide)
        lat_one = run(Executor(kind="ray", actors=1), frames=1)
        lat_wide = run(wide, frames=1)
        modes[1:1] = [("Ray, 1 CPU actor", t_one, lat_one)]
        modes.append(("Ray, 1 actor x 2 CPUs", t_wide, lat_wide))
    n = args.n_science
    print(f"{n} {args.instrument} {args.camera} science frames, {args.extract}, {args.chunk_fibers or 'whole'}-fiber "
          f"bundles ({n_bundles(get_instrument(args.instrument).n_fibers, args.chunk_fibers)} a frame), "
          f"prepare in {tiles} tile(s); ray.init {t_init:.1f} s (once per job); load average {os.getloadavg()[0]:.1f}")
    print(f"{'mode':28s} {'s':>7s} {'frames/s':>9s} {'vs in-process':>14s} {'1 frame, s':>11s} {'vs in-process':>14s}")
    for name, seconds, lat in modes:
        print(f"{name:28s} {seconds:7.1f} {n / seconds:9.2f} {t_local / seconds:14.2f} {lat:11.1f} {lat_local / lat:14.2f}")
    if not args.quick:
        print(f"scaling efficiency, 2 actors over 1: {t_one / t_two / 2:.2f} (throughput), "
              f"{lat_one / lat_two / 2:.2f} (one frame's bundles)")
        print(f"Ray overhead, 1 actor against in-process: {t_one - t_local:+.1f} s ({(t_one / t_local - 1) * 100:+.0f} %)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
