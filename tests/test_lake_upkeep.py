"""Lake upkeep and guarantees: writer lock, compaction under readers, time travel, vacuum, verify."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time

import numpy as np
import pytest
from conftest import write_raw

from fiberlake.jobs.cli import main
from fiberlake.jobs.ingest import ingest_night
from fiberlake.jobs.query import AsOfError, scan_tables, sql
from fiberlake.jobs.upkeep import compact, vacuum, verify
from fiberlake.storage.layout import Lake
from fiberlake.storage.lock import LakeBusy, LakeLock
from fiberlake.storage.rawstore import write_raw_frame
from fiberlake.storage.tables import TableStore


@pytest.fixture
def lake_of_many_commits(tmp_path):
    """Five frames ingested one per run: five small files per table."""
    night = tmp_path / "2026-11-21"
    night.mkdir()
    lake = Lake.at(tmp_path / "lake")
    stamps = []
    for i in range(5):
        write_raw(night / f"fl-0215000{i}-b1.fits", EXPID=2150000 + i)
        ingest_night(lake, night)
        stamps.append(dt.datetime.now(dt.timezone.utc))
        time.sleep(0.05)
    return lake, stamps


def test_one_writer_at_a_time(tmp_path):
    lake = Lake.at(tmp_path / "lake")
    (tmp_path / "2026-11-21").mkdir()
    with LakeLock(lake.root, "test holder"):
        with pytest.raises(LakeBusy, match="test holder"):
            ingest_night(lake, tmp_path / "2026-11-21")
    ingest_night(lake, tmp_path / "2026-11-21")  # released


def test_compaction_keeps_rows_and_readers_see_no_gap(lake_of_many_commits):
    lake, _ = lake_of_many_commits
    store = TableStore(lake.root / "tables")
    want = sorted(store.read("exposures").column("file_sha256").to_pylist())
    seen, errors, done = [], [], threading.Event()

    def reader():
        while not done.is_set():
            try:
                seen.append(sorted(sql(lake, "SELECT file_sha256 FROM exposures")["file_sha256"].to_list()))
            except Exception as err:  # noqa: BLE001 - any reader failure is a test failure
                errors.append(err)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        files = compact(lake, "2026-11-21")
    finally:
        done.set()
        thread.join()
    assert files["exposures"][0] == 5 and files["exposures"][1] == 1
    assert files["deliveries"][1] == 1
    assert not errors and seen and all(s == want for s in seen)
    assert sorted(store.read("exposures").column("file_sha256").to_pylist()) == want
    assert (lake.root / "tables" / "exposures" / "_delta_log" / "_last_checkpoint").exists()


def test_time_travel_by_timestamp_and_version(lake_of_many_commits):
    lake, stamps = lake_of_many_commits
    assert sql(lake, "SELECT count(*) AS n FROM exposures", as_of=stamps[1].isoformat())["n"][0] == 2
    assert sql(lake, "SELECT count(*) AS n FROM exposures", as_of=0)["n"][0] == 0  # created empty with the lake
    assert sql(lake, "SELECT count(*) AS n FROM exposures", as_of=1)["n"][0] == 1
    with pytest.raises(AsOfError, match="before the lake existed"):
        scan_tables(lake, as_of=stamps[0] - dt.timedelta(hours=1))
    assert sql(lake, "SELECT count(*) AS n FROM exposures")["n"][0] == 5


def test_vacuum_removes_only_unreferenced(lake_of_many_commits):
    lake, _ = lake_of_many_commits
    compact(lake)
    rows = sorted(sql(lake, "SELECT raw_path FROM exposures")["raw_path"].to_list())
    # an array published by a crashed ingest whose row was never committed, a day ago
    orphan = "raw/2026-11-20/00000099/b1"
    write_raw_frame(lake.root, orphan, np.ones((4, 4), np.uint16), {})
    old = time.time() - 86400
    os.utime(lake.root / orphan, (old, old))
    dry = vacuum(lake, retention_hours=1, dry_run=True)
    assert dry.orphan_arrays == [orphan] and (lake.root / orphan).exists()
    report = vacuum(lake, retention_hours=0)
    assert report.table_files["exposures"] >= 5 and report.orphan_arrays == [orphan]
    assert not (lake.root / orphan).exists()
    assert sorted(sql(lake, "SELECT raw_path FROM exposures")["raw_path"].to_list()) == rows
    assert verify(lake).ok


def test_verify_finds_a_changed_byte(lake_of_many_commits, capsys):
    lake, _ = lake_of_many_commits
    assert verify(lake, "2026-11-21").ok
    assert main(["verify", "--lake", str(lake.root), "--night", "2026-11-21"]) == 0
    shard = next(p for p in (lake.root / "raw").rglob("c/*/*") if p.is_file())
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    report = verify(lake, "2026-11-21")
    assert len(report.problems) == 1, report.problems
    assert main(["verify", "--lake", str(lake.root), "--night", "2026-11-21"]) == 2
    assert "MISMATCH" in capsys.readouterr().out
