"""A lake on an object store (``s3://``) against a real S3-compatible server (moto, server mode).

The same small mini night goes into a local lake and into ``s3://`` lakes; every table's rows,
every raw array, calibration set and quarantined copy must be the same (the stored objects are
byte for byte the local files). Crashes at the publication failpoints, then a re-run, give the
same lake; a second writer is refused; a stale lock is taken over; queries, compaction, vacuum
and verify work; one run on Ray actors writes the same tables.

The server runs in a child process: deltalake's ``DeltaTable.is_deltatable`` keeps the GIL
while it waits for the network, so a server thread inside the test process would deadlock.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from deltalake import DeltaTable, write_deltalake  # noqa: E402

from fiberlake.jobs.cli import main  # noqa: E402
from fiberlake.jobs.ingest import ingest_files, ingest_night  # noqa: E402
from fiberlake.jobs.query import sql  # noqa: E402
from fiberlake.jobs.upkeep import compact, vacuum, verify  # noqa: E402
from fiberlake.jobs.watch import watch_night  # noqa: E402
from fiberlake.processors.params import ReductionParams  # noqa: E402
from fiberlake.storage.calibstore import read_calib_meta, read_calib_set, write_calib_set  # noqa: E402
from fiberlake.storage.layout import Lake, LakeError  # noqa: E402
from fiberlake.storage.lock import LakeBusy, LakeLock  # noqa: E402
from fiberlake.storage.objectlock import ObjectStoreLock  # noqa: E402
from fiberlake.storage import calibstore, objectlock, rawstore  # noqa: E402
from fiberlake.storage.objectstore import (  # noqa: E402
    ConditionalPutUnsupported,
    ObjectPath,
    ObjectStoreError,
    filesystem,
    storage_options,
)
from fiberlake.storage.rawstore import list_raw_arrays, open_raw_frame, write_raw_frame  # noqa: E402
from fiberlake.storage.tables import TableStore  # noqa: E402
from tests.lakecompare import assert_lakes_equal, table_rows  # noqa: E402
from tests.nights import night_with_bad_deliveries  # noqa: E402
from tests.stages import LIGHT_PRODUCTS, LIGHT_PRODUCTS_FLAGS  # noqa: E402

pytestmark = pytest.mark.slow  # a moto S3 server and whole ingests/reductions on s3:// lakes

NIGHT = "2026-11-28"
BUCKET = "fiberlake-test"
REDUCE = ["--extract", "box", "--no-cosmics", "--no-rectify", *LIGHT_PRODUCTS_FLAGS]
FLAGS = [*REDUCE, "--quiet"]
CONFIG = ReductionParams().updated({"extractions": ("box",), "cosmics.enabled": False, "rectify.enabled": False} | LIGHT_PRODUCTS)
REPO = Path(__file__).resolve().parents[1]
STORED = ("raw", "calib", "quarantine", "lake.json")
"""What the lake stores outside its tables (the tables' Parquet files have random names: rows are compared)."""
SERVER = """
import sys
from moto import __version__
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port={port}, verbose=False)
server.start()
print("up", __version__, flush=True)
sys.stdin.read()
server.stop()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free local port, the AWS variables pointing at it, and a bucket."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER.format(port=port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    banner = server.stdout.readline().split()
    assert banner[:1] == ["up"], "the moto server did not start"
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            patch.delenv("AWS_SESSION_TOKEN", raising=False)
            filesystem().call_s3("create_bucket", Bucket=BUCKET)
            yield {"moto": banner[1], **env}
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stdout.close()


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Path:
    """A mini night (b1) plus a duplicate delivery and a truncated file (quarantined)."""
    return night_with_bad_deliveries(tmp_path_factory.mktemp("osnight"), NIGHT, seed=12)


def _ingest_and_process(lake: str, night: Path) -> None:
    assert main(["ingest", str(night), "--lake", lake, "--instrument", "mini", "--settle", "0", "--quiet"]) == 0
    assert main(["process", "--night", NIGHT, "--lake", lake, "--no-ray", *FLAGS]) == 0


@pytest.fixture(scope="module")
def local_lake(night, tmp_path_factory) -> Lake:
    """The reference: the night in a local lake."""
    root = tmp_path_factory.mktemp("oslocal") / "lake"
    _ingest_and_process(str(root), night)
    return Lake.at(root)


@pytest.fixture(scope="module")
def s3_lake(s3, night) -> Lake:
    """The same night, same commands, in ``s3://<bucket>/clean``."""
    url = f"s3://{BUCKET}/clean"
    _ingest_and_process(url, night)
    return Lake.at(url)


def _cli(args: list[str], **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, **env, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "fiberlake.jobs.cli", *args], env=environ, capture_output=True,
                          text=True, timeout=300)


def _local_files(lake: Lake) -> dict[str, bytes]:
    root = Path(lake.root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] in STORED}


def _objects(lake: Lake) -> dict[str, bytes]:
    fs, base = filesystem(), lake.root.path + "/"
    keys = [k for k in fs.find(base) if k[len(base):].split("/")[0] in STORED]
    return {k[len(base):]: data for k, data in fs.cat(keys).items()}


# --- the same lake on S3 as on disk --------------------------------------------------------------
def test_s3_lake_equals_the_local_lake_object_for_file(s3_lake, local_lake):
    assert_lakes_equal(s3_lake, local_lake)
    want, got = _local_files(local_lake), _objects(s3_lake)
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    assert any(k.startswith("quarantine/") for k in got) and any(k.startswith("calib/") for k in got)
    assert "lake.json" in got
    assert [k for k in got if got[k] != want[k]] == [], "stored bytes differ from the local lake's"
    assert not filesystem().exists(f"{s3_lake.root.path}/.writer.lock"), "the lock is released"
    assert verify(s3_lake).ok


def test_query_on_s3(s3_lake, local_lake, capsys):
    query = "SELECT objtype, count(*) AS n, sum(median_flux) AS f FROM metrics GROUP BY objtype ORDER BY objtype"
    assert sql(s3_lake, query).equals(sql(local_lake, query))
    url = str(s3_lake.root / "tables" / "spectra")
    direct = pl.scan_delta(url, storage_options=storage_options()).select(pl.len()).collect().item()
    assert direct == 64  # 2 frames x 32 fibers, box
    assert main(["query", "--lake", str(s3_lake.root), "--format", "csv", "--as-of", "exposures@1",
                 "SELECT count(*) AS n FROM exposures"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "5"


def test_an_earlier_nights_calibration_is_found_on_s3(s3_lake):
    from fiberlake.jobs.calibrations import earlier_calibration

    meta = read_calib_meta(s3_lake.calib_path(NIGHT, "b1"))
    choice = earlier_calibration(s3_lake, "2026-12-01", "b1", CONFIG)
    assert (choice.night, choice.calib_id) == (NIGHT, meta["calib_id"])
    assert earlier_calibration(s3_lake, NIGHT, "b1", CONFIG) is None  # earlier only


def test_delta_commits_on_s3_never_overwrite_a_version(s3):
    """deltalake's S3 commits are conditional PUTs: a stale writer lands on the next free version."""
    url = f"s3://{BUCKET}/delta-race"
    write_deltalake(url, pa.table({"a": [1]}), storage_options=storage_options())
    stale = DeltaTable(url, storage_options=storage_options())  # sees version 0
    write_deltalake(url, pa.table({"a": [2]}), mode="append", storage_options=storage_options())  # version 1
    write_deltalake(stale, pa.table({"a": [3]}), mode="append")  # tries version 1 first
    table = DeltaTable(url, storage_options=storage_options())
    assert table.version() == 2
    assert sorted(table.to_pyarrow_table().column("a").to_pylist()) == [1, 2, 3]


# --- crashes mid-publication ----------------------------------------------------------------------
def test_kills_at_publication_failpoints_then_a_rerun_equal_a_clean_run(s3, night, local_lake):
    url = f"s3://{BUCKET}/crash"
    lake = Lake.at(url)
    worker = ["watch", str(night), "--once", "--lake", url, "--instrument", "mini", *REDUCE]
    # 1. killed after the 3rd array's chunks are up, before its zarr.json: no such array exists.
    assert _cli(worker, FIBERLAKE_FAILPOINT="raw.before_publish:3").returncode == -signal.SIGKILL
    arrays = list_raw_arrays(lake.root)
    assert [a.temporary for a in arrays] == [False, False, True]
    with pytest.raises(FileNotFoundError):
        open_raw_frame(lake.root, arrays[2].relpath)
    lock = ObjectStoreLock(lake.root)
    holder = lock.holder()
    assert holder is not None and lock.is_stale(holder), "the dead worker's lock is left, and stale at once"
    # 2. killed between the exposures commit and the deliveries commit.
    assert _cli(worker, FIBERLAKE_FAILPOINT="committed.exposures:1").returncode == -signal.SIGKILL
    # 3. killed with the calibration set's arrays up, before its marker: no set for any reader.
    assert _cli(worker, FIBERLAKE_FAILPOINT="calib.before_publish:1").returncode == -signal.SIGKILL
    calib = lake.calib_path(NIGHT, "b1")
    assert filesystem().find(calib.path) and read_calib_meta(calib) is None
    with pytest.raises(FileNotFoundError):
        read_calib_set(calib)
    # 4. the re-run takes the stale lock over and finishes: the lake is the clean local one.
    report = watch_night(lake, night, once=True, config=CONFIG)
    assert len(report.reduced) == 2 and not report.failed
    assert_lakes_equal(lake, local_lake)
    assert verify(lake).ok


def test_calib_set_replacement_on_s3(s3):
    path = ObjectPath(f"s3://{BUCKET}/sets/calib/n/b1")
    write_calib_set(path, {"a": np.arange(6.0).reshape(2, 3), "g/b": np.array(3), "old/only": np.ones(2)}, {"v": 1})
    write_calib_set(path, {"a": np.ones((2, 3)), "g/b": np.array(4)}, {"v": 2})
    arrays, meta = read_calib_set(path)
    assert meta == {"v": 2} and sorted(arrays) == ["a", "g/b"] and int(arrays["g/b"]) == 4
    assert not any("old" in key for key in filesystem().find(path.path)), "the old set's objects are gone"


# --- one writer -----------------------------------------------------------------------------------
def test_a_second_writer_is_refused(s3, night):
    lake = Lake.at(f"s3://{BUCKET}/busy")
    with LakeLock(lake.root, "test holder"):
        with pytest.raises(LakeBusy, match="test holder"):
            ingest_night(lake, night)
        result = _cli(["ingest", str(night), "--lake", str(lake.root), "--instrument", "mini", "--settle", "0", "--quiet"])
        assert result.returncode == 1
        assert result.stderr.startswith("fiberlake: error: another fiberlake writer holds the lake")
    assert not lake.root.exists(), "released, and nothing written by the refused writers"


def _plant_lock(root: ObjectPath, **info) -> None:
    content = {"pid": 1, "host": "elsewhere", "boot_id": "", "pid_start": "", "command": "planted", "token": "x",
               "acquired_at": "2026-01-01T00:00:00+00:00", "renewed_at": "2026-01-01T00:00:00+00:00", **info}
    (root / ".writer.lock").write_text(json.dumps(content))


def test_stale_lock_rule(s3):
    root = ObjectPath(f"s3://{BUCKET}/stale")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # a lock of a process of this machine that is gone: taken over at once
    _plant_lock(root, pid=dead.pid, host=socket.gethostname(), boot_id=objectlock._boot_id())
    with ObjectStoreLock(root, "takeover") as lock:
        assert lock.holder().info["token"] == lock.token
    # a lock held elsewhere and renewed recently: refused, until it is older than the stale limit
    _plant_lock(root)
    with pytest.raises(LakeBusy, match="planted, pid 1 on elsewhere"):
        ObjectStoreLock(root, "second", stale_after=60).acquire()
    time.sleep(2.2)  # LastModified has whole seconds
    with ObjectStoreLock(root, "after", stale_after=1) as lock:
        assert lock.holder().info["command"] == "after"
    assert not (root / ".writer.lock").exists()


def test_the_holder_renews_and_notices_a_takeover(s3):
    root = ObjectPath(f"s3://{BUCKET}/renew")
    lock = ObjectStoreLock(root, "renewing", stale_after=0.5).acquire()  # renews every 0.1 s
    try:
        first = lock.holder().etag
        deadline = time.monotonic() + 5
        while lock.holder().etag == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock.holder().etag != first, "the lock was not renewed"
        _plant_lock(root, command="intruder")  # someone took it over
        deadline = time.monotonic() + 5
        while not lock.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock.lost
    finally:
        lock.release()
    assert lock.holder().info["command"] == "intruder", "a lost lock is not deleted on release"
    filesystem().rm_file((root / ".writer.lock").path)


def test_a_server_without_conditional_put_is_named(s3, monkeypatch):
    monkeypatch.setattr(objectlock, "put_if_absent", lambda path, data: filesystem().pipe_file(path.path, data)["ETag"])
    with pytest.raises(ConditionalPutUnsupported, match="If-None-Match"):
        ObjectStoreLock(ObjectPath(f"s3://{BUCKET}/noconditional"), "x").acquire()


def test_bad_lake_urls_are_refused(s3, monkeypatch):
    with pytest.raises(LakeError, match="only s3://"):
        Lake.at("gs://bucket/lake")
    with pytest.raises(LakeError, match="bucket name"):
        Lake.at("s3://Not_A_Bucket/lake")
    path = ObjectPath.parse("s3://bkt//a/b/")
    assert str(path / "c/d") == "s3://bkt/a/b/c/d" and path.name == "b" and str(path.parent) == "s3://bkt/a"
    assert (path / "c/d").relative_to(path).as_posix() == "c/d"
    monkeypatch.delenv("AWS_ALLOW_HTTP")
    with pytest.raises(ObjectStoreError, match="AWS_ALLOW_HTTP"):
        storage_options()


# --- upkeep ---------------------------------------------------------------------------------------
def _crash_at(name: str):
    def failpoint(reached: str) -> None:
        if reached == name:
            raise KeyboardInterrupt(reached)

    return failpoint


def test_compact_vacuum_and_verify_on_s3(s3, night, monkeypatch):
    lake = Lake.at(f"s3://{BUCKET}/upkeep")
    first_map = sorted(night.glob("fibermap-*.fits"))[0]
    ingest_files(lake, [first_map], NIGHT, instrument="mini")  # one fiber map per commit, then the rest
    ingest_night(lake, night)
    store = TableStore(lake.root / "tables")
    rows = table_rows(lake, "exposures")
    # an orphan array (no row), a half-published array and a half-published calibration set
    pixels = np.arange(12, dtype=np.uint16).reshape(3, 4)
    write_raw_frame(lake.root, f"raw/{NIGHT}/00000042/b1", pixels, {})
    monkeypatch.setattr(rawstore, "failpoint", _crash_at("raw.before_publish"))
    with pytest.raises(KeyboardInterrupt):
        write_raw_frame(lake.root, f"raw/{NIGHT}/00000043/b1", pixels, {})
    monkeypatch.setattr(calibstore, "failpoint", _crash_at("calib.before_publish"))
    with pytest.raises(KeyboardInterrupt):
        write_calib_set(lake.calib_path(NIGHT, "r1"), {"a": np.ones(3)}, {"v": 1})
    assert read_calib_meta(lake.calib_path(NIGHT, "r1")) is None
    dry = vacuum(lake, retention_hours=0, dry_run=True)
    assert dry.orphan_arrays == [f"raw/{NIGHT}/00000042/b1"]
    assert dry.temporaries == [f"raw/{NIGHT}/00000043/b1", f"calib/{NIGHT}/r1"]
    assert compact(lake)["fibermap"] == (2, 1)  # two commits' files, merged
    done = vacuum(lake, retention_hours=0)
    assert (done.orphan_arrays, done.temporaries) == (dry.orphan_arrays, dry.temporaries)
    assert sum(done.table_files.values()) > 0, "the files compaction replaced are vacuumed"
    left = filesystem().find(lake.root.path)
    assert not any("00000042" in k or "00000043" in k or "/calib/" in k for k in left)
    assert table_rows(lake, "exposures") == rows and store.read("fibermap").num_rows == 64
    assert verify(lake).ok
    # an altered raw object is found
    victim = sorted(k for k in left if k.endswith("/c/0/0"))[0]
    data = bytearray(filesystem().cat_file(victim))
    filesystem().pipe_file(victim, bytes(data[:-8]) + bytes(8))
    report = verify(lake)
    assert not report.ok and len(report.problems) == 1


# --- Ray ------------------------------------------------------------------------------------------
def test_process_on_ray_actors_then_reprocess_write_the_same_tables(s3, night, local_lake):
    url = f"s3://{BUCKET}/ray"
    assert main(["ingest", str(night), "--lake", url, "--instrument", "mini", "--settle", "0", "--quiet"]) == 0
    result = _cli(["process", "--night", NIGHT, "--lake", url, "--actors", "1", *FLAGS])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 frames reduced" in result.stdout
    assert_lakes_equal(Lake.at(url), local_lake)
    # a release reprocessed (in this process) on the same lake: every frame again, same rows
    assert main(["reprocess", "--lake", url, "--release", "dr1", "--no-ray", *FLAGS]) == 0
    markers = TableStore(Lake.at(url).root / "tables").read("reductions").column("run_id").to_pylist()
    assert len(markers) == 2 and all(run.startswith("reprocess-dr1-") for run in markers)
    assert_lakes_equal(Lake.at(url), local_lake)
