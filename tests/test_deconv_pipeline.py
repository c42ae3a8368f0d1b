"""The deconvolution extraction inside the classical reduction: PSF in the calibration set,
fiber flat, resampling, sky, resolution data on the reduced frame."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from fiberlake.ingest.simulate import make_expid, simulate_frame  # noqa: E402
from fiberlake.processors import ccd  # noqa: E402
from fiberlake.processors.pipeline import Calibration, ReductionParams, build_calibration, reduce_frame  # noqa: E402
from fiberlake.schemas.instrument import MINI  # noqa: E402
from fiberlake.schemas.maskbits import Mask  # noqa: E402
from fiberlake.storage.calibstore import read_calib_set, write_calib_set  # noqa: E402

pytestmark = pytest.mark.slow  # builds a calibration set with a PSF and reduces a simulated frame

NIGHT = "2026-04-17"
SEED = 6613  # used by no other test


def test_deconv_through_the_pipeline(tmp_path):
    frames = {}
    for seq, obstype in enumerate(("BIAS", "FLAT", "ARC", "SCIENCE"), start=1):
        frames[obstype] = simulate_frame(MINI, "b1", obstype, night=NIGHT, expid=make_expid(NIGHT, seq), seed=SEED)
    params = ccd.CCDParams.from_header(dict(frames["FLAT"].header), saturation=65535)
    rp = ReductionParams().updated({"extractions": ("optimal", "deconv"), "cosmics.enabled": False})
    calib = build_calibration([frames["BIAS"].raw], [frames["FLAT"].raw], [frames["ARC"].raw], params, MINI, "b", rp)
    assert calib.psf is not None and set(calib.fiberflats) == {"optimal", "deconv"}
    assert calib.psf.info["n_lsf_lines"] > 100

    write_calib_set(tmp_path / "calib", calib.to_arrays(), {"night": NIGHT})
    arrays, meta = read_calib_set(tmp_path / "calib")
    back = Calibration.from_arrays(arrays, meta)
    np.testing.assert_allclose(back.psf.lsf.coef, calib.psf.lsf.coef)
    np.testing.assert_allclose(back.psf.xsf.sigma_coef, calib.psf.xsf.sigma_coef)

    sci = frames["SCIENCE"]
    sky = np.asarray(sci.truth["TARGETS"]["OBJTYPE"]) == "SKY"
    out = reduce_frame(sci.raw, params, back, sky, rp)
    dec, opt = out["deconv"], out["optimal"]
    assert dec.resolution is not None and dec.resolution.shape == (MINI.n_fibers, 15, MINI.ny)
    assert opt.resolution is None
    for arr in (dec.spectra.flux, dec.spectra.ivar, dec.sky.flux):
        assert np.all(np.isfinite(arr))
    live = ~back.traces.dead
    assert np.all(dec.spectra.mask[~live] & Mask.DEADFIBER)
    # calibrated deconvolved and optimal spectra of the stars agree in flux (continuum level)
    good = (dec.spectra.ivar > 0) & (opt.spectra.ivar > 0)
    stars = live & ~sky
    ratio = np.array([np.median(dec.spectra.flux[f][good[f]]) / np.median(opt.spectra.flux[f][good[f]])
                      for f in np.flatnonzero(stars)])
    assert np.median(ratio) == pytest.approx(1.0, abs=0.01) and np.all(np.abs(ratio - 1) < 0.05), ratio
