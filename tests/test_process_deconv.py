"""The deconvolution extraction through `process_night`: resolution data in the spectra table."""

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

pytestmark = pytest.mark.slow  # simulates and reduces a night with the deconvolution extraction

NIGHT = "2026-11-27"


def test_deconv_rows_carry_their_resolution(tmp_path):
    simulate_night("mini", NIGHT, tmp_path, seed=41, n_bias=1, n_flat=1, n_arc=1, n_science=1, n_standard=0,
                   cameras=["b1"])
    lake = Lake.at(tmp_path / "lake")
    ingest_night(lake, tmp_path / NIGHT)
    report = process_night(lake, NIGHT, config=ReductionParams().updated({"extractions": ("box", "deconv"), "cosmics.enabled": False} | LIGHT_PRODUCTS))
    assert len(report.done) == 1 and not report.failed, report.failed
    spectra = scan_tables(lake)["spectra"].collect()
    deconv = spectra.filter(pl.col("extraction") == "deconv")
    box = spectra.filter(pl.col("extraction") == "box")
    assert deconv.height == box.height == MINI.n_fibers
    assert box["resolution"].null_count() == box.height and box["resolution_ndiag"].null_count() == box.height
    ndiag = deconv["resolution_ndiag"].unique().to_list()
    assert len(ndiag) == 1 and ndiag[0] % 2 == 1 and ndiag[0] >= 3
    lengths = deconv["resolution"].list.len().unique().to_list()
    assert lengths == [ndiag[0] * MINI.ny]
    # live fibers: the resolution rows of interior pixels sum to ~1 (a normalised line-spread)
    band = np.asarray(deconv["resolution"][5].to_list(), dtype=float).reshape(ndiag[0], MINI.ny)
    interior = band[:, MINI.ny // 4: 3 * MINI.ny // 4].sum(axis=0)
    assert np.median(interior) > 0.9 and np.median(interior) < 1.1
    assert len(deconv["resolution_wave"][5]) >= 3
