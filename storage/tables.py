"""Lake tables: Delta Lake over Parquet, atomic and idempotent commits.

Every write is one Delta commit, so a reader sees all of it or none of it. Two kinds of write:

* :meth:`TableStore.append` adds rows; when given a ``txn`` (an application id and a
  monotonically increasing version), the commit records it and a later call with a version that
  is not newer is a no-op, so a retried job cannot add its rows twice.
* :meth:`TableStore.replace` deletes the rows matching a predicate and adds the new rows in the
  same commit (Delta's ``overwrite`` with ``predicate``): re-processing an exposure swaps its rows
  atomically and never leaves two copies. :meth:`TableStore.replace_keys` does the same with the
  predicate built from typed key values (:mod:`fiberlake.storage.predicates`): use it whenever a
  value came from data.

On an object store (``s3://``) the tables are written and read through deltalake's own object
store with the ``storage_options`` of :func:`fiberlake.storage.objectstore.storage_options`;
deltalake commits there with a conditional PUT, so a commit never overwrites another.

Files are ZSTD-compressed Parquet with BYTE_STREAM_SPLIT encoding for float columns. Row groups
hold 512 rows in tables with per-wavelength list columns (about 20 MB of LAMOST spectra, the
layout measured best here, ``anchors/lake.md``) and 65536 rows in tables of scalars only (a few
MB: small groups there make footers and statistics outweigh the data). Rows of a commit are
sorted by the table's :data:`CLUSTER_COLUMNS` (spectra by their key, the scalar per-fiber tables
by ``targetid``, coadds by ``healpix``), so the min/max statistics of each row group are narrow
and a filter on those columns skips the groups it does not need; compaction (``jobs/upkeep.py``)
re-sorts each night of the scalar tables whole (:meth:`TableStore.recluster`). Delta-rs's
Z-order was measured and left out: on random 40-bit targetids its files' ranges stayed wide
(``bench/query.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import polars as pl
import pyarrow as pa
from deltalake import (
    ColumnProperties,
    CommitProperties,
    DeltaTable,
    Transaction,
    WriterProperties,
    write_deltalake,
)

from deltalake.exceptions import DeltaError

from fiberlake.schemas.tables import PARTITION_COLUMN, SCHEMAS
from fiberlake.storage.failpoints import failpoint
from fiberlake.storage.objectstore import LakeRoot, ObjectPath, as_root, storage_options
from fiberlake.storage.predicates import KeyValue, keys_predicate

ROW_GROUP_ROWS = 512
"""Most rows per Parquet row group in tables with list (per-wavelength) columns."""
MIN_ROW_GROUP_ROWS = 64
"""Fewest rows per row group in tables with list columns."""
ROW_GROUP_BYTES = 4 << 20
"""Target bytes of a row group in tables with list columns: a one-spectrum read decodes one row
group, so on LAMOST spectra (64 KB a row) a group holds 64 rows, not 512 (``bench/query.py``)."""
SCALAR_ROW_GROUP_ROWS = 65536
"""Rows per Parquet row group in tables of scalar columns only."""

CLUSTER_COLUMNS: dict[str, tuple[str, ...]] = {
    "spectra": ("expid", "camera", "fiber", "extraction"),
    "joined": ("expid", "spectrograph", "fiber", "extraction"),
    "metrics": ("targetid", "spectrograph"),
    "fibermap": ("targetid", "spectrograph"),
    "coadds": ("healpix", "targetid"),
}
"""Per table, the columns its rows are sorted by in every commit. Tables of spectra keep their key
order (a one-spectrum lookup by key reads one row group); the scalar tables ``metrics`` and
``fibermap`` are sorted by target, and re-sorted over each night's partition at compaction
(:meth:`TableStore.recluster`), so they are the lake's target index (target -> keys of its
spectra); ``coadds`` is sorted by its HEALPix index (a cone reads the row groups of its pixels)."""


def clustered(name: str, table: pa.Table) -> pa.Table:
    """``table`` with its rows sorted by the :data:`CLUSTER_COLUMNS` of table ``name`` (unchanged if none)."""
    columns = CLUSTER_COLUMNS.get(name)
    if not columns or table.num_rows < 2:
        return table
    return table.sort_by([(column, "ascending") for column in columns])


@dataclass(frozen=True)
class Txn:
    """An application transaction: ``app_id`` commits at most once per ``version``."""

    app_id: str
    version: int


def row_group_rows(schema: pa.Schema, row_bytes: float | None = None) -> int:
    """Rows per Parquet row group of a table with ``schema`` whose rows hold ``row_bytes`` bytes.

    Tables of scalars: :data:`SCALAR_ROW_GROUP_ROWS`. Tables with list columns:
    :data:`ROW_GROUP_BYTES` worth of rows, between :data:`MIN_ROW_GROUP_ROWS` and
    :data:`ROW_GROUP_ROWS` (the latter when the row size is unknown).
    """
    if not any(pa.types.is_list(field.type) for field in schema):
        return SCALAR_ROW_GROUP_ROWS
    if not row_bytes or row_bytes <= 0:
        return ROW_GROUP_ROWS
    return int(min(ROW_GROUP_ROWS, max(MIN_ROW_GROUP_ROWS, ROW_GROUP_BYTES // row_bytes)))


def writer_properties_for(schema: pa.Schema, row_bytes: float | None = None) -> WriterProperties:
    """Parquet writer properties of a table with ``schema`` (every write and compaction uses them);
    ``row_bytes``, the bytes of a row, sizes the row groups (:func:`row_group_rows`)."""
    # Scalar float columns: BYTE_STREAM_SPLIT, no dictionary. delta-rs applies per-column
    # properties only to top-level leaves, so list columns (spectra) get the table default,
    # which turns dictionaries off (float spectra do not repeat; zstd does the work).
    float_cols = {
        field.name: ColumnProperties(dictionary_enabled=False, encoding="BYTE_STREAM_SPLIT")
        for field in schema
        if pa.types.is_floating(field.type)
    }
    has_lists = any(pa.types.is_list(field.type) for field in schema)
    return WriterProperties(
        compression="ZSTD",
        compression_level=3,
        max_row_group_size=row_group_rows(schema, row_bytes),
        default_column_properties=ColumnProperties(dictionary_enabled=False) if has_lists else None,
        column_properties=float_cols,
    )


def conform(table_name: str, data: pa.Table | list[dict] | dict) -> pa.Table:
    """Cast rows to the declared schema of ``table_name`` (column order and types).

    Raises
    ------
    ValueError
        If a declared column is missing or an extra column is present.
    """
    schema = SCHEMAS[table_name]
    if isinstance(data, list):
        keys = set().union(*(row.keys() for row in data)) if data else set(schema.names)
        if keys != set(schema.names):
            raise ValueError(
                f"table {table_name}: missing columns {sorted(set(schema.names) - keys)}, "
                f"unexpected {sorted(keys - set(schema.names))}"
            )
        data = pa.Table.from_pylist(data, schema=schema)
    elif isinstance(data, dict):
        data = pa.table(data)
    missing = set(schema.names) - set(data.column_names)
    extra = set(data.column_names) - set(schema.names)
    if missing or extra:
        raise ValueError(f"table {table_name}: missing columns {sorted(missing)}, unexpected {sorted(extra)}")
    return data.select(schema.names).cast(schema)


class TableStore:
    """The Delta tables of one lake.

    Parameters
    ----------
    tables_root : Path, ObjectPath or str
        Directory (or object-store prefix, or its ``s3://`` URL) that holds one table per name.
    """

    def __init__(self, tables_root: LakeRoot | str):
        self.root = as_root(tables_root)
        self.storage_options: dict[str, str] | None = (
            storage_options() if isinstance(self.root, ObjectPath) else None)
        """deltalake/Polars options for an object-store lake (None for a local one)."""

    def path(self, name: str) -> LakeRoot:
        """Directory of table ``name``."""
        if name not in SCHEMAS:
            raise KeyError(f"unknown table {name!r}; tables: {sorted(SCHEMAS)}")
        return self.root / name

    def exists(self, name: str) -> bool:
        """Whether table ``name`` has been created."""
        return DeltaTable.is_deltatable(str(self.path(name)), storage_options=self.storage_options)

    def delta(self, name: str, version: int | None = None) -> DeltaTable:
        """The :class:`deltalake.DeltaTable`, optionally as of ``version``.

        Raises
        ------
        LookupError
            If ``version`` is given and the table cannot be opened at it (a sentence naming the
            versions the table has, never delta-kernel's text).
        """
        if version is None:
            return DeltaTable(str(self.path(name)), storage_options=self.storage_options)
        try:
            return DeltaTable(str(self.path(name)), version=version, storage_options=self.storage_options)
        except (DeltaError, OverflowError, FileNotFoundError, ValueError):
            raise LookupError(f"table {name} has no version {version}; it has {self.versions(name).span()}") from None

    def committed_version(self, name: str, app_id: str) -> int | None:
        """Last version committed by application ``app_id`` on table ``name`` (None if never)."""
        if not self.exists(name):
            return None
        return self.delta(name).transaction_version(app_id)

    def _write(self, name: str, table: pa.Table, mode: str, predicate: str | None, txn: Txn | None) -> bool:
        if txn is not None:
            done = self.committed_version(name, txn.app_id)
            if done is not None and done >= txn.version:
                return False
        commit = CommitProperties(app_transactions=[Transaction(txn.app_id, txn.version)]) if txn else None
        if not self.exists(name):
            self.path(name).mkdir(parents=True, exist_ok=True)
            mode = "append" if mode == "overwrite" else mode
            predicate = None
        failpoint(f"commit.{name}")
        write_deltalake(
            str(self.path(name)),
            clustered(name, table),
            partition_by=[PARTITION_COLUMN],
            mode=mode,
            predicate=predicate,
            writer_properties=writer_properties_for(table.schema, table.nbytes / max(1, table.num_rows)),
            commit_properties=commit,
            storage_options=self.storage_options,
        )
        failpoint(f"committed.{name}")
        return True

    def append(self, name: str, data: pa.Table | list[dict], txn: Txn | None = None) -> bool:
        """Append rows in one commit.

        Returns
        -------
        bool
            False when ``txn`` was already committed (nothing written), True otherwise.
        """
        table = conform(name, data)
        if table.num_rows == 0:
            return False
        return self._write(name, table, "append", None, txn)

    def replace(self, name: str, data: pa.Table | list[dict], predicate: str, txn: Txn | None = None) -> bool:
        """Atomically delete rows matching ``predicate`` (SQL) and add ``data`` in one commit.

        The new rows must all satisfy ``predicate`` (Delta checks this).
        """
        table = conform(name, data)
        return self._write(name, table, "overwrite", predicate, txn)

    def replace_keys(self, name: str, data: pa.Table | list[dict],
                     keys: Mapping[str, KeyValue] | list[Mapping[str, KeyValue]], txn: Txn | None = None) -> bool:
        """Atomically replace the rows whose key columns equal ``keys`` by ``data`` (one commit).

        The predicate is built by :mod:`fiberlake.storage.predicates` from typed, validated values,
        so no value a file supplied is ever spliced into SQL; prefer this to :meth:`replace`.

        Parameters
        ----------
        name : str
            Table name.
        data : pyarrow.Table or list of dict
            The new rows; each must match one of ``keys`` (Delta checks this).
        keys : mapping, or list of mappings
            Column name to value (``{"night": "2026-11-21", "expid": 7}``), or several such
            mappings naming the same columns (rows matching any of them are replaced).
        txn : Txn, optional
            Application transaction, checked before writing.

        Raises
        ------
        ValueError
            If a key names a column the table does not have, or a value is refused by its
            column's rule (:func:`fiberlake.storage.predicates.literal`).
        """
        many = [keys] if isinstance(keys, Mapping) else list(keys)
        unknown = sorted({column for key in many for column in key} - set(SCHEMAS[name].names))
        if unknown:
            raise ValueError(f"table {name} has no column {', '.join(unknown)} to select rows by")
        return self.replace(name, data, keys_predicate(many), txn=txn)

    def read(self, name: str, filters: list | None = None, columns: list[str] | None = None) -> pa.Table:
        """Read table ``name`` into an Arrow table (empty with the declared schema if absent)."""
        if not self.exists(name):
            return SCHEMAS[name].empty_table()
        return self.delta(name).to_pyarrow_table(filters=filters, columns=columns)

    def scan(self, name: str, version: int | datetime | None = None) -> pl.LazyFrame:
        """Polars LazyFrame over table ``name``, optionally as of a Delta version or a time."""
        if not self.exists(name):
            return pl.LazyFrame(schema=pl.from_arrow(SCHEMAS[name].empty_table()).schema)
        return pl.scan_delta(str(self.path(name)), version=version, storage_options=self.storage_options)

    def reclusters(self, name: str) -> bool:
        """Whether compaction rewrites table ``name`` sorted per night (:meth:`recluster`): the
        tables with :data:`CLUSTER_COLUMNS` and no list column (a night of them fits in memory)."""
        schema = SCHEMAS[name]
        return name in CLUSTER_COLUMNS and not any(pa.types.is_list(field.type) for field in schema)

    def recluster(self, name: str, night: str) -> None:
        """Rewrite one night's partition of table ``name`` sorted by its :data:`CLUSTER_COLUMNS`
        (one commit; the same rows, in as few files as the writer makes)."""
        rows = self.delta(name).to_pyarrow_table(filters=[(PARTITION_COLUMN, "=", night)])
        self.replace_keys(name, rows, {PARTITION_COLUMN: night})

    def row_bytes(self, name: str) -> float | None:
        """Bytes on disk per row of table ``name`` (from the Delta log; None when it holds no rows)."""
        if not self.exists(name):
            return None
        actions = self.delta(name).get_add_actions(flatten=True)
        columns = actions.column_names
        if "size_bytes" not in columns or "num_records" not in columns:
            return None
        size = sum(v for v in actions.column("size_bytes").to_pylist() if v)
        rows = sum(v for v in actions.column("num_records").to_pylist() if v)
        return size / rows if rows else None

    def nights(self, name: str) -> list[str]:
        """The night partitions of table ``name`` (sorted; empty when absent)."""
        if not self.exists(name):
            return []
        return sorted({part[PARTITION_COLUMN] for part in self.delta(name).partitions()})

    def version(self, name: str) -> int:
        """Current table version (-1 if the table does not exist)."""
        return self.delta(name).version() if self.exists(name) else -1

    def create_missing(self) -> list[str]:
        """Create every table of :data:`~fiberlake.schemas.tables.SCHEMAS` that does not exist yet.

        Each is one empty Delta commit (version 0) with the declared schema and partitioning, so
        that every reader (Polars, pyarrow, DuckDB) sees every table, empty, from the lake's
        creation. Idempotent: existing tables are left alone.

        Returns
        -------
        list of str
            The tables created.
        """
        created = []
        for name, schema in SCHEMAS.items():
            if self.exists(name):
                continue
            self.path(name).mkdir(parents=True, exist_ok=True)
            try:
                write_deltalake(str(self.path(name)), schema.empty_table(), partition_by=[PARTITION_COLUMN],
                                mode="append", writer_properties=writer_properties_for(schema),
                                storage_options=self.storage_options)
            except DeltaError:
                if not self.exists(name):  # not a creation raced by another writer
                    raise
                continue
            created.append(name)
        return created

    def versions(self, name: str) -> "TableVersions":
        """The versions of table ``name`` a reader can ask for (from its commit history).

        Raises
        ------
        LookupError
            If the table does not exist.
        """
        if not self.exists(name):
            raise LookupError(f"table {name} does not exist yet (nothing was ever written to it)")
        history = self.delta(name).history()
        commits = tuple(sorted((_commit(entry) for entry in history), key=lambda c: c.version))
        return TableVersions(name, commits)


@dataclass(frozen=True)
class Commit:
    """One commit of a table's log, as far as time travel needs it."""

    version: int
    timestamp_ms: int
    """Commit time, milliseconds since the epoch (UTC)."""
    removes_files: bool
    """Whether the commit took data files out of the table (overwrite, delete, compaction)."""
    vacuum_cutoff_ms: int | None = None
    """For a vacuum: files taken out before this time were deleted."""


def _commit(entry: dict) -> Commit:
    metrics = entry.get("operationMetrics") or {}
    removed = any("removed" in key.lower() and "file" in key.lower() and _positive(value)
                  for key, value in metrics.items())
    cutoff = None
    if entry.get("operation") == "VACUUM START":
        params = entry.get("operationParameters") or {}
        retention = params.get("specifiedRetentionMillis") or params.get("defaultRetentionMillis") or 0
        cutoff = int(entry["timestamp"]) - int(retention)
    return Commit(int(entry["version"]), int(entry["timestamp"]), removed, cutoff)


def _positive(value: object) -> bool:
    try:
        return int(value) > 0
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class TableVersions:
    """The versions a table's log holds, and which of them can still be read.

    A vacuum deletes the data files that commits older than its retention took out of the table;
    a version that still refers to one of them cannot be read any more.
    """

    name: str
    commits: tuple[Commit, ...]
    """Oldest first."""

    @property
    def first(self) -> int:
        """Oldest version in the log."""
        return self.commits[0].version

    @property
    def latest(self) -> int:
        """Newest version."""
        return self.commits[-1].version

    @property
    def created_ms(self) -> int:
        """Time of the oldest commit in the log (ms since the epoch)."""
        return self.commits[0].timestamp_ms

    @property
    def readable_from(self) -> int:
        """Oldest version whose data files a vacuum has not deleted."""
        oldest = self.first
        for vacuum in (c for c in self.commits if c.vacuum_cutoff_ms is not None):
            for commit in self.commits:
                if commit.removes_files and commit.version < vacuum.version and commit.timestamp_ms <= vacuum.vacuum_cutoff_ms:
                    oldest = max(oldest, commit.version)
        return oldest

    def at_time(self, when_ms: float) -> int | None:
        """Newest version committed at or before ``when_ms`` (None if the table is younger)."""
        older = [c.version for c in self.commits if c.timestamp_ms <= when_ms]
        return max(older) if older else None

    def time_of(self, version: int) -> int:
        """Commit time of ``version`` (ms since the epoch)."""
        return next(c.timestamp_ms for c in self.commits if c.version == version)

    def span(self) -> str:
        """The readable versions in words, e.g. ``versions 0 to 7`` or ``versions 3 to 7 (0 to 2 ...)``."""
        start = self.readable_from
        text = f"version {start}" if start == self.latest else f"versions {start} to {self.latest}"
        if start > self.first:
            text += f" (versions {self.first} to {start - 1} refer to data files that 'fiberlake vacuum' removed)"
        return text
