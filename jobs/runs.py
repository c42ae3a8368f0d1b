"""What a run did and with which parameters: the ``runs`` table read back into parameter objects."""

from __future__ import annotations

import json
from dataclasses import dataclass

import polars as pl

from fiberlake.processors.params import ReductionParams
from fiberlake.storage.layout import Lake
from fiberlake.storage.tables import TableStore


@dataclass
class RunRecord:
    """One run as recorded: its rows (one per night) and its parameters.

    Attributes
    ----------
    run_id : str
    rows : list of dict
        The run's ``runs`` rows, one per night.
    params : ReductionParams
        The run's parameters, rebuilt from ``config_json``.
    execution : dict
        Where it ran (``execution_json``).
    """

    run_id: str
    rows: list[dict]
    params: ReductionParams
    execution: dict


def read_run(lake: Lake, run_id: str) -> RunRecord:
    """The ``runs`` rows of ``run_id`` and the parameters they record.

    Raises
    ------
    LookupError
        When the lake has no run of that id (the sentence lists the newest ids).
    """
    tables = TableStore(lake.root / "tables")
    runs = tables.scan("runs").collect() if tables.exists("runs") else pl.DataFrame()
    rows = runs.filter(pl.col("run_id") == run_id).sort("night").to_dicts() if not runs.is_empty() else []
    if not rows:
        newest = runs.sort("started_at", descending=True)["run_id"].unique(maintain_order=True).head(5).to_list() \
            if not runs.is_empty() else []
        hint = f"; newest runs: {', '.join(newest)}" if newest else "; the lake has no runs yet"
        raise LookupError(f"no run {run_id!r} in the lake{hint}")
    params = ReductionParams.from_dict(json.loads(rows[0]["config_json"]))
    execution = json.loads(rows[0].get("execution_json") or "{}")
    return RunRecord(run_id=run_id, rows=rows, params=params, execution=execution)


def format_parameters(params: ReductionParams, *, only_changed: bool = False) -> str:
    """Every parameter, one line each (``path = value``), ``*`` marking values that differ from the default."""
    defaults = {row["path"]: row["default"] for row in ReductionParams.describe()}
    lines = []
    flat = _flatten(params.to_dict())
    for path, value in flat.items():
        changed = value != defaults[path]
        if only_changed and not changed:
            continue
        lines.append(f"{'*' if changed else ' '} {path} = {json.dumps(value)}")
    return "\n".join(lines)


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def format_run(record: RunRecord) -> str:
    """A run for people: when, what, where, and every parameter."""
    first = record.rows[0]
    nights = ", ".join(r["night"] for r in record.rows)
    lines = [
        f"run {record.run_id}: {first['command']} of {nights}",
        f"code {first['code_version']}; science parameters hash {first['config_hash']}",
        f"frames {sum(r['n_frames'] for r in record.rows)}, failed {sum(r['n_failed'] for r in record.rows)}",
        "execution: " + ", ".join(f"{k}={v}" for k, v in sorted(record.execution.items())),
        "parameters (* differs from the default):",
        format_parameters(record.params),
    ]
    return "\n".join(lines)


def format_parameter_table() -> str:
    """Every reduction parameter with its default, allowed values, unit and description (``fiberlake params``)."""
    from fiberlake.schemas.parset import flag_name

    lines = []
    for row in ReductionParams.describe():
        default = json.dumps(row["default"])
        unit = f" {row['unit']}" if row["unit"] else ""
        kind = "" if row["science"] else " (execution: not hashed)"
        lines.append(f"{row['path']} = {default}{unit}  [{row['allowed']}]  {flag_name(row['path'])}{kind}\n"
                     f"    {row['description']}")
    return "\n".join(lines)


def format_parameter_markdown() -> str:
    """Every reduction parameter as a Markdown table (the README's parameter section)."""
    from fiberlake.schemas.parset import flag_name

    lines = ["| parameter | flag | default | allowed | unit | description |", "|---|---|---|---|---|---|"]
    for row in ReductionParams.describe():
        default = json.dumps(row["default"])
        lines.append(f"| `{row['path']}` | `{flag_name(row['path'])}` | `{default}` | {row['allowed']} | {row['unit']} "
                     f"| {row['description']}{'' if row['science'] else ' (execution: not hashed)'} |")
    return "\n".join(lines)

