"""Command-line flags of the reduction parameters, generated from their declarations.

Every parameter of :class:`~fiberlake.processors.params.ReductionParams` gets one flag
(:func:`fiberlake.schemas.parset.flag_name`), grouped by stage in ``--help`` with its default,
allowed values and unit taken from the declaration, so no default is written twice. A flag left
out keeps the value of ``--params FILE`` (a JSON object as ``fiberlake runs show RUN_ID --json``
prints it) or the declared default.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from fiberlake.processors.params import ReductionParams
from fiberlake.schemas.parset import ParameterError, flag_name

DEST_PREFIX = "par__"


def _dest(path: str) -> str:
    return DEST_PREFIX + path.replace(".", "__")


def _converter(kind: str, optional: bool):
    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        if kind == "tuple":
            return tuple(v.strip() for v in text.split(",") if v.strip())
        try:
            return {"int": int, "float": float, "str": str}[kind](text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind == 'int' else 'a number'}") from None
    convert.__name__ = kind  # argparse names the type in its messages
    return convert


def _metavar(row: dict) -> str:
    if row["type"] == "tuple":
        return "A,B"
    if row["allowed"].startswith("one of "):
        return "{" + row["allowed"][len("one of "):].split(";")[0].replace(" ", "") + "}"
    return {"int": "N", "float": "X", "str": "TEXT"}[row["type"]]


def _help(row: dict) -> str:
    default = ",".join(row["default"]) if isinstance(row["default"], list) else row["default"]
    if isinstance(default, bool):
        default = "on" if default else "off"
    unit = f" {row['unit']}" if row["unit"] else ""
    text = f"{row['description']} [default {default}{unit if default is not None else ''}; {row['allowed']}]"
    return text.replace("%", "%%")


def add_parameter_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per reduction parameter to ``parser``, grouped by stage, and ``--params FILE``."""
    parser.add_argument("--params", metavar="FILE", default=None,
                        help="JSON file of reduction parameters (as 'fiberlake runs show RUN_ID --json' prints "
                             "them); flags given here override it")
    groups: dict[str, argparse._ArgumentGroup] = {}
    descriptions = {f.name: f.metadata["par"].description for f in fields(ReductionParams)}
    seen: set[str] = set()
    for row in ReductionParams.describe():
        path = row["path"]
        stage = path.split(".")[0] if "." in path else "reduction"
        if stage not in groups:
            groups[stage] = parser.add_argument_group(f"{stage} parameters", descriptions.get(stage))
        flag = flag_name(path)
        if flag in seen:
            raise RuntimeError(f"two parameters map to the flag {flag}")
        seen.add(flag)
        if row["type"] == "bool":
            groups[stage].add_argument(flag, dest=_dest(path), action=argparse.BooleanOptionalAction,
                                       default=argparse.SUPPRESS,
                                       help=_help(row))
        else:
            groups[stage].add_argument(flag, dest=_dest(path), default=argparse.SUPPRESS, metavar=_metavar(row),
                                       type=_converter(row["type"], row["allowed"].endswith("(derived from the data)")),
                                       help=_help(row))
    parser.usage = (f"%(prog)s [options] [{len(seen)} stage parameters: see below, or 'fiberlake params']")


def params_from_args(args: argparse.Namespace) -> ReductionParams:
    """The reduction parameters of the parsed flags (``--params FILE`` first, then each flag given).

    Raises
    ------
    ParameterError
        On a value outside what the parameter allows, or an unreadable ``--params`` file.
    """
    base = ReductionParams()
    if getattr(args, "params", None):
        try:
            data = json.loads(Path(args.params).read_text())
        except (OSError, ValueError) as err:
            raise ParameterError(f"cannot read parameters from {args.params}: {err}") from None
        base = ReductionParams.from_dict(data.get("config", data) if isinstance(data, dict) else data)
    changes = {key[len(DEST_PREFIX):].replace("__", "."): value for key, value in vars(args).items()
               if key.startswith(DEST_PREFIX)}
    return base.updated(changes)


def add_parset_flags(parser: argparse.ArgumentParser, cls: type, prefix: str, title: str | None = None) -> None:
    """One flag per field of a top-level parameter set ``cls`` whose paths start with ``prefix``.

    The same machinery as :func:`fiberlake.jobs.cli_params.add_parameter_flags` (flag names from
    :func:`~fiberlake.schemas.parset.flag_name`, help with default, range and unit), for a set
    that is not part of the reduction: ``add_parset_flags(p, TypingParams, "typing")`` gives
    ``--typing``/``--no-typing``, ``--typing-model``, ``--typing-routing``, ...
    """
    group = parser.add_argument_group(title or f"{prefix} parameters", (cls.__doc__ or "").splitlines()[0])
    for row in cls.describe(prefix=f"{prefix}."):
        optional = row["allowed"].endswith("(derived from the data)")
        if row["type"] == "bool":
            group.add_argument(flag_name(row["path"]), dest=_dest(row["path"]), action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=_help(row))
        else:
            group.add_argument(flag_name(row["path"]), dest=_dest(row["path"]), default=argparse.SUPPRESS,
                               metavar=_metavar(row), type=_converter(row["type"], optional), help=_help(row))


def parset_from_args(args: argparse.Namespace, cls: type, prefix: str):
    """The set ``cls`` with the flags of :func:`add_parset_flags` that were given (declared defaults otherwise)."""
    head = _dest(f"{prefix}.")
    names = {f.name for f in fields(cls)}
    changes = {key[len(head):]: value for key, value in vars(args).items()
               if key.startswith(head) and key[len(head):] in names}
    return cls().updated(changes)
