"""End to end on a simulated mini night: simulate -> ingest -> process -> query, against truth.

Seed 7 is used nowhere else (the demo uses 0), so the thresholds are checked on a night the
stages were not tuned on.
"""

from __future__ import annotations

import json

import duckdb
import numpy as np
import polars as pl
import pyarrow.dataset as ds
import pytest
from deltalake import DeltaTable

from fiberlake.ingest.simulate import simulate_night
from fiberlake.jobs.cli import main
from fiberlake.jobs.evaluate import evaluate_night
from fiberlake.jobs.ingest import ingest_night
from fiberlake.jobs.process import process_night
from fiberlake.jobs.query import scan_tables, sql
from fiberlake.storage.layout import Lake
from fiberlake.storage.tables import TableStore

pytestmark = pytest.mark.slow  # simulates, ingests and reduces a whole mini night

NIGHT = "2026-11-22"
SEED = 7


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    simulate_night("mini", NIGHT, work / "nights", seed=SEED)
    lake = Lake.at(work / "lake")
    ingest_night(lake, work / "nights" / NIGHT)
    report = process_night(lake, NIGHT)
    return work, lake, report


@pytest.fixture(scope="module")
def figures(processed):
    work, lake, _ = processed
    return evaluate_night(lake, NIGHT, work / "nights" / NIGHT)


def test_every_science_frame_reduced(processed):
    _, lake, report = processed
    assert not report.failed, report.failed
    assert len(report.done) == 6  # 2 science + 1 standard, 2 cameras
    spectra = scan_tables(lake)["spectra"].collect()
    assert spectra.height == 6 * 32 * 2
    assert isinstance(spectra.schema["flux"], pl.Array)
    flux = np.stack(spectra["flux"].to_numpy())
    assert np.isfinite(flux).all(), "no NaN may reach a table"


def test_trace_and_wavelength_against_truth(figures):
    for camera, cal in figures["calibration"].items():
        assert cal["trace_rms_px"] < 0.06, (camera, cal)
        assert cal["wave_rms_A"] < 0.06, (camera, cal)
        assert cal["dead_agree"], (camera, cal)


def test_flux_against_truth(figures):
    for row in figures["spectra"]:
        assert abs(row["median_ratio"] - 1) < 0.025, row
        assert row["median_ratio_scatter"] < 0.08, row
        assert 0.8 < row["median_pull_std"] < 1.3, row


def test_optimal_beats_box_on_faint_targets(figures):
    faint_science = [r for r in figures["faint"] if r["box_snr"] < 20]
    assert faint_science
    gains = [r["median_gain"] for r in faint_science]
    assert np.median(gains) > 1.04, figures["faint"]


def test_sky_residuals_are_noise_like(figures):
    for row in figures["sky"]:
        assert abs(row["sky_chi_mean"]) < 0.3, row
        assert 0.6 < row["sky_chi_std"] < 1.5, row


def test_reprocessing_replaces_rows(processed):
    _, lake, _ = processed
    store = TableStore(lake.root / "tables")
    before = store.read("spectra").num_rows
    versions = {name: store.version(name) for name in ("spectra", "metrics", "reductions", "runs")}
    again = process_night(lake, NIGHT)  # nothing new: nothing is touched
    assert again.done == [] and again.skipped == 6
    assert {name: store.version(name) for name in versions} == versions
    redone = process_night(lake, NIGHT, force=True)  # forced: every exposure's rows are replaced
    assert len(redone.done) == 6
    tables = scan_tables(lake)
    assert tables["spectra"].select(pl.len()).collect().item() == before
    keys = tables["spectra"].group_by(["expid", "camera", "fiber", "extraction"]).len().collect()
    assert keys["len"].max() == 1
    assert tables["runs"].collect().height == 2


def result_nwave(lake) -> int:
    from fiberlake.schemas.instrument import get_instrument

    inst = get_instrument(lake.instrument)
    return inst.wave_grid(inst.arms[0].name)[2]


def test_sql_and_other_readers(processed, capsys):
    _, lake, _ = processed
    result = sql(lake, "SELECT extraction, objtype, median(median_snr) AS snr FROM metrics GROUP BY extraction, objtype")
    assert set(result["extraction"]) == {"box", "optimal"}
    # pyarrow through the Delta table, and Polars directly
    dataset = DeltaTable(str(lake.table_path("metrics"))).to_pyarrow_dataset()
    assert isinstance(dataset, ds.Dataset) and dataset.count_rows() == 6 * 32 * 2
    assert pl.scan_delta(str(lake.table_path("spectra"))).select(pl.len()).collect().item() == 6 * 64
    # DuckDB over the same Arrow dataset: the spectra as lists, one row per fiber and extraction
    spectra = DeltaTable(str(lake.table_path("spectra"))).to_pyarrow_dataset()  # noqa: F841 (DuckDB finds it by name)
    n, nwave = duckdb.sql("SELECT count(*), min(len(flux)) FROM spectra WHERE extraction = 'optimal'").fetchall()[0]
    assert n == 6 * 32 and nwave == result_nwave(lake)
    # the CLI: table, json, and a one-line error with non-zero exit
    assert main(["query", "--lake", str(lake.root), "--format", "json", "SELECT count(*) AS n FROM exposures"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[0])["n"] == 18
    assert main(["query", "--lake", str(lake.root), "SELECT * FROM nosuchtable"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fiberlake: error:") and len(err.strip().splitlines()) == 1
