"""The ``fiberlake`` command: simulate, ingest, watch, process, query, compact, vacuum, verify, evaluate, demo.

Every subcommand exits 0 on success and non-zero with one line ``fiberlake: error: <reason>`` on
failure (``--traceback`` shows the full stack for debugging).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_LAKE = "./lake"


def _add_lake(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lake", default=DEFAULT_LAKE,
                        help=f"lake root: a directory or s3://bucket/prefix (AWS_* variables; default {DEFAULT_LAKE})")


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fiberlake.ingest.simulate import simulate_night

    paths = simulate_night(
        args.instrument, args.night, args.out, seed=args.seed, n_science=args.n_science, progress=not args.quiet
    )
    print(f"wrote {len(paths)} raw frames to {Path(args.out) / args.night}")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from fiberlake.jobs.ingest import ingest_night
    from fiberlake.storage.layout import Lake

    lake = Lake.at(args.lake)
    for night_dir in args.night_dirs:
        report = ingest_night(lake, night_dir, progress=not args.quiet, settle=args.settle)
        print(f"{night_dir}: {report.summary()}")
        for name, reason in report.quarantined:
            print(f"  quarantined {name}: {reason}")
        for name, why in report.waiting:
            print(f"  left for the next run: {name}: {why}")
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    from fiberlake.jobs.watch import watch_night
    from fiberlake.storage.layout import Lake

    config = _reduction_params(args)
    report = watch_night(
        Lake.at(args.lake), args.night_dir, poll=args.poll, settle=args.settle, stale_after=args.stale_after,
        process=not args.no_process, config=config, once=args.once, log=lambda line: print(line, flush=True),
    )
    print(report.summary())
    return 0 if not report.failed else 3


def _cmd_compact(args: argparse.Namespace) -> int:
    from fiberlake.jobs.upkeep import compact
    from fiberlake.storage.layout import Lake

    for name, (before, after) in compact(Lake.at(args.lake), args.night).items():
        print(f"{name:12s} {before:6d} -> {after:6d} files")
    return 0


def _cmd_vacuum(args: argparse.Namespace) -> int:
    from fiberlake.jobs.upkeep import vacuum
    from fiberlake.storage.layout import Lake

    report = vacuum(Lake.at(args.lake), args.retention_hours, dry_run=args.dry_run)
    print(("would remove: " if args.dry_run else "removed: ") + report.summary())
    for rel in report.orphan_arrays + report.temporaries:
        print(f"  {rel}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from fiberlake.jobs.upkeep import verify
    from fiberlake.storage.layout import Lake

    report = verify(Lake.at(args.lake), args.night)
    for problem in report.problems:
        print(f"  MISMATCH {problem}")
    print(report.summary())
    return 0 if report.ok else 2


def _reduction_params(args: argparse.Namespace):
    """ReductionParams from the reduction flags shared by ``process`` and ``watch``."""
    from fiberlake.jobs.process import ProcessConfig

    return ProcessConfig(extractions=tuple(args.extract.split(",")), cosmics=not args.no_cosmics,
                         psf_invariant=args.psf_invariant, deconv_device=args.deconv_device,
                         rectify=not args.no_rectify, rectify_map=args.rectify_map,
                         rectify_sampling=args.rectify_sampling, rectify_labels=args.rectify_labels,
                         chunk_fibers=args.chunk_fibers, chunk_margin=args.chunk_margin)


def _add_reduction_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--extract", default="box,optimal",
                        help="comma-separated extractions: box, optimal, deconv (spectro-perfectionism)")
    parser.add_argument("--no-cosmics", action="store_true", help="skip cosmic-ray detection")
    parser.add_argument("--psf-invariant", action="store_true",
                        help="deconv: one PSF for the whole frame (rectified frames) instead of one varying over the CCD")
    parser.add_argument("--deconv-device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="deconv: torch device (auto: CUDA when available)")
    parser.add_argument("--no-rectify", action="store_true",
                        help="skip the aberration correction (seed 000): extract on the distorted frames")
    parser.add_argument("--rectify-map", default="legendre", choices=("legendre", "mlp"),
                        help="aberration map: 2D Legendre warp (default) or the paper's 2-20-2 MLP (torch)")
    parser.add_argument("--rectify-sampling", default="semicircle", choices=("semicircle", "uniform"),
                        help="training samples along the traces: semicircle (eq. 13, default) or uniform")
    parser.add_argument("--rectify-labels", default="slit", choices=("slit", "tls"),
                        help="target lines: parallel and equally spaced (slit, default) or each trace's TLS line (tls, the paper)")
    parser.add_argument("--chunk-fibers", type=int, default=25,
                        help="fibers per bundle, the unit of work of the extraction (0: whole frames)")
    parser.add_argument("--chunk-margin", type=int, default=2,
                        help="neighbour fibers extracted with each bundle on either side")


def _cmd_process(args: argparse.Namespace) -> int:
    from fiberlake.jobs.process import process_night
    from fiberlake.storage.layout import Lake

    config = _reduction_params(args)
    report = process_night(Lake.at(args.lake), args.night, config=config, progress=not args.quiet,
                           force=args.force, retry_failed=args.retry_failed, executor=_executor(args),
                           batch_frames=args.batch_frames)
    print(report.summary())
    return 0 if not report.failed else 3


def _executor(args: argparse.Namespace):
    """Executor from the Ray flags (Ray by default, ``--no-ray`` in this process)."""
    from fiberlake.jobs.process import Executor

    if args.no_ray:
        return Executor(kind="local")
    return Executor(kind="ray", actors=args.actors, gpus_per_actor=args.gpus_per_actor, address=args.address,
                    cpus_per_actor=args.cpus_per_actor)


def _add_ray_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-ray", action="store_true", help="run in this process (debugging); same tables as Ray")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray)")
    parser.add_argument("--actors", type=int, default=2, help="Ray actors (default 2)")
    parser.add_argument("--cpus-per-actor", type=int, default=1,
                        help="CPUs (and OpenMP threads) each actor reserves (default 1)")
    parser.add_argument("--gpus-per-actor", type=float, default=1.0,
                        help="GPUs per actor when the cluster has GPUs; fractions share a GPU (default 1)")
    parser.add_argument("--batch-frames", type=int, default=8, help="frames per table commit (default 8)")


def _cmd_reprocess(args: argparse.Namespace) -> int:
    from fiberlake.jobs.reprocess import reprocess
    from fiberlake.storage.layout import Lake

    report = reprocess(Lake.at(args.lake), release=args.release, nights=args.nights, config=_reduction_params(args),
                       executor=_executor(args), progress=not args.quiet, batch_frames=args.batch_frames)
    print(report.summary())
    return 0 if not report.failed else 3


def _cmd_query(args: argparse.Namespace) -> int:
    import polars as pl

    from fiberlake.jobs.query import sql
    from fiberlake.storage.layout import Lake

    result = sql(Lake.at(args.lake), args.sql, as_of=args.as_of)
    if args.format == "table":
        with pl.Config(tbl_rows=args.max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=160):
            print(result)
    elif args.format == "csv":
        flat = result.select([c for c in result.columns if not isinstance(result.schema[c], (pl.List, pl.Array))])
        sys.stdout.write(flat.write_csv())
    elif args.format == "json":
        sys.stdout.write(result.write_ndjson())
    elif args.format == "parquet":
        if not args.output:
            raise ValueError("--format parquet needs --output FILE")
        result.write_parquet(args.output)
        print(f"wrote {result.height} rows to {args.output}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import polars as pl

    from fiberlake.jobs.evaluate import evaluate_night, format_report
    from fiberlake.storage.layout import Lake

    night_dir = Path(args.truth)
    results = evaluate_night(Lake.at(args.lake), args.night, night_dir)
    with pl.Config(tbl_rows=100, tbl_cols=-1, tbl_width_chars=250):
        print(format_report(results))
    return 0


def _cmd_evaluate_rectify(args: argparse.Namespace) -> int:
    from fiberlake.jobs.evaluate_rectify import evaluate_rectification, format_tables, write_tables

    def values(text: str, kind=str):
        return tuple(kind(v) for v in text.split(",") if v)

    tables = evaluate_rectification(
        instrument=args.instrument, seeds=values(args.seeds, int), ks=values(args.k, float),
        psf_models=values(args.psf), cameras=values(args.cameras), variants=values(args.variants),
        extractions=values(args.extract), progress=not args.quiet)
    print(format_tables(tables))
    if args.out:
        write_tables(tables, args.out)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fiberlake.jobs.demo import run_demo

    run_demo(Path(args.workdir), seed=args.seed, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fiberlake`` command."""
    parser = argparse.ArgumentParser(prog="fiberlake", description="Streaming data lake for multi-fiber spectroscopy.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="write a simulated night of raw FITS frames with truth files")
    p.add_argument("--instrument", default="mini", choices=["mini", "lamost"], help="instrument (default mini)")
    p.add_argument("--night", default="2026-11-21", help="night, YYYY-MM-DD")
    p.add_argument("--out", required=True, help="output directory; the night goes to OUT/NIGHT/")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--n-science", type=int, default=2, help="science exposures")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("ingest", help="ingest night directories of raw FITS into the lake")
    p.add_argument("night_dirs", nargs="+", metavar="NIGHT_DIR", help="directories of delivered frames")
    _add_lake(p)
    p.add_argument("--settle", type=float, default=5.0,
                   help="files changed less than this many seconds ago are left for the next run (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("watch", help="ingest frames as they land in a night directory and reduce science at once")
    p.add_argument("night_dir", metavar="NIGHT_DIR", help="directory the acquisition system writes into")
    _add_lake(p)
    p.add_argument("--once", action="store_true", help="take what is there, reduce what can be, and exit")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between looks at the directory (default 2)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds a file must stay unchanged (default 1)")
    p.add_argument("--stale-after", type=float, default=300.0,
                   help="seconds after which an unchanged incomplete file is quarantined as truncated (default 300)")
    p.add_argument("--no-process", action="store_true", help="ingest only")
    _add_reduction_flags(p)
    p.set_defaults(func=_cmd_watch)

    p = sub.add_parser("process", help="reduce a night's science frames to calibrated spectra")
    p.add_argument("--night", required=True, help="night to process, YYYY-MM-DD")
    _add_lake(p)
    _add_reduction_flags(p)
    _add_ray_flags(p)
    p.add_argument("--force", action="store_true", help="rebuild calibrations and reduce every frame again")
    p.add_argument("--retry-failed", action="store_true", help="reduce again frames that failed with the same inputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_process)

    p = sub.add_parser("reprocess", help="reduce every exposure of a release again into one resumable run")
    _add_lake(p)
    p.add_argument("--release", default="all", help="name of the data release (part of the run id)")
    p.add_argument("--nights", nargs="+", default=None, help="nights to include (default: every night)")
    _add_reduction_flags(p)
    _add_ray_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_reprocess)

    p = sub.add_parser("query", help="run SQL over the lake's tables (Polars SQL)")
    p.add_argument("sql", help="SQL query; tables: exposures quarantine deliveries fibermap spectra metrics "
                   "reductions runs")
    _add_lake(p)
    p.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    p.add_argument("--output", help="output file for --format parquet")
    p.add_argument("--as-of", default=None,
                   help="time travel: an ISO 8601 time (every table as it was then) or a Delta version number")
    p.add_argument("--max-rows", type=int, default=40, help="rows shown with --format table")
    p.set_defaults(func=_cmd_query)

    p = sub.add_parser("compact", help="merge small table files (one night or all) and checkpoint the logs")
    _add_lake(p)
    p.add_argument("--night", default=None, help="night partition to compact (default: all)")
    p.set_defaults(func=_cmd_compact)

    p = sub.add_parser("vacuum", help="delete table files and raw arrays nothing references any more")
    _add_lake(p)
    p.add_argument("--retention-hours", type=float, default=168.0,
                   help="keep what is younger than this (default 168); older versions can no longer be queried")
    p.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    p.set_defaults(func=_cmd_vacuum)

    p = sub.add_parser("verify", help="re-read raw arrays and check them against the hashes recorded at ingest")
    _add_lake(p)
    p.add_argument("--night", default=None, help="night to verify (default: all)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("evaluate", help="compare a processed simulated night with its truth files")
    p.add_argument("--night", required=True, help="night, YYYY-MM-DD")
    p.add_argument("--truth", required=True, help="the simulated night directory (with truth/)")
    _add_lake(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("evaluate-rectify",
                       help="aberration correction before/after on simulated cameras (map, PSF, Tables 2-3)")
    p.add_argument("--instrument", default="mini", choices=["mini", "lamost"])
    p.add_argument("--seeds", default="31,32", help="comma-separated simulation seeds (default: seeds no test uses)")
    p.add_argument("--k", default="0.012,0.02,0.03", help="comma-separated pincushion coefficients")
    p.add_argument("--psf", default="distortion,radial", help="simulator PSF models: distortion, radial")
    p.add_argument("--cameras", default="b1,r1")
    p.add_argument("--variants", default="none,legendre,legendre-slit",
                   help="none, legendre, legendre-uniform, legendre-slit, mlp, mlp-uniform, mlp-slit, mlp-direct")
    p.add_argument("--extract", default="box,optimal")
    p.add_argument("--out", help="directory for the tables as CSV and JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_evaluate_rectify)

    p = sub.add_parser("demo", help="simulate a mini night, ingest, process and report")
    p.add_argument("--workdir", default="./fiberlake-demo", help="directory for the night and the lake")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fiberlake`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("fiberlake: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one readable line, not a stack, for people
        if args.traceback:
            raise
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"fiberlake: error: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
