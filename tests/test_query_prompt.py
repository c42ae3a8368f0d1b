"""The query prompt: every table from the lake's creation, arrays in CSV, ``fiberlake tables``,
``--as-of`` per table with sentences for every refusal, queries that stay inside the lake, and
commands that refuse a path that is not a lake.

Fast: tiny lakes written row by row through :class:`TableStore`, no simulated night.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time

import duckdb
import polars as pl
import pyarrow as pa
import pytest

from fiberlake.jobs.cli import main
from fiberlake.jobs.query import AsOfError, QueryRefused, check_query, parse_as_of, scan_tables, sql
from fiberlake.jobs.upkeep import vacuum
from fiberlake.schemas.tables import SCHEMAS, TABLE_DESCRIPTIONS
from fiberlake.storage.layout import Lake, LakeError
from fiberlake.storage.tables import TableStore

NIGHT = "2026-11-21"


def _value(dtype: pa.DataType, i: int):
    if pa.types.is_list(dtype):
        return [_value(dtype.value_type, i) + k for k in range(3)]
    if pa.types.is_string(dtype):
        return f"v{i}"
    if pa.types.is_integer(dtype):
        return i
    if pa.types.is_floating(dtype):
        return 0.5 + i
    if pa.types.is_timestamp(dtype):
        return dt.datetime(2026, 11, 21, tzinfo=dt.timezone.utc)
    raise TypeError(dtype)


def rows(table: str, n: int = 2, start: int = 0, **fixed) -> list[dict]:
    """``n`` rows of ``table`` with a value of the right type in every column."""
    out = []
    for i in range(start, start + n):
        row = {f.name: _value(f.type, i) for f in SCHEMAS[table]}
        row.update(night=NIGHT, **fixed)
        out.append(row)
    return out


@pytest.fixture
def lake(tmp_path) -> Lake:
    """A new lake (every table created, empty), as ``ingest`` makes it."""
    lake = Lake.at(tmp_path / "lake")
    lake.ensure("mini")
    return lake


def _store(lake: Lake) -> TableStore:
    return TableStore(lake.root / "tables")


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_sentence(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fiberlake: error: "), err
    for raw in ("kernel", "os error", "Traceback", "DeltaError", "LogSegment", "Generic"):
        assert raw not in err, err


# --- 1. every table exists, empty, from the lake's creation ------------------------------------------
def test_every_table_exists_empty_from_the_lakes_creation(lake):
    store = _store(lake)
    assert all(store.exists(name) for name in SCHEMAS)
    assert all(store.version(name) == 0 for name in SCHEMAS)
    assert store.create_missing() == [] and all(store.version(name) == 0 for name in SCHEMAS), "idempotent"
    quarantine = sql(lake, "SELECT * FROM quarantine")
    assert quarantine.height == 0 and quarantine.columns == SCHEMAS["quarantine"].names
    dataset = store.delta("quarantine").to_pyarrow_dataset()
    assert dataset.count_rows() == 0 and dataset.schema.names == SCHEMAS["quarantine"].names
    assert duckdb.arrow(dataset).aggregate("count(*)").fetchall() == [(0,)]


def test_a_lake_made_before_every_table_existed_reads_missing_tables_as_empty(tmp_path):
    from fiberlake.storage.layout import LAKE_FORMAT_VERSION

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "lake.json").write_text(json.dumps({"instrument": "mini",
                                                             "format_version": LAKE_FORMAT_VERSION}))
    old = Lake.open(tmp_path / "old")
    TableStore(old.root / "tables").append("exposures", rows("exposures"))
    assert sql(old, "SELECT count(*) AS n FROM metrics")["n"][0] == 0
    assert sql(old, "SELECT count(*) AS n FROM exposures")["n"][0] == 2
    assert sql(old, "SELECT * FROM spectra", as_of=0).columns == SCHEMAS["spectra"].names


def test_a_lake_of_another_format_is_refused_with_a_sentence(tmp_path, capsys):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "lake.json").write_text(json.dumps({"instrument": "mini", "format_version": 1}))
    with pytest.raises(LakeError, match="is of format 1.*ingest its night directories into a new lake"):
        Lake.open(tmp_path / "v1")
    code, _, err = _run(capsys, "query", "--lake", str(tmp_path / "v1"), "SELECT * FROM runs")
    assert code == 1 and "is of format 1" in err


# --- 2. CSV keeps array columns ------------------------------------------------------------------------------
def test_csv_writes_array_columns_as_json_lists(lake, capsys):
    _store(lake).append("spectra", rows("spectra", 2))
    code, out, _ = _run(capsys, "query", "--lake", str(lake.root), "--format", "csv",
                        "SELECT night, fiber, flux, mask FROM spectra ORDER BY fiber")
    assert code == 0
    got = list(csv.DictReader(io.StringIO(out)))
    assert [json.loads(r["flux"]) for r in got] == [[0.5, 1.5, 2.5], [1.5, 2.5, 3.5]]
    assert [json.loads(r["mask"]) for r in got] == [[0, 1, 2], [1, 2, 3]]
    assert got[0]["night"] == NIGHT


# --- 3. fiberlake tables ---------------------------------------------------------------------------------------
def test_every_column_of_every_table_has_a_description():
    assert set(TABLE_DESCRIPTIONS) == set(SCHEMAS)
    for name, schema in SCHEMAS.items():
        for field in schema:
            assert (field.metadata or {}).get(b"description"), f"{name}.{field.name} has no description"


def test_tables_lists_tables_and_prints_a_schema(lake, capsys):
    _store(lake).append("metrics", rows("metrics", 3))
    code, out, _ = _run(capsys, "tables", "--lake", str(lake.root))
    assert code == 0
    assert all(name in out for name in SCHEMAS)
    metrics_line = next(line for line in out.splitlines() if line.startswith("metrics "))
    assert metrics_line.split()[1] == "3" and "versions 0 to 1" in metrics_line
    code, out, _ = _run(capsys, "tables", "--lake", str(lake.root), "metrics")
    assert code == 0
    for field in SCHEMAS["metrics"]:
        line = next(line for line in out.splitlines() if line.split()[:1] == [field.name])
        assert field.metadata[b"description"].decode() in line
    code, _, err = _run(capsys, "tables", "--lake", str(lake.root), "metricz")
    assert code == 1 and "metrics" in err
    _assert_sentence(err)


# --- 4. --as-of per table ----------------------------------------------------------------------------------------
@pytest.fixture
def lake_with_history(lake):
    """exposures: versions 1-3 add 2 rows each; spectra: version 1 adds 2 rows; times between commits."""
    store, stamps = _store(lake), []
    for batch in range(3):
        time.sleep(0.02)
        stamps.append(dt.datetime.now(dt.timezone.utc))
        time.sleep(0.02)
        store.append("exposures", rows("exposures", 2, start=2 * batch))
    store.append("spectra", rows("spectra", 2))
    return lake, stamps


def _count(lake, table, as_of):
    return sql(lake, f"SELECT count(*) AS n FROM {table}", as_of=as_of)["n"][0]


def test_as_of_versions_per_table(lake_with_history):
    lake, _ = lake_with_history
    assert _count(lake, "exposures", 2) == 4 and _count(lake, "spectra", 2) == 2  # spectra: newest <= 2 is 1
    assert _count(lake, "exposures", 0) == 0 and _count(lake, "quarantine", 3) == 0
    assert _count(lake, "spectra", "spectra@0") == 0 and _count(lake, "exposures", "spectra@0") == 6
    assert _count(lake, "exposures", "exposures@1,spectra@1") == 2
    assert _count(lake, "exposures", "1,exposures@3") == 6


def test_as_of_time_is_a_consistent_view(lake_with_history):
    lake, stamps = lake_with_history
    assert _count(lake, "exposures", stamps[2].isoformat()) == 4
    assert _count(lake, "spectra", stamps[2]) == 0
    assert _count(lake, "exposures", f"{stamps[1].isoformat()},exposures@3") == 6


@pytest.mark.parametrize("as_of, says", [
    ("-1", "versions count from 0"),
    ("99", "no table has version 99; the newest is version 3 of table exposures"),
    ("spectra@5", "table spectra has no version 5; it has versions 0 to 1"),
    ("spectra@-2", "table spectra has no version -2; it has versions 0 to 1"),
    ("2026-13-01", "neither a table version (0, 1, ...) nor an ISO 8601 time"),
    ("2000-01-01T00:00:00", "is before the lake existed (its first commit was at"),
    ("spectrum@1", "there is no table 'spectrum'; tables: exposures"),
    ("1,2", "at most one version or time without a table name"),
])
def test_as_of_refusals_are_sentences(lake_with_history, capsys, as_of, says):
    lake, _ = lake_with_history
    code, out, err = _run(capsys, "query", "--lake", str(lake.root), "--as-of", as_of, "SELECT * FROM exposures")
    assert code == 1 and out == "" and says in err
    _assert_sentence(err)


def test_as_of_after_vacuum_says_which_versions_remain(lake_with_history, capsys):
    lake, _ = lake_with_history
    store = _store(lake)
    store.replace("exposures", rows("exposures", 1, start=9), f"night = '{NIGHT}'")  # v4 takes v1-v3's files out
    vacuum(lake, retention_hours=0)
    assert _count(lake, "exposures", None) == 1 and _count(lake, "exposures", "exposures@4") == 1
    with pytest.raises(AsOfError, match=r"version 2 of table exposures refers to data files that 'fiberlake "
                                        r"vacuum' removed .* it can read versions 4 to 6"):
        sql(lake, "SELECT * FROM exposures", as_of="exposures@2")
    code, _, err = _run(capsys, "query", "--lake", str(lake.root), "--as-of", "2", "SELECT * FROM exposures")
    assert code == 1 and "'fiberlake vacuum' removed" in err
    _assert_sentence(err)
    assert "versions 4 to 6 (versions 0 to 3 refer to data files" in store.versions("exposures").span()


def test_as_of_text_parses_items():
    spec = parse_as_of("2026-11-21T18:00, spectra@3")
    assert spec.default == dt.datetime(2026, 11, 21, 18, tzinfo=dt.timezone.utc) and spec.tables == {"spectra": 3}
    assert parse_as_of(None) is None and parse_as_of(4).default == 4


# --- 5. the query stays inside the lake ---------------------------------------------------------------------------
HOSTILE = [
    "SELECT * FROM read_csv('{path}')",
    "select * from READ_CSV('{path}')",
    "SELECT * FROM \"read_csv\"('{path}')",
    "SELECT * FROM read_csv/* hidden */('{path}')",
    "SELECT * FROM read_parquet('{path}')",
    "SELECT * FROM read_json('{path}')",
    "SELECT * FROM read_ipc('{path}')",
    "SELECT * FROM read_delta('{path}')",
    "SELECT * FROM scan_csv('{path}')",
    "SELECT * FROM exposures JOIN read_csv('{path}') x ON true",
    "SELECT * FROM exposures, read_csv('{path}')",
    "SELECT * FROM (SELECT * FROM read_csv('{path}'))",
    "SELECT * FROM exposures WHERE expid IN (SELECT 1 FROM read_csv('{path}'))",
    "WITH x AS (SELECT * FROM read_csv('{path}')) SELECT * FROM x",
    "SELECT * FROM some_function('{path}')",
    "SELECT * FROM '{path}'",
    "SELECT * FROM \"{path}\"",
    "SELECT * FROM main.exposures",
    "CREATE TABLE t AS SELECT * FROM read_csv('{path}')",
    "DROP TABLE exposures",
    "COPY exposures TO '{path}'",
    "SELECT 1; SELECT * FROM read_csv('{path}')",
    "SELECT 'it''s' AS a FROM exposures, read_csv('{path}')",
    "SELECT $$a'b$$ AS a FROM read_csv('{path}')",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_queries_that_read_outside_the_lake_are_refused(lake, tmp_path, capsys, template):
    secret = tmp_path / "secret.csv"
    secret.write_text("token\nSECRET-VALUE-42\n")
    query = template.format(path=secret)
    with pytest.raises(QueryRefused):
        check_query(query, SCHEMAS)
    code, out, err = _run(capsys, "query", "--lake", str(lake.root), "--format", "csv", query)
    assert code == 1 and "SECRET-VALUE-42" not in out + err
    _assert_sentence(err)


def test_etc_passwd_is_refused_with_a_sentence(lake, capsys):
    code, out, err = _run(capsys, "query", "--lake", str(lake.root), "SELECT * FROM read_csv('/etc/passwd')")
    assert code == 1 and out == "" and "reads only the lake's tables" in err
    _assert_sentence(err)


@pytest.mark.parametrize("query", [
    "SELECT e.expid, count(*) AS n FROM exposures e JOIN spectra s ON e.expid = s.expid GROUP BY e.expid",
    "WITH a AS (SELECT expid FROM exposures), b (x) AS (SELECT expid FROM spectra) SELECT * FROM a, b",
    "SELECT * FROM (SELECT expid FROM exposures) AS sub WHERE expid IN (SELECT expid FROM spectra)",
    "SELECT extract(year FROM ingested_at) AS y, read_noise FROM exposures WHERE filename <> 'read_csv(x)'",
    "SELECT expid FROM exposures WHERE expid IS DISTINCT FROM 3 ORDER BY expid, night",
    "SELECT * FROM EXPOSURES",
    "SELECT x FROM UNNEST([1, 2]) AS u(x)",
    "SHOW TABLES",
    "SELECT 1 AS one;",
])
def test_ordinary_queries_run(lake_with_history, query):
    lake, _ = lake_with_history
    sql(lake, query)


def test_describe_points_to_fiberlake_tables(lake):
    with pytest.raises(QueryRefused, match="'fiberlake tables NAME'"):
        sql(lake, "DESCRIBE metrics")


def test_a_file_the_user_names_can_be_joined(lake, tmp_path, capsys):
    _store(lake).append("exposures", rows("exposures", 2))
    extra = tmp_path / "targets.parquet"
    pl.DataFrame({"expid": [1], "label": ["star"]}).write_parquet(extra)
    code, out, _ = _run(capsys, "query", "--lake", str(lake.root), "--format", "csv", "--table", f"targets={extra}",
                        "SELECT t.label FROM exposures e JOIN targets t ON e.expid = t.expid")
    assert code == 0 and out.splitlines() == ["label", "star"]
    code, _, err = _run(capsys, "query", "--lake", str(lake.root), "--table", f"spectra={extra}", "SELECT 1")
    assert code == 1 and "already a table" in err


# --- 6. only ingest and watch create a lake; nights are dates ------------------------------------------------------
NOT_A_LAKE = [
    ["process", "--night", NIGHT, "--no-ray"],
    ["reprocess", "--no-ray"],
    ["query", "SELECT 1"],
    ["tables"],
    ["compact"],
    ["vacuum"],
    ["verify"],
    ["evaluate", "--night", NIGHT, "--truth", "nowhere"],
    ["runs", "show", "r1"],
]


@pytest.mark.parametrize("argv", NOT_A_LAKE, ids=lambda argv: argv[0])
def test_commands_refuse_a_path_that_is_not_a_lake(tmp_path, capsys, argv):
    typo = tmp_path / "nolake"
    code, _, err = _run(capsys, *argv, "--lake", str(typo))
    assert code == 1 and "is not a fiberlake lake" in err
    _assert_sentence(err)
    assert not typo.exists(), "nothing is created at a path that is not a lake"


def test_lake_open_refuses_an_empty_directory(tmp_path):
    with pytest.raises(LakeError, match="no lake.json"):
        Lake.open(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["process", "--night", "{night}"], ["compact", "--night", "{night}"], ["verify", "--night", "{night}"],
    ["evaluate", "--truth", "t", "--night", "{night}"], ["reprocess", "--nights", NIGHT, "{night}"],
    ["simulate", "--out", "o", "--night", "{night}"],
], ids=lambda argv: argv[0])
@pytest.mark.parametrize("night", ["2026/12/01", "2026-02-30", "x' OR true"])
def test_night_arguments_must_be_dates(lake, capsys, argv, night):
    with pytest.raises(SystemExit) as stop:
        main([a.format(night=night) for a in argv] + (["--lake", str(lake.root)] if argv[0] != "simulate" else []))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "argument --night" in err and ("YYYY-MM-DD" in err or "calendar date" in err)


def test_a_data_file_gone_from_under_a_table_is_a_sentence(lake, capsys):
    _store(lake).append("exposures", rows("exposures", 2))
    for data_file in (lake.root / "tables" / "exposures").rglob("*.parquet"):
        data_file.unlink()
    code, _, err = _run(capsys, "query", "--lake", str(lake.root), "SELECT * FROM exposures")
    assert code == 1 and "table exposures refers to a data file that is missing" in err
    _assert_sentence(err)
