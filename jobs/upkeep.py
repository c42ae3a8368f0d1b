"""Lake upkeep: compact small files, vacuum what nothing references, verify stored bytes.

* :func:`compact` rewrites a night's many small Parquet files (one per commit: the streaming
  ingest and per-exposure replaces make many) into few, in one Delta commit per table, then
  writes a checkpoint of the log. Readers keep their snapshot during the rewrite and see the
  same rows after it: compaction changes files, never rows.
* :func:`vacuum` deletes Parquet files no longer referenced by a table version younger than the
  retention period (time travel to older versions is no longer possible afterwards), plus raw
  arrays that no ``exposures`` row references (left by a crash between publishing pixels and
  committing their row, and never adopted by a re-run) and temporaries of interrupted writes
  (on an object store: arrays and calibration sets whose ``zarr.json`` marker never landed).
* :func:`verify` re-reads raw arrays and quarantined copies and checks them against the hashes
  recorded at ingest.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
import polars as pl

from fiberlake.schemas.tables import SCHEMAS
from fiberlake.storage.calibstore import list_calib_leftovers
from fiberlake.storage.failpoints import failpoint
from fiberlake.storage.layout import Lake
from fiberlake.storage.lock import LakeLock
from fiberlake.storage.objectstore import remove_tree
from fiberlake.storage.quarantine import stored_copy_sha256
from fiberlake.storage.rawstore import list_raw_arrays, open_raw_frame, pixel_sha256
from fiberlake.storage.tables import TableStore, writer_properties_for


def _files(store: TableStore, name: str, night: str | None) -> int:
    table = store.delta(name)
    if night is None:
        return len(table.file_uris())
    return len(table.file_uris(file_pruning_predicate=[("night", "=", night)]))


def compact(lake: Lake, night: str | None = None, *, lock: bool = True) -> dict[str, tuple[int, int]]:
    """Merge small files of every table (one night's partition, or all) and checkpoint the logs.

    Parameters
    ----------
    lake : Lake
        The lake.
    night : str, optional
        Partition to compact; all partitions when omitted.
    lock : bool
        Take the lake's writer lock.

    Returns
    -------
    dict of str to (int, int)
        Data files of each table's partition before and after.
    """
    store = TableStore(lake.root / "tables")
    out: dict[str, tuple[int, int]] = {}
    with LakeLock(lake.root, "compact", timeout=60) if lock else nullcontext():
        for name in SCHEMAS:
            if not store.exists(name):
                continue
            before = _files(store, name, night)
            failpoint(f"compact.{name}")
            if before > 1:
                if store.reclusters(name):  # sorted per night: the target index skips row groups
                    for each in [night] if night else store.nights(name):
                        if _files(store, name, each) > 1:
                            store.recluster(name, each)
                else:
                    store.delta(name).optimize.compact(
                        partition_filters=[("night", "=", night)] if night else None,
                        writer_properties=writer_properties_for(SCHEMAS[name], store.row_bytes(name)),
                        min_commit_interval=timedelta(0),
                    )
            failpoint(f"compacted.{name}")
            table = store.delta(name)
            table.create_checkpoint()
            table.cleanup_metadata()
            out[name] = (before, _files(store, name, night))
    return out


@dataclass
class VacuumReport:
    """What :func:`vacuum` removed (or would remove with ``dry_run``)."""

    table_files: dict[str, int] = field(default_factory=dict)
    orphan_arrays: list[str] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for people."""
        return (f"{sum(self.table_files.values())} unreferenced table files, {len(self.orphan_arrays)} unreferenced "
                f"raw arrays, {len(self.temporaries)} temporaries of interrupted writes")


def vacuum(lake: Lake, retention_hours: float = 168.0, *, dry_run: bool = False, lock: bool = True) -> VacuumReport:
    """Delete what no table version younger than ``retention_hours`` references.

    Parameters
    ----------
    lake : Lake
        The lake.
    retention_hours : float
        Files and arrays younger than this are kept (Delta's default is 168 h, one week).
        Versions older than this cannot be read with ``--as-of`` after a vacuum.
    dry_run : bool
        Report, delete nothing.
    lock : bool
        Take the lake's writer lock.
    """
    store = TableStore(lake.root / "tables")
    report = VacuumReport()
    cutoff = time.time() - retention_hours * 3600
    with LakeLock(lake.root, "vacuum", timeout=60) if lock else nullcontext():
        for name in SCHEMAS:
            if store.exists(name):
                failpoint(f"vacuum.{name}")
                removed = store.delta(name).vacuum(
                    retention_hours=int(retention_hours), dry_run=dry_run, enforce_retention_duration=False
                )
                report.table_files[name] = len(removed)
        # Polars reads the Parquet files itself. Not store.read: pyarrow reads a Delta table through a
        # Python filesystem, and its scanner can still be releasing those Python buffers on its own
        # threads when the command returns; a release after the interpreter began to exit aborts the
        # process ("terminate called without an active exception", exit 134; apache/arrow#34314).
        referenced = set(store.scan("exposures").select("raw_path").collect()["raw_path"].to_list())
        for array in list_raw_arrays(lake.root):
            if array.mtime > cutoff:
                continue
            if array.temporary:
                report.temporaries.append(array.relpath)
            elif array.relpath not in referenced:
                report.orphan_arrays.append(array.relpath)
        report.temporaries.extend(rel for rel, mtime in list_calib_leftovers(lake.root) if mtime <= cutoff)
        if not dry_run:
            for rel in report.orphan_arrays + report.temporaries:
                failpoint("vacuum.remove")
                remove_tree(lake.root / rel)
    return report


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every stored byte matched its recorded hash."""
        return not self.problems

    def summary(self) -> str:
        """One line for people."""
        if self.ok:
            return f"{self.checked} stored items verified, all match their recorded hashes"
        return f"{self.checked} stored items checked, {len(self.problems)} problems"


def verify(lake: Lake, night: str | None = None) -> VerifyReport:
    """Re-read every raw array (and quarantined copy) of a night and compare with the recorded hashes.

    Parameters
    ----------
    lake : Lake
        The lake.
    night : str, optional
        Night to verify; every night when omitted.

    Returns
    -------
    VerifyReport
        ``problems`` lists each missing or altered item in words.
    """
    store = TableStore(lake.root / "tables")
    report = VerifyReport()
    exposures = store.scan("exposures")
    quarantine = store.scan("quarantine")
    if night is not None:
        exposures = exposures.filter(pl.col("night") == night)
        quarantine = quarantine.filter(pl.col("night") == night)
    for row in exposures.select("raw_path", "pixel_sha256", "file_sha256").collect().iter_rows(named=True):
        report.checked += 1
        path = row["raw_path"]
        try:
            array = open_raw_frame(lake.root, path)
            pixels = array[...]
        except Exception as err:  # a missing or unreadable array is what verify exists to find
            report.problems.append(f"{path}: cannot be read ({type(err).__name__}: {err})")
            continue
        digest = pixel_sha256(pixels)
        if digest != row["pixel_sha256"]:
            report.problems.append(f"{path}: pixel SHA-256 {digest[:12]}... differs from the recorded {row['pixel_sha256'][:12]}...")
        if array.attrs.get("file_sha256") != row["file_sha256"]:
            report.problems.append(f"{path}: attributes name file {array.attrs.get('file_sha256')}, the table {row['file_sha256']}")
    for row in quarantine.select("stored_path", "file_sha256").collect().iter_rows(named=True):
        report.checked += 1
        digest = stored_copy_sha256(lake.root, row["stored_path"])
        if digest is None:
            report.problems.append(f"{row['stored_path']}: quarantined copy is missing")
            continue
        if digest != row["file_sha256"]:
            report.problems.append(f"{row['stored_path']}: SHA-256 differs from the recorded one")
    return report
