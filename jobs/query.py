"""Query the lake: every table as a Polars LazyFrame, and SQL over all of them."""

from __future__ import annotations

import datetime as dt

import polars as pl

from fiberlake.schemas.tables import ARRAY_COLUMNS, SCHEMAS
from fiberlake.storage.layout import Lake
from fiberlake.storage.tables import TableStore


AsOf = int | dt.datetime | str | None


def parse_as_of(value: AsOf) -> int | dt.datetime | None:
    """An ``--as-of`` value: a Delta version (integer) or a timestamp (ISO 8601; UTC when naive)."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        try:
            value = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"--as-of {text!r} is neither a table version nor an ISO 8601 time") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def scan_tables(lake: Lake, *, as_of: AsOf = None, arrays: bool = True) -> dict[str, pl.LazyFrame]:
    """Every existing table of ``lake`` as a Polars LazyFrame.

    Parameters
    ----------
    lake : Lake
        The lake.
    as_of : int, datetime or str, optional
        Time travel. A timestamp (datetime or ISO 8601 text) reads every table as it was at that
        moment, a consistent view of the whole lake; tables created later are absent. An
        integer reads each table at that Delta version (useful for one table). Default: latest.
    arrays : bool
        Present per-wavelength list columns as fixed-size ``pl.Array`` (the instrument's ``nwave``).

    Returns
    -------
    dict of str to polars.LazyFrame
        Keyed by table name; tables not yet written are absent.
    """
    store = TableStore(lake.root / "tables")
    as_of = parse_as_of(as_of)
    frames: dict[str, pl.LazyFrame] = {}
    nwave = None
    if arrays and lake.describe():
        from fiberlake.schemas.instrument import get_instrument

        inst = get_instrument(lake.instrument)
        nwave = inst.wave_grid(inst.arms[0].name)[2]
    for name, schema in SCHEMAS.items():
        if not store.exists(name):
            continue
        if isinstance(as_of, dt.datetime) and not store.existed_at(name, as_of):
            continue
        lf = store.scan(name, version=as_of)
        if nwave is not None:
            casts = [pl.col(c).cast(pl.Array(pl.from_arrow(schema.empty_table()).schema[c].inner, nwave))
                     for c in ARRAY_COLUMNS if c in schema.names]
            if casts:
                lf = lf.with_columns(casts)
        frames[name] = lf
    return frames


def sql(lake: Lake, query: str, *, as_of: AsOf = None) -> pl.DataFrame:
    """Run a SQL query over every table of ``lake`` (Polars SQLContext).

    Examples
    --------
    >>> sql(Lake.at("lake"), "SELECT objtype, median(snr_eq15) FROM metrics GROUP BY objtype")  # doctest: +SKIP
    """
    frames = scan_tables(lake, as_of=as_of, arrays=False)
    if not frames:
        raise LookupError(f"the lake at {lake.root} has no tables yet (run 'fiberlake ingest' first)")
    ctx = pl.SQLContext(frames=frames, eager=False)
    return ctx.execute(query).collect()
