"""`--extract cae` through `process_night`: rows in spectra beside box, flagged never NaN."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from fiberlake.ingest.simulate import simulate_night
from fiberlake.jobs.ingest import ingest_night
from fiberlake.jobs.process import process_night
from fiberlake.jobs.query import scan_tables
from fiberlake.processors.params import ReductionParams
from fiberlake.schemas.instrument import MINI
from fiberlake.storage.layout import Lake
from tests.stages import LIGHT_PRODUCTS

pytestmark = pytest.mark.slow  # simulates and reduces a night with the CAE extraction

NIGHT = "2026-11-26"


def test_cae_rows_beside_box(tmp_path):
    simulate_night("mini", NIGHT, tmp_path, seed=43, n_bias=1, n_flat=1, n_arc=1, n_science=1, n_standard=0,
                   cameras=["b1"])
    lake = Lake.at(tmp_path / "lake")
    ingest_night(lake, tmp_path / NIGHT)
    config = ReductionParams().updated({"extractions": ("box", "cae"), "cosmics.enabled": False} | LIGHT_PRODUCTS)
    report = process_night(lake, NIGHT, config=config)
    assert len(report.done) == 1 and not report.failed, report.failed
    spectra = scan_tables(lake)["spectra"].collect()
    cae = spectra.filter(pl.col("extraction") == "cae").sort("fiber")
    box = spectra.filter(pl.col("extraction") == "box").sort("fiber")
    assert cae.height == box.height == MINI.n_fibers
    flux = np.array(cae["flux"].to_list(), dtype=float)
    ivar = np.array(cae["ivar"].to_list(), dtype=float)
    bflux = np.array(box["flux"].to_list(), dtype=float)
    bivar = np.array(box["ivar"].to_list(), dtype=float)
    assert np.isfinite(flux).all() and np.isfinite(ivar).all() and (ivar >= 0).all()
    good = (ivar > 0) & (bivar > 0)
    assert good.mean() > 0.5
    # the same light: per-fiber median flux of the CAE path follows the box extraction's
    lit = np.array([np.median(bflux[f][good[f]]) if good[f].any() else 0 for f in range(len(bflux))])
    cmed = np.array([np.median(flux[f][good[f]]) if good[f].any() else 0 for f in range(len(flux))])
    bright = lit > np.percentile(lit, 50)
    ratio = cmed[bright] / lit[bright]
    assert np.all(np.abs(ratio - 1) < 0.3), ratio
