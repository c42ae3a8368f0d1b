"""Query the lake: every table as a Polars LazyFrame, and SQL over all of them."""

from __future__ import annotations

import polars as pl

from fiberlake.schemas.tables import ARRAY_COLUMNS, SCHEMAS
from fiberlake.storage.layout import Lake
from fiberlake.storage.tables import TableStore


def scan_tables(lake: Lake, *, as_of: int | None = None, arrays: bool = True) -> dict[str, pl.LazyFrame]:
    """Every existing table of ``lake`` as a Polars LazyFrame.

    Parameters
    ----------
    lake : Lake
        The lake.
    as_of : int, optional
        Delta table version to read (time travel); default the latest.
    arrays : bool
        Present per-wavelength list columns as fixed-size ``pl.Array`` (the instrument's ``nwave``).

    Returns
    -------
    dict of str to polars.LazyFrame
        Keyed by table name; tables not yet written are absent.
    """
    store = TableStore(lake.root / "tables")
    frames: dict[str, pl.LazyFrame] = {}
    nwave = None
    if arrays and lake.describe():
        from fiberlake.schemas.instrument import get_instrument

        inst = get_instrument(lake.instrument)
        nwave = inst.wave_grid(inst.arms[0].name)[2]
    for name, schema in SCHEMAS.items():
        if not store.exists(name):
            continue
        lf = store.scan(name, version=as_of)
        if nwave is not None:
            casts = [pl.col(c).cast(pl.Array(pl.from_arrow(schema.empty_table()).schema[c].inner, nwave))
                     for c in ARRAY_COLUMNS if c in schema.names]
            if casts:
                lf = lf.with_columns(casts)
        frames[name] = lf
    return frames


def sql(lake: Lake, query: str, *, as_of: int | None = None) -> pl.DataFrame:
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
