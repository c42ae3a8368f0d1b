"""The ``fiberlake`` command: simulate, ingest, process, query, evaluate, demo.

Every subcommand exits 0 on success and non-zero with one line ``fiberlake: error: <reason>`` on
failure (``--traceback`` shows the full stack for debugging).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_LAKE = "./lake"


def _add_lake(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lake", default=DEFAULT_LAKE, help=f"lake root directory (default {DEFAULT_LAKE})")


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
        report = ingest_night(lake, night_dir, progress=not args.quiet)
        print(f"{night_dir}: {report.summary()}")
        for name, reason in report.quarantined:
            print(f"  quarantined {name}: {reason}")
    return 0


def _cmd_process(args: argparse.Namespace) -> int:
    from fiberlake.jobs.process import ProcessConfig, process_night
    from fiberlake.storage.layout import Lake

    config = ProcessConfig(extractions=tuple(args.extract.split(",")), cosmics=not args.no_cosmics)
    report = process_night(Lake.at(args.lake), args.night, config=config, progress=not args.quiet)
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("process", help="reduce a night's science frames to calibrated spectra")
    p.add_argument("--night", required=True, help="night to process, YYYY-MM-DD")
    _add_lake(p)
    p.add_argument("--extract", default="box,optimal", help="comma-separated extractions: box, optimal")
    p.add_argument("--no-cosmics", action="store_true", help="skip cosmic-ray detection")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_process)

    p = sub.add_parser("query", help="run SQL over the lake's tables (Polars SQL)")
    p.add_argument("sql", help="SQL query; tables: exposures quarantine fibermap spectra metrics runs")
    _add_lake(p)
    p.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    p.add_argument("--output", help="output file for --format parquet")
    p.add_argument("--as-of", type=int, default=None, help="read every table as of this Delta version")
    p.add_argument("--max-rows", type=int, default=40, help="rows shown with --format table")
    p.set_defaults(func=_cmd_query)

    p = sub.add_parser("evaluate", help="compare a processed simulated night with its truth files")
    p.add_argument("--night", required=True, help="night, YYYY-MM-DD")
    p.add_argument("--truth", required=True, help="the simulated night directory (with truth/)")
    _add_lake(p)
    p.set_defaults(func=_cmd_evaluate)

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
