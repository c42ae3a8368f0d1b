"""Sky model, subtraction and leave-one-out residuals on the common wavelength grid."""

from __future__ import annotations

import numpy as np
import pytest

from fiberlake.schemas.containers import Spectra1D
from fiberlake.processors.sky import sky_model, sky_residuals, subtract_sky
from fiberlake.schemas.linelists import sky_lines
from fiberlake.schemas.maskbits import Mask

NF, NW = 30, 1500
WAVE = 5400.0 + 0.8 * np.arange(NW)
SKY_FIBERS = np.arange(0, NF, 4)  # 8 sky fibers


def _truth():
    lines = sky_lines()
    sky = 40.0 + 0.01 * (WAVE - 5400)                              # e-/A continuum
    for w, amp in zip(lines["wave_air"], lines["relative_intensity"]):
        sky = sky + 12.0 * amp * np.exp(-0.5 * ((WAVE - w) / 1.6) ** 2)  # [OI] 5577 ~ 3600 e-/A
    obj = np.zeros((NF, NW))
    is_obj = np.ones(NF, bool)
    is_obj[SKY_FIBERS] = False
    rng = np.random.default_rng(0)
    halpha = 1 - 0.3 * np.exp(-0.5 * ((WAVE - 6563) / 4) ** 2)
    obj[is_obj] = rng.uniform(20, 400, (is_obj.sum(), 1)) * halpha
    return sky, obj


def _observe(seed: int, sky, obj, read_var: float = 30.0):
    rng = np.random.default_rng(seed)
    truth = sky[None, :] + obj
    var = read_var + truth
    flux = truth + np.sqrt(var) * rng.normal(size=truth.shape)
    return Spectra1D(flux, 1 / var, np.zeros(truth.shape, np.uint32))


def test_subtraction_leaves_noise_only():
    sky, obj = _truth()
    spec = _observe(1, sky, obj)
    model = sky_model(spec, SKY_FIBERS)
    assert model.flux.shape == (1, NW) and np.all(model.mask == 0)
    # the model is the weighted mean: error ~ sigma / sqrt(8)
    pull = (model.flux[0] - sky) * np.sqrt(model.ivar[0])
    assert np.std(pull) == pytest.approx(1.0, abs=0.06)
    out = subtract_sky(spec, model)
    objs = np.setdiff1d(np.arange(NF), SKY_FIBERS)
    chi = (out.flux[objs] - obj[objs]) * np.sqrt(out.ivar[objs])
    assert np.sqrt(np.mean(chi**2)) == pytest.approx(1.0, abs=0.03)
    assert abs(np.mean(chi)) < 0.03


def test_leave_one_out_residuals_are_noise():
    sky, obj = _truth()
    res = sky_residuals(_observe(2, sky, obj), SKY_FIBERS)
    assert res["rms_chi"] == pytest.approx(1.0, abs=0.04)
    assert res["median_abs_chi"] == pytest.approx(0.674, abs=0.03)
    assert res["n_line_bins"] > 20
    assert res["line_frac_resid"] < 0.01 and res["n_used"] == len(SKY_FIBERS) * NW
    assert res["line_rms_chi"] == pytest.approx(1.0, abs=0.15)


def test_residuals_expose_a_miscalibrated_sky_fiber():
    sky, obj = _truth()
    spec = _observe(3, sky, obj)
    clean = sky_residuals(spec, SKY_FIBERS)
    spec.flux[SKY_FIBERS[2]] *= 1.05  # 5 % throughput error on one sky fiber
    bad = sky_residuals(spec, SKY_FIBERS)
    # leave-one-out: the bad fiber is off by 5 % * 8/7, each other one by -5 %/7
    n = len(SKY_FIBERS)
    expect = 0.05 * np.sqrt(((n / (n - 1)) ** 2 + (n - 1) / (n - 1) ** 2) / n)
    assert clean["line_frac_resid"] < 0.01  # noise floor ~0.006 here
    assert bad["line_frac_resid"] == pytest.approx(expect, rel=0.25)
    assert bad["line_rms_chi"] > clean["line_rms_chi"] + 0.05
    assert bad["rms_chi"] > clean["rms_chi"]


def test_clipping_rejects_a_contaminated_sky_fiber():
    sky, obj = _truth()
    spec = _observe(4, sky, obj)
    spec.flux[SKY_FIBERS[3], 500:520] += 5000.0  # a star in a "sky" fiber, or a cosmic
    clipped = sky_model(spec, SKY_FIBERS, clip_sigma=3.0)
    loose = sky_model(spec, SKY_FIBERS, clip_sigma=1e6)
    err_c = np.abs(clipped.flux[0, 500:520] - sky[500:520]) * np.sqrt(clipped.ivar[0, 500:520])
    err_l = np.abs(loose.flux[0, 500:520] - sky[500:520]) * np.sqrt(loose.ivar[0, 500:520])
    assert np.all(err_c < 4) and np.all(err_l > 20)


def test_badsky_and_masks():
    sky, obj = _truth()
    spec = _observe(5, sky, obj)
    spec.ivar[SKY_FIBERS, 100:110] = 0
    spec.mask[SKY_FIBERS, 100:110] = Mask.COSMIC
    spec.ivar[7, 300] = 0
    model = sky_model(spec, np.isin(np.arange(NF), SKY_FIBERS))  # boolean selection
    assert np.all(model.mask[0, 100:110] & Mask.BADSKY) and np.all(model.ivar[0, 100:110] == 0)
    assert np.all(model.mask[0, :100] == 0)
    out = subtract_sky(spec, model)
    assert np.all(out.ivar[:, 100:110] == 0) and np.all(out.mask[:, 100:110] & Mask.BADSKY)
    assert out.ivar[7, 300] == 0 and np.all(out.ivar[7, 301:] > 0)
    assert np.all(np.isfinite(out.flux)) and np.all(np.isfinite(out.ivar))
