"""The denoising stage on a lake: rows written once, bad input flagged, nothing NaN, re-runs skip."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from fiberlake.jobs.denoise_stage import denoise_night
from fiberlake.processors.denoise_map import MapSettings
from fiberlake.processors.params import DenoiseParams, ReductionParams
from fiberlake.storage.layout import Lake
from fiberlake.storage.products import products_table
from fiberlake.storage.tables import TableStore

NIGHT = "2026-11-21"


def _joined_rows(n: int) -> tuple[list[dict], float, float]:
    loglam0, dlog = np.log10(3800.0), 1e-4
    nwave = int(np.log10(8900 / 3800) / dlog)
    wave = 10 ** (loglam0 + dlog * np.arange(nwave))
    rng = np.random.default_rng(0)
    rows = []
    for fiber in range(n):
        flam = 1e-16 * (wave / 5000.0) ** -2 * (1 + 0.02 * rng.standard_normal(nwave))
        ivar = np.full(nwave, 1e34)
        if fiber == 1:
            flam[:] = np.nan                       # NaN flux
        if fiber == 2:
            ivar[:] = 0                            # all masked
        if fiber == 3:
            flam[:] = 0                            # all zero
        rows.append({"night": NIGHT, "expid": 7, "spectrograph": 1, "fiber": fiber, "extraction": "box",
                     "targetid": 100 + fiber, "objtype": "TGT", "obstype": "SCIENCE", "run_id": "r0",
                     "cameras": "b1,r1", "fluxcal_status": "ok", "loglam_min": loglam0, "dloglam": dlog,
                     "nwave": nwave, "flam": flam.astype(np.float32), "flam_ivar": ivar.astype(np.float32),
                     "flam_mask": np.zeros(nwave, np.uint32), "resolution": None, "resolution_ndiag": None})
    rows.append(dict(rows[0], fiber=n, targetid=-1, objtype="SKY"))
    return rows, loglam0, dlog


@pytest.mark.slow
def test_stage_writes_flagged_rows_and_skips_on_rerun(tmp_path):
    lake = Lake.at(tmp_path / "lake")
    tables = TableStore(lake.root / "tables")
    rows, _, _ = _joined_rows(4)
    tables.replace_keys("joined", products_table(rows, "joined"), {"night": NIGHT})
    now = dt.datetime.now(dt.timezone.utc)
    cal = [{"night": NIGHT, "expid": 7, "camera": c, "spectrograph": 1, "extraction": "box", "run_id": "r0",
            "status": "ok", "input_hash": "h1", "made_at": now} for c in ("b1", "r1")]
    tables.replace_keys("fluxcal", products_table(cal, "fluxcal"), {"night": NIGHT})
    params = DenoiseParams(sources=("joined",), steps=5)
    config = ReductionParams().updated({"extractions": ("box",)})
    report = denoise_night(lake, NIGHT, config, params, run_id="r1")
    assert not report.failed, report.failed
    out = tables.scan("spectra_denoised").collect().sort("fiber")
    assert out["fiber"].to_list() == [0, 1, 2, 3]                       # the sky fiber is not denoised
    assert out["status"].to_list()[1:] == ["no_data", "no_data", "nonpositive"]
    assert out["status"][0] in ("ok", "poor_fit", "out_of_prior")
    flux = np.stack(out["flux"].to_numpy())
    assert np.isfinite(flux).all() and flux.shape[1] == 2048
    for col in ("objective", "log_prior", "residual_rms", "flux_scale"):
        assert out[col].is_finite().all()
    np.testing.assert_allclose(np.abs(flux[0]).sum(), 1.0, rtol=1e-2)   # the posterior mean: scaled like G(z)
    mask = np.stack(out["mask"].to_numpy())
    grid = np.linspace(4000, 9000, 2048)
    assert (mask[0, grid > 8950] != 0).all() and (mask[0, (grid > 4100) & (grid < 8800)] == 0).all()
    assert out["model_id"][0].startswith("denoise-") and out["subclass"][0] is not None
    assert out["subclass"][2] is None
    # nothing changed: nothing redone
    again = denoise_night(lake, NIGHT, config, params, run_id="r2")
    assert again.joined == 0 and again.skipped_groups == 1
    assert tables.scan("spectra_denoised").collect()["run_id"].unique().to_list() == ["r1"]
    # new parameters: redone, replaced (not appended)
    redo = denoise_night(lake, NIGHT, config, DenoiseParams(sources=("joined",), steps=6), run_id="r3")
    assert redo.joined == 4
    final = tables.scan("spectra_denoised").collect()
    assert final.height == 4 and final["run_id"].unique().to_list() == ["r3"]
    assert final.filter(pl.col("status") == "no_data")["class_posterior"].list.sum().to_list() == [0.0, 0.0]


@pytest.mark.slow
def test_train_denoise_stores_the_discrepancy_and_add_discrepancy_reproduces_it(tmp_path):
    """A tiny ``train_denoise`` run writes ``S_C`` beside the decoder (from the decoder as shipped, float16);
    ``add_discrepancy`` on that artifact recomputes the same ``S_C`` and records the lineage."""
    from fiberlake.jobs.train_denoise import add_discrepancy, load_denoiser, train_denoise
    from fiberlake.processors.params import DenoiseTrainParams
    from fiberlake.storage import models as art

    params = DenoiseTrainParams(per_subclass=8, noise_per_subclass=2, ae_steps=3, flow_steps=3, dae_steps=0,
                                batch=8, cpu_threads=1)
    card = train_denoise(params, out=tmp_path, log=lambda _m: None)
    den = load_denoiser(card["path"], device="cpu")
    assert den.discrepancy is not None and den.discrepancy.shape == (len(den.classes), 2048)
    assert (den.discrepancy >= 0).all() and (den.discrepancy.max(-1) > 0).all()
    again = add_discrepancy(card["path"], tmp_path / "again", log=lambda _m: None)
    tensors, card2 = art.read_artifact(Path(again["path"]))
    np.testing.assert_allclose(tensors["discrepancy_var"], den.discrepancy, rtol=1e-5)
    # the same weights and S_C: the same content-hash id, the lineage recorded
    assert card2["lineage"]["discrepancy_added_to"] == card["model_id"] and card2["model_id"] == card["model_id"]
    res = den.denoise(np.abs(np.random.default_rng(0).normal(1.0, 0.1, (2, 2048))), settings=MapSettings(steps=2))
    assert np.isfinite(res.flux).all() and np.isfinite(res.generator_flux).all()
