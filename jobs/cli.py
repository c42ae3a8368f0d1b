"""The ``fiberlake`` command: simulate, ingest, watch, process, query, tables, compact, vacuum, verify, evaluate, demo.

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


def _night(text: str) -> str:
    """``--night`` values: a real calendar date written YYYY-MM-DD (argparse type)."""
    from fiberlake.schemas.header import check_night

    try:
        return check_night(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err} (e.g. 2026-11-21)") from None


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fiberlake.ingest.simulate import simulate_night

    paths = simulate_night(
        args.instrument, args.night, args.out, seed=args.seed, n_science=args.n_science, progress=not args.quiet
    )
    print(f"wrote {len(paths)} raw frames to {Path(args.out) / args.night}")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from fiberlake.jobs.ingest import ingest_night, resolve_instrument
    from fiberlake.storage.layout import Lake

    lake = Lake.at(args.lake)
    resolve_instrument(lake, args.instrument)  # a new lake needs one (created under the writer lock)
    for night_dir in args.night_dirs:
        report = ingest_night(lake, night_dir, progress=not args.quiet, settle=args.settle, instrument=args.instrument,
                              typing=_typing_params(args))
        print(f"{night_dir}: {report.summary()}")
        for name, reason in report.quarantined:
            print(f"  quarantined {name}: {reason}")
        for name, reason in report.refused:
            print(f"  refused {name}: {reason}")
        for name, why in report.waiting:
            print(f"  left for the next run: {name}: {why}")
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    from fiberlake.jobs.ingest import resolve_instrument
    from fiberlake.jobs.watch import watch_night
    from fiberlake.storage.layout import Lake

    config = _reduction_params(args)
    lake = Lake.at(args.lake)
    resolve_instrument(lake, args.instrument)  # a new lake needs one (created under the writer lock)
    report = watch_night(
        lake, args.night_dir, poll=args.poll, settle=args.settle, stale_after=args.stale_after,
        process=not args.no_process, config=config, once=args.once, log=lambda line: print(line, flush=True),
        instrument=args.instrument, typing=_typing_params(args),
    )
    print(report.summary())
    return 0 if not report.failed else 3


def _cmd_compact(args: argparse.Namespace) -> int:
    from fiberlake.jobs.upkeep import compact
    from fiberlake.storage.layout import Lake

    for name, (before, after) in compact(Lake.open(args.lake), args.night).items():
        print(f"{name:12s} {before:6d} -> {after:6d} files")
    return 0


def _cmd_vacuum(args: argparse.Namespace) -> int:
    from fiberlake.jobs.upkeep import vacuum
    from fiberlake.storage.layout import Lake

    report = vacuum(Lake.open(args.lake), args.retention_hours, dry_run=args.dry_run)
    print(("would remove: " if args.dry_run else "removed: ") + report.summary())
    for rel in report.orphan_arrays + report.temporaries:
        print(f"  {rel}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from fiberlake.jobs.upkeep import verify
    from fiberlake.storage.layout import Lake

    report = verify(Lake.open(args.lake), args.night)
    for problem in report.problems:
        print(f"  MISMATCH {problem}")
    print(report.summary())
    return 0 if report.ok else 2


def _typing_params(args: argparse.Namespace):
    """TypingParams from the generated ``--typing-*`` flags of ``ingest`` and ``watch``."""
    from fiberlake.jobs.cli_params import parset_from_args
    from fiberlake.processors.params import TypingParams

    return parset_from_args(args, TypingParams, "typing")


def _add_typing_flags(parser: argparse.ArgumentParser) -> None:
    from fiberlake.jobs.cli_params import add_parset_flags
    from fiberlake.processors.params import TypingParams

    add_parset_flags(parser, TypingParams, "typing", "frame typing (seed 001)")


def _reduction_params(args: argparse.Namespace):
    """ReductionParams from the generated parameter flags shared by ``process``, ``reprocess`` and ``watch``."""
    from fiberlake.jobs.cli_params import params_from_args

    return params_from_args(args)


def _add_reduction_flags(parser: argparse.ArgumentParser) -> None:
    from fiberlake.jobs.cli_params import add_parameter_flags

    add_parameter_flags(parser)


def _cmd_process(args: argparse.Namespace) -> int:
    _prestart_ray(args)
    from fiberlake.jobs.process import process_night
    from fiberlake.storage.layout import Lake

    config = _reduction_params(args)
    report = process_night(Lake.open(args.lake), args.night, config=config, progress=not args.quiet,
                           force=args.force, retry_failed=args.retry_failed, executor=_executor(args),
                           batch_frames=args.batch_frames)
    print(report.summary())
    return 0 if not report.failed else 3


def _prestart_ray(args: argparse.Namespace) -> None:
    """A run on a local Ray starts it now, in the background: Ray's start overlaps the imports and the
    reading of the lake (:func:`fiberlake.jobs.executors.prestart_local_ray`)."""
    if not args.no_ray and not args.address:
        from fiberlake.jobs.executors import prestart_local_ray

        prestart_local_ray()


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
    _prestart_ray(args)
    from fiberlake.jobs.reprocess import reprocess
    from fiberlake.storage.layout import Lake

    report = reprocess(Lake.open(args.lake), release=args.release, nights=args.nights, config=_reduction_params(args),
                       executor=_executor(args), progress=not args.quiet, batch_frames=args.batch_frames)
    print(report.summary())
    return 0 if not report.failed else 3


def _cmd_query(args: argparse.Namespace) -> int:
    import polars as pl

    from fiberlake.jobs.query import encode_nested, sql, user_tables
    from fiberlake.storage.layout import Lake

    if args.format == "parquet" and not args.output:
        raise ValueError("--format parquet needs --output FILE")
    result = sql(Lake.open(args.lake), args.sql, as_of=args.as_of, extra=user_tables(args.table))
    if args.format == "table":
        with pl.Config(tbl_rows=args.max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=160):
            print(result)
    elif args.format == "csv":
        sys.stdout.write(encode_nested(result).write_csv())
    elif args.format == "json":
        sys.stdout.write(result.write_ndjson())
    elif args.format == "parquet":
        result.write_parquet(args.output)
        print(f"wrote {result.height} rows to {args.output}")
    return 0


def _cmd_tables(args: argparse.Namespace) -> int:
    from fiberlake.jobs.query import format_columns, format_summaries, table_summaries
    from fiberlake.storage.layout import Lake

    lake = Lake.open(args.lake)
    print(format_columns(args.name) if args.name else format_summaries(table_summaries(lake)))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import polars as pl

    from fiberlake.jobs.evaluate import evaluate_night, format_report
    from fiberlake.storage.layout import Lake

    night_dir = Path(args.truth)
    results = evaluate_night(Lake.open(args.lake), args.night, night_dir)
    with pl.Config(tbl_rows=100, tbl_cols=-1, tbl_width_chars=250):
        print(format_report(results))
    return 0


def _cmd_retype(args: argparse.Namespace) -> int:
    from fiberlake.jobs.typing_stage import retype_night
    from fiberlake.storage.layout import Lake

    outcome = retype_night(Lake.open(args.lake), args.night, _typing_params(args))
    print(f"{args.night}: {outcome['frames']} frames typed again, {outcome['changed']} changed type "
          f"(the next 'fiberlake process' rebuilds the calibration sets they enter and reduces their frames)")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from fiberlake.jobs.runs import format_parameter_markdown, format_parameter_table

    print(format_parameter_markdown() if args.markdown else format_parameter_table())
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    import json

    from fiberlake.jobs.runs import format_run, read_run
    from fiberlake.storage.layout import Lake

    record = read_run(Lake.open(args.lake), args.run_id)
    if args.json:
        print(json.dumps(record.params.to_dict(), indent=2, sort_keys=True))
    else:
        print(format_run(record))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fiberlake.jobs.train import assemble_typing_ensemble, register_model, train_params_from_args, train_typing
    from fiberlake.storage.layout import Lake
    from fiberlake.storage.models import ship

    params = train_params_from_args(args)
    command = _train_command_line(args.stage)
    out = Path(args.out)
    if args.ensemble_of:
        card, path = assemble_typing_ensemble(args.ensemble_of, out=out, command=command, cache=args.cache,
                                              lake_root=Lake.open(args.lake).root if args.lake else None)
    else:
        card, path = train_typing(params, out=out, command=command, cache=args.cache, progress=not args.quiet)
    print(f"model {card['model_id']}: {path} (held-out final accuracy {card['heldout']['final_accuracy']:.4f}, "
          f"unknown {card['heldout']['unknown_rate']:.4f})")
    if args.lake:
        register_model(Lake.open(args.lake), path)
        print(f"registered in {args.lake}: models/{card['stage']}/{card['model_id']}")
    if args.ship:
        print(f"shipped as the default {card['stage']} model: {ship(path, card['stage'])}")
    return 0


def _train_command_line(stage: str) -> str:
    """The command a model card records (what was typed, when run as ``fiberlake train ...``)."""
    return "fiberlake " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["train"] else f"fiberlake train {stage}"


def _report_trained(card: dict, path, stage: str, ship_it: bool) -> int:
    """Print where a trained artifact is, and make it the package's default when asked (``--ship``)."""
    from fiberlake.storage.models import ship

    print(f"model {card['model_id']}: {path}")
    if ship_it:
        print(f"shipped as the default {stage} model: {ship(path, stage)}")
    return 0


def _cmd_train_denoise(args: argparse.Namespace) -> int:
    from fiberlake.jobs.train_denoise import train_denoise, train_params_from_args

    card = train_denoise(train_params_from_args(args), out=Path(args.out), command=_train_command_line("denoise"))
    return _report_trained(card, card["path"], "denoise", args.ship)


def _cmd_train_classify(args: argparse.Namespace) -> int:
    from fiberlake.jobs.train_classify import train_classify, train_params_from_args

    card, path = train_classify(train_params_from_args(args), out=Path(args.out),
                                command=_train_command_line("classify"), cache=args.cache, progress=not args.quiet)
    return _report_trained(card, path, "classify", args.ship)


def _cmd_train_deconvolve(args: argparse.Namespace) -> int:
    from fiberlake.jobs.train_cae import train_deconvolve, train_params_from_args

    card, path = train_deconvolve(train_params_from_args(args), out=Path(args.out),
                                  command=_train_command_line("deconvolve"))
    return _report_trained(card, path, "deconvolve", args.ship)


def _cmd_export(args: argparse.Namespace) -> int:
    from fiberlake.jobs.export import export
    from fiberlake.storage.layout import Lake

    report = export(Lake.open(args.lake), args.where, args.out, kind=args.kind, formats=args.format,
                    overwrite=args.overwrite, as_of=args.as_of)
    print(report.summary())
    return 0


def _cmd_qa(args: argparse.Namespace) -> int:
    from fiberlake.jobs.qa import build_qa
    from fiberlake.storage.layout import Lake

    print(build_qa(Lake.open(args.lake), args.night, args.out, extraction=args.extraction).summary())
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from fiberlake.jobs.plot import plot_target
    from fiberlake.storage.layout import Lake

    path = plot_target(Lake.open(args.lake), args.targetid, args.out, night=args.night, expid=args.expid,
                       extraction=args.extraction)
    print(f"wrote {path}")
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
    p.add_argument("--night", default="2026-11-21", type=_night, help="night, YYYY-MM-DD")
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
    p.add_argument("--instrument", metavar="NAME", default=None,
                   help="instrument of a new lake (required to create one unless FIBERLAKE_INSTRUMENT is set); "
                        "an existing lake keeps the instrument in its lake.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_typing_flags(p)
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
    p.add_argument("--instrument", metavar="NAME", default=None,
                   help="instrument of a new lake (required to create one unless FIBERLAKE_INSTRUMENT is set); "
                        "an existing lake keeps the instrument in its lake.json")
    _add_reduction_flags(p)
    _add_typing_flags(p)
    p.set_defaults(func=_cmd_watch)

    p = sub.add_parser("process", help="reduce a night's science frames to calibrated spectra")
    p.add_argument("--night", required=True, type=_night, help="night to process, YYYY-MM-DD")
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
    p.add_argument("--nights", nargs="+", default=None, type=_night, help="nights to include (default: every night)")
    _add_reduction_flags(p)
    _add_ray_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_reprocess)

    p = sub.add_parser("query", help="run one SQL SELECT over the lake's tables (Polars SQL)",
                       description="Run one SQL SELECT (or WITH ... SELECT) over the lake's tables with Polars SQL. "
                       "The query sees the lake's tables and the files named with --table, nothing else: "
                       "table functions such as read_csv(...) and quoted paths are refused.")
    p.add_argument("sql", help="SQL query; tables: exposures quarantine deliveries fibermap spectra metrics "
                   "reductions runs ('fiberlake tables' describes them)")
    _add_lake(p)
    p.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table",
                   help="output format (default table); csv writes list columns (flux, ivar, mask, sky, ...) "
                   "as JSON lists such as [1.0,2.5,null] (NaN is written null), json writes one object per row")
    p.add_argument("--output", help="output file for --format parquet")
    p.add_argument("--as-of", default=None, metavar="WHEN",
                   help="time travel: TIME (ISO 8601, UTC unless a zone is given) reads every table as it was "
                   "then, a consistent view of the lake; N reads each table at its newest version <= N; "
                   "TABLE@N reads that table at exactly version N, TABLE@TIME that table as it was then; "
                   "combine with commas (2026-11-21T18:00,spectra@3); 'fiberlake tables' lists the versions "
                   "each table can read (a vacuum removes older ones)")
    p.add_argument("--table", action="append", default=[], metavar="NAME=PATH",
                   help="also let the query read this file as table NAME (.parquet, .csv, .arrow/.ipc); repeatable")
    p.add_argument("--max-rows", type=int, default=40, help="rows shown with --format table")
    p.set_defaults(func=_cmd_query)

    p = sub.add_parser("tables", help="list the lake's tables, or print one table's columns and what they mean")
    p.add_argument("name", nargs="?", default=None, metavar="NAME",
                   help="a table: print its columns with type and description (default: list every table "
                   "with rows and readable versions)")
    _add_lake(p)
    p.set_defaults(func=_cmd_tables)

    p = sub.add_parser("compact", help="merge small table files (one night or all) and checkpoint the logs")
    _add_lake(p)
    p.add_argument("--night", default=None, type=_night, help="night partition to compact (default: all)")
    p.set_defaults(func=_cmd_compact)

    p = sub.add_parser("vacuum", help="delete table files and raw arrays nothing references any more")
    _add_lake(p)
    p.add_argument("--retention-hours", type=float, default=168.0,
                   help="keep what is younger than this (default 168); older versions can no longer be queried")
    p.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    p.set_defaults(func=_cmd_vacuum)

    p = sub.add_parser("verify", help="re-read raw arrays and check them against the hashes recorded at ingest")
    _add_lake(p)
    p.add_argument("--night", default=None, type=_night, help="night to verify (default: all)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("evaluate", help="compare a processed simulated night with its truth files")
    p.add_argument("--night", required=True, type=_night, help="night, YYYY-MM-DD")
    p.add_argument("--truth", required=True, help="the simulated night directory (with truth/)")
    _add_lake(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("retype", help="type a night's frames again from their pixels (e.g. with a new model)")
    p.add_argument("--night", required=True, type=_night, help="night, YYYY-MM-DD")
    _add_lake(p)
    _add_typing_flags(p)
    p.set_defaults(func=_cmd_retype)

    p = sub.add_parser("params", help="list every reduction parameter: default, allowed values, unit, flag, meaning")
    p.add_argument("--markdown", action="store_true", help="as a Markdown table (the README's parameter section)")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser("runs", help="what a run did and every parameter it used")
    runs_sub = p.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    show = runs_sub.add_parser("show", help="print a run's parameters (--json: reusable with --params FILE)")
    show.add_argument("run_id", metavar="RUN_ID", help="run id (column run_id of runs, spectra, reductions)")
    _add_lake(show)
    show.add_argument("--json", action="store_true", help="the parameters as JSON, for 'fiberlake process --params'")
    show.set_defaults(func=_cmd_runs)

    p = sub.add_parser("train", help="train a model from simulated data and write its artifact (safetensors + card)")
    train_sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    t = train_sub.add_parser("typing", help="the frame typer (seed 001, SPIT): simulate, train, evaluate on "
                             "held-out nights, write weights.safetensors and card.json under OUT/<model_id>/")
    t.add_argument("--out", default="./models", help="folder of the artifact (default ./models)")
    t.add_argument("--lake", default=None,
                   help="also copy the artifact into this (existing) lake and list it in its models table")
    t.add_argument("--ship", action="store_true",
                   help="make it the package's default model (replaces the shipped one; for maintainers)")
    t.add_argument("--cache", default=None, metavar="DIR",
                   help="keep the simulated, pre-processed frames here and reuse them on the next run")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--ensemble-of", action="append", default=[], metavar="MODEL",
                   help="no training: join these trained typing models (folders or ids; same data, other seeds) "
                        "into one ensemble that averages their probabilities, evaluate it and write its artifact")
    from fiberlake.jobs.train import add_train_flags

    add_train_flags(t)
    t.set_defaults(func=_cmd_train)
    # the other stages' flags come from their parameter sets (no torch imported to build the parser)
    from fiberlake.jobs.cli_params import add_parset_flags
    from fiberlake.processors.params import CAETrainParams, ClassifyTrainParams, DenoiseTrainParams
    d = train_sub.add_parser("denoise", help="the Bayesian denoiser (seed 004): isometric generator, KDE prior, "
                             "NoiseFlow, plus its DAE baselines; writes OUT/<model_id>/ and OUT/<model_id>-baselines/")
    d.add_argument("--out", default="./models", help="folder of the artifacts (default ./models)")
    d.add_argument("--ship", action="store_true", help="make it the package's default denoise model (maintainers)")
    add_parset_flags(d, DenoiseTrainParams, "train", "training parameters")
    d.set_defaults(func=_cmd_train_denoise)
    c = train_sub.add_parser("deconvolve", help="the PSF-conditioned CAE (seed 002): simulated chunks, BCE, "
                             "afterburner calibration, held-out figures; writes OUT/<model_id>/")
    c.add_argument("--out", default="./models", help="folder of the artifact (default ./models)")
    c.add_argument("--ship", action="store_true", help="make it the package's default deconvolve model (maintainers)")
    add_parset_flags(c, CAETrainParams, "train", "training parameters")
    c.set_defaults(func=_cmd_train_deconvolve)

    k = train_sub.add_parser("classify", help="DRC-Net and RC-Net stellar classifiers (seed 003): simulated stripes, "
                             "AdaGrad with early stopping, held-out S/N tables beside the template fit; writes "
                             "OUT/<model_id>/")
    k.add_argument("--out", default="./models", help="folder of the artifact (default ./models)")
    k.add_argument("--cache", default=None, help="folder caching the simulated data sets")
    k.add_argument("--quiet", action="store_true", help="no progress bars")
    k.add_argument("--ship", action="store_true", help="make it the package's default classify model (maintainers)")
    add_parset_flags(k, ClassifyTrainParams, "train", "training parameters")
    k.set_defaults(func=_cmd_train_classify)

    p = sub.add_parser("export", help="write selected spectra as files the field's tools open (DESI layout, tabular FITS)",
                       description="Write the flux-calibrated exposures (table joined) and coadds that a SQL condition "
                       "selects, in DESI's spectra/coadd layout (desispec.io.read_spectra, specutils "
                       "SpectrumList.read) and as one tabular FITS file per spectrum (specutils Spectrum.read), "
                       "with the fiber map and the runs' parameters.")
    _add_lake(p)
    p.add_argument("--where", required=True, metavar="SQL",
                   help="SQL condition over joined_full (exposures: joined spectra with ra, dec, mag) and coadds, "
                   "e.g. \"night = '2026-11-21' AND objtype = 'TGT' AND mag < 17\"")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--kind", choices=["exposures", "coadds", "both"], default="both",
                   help="per-exposure spectra, coadds or both (default both)")
    p.add_argument("--format", choices=["desi", "tabular", "both"], default="both",
                   help="DESI spectra/coadd files, one tabular file per spectrum, or both (default both)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.add_argument("--as-of", default=None, metavar="WHEN", help="time travel, as for fiberlake query")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("qa", help="write a night's QA page: HTML with PNG figures per camera")
    p.add_argument("--night", required=True, type=_night, help="night, YYYY-MM-DD")
    _add_lake(p)
    p.add_argument("--out", required=True, help="folder of index.html and figures/")
    p.add_argument("--extraction", default=None, choices=["box", "optimal", "deconv"],
                   help="extraction shown (default: the first reduced of optimal, deconv, box)")
    p.set_defaults(func=_cmd_qa)

    p = sub.add_parser("plot", help="plot a target's coadded (or one exposure's) flux-calibrated spectrum to a PNG")
    p.add_argument("--targetid", required=True, type=int, help="target id")
    p.add_argument("--night", default=None, type=_night, help="that night's coadd (default: over every night)")
    p.add_argument("--expid", default=None, type=int, help="plot this exposure's joined spectrum instead of a coadd")
    p.add_argument("--extraction", default=None, choices=["box", "optimal", "deconv"],
                   help="default: the first present of optimal, deconv, box")
    p.add_argument("--out", required=True, help="PNG file")
    _add_lake(p)
    p.set_defaults(func=_cmd_plot)

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
