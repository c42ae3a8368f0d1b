"""Lineage: a changed parameter re-does exactly what it touches; the runs row says how a product was made."""

from __future__ import annotations

import errno
import json

import polars as pl
import pytest

from fiberlake.ingest.simulate import simulate_night
from fiberlake.jobs import reduce_worker
from fiberlake.jobs.cli import main
from fiberlake.jobs.ingest import ingest_night
from fiberlake.jobs.model_pins import pin_models
from fiberlake.jobs.process import process_night
from fiberlake.jobs.query import scan_tables
from fiberlake.jobs.runs import read_run
from fiberlake.processors.params import ReductionParams
from fiberlake.storage.calibstore import read_calib_meta
from fiberlake.storage.layout import Lake
from tests.stages import LIGHT_PRODUCTS

pytestmark = pytest.mark.slow  # simulates and reduces a mini camera several times

NIGHT, LATER = "2026-11-27", "2026-11-28"
BASE = ReductionParams().updated({"extractions": ("box",), "cosmics.enabled": False} | LIGHT_PRODUCTS)


@pytest.fixture
def lake(tmp_path):
    simulate_night("mini", NIGHT, tmp_path, seed=4301, n_bias=1, n_flat=1, n_arc=1, n_science=1, n_standard=0,
                   cameras=["b1"])
    lake = Lake.at(tmp_path / "lake")
    ingest_night(lake, tmp_path / NIGHT)
    return lake


def _markers(lake: Lake) -> pl.DataFrame:
    return scan_tables(lake)["reductions"].collect().sort("extraction")


def _calib_id(lake: Lake) -> str:
    return read_calib_meta(lake.calib_path(NIGHT, "b1"))["calib_id"]


def test_a_change_re_does_what_it_touches_and_nothing_else(lake):
    first = process_night(lake, NIGHT, config=BASE)
    assert len(first.done) == 1
    calib0, marker0 = _calib_id(lake), _markers(lake).row(0, named=True)

    # execution settings: nothing is redone, the calibration set stays
    for config in (BASE.updated({"execution.chunk_fibers": 10}), BASE.updated({"execution.chunk_margin": 0})):
        again = process_night(lake, NIGHT, config=config)
        assert again.done == [] and again.skipped == 1
    assert _calib_id(lake) == calib0

    # a sky parameter: the frame is reduced again with the same calibration set
    sky = process_night(lake, NIGHT, config=BASE.updated({"sky.clip_sigma": 4.0}))
    assert len(sky.done) == 1 and _calib_id(lake) == calib0

    # a wavelength-calibration parameter: a new calib_id, and the frame that used it is redone
    wave = BASE.updated({"wavecal.tol_final": 0.5})
    redo = process_night(lake, NIGHT, config=wave)
    assert len(redo.done) == 1 and _calib_id(lake) != calib0
    marker = _markers(lake).row(0, named=True)
    assert marker["calib_id"] == _calib_id(lake) and marker["config_hash"] == wave.extraction_digest("box")
    assert marker["config_hash"] != marker0["config_hash"]
    assert process_night(lake, NIGHT, config=wave).done == []


def test_extractions_add_to_a_night(lake):
    process_night(lake, NIGHT, config=BASE)
    box_before = scan_tables(lake)["spectra"].filter(pl.col("extraction") == "box").collect()
    calib0 = _calib_id(lake)
    added = process_night(lake, NIGHT, config=BASE.updated({"extractions": ("optimal",)}))
    assert len(added.done) == 1
    spectra = scan_tables(lake)["spectra"].collect()
    assert sorted(spectra["extraction"].unique().to_list()) == ["box", "optimal"]
    box_after = spectra.filter(pl.col("extraction") == "box")
    assert box_after["run_id"].to_list() == box_before["run_id"].to_list()  # box rows untouched
    assert _calib_id(lake) == calib0  # same set, one more method's products
    assert set(read_calib_meta(lake.calib_path(NIGHT, "b1"))["methods"]) == {"box", "optimal"}
    assert _markers(lake)["extraction"].to_list() == ["box", "optimal"]
    # both asked again: nothing to do
    both = process_night(lake, NIGHT, config=BASE.updated({"extractions": ("box", "optimal")}))
    assert both.done == [] and both.skipped == 1
    metrics = scan_tables(lake)["metrics"].collect()
    fibermap = scan_tables(lake)["fibermap"].collect()
    joined = metrics.join(fibermap, on=["night", "expid", "spectrograph", "fiber"], how="inner")
    assert joined.height == metrics.height  # the full key joins one fibermap row per metrics row
    assert (joined["targetid"] == joined["targetid_right"]).all()


def test_runs_row_round_trips_and_prints(lake, capsys):
    config = BASE.updated({"optimal.reject_sigma": 4.5, "execution.chunk_fibers": 8})
    report = process_night(lake, NIGHT, config=config)
    record = read_run(lake, report.run_id)
    config = pin_models(lake, config)  # the run records the model ids its settings resolved to
    assert record.params == config
    row = record.rows[0]
    assert row["config_hash"] == config.digest() and json.loads(row["config_json"]) == config.to_dict()
    assert record.execution["kind"] == "local"
    assert main(["runs", "show", report.run_id, "--lake", str(lake.root)]) == 0
    out = capsys.readouterr().out
    assert "* optimal.reject_sigma = 4.5" in out and "* execution.chunk_fibers = 8" in out
    assert main(["runs", "show", report.run_id, "--lake", str(lake.root), "--json"]) == 0
    assert ReductionParams.from_dict(json.loads(capsys.readouterr().out)) == config
    assert main(["runs", "show", "nope", "--lake", str(lake.root)]) == 1
    assert "no run 'nope'" in capsys.readouterr().err


def test_a_night_without_calibrations_says_whose_it_used(lake, tmp_path):
    process_night(lake, NIGHT, config=BASE)
    simulate_night("mini", LATER, tmp_path, seed=4302, n_bias=0, n_flat=0, n_arc=0, n_science=1, n_standard=0,
                   cameras=["b1"])
    ingest_night(lake, tmp_path / LATER)
    report = process_night(lake, LATER, config=BASE)
    assert report.calib_nights == {"b1": NIGHT}
    assert f"b1 <- {NIGHT}" in report.summary()
    marker = scan_tables(lake)["reductions"].filter(pl.col("night") == LATER).collect().row(0, named=True)
    assert marker["calib_night"] == NIGHT
    # an execution setting does not block the fallback to the earlier set
    assert process_night(lake, LATER, config=BASE.updated({"execution.chunk_fibers": 10})).skipped == 1


def test_environment_failures_are_retried_and_data_failures_remembered(lake, monkeypatch):
    real = reduce_worker.read_raw_frame

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reduce_worker, "read_raw_frame", disk_full)
    full = process_night(lake, NIGHT, config=BASE)
    assert len(full.retry) == 1 and not full.failed and "retried by the next run" in full.summary()
    assert _markers(lake)["error_kind"].to_list() == ["environment"]
    monkeypatch.setattr(reduce_worker, "read_raw_frame", real)
    freed = process_night(lake, NIGHT, config=BASE)
    assert len(freed.done) == 1 and freed.n_spectra > 0

    def corrupt(*args, **kwargs):
        raise ValueError("pixels do not decode")

    monkeypatch.setattr(reduce_worker, "read_raw_frame", corrupt)
    bad = process_night(lake, NIGHT, config=BASE.updated({"sky.clip_sigma": 3.5}))
    assert len(bad.failed) == 1 and "failed on their data" in bad.summary()
    monkeypatch.setattr(reduce_worker, "read_raw_frame", real)
    assert process_night(lake, NIGHT, config=BASE.updated({"sky.clip_sigma": 3.5})).skipped == 1
    assert len(process_night(lake, NIGHT, config=BASE.updated({"sky.clip_sigma": 3.5}), retry_failed=True).done) == 1
