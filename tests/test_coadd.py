"""Arms joined and exposures combined: flux conservation, no ripple, continuity, S/N, rejection, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from fiberlake.processors import coadd as co
from fiberlake.processors.resample import resample_to_grid, ripple_factor
from fiberlake.schemas.containers import Spectra1D
from fiberlake.schemas.maskbits import Mask


def _spectra(flux, ivar=None, mask=None) -> Spectra1D:
    flux = np.atleast_2d(np.asarray(flux, float))
    return Spectra1D(flux, np.ones_like(flux) if ivar is None else np.atleast_2d(ivar),
                     np.zeros(flux.shape, np.uint32) if mask is None else np.atleast_2d(mask))


def _grid(lo=5000.0, hi=5600.0, kms=32.0) -> co.LogGrid:
    return co.joined_grid([(lo, 0.54, int((hi - lo) / 0.54) + 1)], kms)


def test_rebin_conserves_flux_and_keeps_a_constant_density():
    wave = 5000.0 + 0.54 * np.arange(1100)
    grid = _grid(5010.0, 5580.0)
    out = co.rebin(wave, _spectra(np.full(wave.size, 3.5)), grid)
    inside = (out.mask[0] & Mask.NODATA) == 0
    np.testing.assert_allclose(out.flux[0][inside], 3.5, rtol=1e-5)
    rng = np.random.default_rng(0)
    flux = rng.uniform(1, 10, wave.size)
    out = co.rebin(wave, _spectra(flux), grid)
    e_in, e_out = co._linear_edges(wave), grid.edges
    inside = (out.mask[0] & Mask.NODATA) == 0
    lo, hi = e_out[:-1][inside][0], e_out[1:][inside][-1]
    cum = np.concatenate([[0.0], np.cumsum(flux * np.diff(e_in))])
    expect = np.interp(hi, e_in, cum) - np.interp(lo, e_in, cum)
    assert float(np.sum(out.flux[0][inside] * np.diff(e_out)[inside])) == pytest.approx(expect, rel=1e-5)
    # outside the input: NODATA, flux 0, ivar 0
    outside = co.rebin(wave, _spectra(flux), co.LogGrid(np.log10(4000.0), grid.dloglam, 50))
    assert np.all(outside.ivar == 0) and np.all(outside.flux == 0) and np.all(outside.mask & Mask.NODATA)


def test_linear_weights_remove_the_ripple_that_squared_weights_make():
    wave = 5000.0 + 0.55 * np.arange(1100)                   # 0.55 A bins onto ~0.5377 A bins: a beat
    grid = co.LogGrid(np.log10(5010.0), np.log10(1.0 + 32.2 / co.C_KMS), 1000)
    s = _spectra(np.ones(wave.size), np.full(wave.size, 4.0))
    before = co.ripple(co.rebin(wave, s, grid, squared_weights=True).ivar)
    after = co.ripple(co.rebin(wave, s, grid).ivar)
    assert before > 0.08 and after < 0.01, (before, after)
    # the linear-weight variance is the variance of sums: 20-bin sums of noise match it
    rng = np.random.default_rng(1)
    sums, var = [], None
    for _ in range(400):
        out = co.rebin(wave, _spectra(rng.normal(0, 0.5, wave.size), np.full(wave.size, 4.0)), grid)
        w = np.diff(grid.edges)[100:120]
        sums.append(np.sum(out.flux[0, 100:120] * w))
        var = np.sum(w**2 / out.ivar[0, 100:120])
    assert np.var(sums) == pytest.approx(var, rel=0.15)


def test_ripple_factor_flattens_the_frame_resampling_ivar():
    ny = 1200
    rows = 5000.0 + 0.545 * np.arange(ny) + 4e-6 * np.arange(ny) ** 2
    wave_rows = np.stack([rows, rows + 0.2])
    grid = 5010.0 + 0.5377 * np.arange(1150)
    s = resample_to_grid(wave_rows, _spectra(np.ones((2, ny)), np.full((2, ny), 2.0)), grid)
    q = ripple_factor(wave_rows, grid)
    assert q.shape == s.ivar.shape and np.all(q[:, 20:-20] >= 0.4) and np.all(q <= 1.0)
    before = co.ripple(s.ivar[:, 20:-20])
    after = co.ripple(co.decorrelate_ivar(s, q).ivar[:, 20:-20])
    assert before > 0.1 and after < 0.02, (before, after)


def _two_arms(rng, n=1, gap=False, mask_red_from=None):
    truth = lambda w: 2.0 + np.sin(w / 90.0)  # noqa: E731
    wb = 4800.0 + 0.54 * np.arange(1500)        # 4800-5609
    wr = (5700.0 if gap else 5450.0) + 0.81 * np.arange(1200)
    sig_b, sig_r = 0.05, 0.08
    fb = truth(wb) + rng.normal(0, sig_b, (n, wb.size))
    fr = truth(wr) + rng.normal(0, sig_r, (n, wr.size))
    mr = np.zeros((n, wr.size), np.uint32)
    ivr = np.full((n, wr.size), sig_r**-2)
    if mask_red_from is not None:
        bad = wr > mask_red_from
        ivr[:, bad] = 0
        mr[:, bad] = Mask.BADPIX
    return (wb, _spectra(fb, np.full((n, wb.size), sig_b**-2))), (wr, Spectra1D(fr, ivr, mr)), truth


def test_join_is_continuous_across_the_dichroic_overlap():
    rng = np.random.default_rng(2)
    blue, red, truth = _two_arms(rng, n=20)
    grid = co.joined_grid([(blue[0][0], 0.54, blue[0].size), (red[0][0], 0.81, red[0].size)])
    joined = co.join_arms([blue, red], grid)
    w = grid.wave
    overlap = (w > 5460.0) & (w < 5600.0)
    only_b = (w > 5300.0) & (w < 5440.0)
    only_r = (w > 5620.0) & (w < 5760.0)
    resid = joined.flux - truth(w)[None, :]
    for sel in (overlap, only_b, only_r):
        assert abs(np.mean(resid[:, sel])) < 0.01
    # the overlap holds both arms' information: its ivar exceeds either arm's alone
    assert np.median(joined.ivar[:, overlap]) > 1.1 * np.median(joined.ivar[:, only_b])
    # a step test: the mean level just below and just above the blue arm's end agree
    end = blue[0][-1]
    left = np.mean(joined.flux[:, (w > end - 30) & (w < end)] - truth(w)[(w > end - 30) & (w < end)])
    right = np.mean(joined.flux[:, (w > end) & (w < end + 30)] - truth(w)[(w > end) & (w < end + 30)])
    assert abs(left - right) < 0.01
    assert np.all(np.isfinite(joined.flux)) and np.all(np.isfinite(joined.ivar))


def test_gap_missing_camera_and_masked_arm_are_flagged_not_nan():
    rng = np.random.default_rng(3)
    blue, red, _ = _two_arms(rng, gap=True, mask_red_from=6200.0)
    grid = co.joined_grid([(blue[0][0], 0.54, blue[0].size), (red[0][0], 0.81, red[0].size)])
    w = grid.wave
    joined = co.join_arms([blue, red], grid)
    gap = (w > blue[0][-1] + 2) & (w < red[0][0] - 2)
    masked = w > 6205.0
    assert np.all(joined.mask[0, gap] & Mask.NODATA) and np.all(joined.ivar[0, gap] == 0)
    assert np.all(joined.ivar[0, masked & (w < red[0][-1])] == 0)
    assert np.all(joined.mask[0, masked & (w < red[0][-1])] & (Mask.NODATA | Mask.BADPIX))
    only_blue = co.join_arms([blue], grid)              # the red camera is missing
    assert np.all(only_blue.mask[0, w > red[0][0] + 2] & Mask.NODATA)
    for s in (joined, only_blue):
        assert np.all(np.isfinite(s.flux)) and np.all(np.isfinite(s.ivar))
    with pytest.raises(ValueError):
        co.join_arms([], grid)


def test_coadd_snr_grows_as_sqrt_n():
    rng = np.random.default_rng(4)
    n_exp, nwave, sigma = 4, 20000, 0.2
    flux = 1.0 + rng.normal(0, sigma, (n_exp, nwave))
    out = co.coadd(flux, np.full((n_exp, nwave), sigma**-2), np.zeros((n_exp, nwave), np.uint32))
    single = 1.0 / np.std(flux[0] - 1.0)
    combined = 1.0 / np.std(out.flux - 1.0)
    assert combined / single == pytest.approx(np.sqrt(n_exp), rel=0.03)
    np.testing.assert_allclose(out.ivar, out.n_used * sigma**-2, rtol=1e-5)
    assert out.n_rejected < 0.002 * n_exp * nwave   # 4 sigma on Gaussian noise: rare


def test_coadd_rejects_an_outlier_exposure_bin():
    rng = np.random.default_rng(5)
    flux = 1.0 + rng.normal(0, 0.05, (5, 300))
    flux[2, 100:103] += 5.0                             # a cosmic ray in one exposure
    out = co.coadd(flux, np.full((5, 300), 400.0), np.zeros((5, 300), np.uint32))
    assert out.n_rejected >= 3
    assert np.all(np.abs(out.flux[100:103] - 1.0) < 0.1)
    assert np.all(out.n_used[100:103] == 4)


def test_coadd_of_one_exposure_and_of_nothing():
    flux = np.array([[1.0, 2.0, 3.0]])
    ivar = np.array([[4.0, 0.0, 4.0]])
    out = co.coadd(flux, ivar, np.zeros((1, 3), np.uint32))
    np.testing.assert_allclose(out.flux, [1.0, 0.0, 3.0])
    assert out.mask[1] & Mask.NODATA and out.ivar[1] == 0
    res = np.zeros((1, 3, 3))
    res[0, 1] = 1.0
    out = co.coadd(np.full((2, 3), np.nan), np.zeros((2, 3)), np.zeros((2, 3), np.uint32), resolution=np.repeat(res, 2, 0))
    assert np.all(np.isfinite(out.flux)) and np.all(out.ivar == 0) and np.all(out.mask & Mask.NODATA)
    assert np.all(out.resolution[1] == 1.0)


def test_healpix_nested_against_astropy_healpix():
    import astropy.units as u
    from astropy_healpix import HEALPix

    ra = np.array([0.0, 45.0, 180.0, 359.0, np.nan])
    dec = np.array([0.0, 30.0, -60.0, 89.0, 0.0])
    got = co.healpix_nested(ra, dec, 64)
    ref = HEALPix(64, order="nested").lonlat_to_healpix(ra[:4] * u.deg, dec[:4] * u.deg)
    np.testing.assert_array_equal(got[:4], ref)
    assert got[4] == -1
    ring = HEALPix(64, order="ring").lonlat_to_healpix(ra[:4] * u.deg, dec[:4] * u.deg)
    assert not np.array_equal(got[:4], ring)


def test_resolution_moves_from_rows_to_the_grid_and_joins():
    from fiberlake.processors.resample import bands_rebinned, resolution_on_grid, resolutions_on_grid

    ny, h, sig = 600, 7, 1.4
    r = np.arange(ny)
    wave_rows = 5000.0 + 0.545 * r + 3e-6 * r**2
    k = np.arange(-h, h + 1)
    band = np.exp(-0.5 * (k[:, None] / sig) ** 2) * np.ones((1, ny))
    band /= band.sum(axis=0)
    grid = 5010.0 + 0.5377 * np.arange(580)
    res = resolution_on_grid(band, wave_rows, grid)
    assert res.shape == (2 * h + 1, grid.size)
    np.testing.assert_allclose(res.sum(axis=0)[10:-10], 1.0, atol=1e-4)       # flux conserved
    # width in bins: the rows' sigma scaled by row/bin size, widened a little by the resampling
    centre = res[:, 300]
    width = np.sqrt(np.sum(centre * k**2) / centre.sum())
    assert sig * 0.545 / 0.5377 < width < sig * 0.545 / 0.5377 + 0.5
    # reversed rows give the same band; per-fiber helper agrees
    np.testing.assert_allclose(resolution_on_grid(band[::-1, ::-1], wave_rows[::-1], grid), res, atol=1e-6)
    coeffs = np.polynomial.legendre.legfit(2 * r / (ny - 1) - 1, wave_rows, 4)
    many = resolutions_on_grid(np.stack([band, np.zeros_like(band)]), np.stack([coeffs, coeffs]), grid)
    np.testing.assert_allclose(many[0], res, atol=2e-3)
    assert np.all(many[1] == 0)
    # onto the joined log grid, then two arms combined by ivar (identity where no data)
    log = co.LogGrid(np.log10(5020.0), np.log10(1.0 + 32.0 / co.C_KMS), 500)
    on_log = bands_rebinned(res[None], grid, log.wave)
    np.testing.assert_allclose(on_log[0].sum(axis=0)[10:-10], 1.0, atol=1e-3)
    ivar_a = np.ones((1, log.nwave))
    ivar_b = np.zeros((1, log.nwave))
    joined = co.join_resolution([on_log, on_log * 0], [ivar_a, ivar_b])
    np.testing.assert_allclose(joined, on_log, atol=1e-6)
    empty = co.join_resolution([on_log], [ivar_b])
    assert np.all(empty[0, h] == 1.0) and np.all(empty[0, :h] == 0)


def test_product_rows_round_trip_with_lists_of_any_length():
    import polars as pl

    from fiberlake.storage.products import camera_arrays, products_table
    from fiberlake.storage.rows import rows_to_table

    base = {name: None for name in products_table([], "coadds").schema.names}
    rows = [base | {"night": "2026-12-01", "targetid": 7, "extraction": "box", "scope": "night",
                    "expids": np.array([1, 2, 3]), "nights": np.array(["2026-12-01"] * 3, dtype=object),
                    "flam": np.ones(5, np.float32), "flam_ivar": np.ones(5, np.float32),
                    "flam_mask": np.zeros(5, np.uint32)},
            base | {"night": "2026-12-01", "targetid": 8, "extraction": "box", "scope": "all",
                    "expids": np.array([4]), "nights": np.array(["2026-12-01"], dtype=object),
                    "flam": np.zeros(5, np.float32), "flam_ivar": np.zeros(5, np.float32),
                    "flam_mask": np.zeros(5, np.uint32), "resolution": np.ones(15, np.float32), "resolution_ndiag": 3}]
    table = products_table(rows, "coadds")
    assert table.column("expids").to_pylist() == [[1, 2, 3], [4]]
    assert table.column("resolution").to_pylist()[0] is None and len(table.column("resolution").to_pylist()[1]) == 15
    # spectra rows of a camera (one fiber missing, deconv bands) back to arrays
    ny, nwave = 8, 6
    spectra_rows = []
    for fiber in (0, 2):
        spectra_rows.append({"night": "2026-12-01", "expid": 1, "camera": "b1", "spectrograph": 1, "arm": "b",
                             "fiber": fiber, "targetid": fiber, "objtype": "TGT", "obstype": "SCIENCE",
                             "extraction": "deconv", "run_id": "r", "wave_min": 5000.0, "dwave": 0.5, "nwave": nwave,
                             "fiber_status": 0, "flux": np.full(nwave, fiber + 1.0, np.float32),
                             "ivar": np.ones(nwave, np.float32), "mask": np.zeros(nwave, np.uint32),
                             "sky": np.zeros(nwave, np.float32), "resolution": np.ones(3 * ny, np.float32),
                             "resolution_ndiag": 3, "resolution_wave": np.array([5002.0, 2.0])})
    frame = pl.from_arrow(rows_to_table(spectra_rows, "spectra"))
    arrays = camera_arrays(frame, 3)
    assert arrays.spectra.flux[2, 0] == 3.0 and arrays.spectra.ivar[1].sum() == 0
    assert np.all(arrays.spectra.mask[1] & Mask.DEADFIBER)
    assert arrays.resolution.shape == (3, 3, ny) and np.all(arrays.resolution[1] == 0)
    np.testing.assert_allclose(arrays.resolution_wave[2], [5002.0, 2.0])
