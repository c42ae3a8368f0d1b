"""Compare two lakes: every table's rows (less the columns that record when or by which run)
and every raw array's bytes and attributes."""

from __future__ import annotations

import pyarrow as pa

from fiberlake.schemas.tables import SCHEMAS
from fiberlake.storage.layout import Lake
from fiberlake.storage.rawstore import open_raw_frame
from fiberlake.storage.tables import TableStore

VOLATILE = {"run_id", "seconds"}
"""Columns that differ between two correct runs: timestamps (every ``timestamp`` column), the id of the
run that wrote a row, and wall times."""
LOGS = {"runs"}
"""Tables that log attempts rather than hold data: a killed run leaves no row, a finished one does."""


def table_rows(lake: Lake, name: str) -> list[tuple]:
    """Rows of table ``name`` over its stable columns, sorted."""
    table = TableStore(lake.root / "tables").read(name)
    keep = [f.name for f in SCHEMAS[name] if f.name not in VOLATILE and not pa.types.is_timestamp(f.type)]
    rows = table.select(keep).to_pylist()
    return sorted(tuple(_hashable(row[k]) for k in keep) for row in rows)


def _hashable(value):
    if isinstance(value, list):
        return tuple(_hashable(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                     for v in value)
    if isinstance(value, float):
        return "nan" if value != value else round(value, 6)
    return value


def raw_arrays(lake: Lake) -> dict[str, tuple[bytes, dict]]:
    """Every raw array under the lake: path -> (pixel bytes, attributes)."""
    out = {}
    for path in sorted((lake.root / "raw").glob("*/*/*")):
        rel = path.relative_to(lake.root).as_posix()
        array = open_raw_frame(lake.root, rel)
        out[rel] = (array[...].tobytes(), dict(array.attrs))
    return out


def assert_lakes_equal(got: Lake, want: Lake) -> None:
    """Fail with the first difference between two lakes."""
    for name in SCHEMAS:
        if name in LOGS:
            continue
        a, b = table_rows(got, name), table_rows(want, name)
        assert len(a) == len(b), f"table {name}: {len(a)} rows, the clean run has {len(b)}"
        if a != b:
            got_only = [r for r in a if r not in b][:1]
            want_only = [r for r in b if r not in a][:1]
            short = [[v if not isinstance(v, tuple) else f"<{len(v)} values>" for v in r] for r in got_only + want_only]
            raise AssertionError(f"table {name}: rows differ from the clean run: got {short[:1]}, want {short[1:]}")
    a, b = raw_arrays(got), raw_arrays(want)
    assert sorted(a) == sorted(b), f"raw arrays differ: {sorted(set(a) ^ set(b))}"
    for rel in a:
        assert a[rel][0] == b[rel][0], f"{rel}: pixels differ"
        assert a[rel][1] == b[rel][1], f"{rel}: attributes differ"
    qa = sorted(p.relative_to(got.root).as_posix() for p in (got.root / "quarantine").rglob("*") if p.is_file())
    qb = sorted(p.relative_to(want.root).as_posix() for p in (want.root / "quarantine").rglob("*") if p.is_file())
    assert qa == qb, "quarantined copies differ"
