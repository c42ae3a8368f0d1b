"""The optimal extraction's fit / reject iterations against the reference implementation
(processors/extract_reference.py, the code before issue 19): float32 pixel arithmetic, the same
spectra within 1e-4 sigma and the same mask bits."""

from __future__ import annotations

import numpy as np
import pytest

from fiberlake.processors.extract import measure_profile, optimal_extract
from fiberlake.processors.extract_reference import optimal_block_reference
from fiberlake.schemas.containers import ProfileModel
from fiberlake.schemas.maskbits import Mask

from synthetic_extract import make_traces, observe, render

NF, NY, RN = 9, 300, 3.5
NX = NF * 16 + 24


@pytest.mark.parametrize("deblend,wings", [(True, False), (False, False), (True, True)])
def test_optimal_matches_reference(deblend, wings):
    rng = np.random.default_rng(11)
    tr = make_traces(NF, NY, NX, sigma=2.0, dead=np.arange(NF) == 4)
    flux = 4000.0 * rng.uniform(0.2, 1.5, (NF, 1)) * (1 + 0.5 * np.sin(np.arange(NY) / 9.0))[None, :]
    flux[4] = 0
    profile = (ProfileModel(sigma=np.full(NF, 2.0), wing_fraction=np.full(NF, 0.08), wing_offset=np.full(NF, 0.3),
                            wing_ratio=2.5) if wings else None)
    expected = render(tr, flux, NX, wing_fraction=0.08 if wings else 0.0, wing_sigma=5.0, wing_offset=0.3)
    image, ivar = observe(expected, rng, read_noise=RN)
    xc = tr.x()
    for f, r in zip(rng.integers(0, NF, 40), rng.integers(0, NY - 1, 40)):  # unflagged hits: rejections
        image[r, int(round(xc[f, r])) + int(rng.integers(-3, 4))] += rng.uniform(500, 8000)
    mask = np.zeros(image.shape, np.uint32)
    mask[rng.integers(0, NY, 200), rng.integers(0, NX, 200)] = Mask.BADPIX
    ivar[mask != 0] = 0
    image[50, :] = np.nan
    kw = dict(deblend=deblend, profile=profile, max_iter=5, reject_sigma=5.0)
    new = optimal_extract(image, ivar, mask, tr, **kw)
    ref = optimal_extract(image, ivar, mask, tr, _block=optimal_block_reference, **kw)
    np.testing.assert_array_equal(new.mask, ref.mask)
    np.testing.assert_array_equal(new.npix, ref.npix)
    np.testing.assert_array_equal(new.ivar > 0, ref.ivar > 0)
    assert np.max(np.abs(new.flux - ref.flux) * np.sqrt(ref.ivar)) < 1e-4
    np.testing.assert_allclose(new.ivar, ref.ivar, rtol=1e-5)
    np.testing.assert_allclose(new.chi2, ref.chi2, rtol=1e-4, atol=1e-5)
    assert np.count_nonzero(ref.mask & np.uint32(Mask.SOMEBADPIX)) > 0


def test_profile_residuals_match_reference(monkeypatch):
    """measure_profile fits on the residuals of the block function: same profile either way."""
    from fiberlake.processors import extract

    rng = np.random.default_rng(3)
    tr = make_traces(6, 120, 6 * 16 + 24, sigma=1.8)
    image, ivar = observe(render(tr, np.full((6, 120), 5000.0), 6 * 16 + 24, wing_fraction=0.1, wing_sigma=4.0),
                          rng, read_noise=RN)
    kw = dict(n_bands=3, rows_per_band=4, max_sweeps=2)
    new = measure_profile(image, ivar, None, tr, **kw)
    monkeypatch.setattr(extract, "_optimal_block", optimal_block_reference)
    ref = measure_profile(image, ivar, None, tr, **kw)
    np.testing.assert_allclose(new.sigma, ref.sigma, atol=1e-4)
    np.testing.assert_allclose(new.wing_fraction, ref.wing_fraction, atol=1e-4)


def test_read_noise_from_the_subsample_equals_the_whole_frame():
    from fiberlake.processors import extract

    rng = np.random.default_rng(8)
    image = rng.normal(50, 20, (900, 700)).astype(np.float32)
    ivar = (1 / (12.25 + np.clip(image, 0, None))).astype(np.float32)
    mask = np.zeros(image.shape, np.uint32)
    mask[rng.random(image.shape) < 0.1] = Mask.COSMIC
    ivar[rng.random(image.shape) < 0.05] = 0
    image[rng.random(image.shape) < 0.01] = np.nan
    img, good, var, _ = extract._prepare(image, ivar, mask)
    whole = float(np.sqrt(extract._estimate_read_noise_var(img, good, var)))
    assert extract.estimate_read_noise(image, ivar, mask) == whole
    assert abs(whole - 3.5) < 0.01
