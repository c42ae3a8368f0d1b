"""Table layout for survey-scale reads (issue 19): rows sorted per commit, row groups by row width,
compaction re-sorting each night of the scalar tables, the same rows throughout."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from fiberlake.jobs.upkeep import compact
from fiberlake.schemas.tables import SCHEMAS
from fiberlake.storage.layout import Lake
from fiberlake.storage.tables import CLUSTER_COLUMNS, ROW_GROUP_ROWS, TableStore


def _rows(name: str, n: int, night: str, rng: np.random.Generator, expid: int = 1) -> pa.Table:
    schema = SCHEMAS[name]
    columns = {f.name: pa.nulls(n, f.type) for f in schema}
    columns |= {"night": pa.array([night] * n), "expid": pa.array(np.full(n, expid, np.int64)),
                "camera": pa.array(rng.choice(["b1", "r1", "b2", "r2"], n)),
                "spectrograph": pa.array(rng.integers(1, 3, n).astype(np.int16)),
                "fiber": pa.array(rng.permutation(n).astype(np.int16)),
                "extraction": pa.array(["box"] * n), "targetid": pa.array(rng.integers(1, 2**40, n))}
    if "median_snr" in columns:
        columns["median_snr"] = pa.array(rng.random(n).astype(np.float32))
    if "flux" in columns:
        columns["flux"] = pa.array([rng.random(4).astype(np.float32) for _ in range(n)], pa.list_(pa.float32()))
    return pa.table({f.name: columns[f.name] for f in schema}).cast(schema)


def _files(store: TableStore, name: str) -> list[str]:
    return [uri.removeprefix("file://") for uri in store.delta(name).file_uris()]


def _sorted_by(table: pa.Table, columns: tuple[str, ...]) -> bool:
    keys = list(zip(*(table[c].to_pylist() for c in columns)))
    return keys == sorted(keys)


def test_commits_sorted_row_groups_by_width_and_compaction_resorts_nights(tmp_path):
    rng = np.random.default_rng(19)
    lake = Lake.at(tmp_path / "lake")
    store = TableStore(lake.root / "tables")
    night = "2026-03-04"
    metrics = [_rows("metrics", 700, night, rng, expid=e) for e in (1, 2)]
    spectra = _rows("spectra", 1200, night, rng)
    for table in metrics:
        store.append("metrics", table)
    store.append("spectra", spectra)
    for path in _files(store, "metrics"):                      # each commit sorted by targetid
        assert _sorted_by(pq.read_table(path), CLUSTER_COLUMNS["metrics"])
        assert pq.ParquetFile(path).metadata.num_row_groups == 1  # 700 scalar rows: one group, not two
    (path,) = _files(store, "spectra")
    assert _sorted_by(pq.read_table(path), CLUSTER_COLUMNS["spectra"])
    meta = pq.ParquetFile(path).metadata
    assert max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) == ROW_GROUP_ROWS

    before = sorted(store.read("metrics").to_pylist(), key=lambda r: (r["expid"], r["fiber"]))
    compact(lake, lock=False)
    (path,) = _files(store, "metrics")                          # the night re-sorted whole, one file
    assert _sorted_by(pq.read_table(path), CLUSTER_COLUMNS["metrics"])
    after = sorted(store.read("metrics").to_pylist(), key=lambda r: (r["expid"], r["fiber"]))
    assert after == before
    target = metrics[1]["targetid"][5].as_py()
    found = store.scan("metrics").filter(pl.col("targetid") == target).collect()
    assert found.height == 1 and found["expid"][0] == 2
