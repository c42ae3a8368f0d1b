"""Tests of processors/tracing.py: Gaussian fits, band centroids, Legendre traces, dead fibers."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.polynomial import legendre
from scipy.optimize import curve_fit
from synthetic import distorted_traces, fiber_image, halo_fiber_image, nominal_columns, pixel_gauss

from fiberlake.processors.tracing import (band_profiles, fit_legendre_clipped, fit_pixel_gaussians,
                                          interpolate_fibers, measure_band_centroids, trace_fibers)
from fiberlake.schemas.containers import TraceSet


def test_fit_pixel_gaussians_exact_and_against_curve_fit():
    rng = np.random.default_rng(0)
    n, w = 40, 15
    mu = 7.0 + rng.uniform(-1.5, 1.5, n)
    sig = rng.uniform(1.2, 3.0, n)
    amp = rng.uniform(500, 5000, n)
    t = np.broadcast_to(np.arange(w, dtype=float), (n, w))
    model = amp[:, None] * pixel_gauss(t, mu[:, None], sig[:, None]) + 10.0
    fit = fit_pixel_gaussians(model, t, np.ones_like(model), amp * 0.7, np.full(n, 7.0), np.full(n, 2.0),
                              np.zeros(n), n_iter=30)
    assert fit.ok.all()
    np.testing.assert_allclose(fit.mu, mu, atol=1e-5)
    np.testing.assert_allclose(fit.sigma, sig, atol=1e-5)
    np.testing.assert_allclose(fit.amp, amp, rtol=1e-5)
    np.testing.assert_allclose(fit.bkg, 10.0, atol=1e-3)

    # noisy data: same answer and error as scipy's curve_fit on the same model
    var = model + 9.0
    noisy = model + rng.normal(0, np.sqrt(var))
    fit = fit_pixel_gaussians(noisy, t, 1.0 / var, amp, mu, sig, np.full(n, 10.0), n_iter=30)
    for i in range(5):
        f = lambda x, a, m, s, b: a * pixel_gauss(x, m, s) + b  # noqa: E731
        p, cov = curve_fit(f, t[i], noisy[i], p0=[amp[i], mu[i], sig[i], 10.0], sigma=np.sqrt(var[i]),
                           absolute_sigma=True)
        assert fit.mu[i] == pytest.approx(p[1], abs=1e-4)
        assert fit.mu_err[i] == pytest.approx(np.sqrt(cov[1, 1]), rel=1e-3)


def test_band_profiles_ignore_masked_pixels():
    rng = np.random.default_rng(1)
    img = rng.normal(100.0, 1.0, (64, 20))
    ivar = np.ones_like(img)
    img[5, :] = 1e6
    ivar[5, :] = 0.0  # a masked hot row
    prof, weight, rows = band_profiles(img, ivar, band_rows=16)
    assert prof.shape == (4, 20) and rows.tolist() == [7.5, 23.5, 39.5, 55.5]
    assert np.abs(prof - 100.0).max() < 1.0
    np.testing.assert_allclose(weight[0], 15 * 2 / np.pi)
    np.testing.assert_allclose(weight[1], 16 * 2 / np.pi)


def test_fit_legendre_clipped_rejects_outliers_like_a_clean_fit():
    rng = np.random.default_rng(2)
    u = np.linspace(-1, 1, 60)
    true = np.array([300.0, 2.0, -0.5, 0.2])
    y = np.stack([legendre.legval(u, true) + rng.normal(0, 0.02, u.size) for _ in range(3)])
    bad = np.zeros_like(y, bool)
    bad[0, [5, 30]] = True
    bad[2, 50] = True
    y[bad] += 1.0
    weight = np.full_like(y, 1 / 0.02 ** 2)
    coeffs, used = fit_legendre_clipped(u, y, weight, 3, clip=4.0)
    assert not used[bad].any() and used[~bad].all()
    for i in range(3):
        ref = legendre.legfit(u[~bad[i]], y[i, ~bad[i]], 3)
        np.testing.assert_allclose(coeffs[i], ref, atol=1e-9)


def test_interpolate_fibers_is_exact_for_smooth_coefficients():
    pos = np.arange(12, dtype=float) * 16
    coeffs = np.stack([5 + 0.3 * pos + 1e-3 * pos ** 2, -0.01 * pos], axis=1)
    bad = np.zeros(12, bool)
    bad[[0, 4, 5, 11]] = True
    out = interpolate_fibers(np.where(bad[:, None], 0.0, coeffs), pos, bad)
    np.testing.assert_allclose(out[~bad], coeffs[~bad])
    np.testing.assert_allclose(out[[0, 4, 5, 11]], coeffs[[0, 4, 5, 11]], atol=1e-9)  # local quadratics


NY, NX, NF = 1024, 608, 32
DEAD = [0, 9, 10, 20]


@pytest.fixture(scope="module")
def mini_flat():
    """A MINI-sized flat: pincushion traces offset by 5 px, sigma 2.4 -> 3.0, dead fibers."""
    rng = np.random.default_rng(3)
    nom = nominal_columns(NX, NF)
    xt = distorted_traces(NY, NX, nom, k=0.012, shift=5.0)
    sig = np.linspace(2.4, 3.0, NF)
    flux = rng.uniform(1.5e4, 2.5e4, NF)[:, None] * (0.6 + 0.4 * np.linspace(0, 1, NY))[None, :]
    flux[DEAD] = 0.0
    flux[10] = 0.05 * 2e4 * flux[11] / flux[11].mean()  # a nearly dead fiber: 5 % of the others
    truth = fiber_image(xt, NX, sig, flux)
    img = truth + rng.normal(0, 1, truth.shape) * np.sqrt(3.5 ** 2 + truth)
    ivar = 1.0 / (3.5 ** 2 + np.maximum(img, 0))
    bad_col = int(round(xt[25, NY // 2]))  # a bad column through a fiber core
    img[:, bad_col] = 6e4
    ivar[:, bad_col] = 0.0
    return img, ivar, nom, xt, sig


@pytest.mark.parametrize("profile, tol_fiber", [("halo", 0.05), ("gauss", 0.02)])
def test_trace_fibers_recovers_distorted_traces(mini_flat, profile, tol_fiber):
    img, ivar, nom, xt, sig = mini_flat
    ts = trace_fibers(img, ivar, nom, profile=profile)
    assert isinstance(ts, TraceSet) and ts.coeffs.shape == (NF, 6) and ts.ny == NY
    assert np.flatnonzero(ts.dead).tolist() == DEAD
    err = ts.x() - xt
    live = ~ts.dead
    rms_live = np.sqrt((err[live] ** 2).mean(axis=1))
    # target 0.05 px rms; on these pure Gaussians the halo model is a little noisier, mostly on
    # the end fiber, whose halo may lean into the empty side
    assert rms_live.max() < tol_fiber
    assert np.sqrt(np.mean(rms_live ** 2)) < 0.4 * tol_fiber
    # dead fibers: interpolated from neighbours (pincushion is smooth across fibers)
    assert np.abs(err[~live]).max() < 0.15
    assert np.all(ts.rms[live] < 0.03) and np.all(np.isnan(ts.rms[~live]))
    np.testing.assert_allclose(ts.sigma[live], sig[live], rtol=0.03)  # equivalent Gaussian sigma
    assert np.all(np.isfinite(ts.sigma))


def test_halo_profile_traces_the_flux_centroid_of_asymmetric_profiles():
    """Profiles with a wing offset outward (as at the CCD edges): the core centre is biased."""
    rng = np.random.default_rng(6)
    ny, nx, nf = 256, 260, 14
    nom = nominal_columns(nx, nf)
    xt = distorted_traces(ny, nx, nom, k=0.0) + 0.2 * np.sin(np.arange(ny) / 50.0)[None, :]
    r = (xt - (nx - 1) / 2.0) / (nx / 2.0)  # -1 .. 1 across the CCD
    frac = 0.1 + 0.1 * r ** 2
    sep = 2.0 * r
    img = halo_fiber_image(xt, nx, 2.5, 3e4, frac, sep)
    img = img + rng.normal(0, 1, img.shape) * np.sqrt(12.25 + img)
    ivar = 1.0 / (12.25 + np.maximum(img, 0))
    errs = {}
    for profile in ("gauss", "halo"):
        ts = trace_fibers(img, ivar, nom, profile=profile)
        errs[profile] = np.sqrt(np.mean((ts.x() - xt) ** 2, axis=1))
    assert errs["gauss"].max() > 0.05  # the Gaussian follows the core
    assert errs["halo"].max() < 0.02
def test_band_centroids_follow_traces_from_the_centre(mini_flat):
    img, ivar, nom, xt, _ = mini_flat
    bc = measure_band_centroids(img, ivar, nom, band_rows=32, profile="gauss")
    live = np.setdiff1d(np.arange(NF), DEAD)
    truth = np.stack([np.interp(bc.rows, np.arange(NY), xt[f]) for f in live])
    assert bc.valid[live].all()  # fiber 25, across the masked column, too
    assert np.abs(bc.x[live] - truth).max() < 0.05
    # the formal errors describe the scatter
    z = (bc.x[live] - truth) / bc.x_err[live]
    assert 0.7 < np.std(z) < 1.4


def test_neighbour_subtraction_removes_wing_bias():
    ny, nx, nf = 256, 260, 14
    nom = nominal_columns(nx, nf)
    xt = distorted_traces(ny, nx, nom, k=0.0) + 0.3 * np.sin(np.arange(ny) / 60.0)[None, :]
    flux = np.where(np.arange(nf) % 2, 1e4, 8e4)  # faint fibers between bright ones
    img = fiber_image(xt, nx, 3.0, flux)
    ivar = 1.0 / (12.25 + img)
    errs = {}
    for n in (0, 3):
        bc = measure_band_centroids(img, ivar, nom, n_refine=n, sigma_guess=3.0, profile="gauss")
        truth = np.stack([np.interp(bc.rows, np.arange(ny), xt[f]) for f in range(nf)])
        errs[n] = np.sqrt(np.mean((bc.x - truth) ** 2))
    assert errs[0] > 0.02  # the wings of bright neighbours pull a lone Gaussian fit
    assert errs[3] < 1e-3
