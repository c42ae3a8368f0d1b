"""Benchmark: processing on Ray actors against in-process (``--no-ray``) at equal cores, cold and warm.

Two simulated nights (``--n-science`` and ``--large`` science frames, one camera) are ingested once
into a template lake whose calibration sets are built once; each run reduces one night's science
frames in a fresh copy of that lake (so every run loads its calibration set again, as a new night
does), and the figures compare frame reduction only. Printed, all measured in this run, each
against in-process on the same night:

* cold: the first job of a pool, the actors' start included (worker processes, imports, the
  calibration set loaded into each actor);
* warm: a second job on the actors the first one kept (``RayPool`` keeps them for the next job of
  the driver process: ``watch``, ``reprocess`` over nights), on the small and on the large night;
* one frame alone, where the only parallelism is the frame's tiles and bundles spread over the actors;
* ``before``: the call graph for every frame, calls run in submission order, actors stopped after
  each job (the executor before issue 19's Ray work), cold.

``ray.init`` (once per driver process) is printed apart, and the cold ratio with it.

Usage::

    python bench/ray.py --instrument mini --n-science 8 --large 24
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
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from fiberlake.ingest.simulate import simulate_night  # noqa: E402
from fiberlake.jobs import executors, process  # noqa: E402
from fiberlake.jobs.executors import init_ray, release_kept_actors  # noqa: E402
from fiberlake.jobs.ingest import ingest_night  # noqa: E402
from fiberlake.jobs.process import Executor, process_night  # noqa: E402
from fiberlake.processors.chunks import n_bundles  # noqa: E402
from fiberlake.processors.params import ReductionParams  # noqa: E402
from fiberlake.schemas.instrument import get_instrument  # noqa: E402
from fiberlake.storage.layout import Lake  # noqa: E402

SMALL, LARGE = "2026-12-03", "2026-12-04"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instrument", default="mini", choices=["mini", "lamost"])
    parser.add_argument("--camera", default="b1")
    parser.add_argument("--n-science", type=int, default=8, help="science frames of the small night")
    parser.add_argument("--large", type=int, default=24, help="science frames of the large night (0: none)")
    parser.add_argument("--extract", default="box,optimal")
    parser.add_argument("--chunk-fibers", type=int, default=25, help="fibers per bundle (0: whole frames)")
    parser.add_argument("--prepare-tiles", type=int, default=8, help="column tiles of a frame's preparation")
    parser.add_argument("--quick", action="store_true", help="2 actors of 1 CPU only (no 'before', no 1 actor x 2 CPUs)")
    parser.add_argument("--cli", action="store_true",
                        help="also the whole command, cold: `fiberlake process` on 2 actors against `--no-ray`, each a "
                             "new process (Python, imports, Ray's start, products; labels and denoising off)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fiberlake-raybench-"))
    try:
        bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench(args, work: Path) -> None:
    config = ReductionParams().updated({"extractions": tuple(args.extract.split(",")),
                                        "execution.chunk_fibers": args.chunk_fibers,
                                        "execution.prepare_tiles": args.prepare_tiles})
    template = Lake.at(work / "template")
    nights = {SMALL: args.n_science} | ({LARGE: args.large} if args.large else {})
    for seed, (night, n) in enumerate(nights.items(), start=9):
        simulate_night(args.instrument, night, work / "nights", seed=seed, n_bias=1, n_flat=1, n_arc=1,
                       n_science=n, n_standard=0, cameras=[args.camera])
        ingest_night(template, work / "nights" / night)
        # calibration sets once, in the template: the runs below time frame reduction only
        process_night(template, night, config=config, stop=lambda: True)
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    init_ray()
    t_init = time.perf_counter() - t0
    pool_seconds: list[float] = []
    real_make_pool = process.make_pool

    def run(executor: Executor, night: str, frames: int | None = None, cold: bool = False, **pool_options) -> float:
        """Seconds of one job (``process_night``) in a fresh copy of the template lake."""
        lake_dir = work / f"lake-{len(pool_seconds)}"
        shutil.copytree(template.root, lake_dir)
        if cold:
            release_kept_actors()
        left = [frames if frames is not None else nights[night]]

        def stop() -> bool:  # checked before each frame is handed out
            left[0] -= 1
            return left[0] < 0

        def make_pool(lake, cfg, ex):
            t = time.perf_counter()
            if ex.kind == "ray" and pool_options:
                pool = executors.RayPool(str(lake.root), cfg.to_dict(), n_actors=ex.actors, num_cpus=ex.cpus_per_actor,
                                         num_gpus=ex.gpus_per_actor, max_in_flight=ex.max_in_flight, **pool_options)
            else:
                pool = real_make_pool(lake, cfg, ex)
            pool_seconds[-1] = time.perf_counter() - t
            return pool

        pool_seconds.append(0.0)
        process.make_pool = make_pool
        try:
            start = time.perf_counter()
            report = process_night(Lake.at(lake_dir), night, config=config, executor=executor, stop=stop)
            seconds = time.perf_counter() - start
        finally:
            process.make_pool = real_make_pool
            shutil.rmtree(lake_dir, ignore_errors=True)
        want = frames if frames is not None else nights[night]
        assert len(report.done) == want and not report.failed, report.summary()
        return seconds

    local, two = Executor(kind="local"), Executor(kind="ray", actors=2)
    rows = []  # (mode, night, seconds, in-process seconds, pool start seconds)
    t_local = run(local, SMALL)
    if not args.quick:
        t = run(two, SMALL, cold=True, frame_calls="graph", out_of_order=False, keep=False)
        rows.append(("before: graph, in order, cold", SMALL, t, t_local, pool_seconds[-1]))
    t = run(two, SMALL, cold=True)
    rows.append(("2 x 1 CPU, cold", SMALL, t, t_local, pool_seconds[-1]))
    t_cold = t
    t = run(two, SMALL)
    rows.append(("2 x 1 CPU, warm", SMALL, t, t_local, pool_seconds[-1]))
    if args.large:
        t_big = run(local, LARGE)
        t = run(two, LARGE)
        rows.append(("2 x 1 CPU, warm", LARGE, t, t_big, pool_seconds[-1]))
    lat_local = run(local, SMALL, frames=1)
    t = run(two, SMALL, frames=1)
    rows.append(("2 x 1 CPU, warm, 1 frame", SMALL, t, lat_local, pool_seconds[-1]))
    if not args.quick:
        wide = Executor(kind="ray", actors=1, cpus_per_actor=2)
        t = run(wide, SMALL, cold=True)
        rows.append(("1 x 2 CPUs, cold", SMALL, t, t_local, pool_seconds[-1]))
        t = run(wide, SMALL)
        rows.append(("1 x 2 CPUs, warm", SMALL, t, t_local, pool_seconds[-1]))
    release_kept_actors()

    inst = get_instrument(args.instrument)
    print(f"{args.instrument} {args.camera}, {args.extract}, {args.chunk_fibers or 'whole'}-fiber bundles "
          f"({n_bundles(inst.n_fibers, args.chunk_fibers)} a frame), prepare in {args.prepare_tiles} tile(s) at most; "
          f"ray.init {t_init:.1f} s (once per driver process); load average {load_start:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end")
    print(f"{'mode':34s} {'frames':>6s} {'s':>7s} {'frames/s':>9s} {'in-process s':>13s} {'vs in-process':>14s} "
          f"{'pool start s':>13s}")
    print(f"{'in-process (--no-ray)':34s} {nights[SMALL]:6d} {t_local:7.2f} {nights[SMALL] / t_local:9.2f}")
    for mode, night, seconds, base, pool in rows:
        n = 1 if "1 frame" in mode else nights[night]
        print(f"{mode:34s} {n:6d} {seconds:7.2f} {n / seconds:9.2f} {base:13.2f} {base / seconds:14.2f} {pool:13.2f}")
    if args.cli:
        cli = {}
        for name, flags in (("--no-ray", ["--no-ray"]), ("2 actors", ["--actors", "2"])):
            lake_dir = work / f"cli-{len(cli)}"
            shutil.copytree(template.root, lake_dir)
            command = [sys.executable, "-m", "fiberlake.jobs.cli", "process", "--lake", str(lake_dir), "--night", SMALL,
                       "--extract", args.extract, "--chunk-fibers", str(args.chunk_fibers), "--prepare-tiles",
                       str(args.prepare_tiles), "--no-classify", "--no-denoise", "--quiet", *flags]
            t = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            cli[name] = time.perf_counter() - t
            shutil.rmtree(lake_dir, ignore_errors=True)
        print(f"whole command, cold, {nights[SMALL]} frames: --no-ray {cli['--no-ray']:.2f} s, 2 actors "
              f"{cli['2 actors']:.2f} s: {cli['--no-ray'] / cli['2 actors']:.2f}x")
    print(f"cold with ray.init: {t_cold + t_init:.2f} s, {t_local / (t_cold + t_init):.2f}x in-process; "
          f"the cold job's fixed cost over the warm one: {t_cold - rows[[r[0] for r in rows].index('2 x 1 CPU, warm')][2]:+.2f} s")


if __name__ == "__main__":
    main()
