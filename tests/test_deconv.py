"""Deconvolution extraction against known pre-LSF input, the numpy reference and the other
extractions (crosstalk, resolution), with bad data: masks, NaN, dead fibers, CCD edges."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from fiberlake.processors import deconv as D  # noqa: E402
from fiberlake.processors import extract as E  # noqa: E402
from fiberlake.processors import psf as P  # noqa: E402
from fiberlake.processors.deconv_reference import deconv_extract_reference  # noqa: E402
from fiberlake.schemas.containers import TraceSet  # noqa: E402
from fiberlake.schemas.maskbits import Mask  # noqa: E402
from synthetic_deconv import (arc_rows, camera, flat_binned, image_of, observe, science_binned,  # noqa: E402
                              traces_from_truth, truth_F)

SEED = 7302  # used by no other test
H = D.DeconvParams().resolution_halfwidth


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(SEED)
    cam = camera(SEED)
    traces = traces_from_truth(cam)
    flat, flat_iv = observe(image_of(cam, flat_binned(cam)), rng)
    arc, arc_iv = observe(cam.render(cam.throughput[:, None] * arc_rows(cam, rng)), rng)
    psf = P.fit_psf(flat, flat_iv, None, arc, arc_iv, None, traces)
    mags = np.linspace(13.0, 18.0, cam.instrument.n_fibers)[rng.permutation(cam.instrument.n_fibers)]
    binned = science_binned(cam, rng, mags)
    return {"cam": cam, "traces": traces, "psf": psf, "binned": binned, "expected": image_of(cam, binned),
            "rng": rng}


def _pulls(out, F):
    pull = (out.flux - D.apply_resolution(out.resolution, F)) * np.sqrt(out.ivar)
    return np.where(out.ivar > 0, pull, np.nan)


def test_pulls_per_fiber(setup):
    cam, traces, psf = setup["cam"], setup["traces"], setup["psf"]
    F = truth_F(cam, setup["binned"], H)
    pulls = []
    for _ in range(2):
        obs, iv = observe(setup["expected"], setup["rng"])
        out = D.deconv_extract(obs, iv, None, traces, psf)
        assert np.all(np.isfinite(out.flux)) and np.all(out.ivar[:, 2:-2] > 0)
        pulls.append(_pulls(out, F))
    p = np.concatenate(pulls, axis=1)
    mean, std = np.nanmean(p, axis=1), np.nanstd(p, axis=1)
    # 512 pulls per fiber: the standard errors of the mean and the std are 0.044 and 0.031; the
    # brightest fibers (S/N ~ 100 per row) also carry the PSF model's ~0.2 % flux error
    assert np.all(np.abs(mean) < 0.3), mean
    assert np.all(np.abs(std - 1.0) < 0.12), std
    assert abs(np.nanmean(p)) < 0.06 and abs(np.nanstd(p) - 1.0) < 0.05


def test_data_weights_bias_low_and_model_variance_fixes_it(setup):
    cam, traces, psf = setup["cam"], setup["traces"], setup["psf"]
    F = truth_F(cam, setup["binned"], H)
    obs, iv = observe(setup["expected"], setup["rng"])
    raw = np.nanmean(_pulls(D.deconv_extract(obs, iv, None, traces, psf, D.DeconvParams(variance_model="none")), F))
    fixed = np.nanmean(_pulls(D.deconv_extract(obs, iv, None, traces, psf), F))
    assert raw < -0.1 and abs(fixed) < 0.06, (raw, fixed)


def test_torch_equals_numpy_reference(setup):
    traces, psf = setup["traces"], setup["psf"]
    obs, iv = observe(setup["expected"], setup["rng"])
    mask = np.zeros(obs.shape, np.uint32)
    mask[120:126, 100:110] = Mask.COSMIC
    iv[120:126, 100:110] = 0
    tr = TraceSet(traces.coeffs, traces.ny, traces.dead.copy(), traces.rms, traces.sigma)
    tr.dead[4] = True
    params = D.DeconvParams(fibers_per_patch=4, rows_per_patch=40)
    a = D.deconv_extract(obs, iv, mask, tr, psf, params)
    b = deconv_extract_reference(obs, iv, mask, tr, psf, params)
    scale = np.abs(b.flux).max()
    np.testing.assert_allclose(a.flux, b.flux, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(a.ivar, b.ivar, rtol=1e-5, atol=0)
    np.testing.assert_allclose(a.resolution, b.resolution, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.chi2, b.chi2, rtol=1e-5, atol=1e-6)


def test_resolution_rows_and_effective_fwhm(setup):
    """Isolated unresolved lines: the deconvolved profile is no wider than optimal extraction's."""
    cam, traces, psf = setup["cam"], setup["traces"], setup["psf"]
    rng = np.random.default_rng(SEED + 1)
    lines = arc_rows(cam, rng, spacing=30, flux=(2e5, 4e5))
    expected = cam.render(cam.throughput[:, None] * lines)
    iv = 1.0 / (12.25 + expected)
    dec = D.deconv_extract(expected, iv, None, traces, psf)
    opt = E.optimal_extract(expected, iv, None, traces)
    mass = np.abs(dec.resolution.sum(axis=1) - 1.0)[dec.ivar > 0]
    # the stored band (h = 7) holds the rows of R but for the far wings of the corner LSFs
    assert np.median(mass) < 2e-4 and np.percentile(mass, 99) < 5e-3, (np.median(mass), mass.max())

    def fwhm(y, r):
        seg = y[r - 8:r + 9]
        half = seg.max() / 2
        above = np.flatnonzero(seg >= half)
        i0, i1 = above[0], above[-1]
        left = i0 - (seg[i0] - half) / (seg[i0] - seg[i0 - 1])
        right = i1 + (seg[i1] - half) / (seg[i1] - seg[i1 + 1])
        return right - left

    ratios = []
    for f in range(cam.instrument.n_fibers):
        peaks = np.flatnonzero((lines[f][1:-1] > lines[f][:-2]) & (lines[f][1:-1] >= lines[f][2:])
                               & (lines[f][1:-1] > 1e4)) + 1
        for r in peaks[(peaks > 12) & (peaks < cam.instrument.ny - 12)]:
            ratios.append(fwhm(dec.flux[f], r) / fwhm(opt.flux[f], r))
    ratios = np.array(ratios)
    assert ratios.size > 40
    assert np.median(ratios) < 1.02 and ratios.max() < 1.1, (np.median(ratios), ratios.max())


def test_crosstalk_beats_box_and_optimal(setup):
    cam, traces, psf = setup["cam"], setup["traces"], setup["psf"]
    nf = cam.instrument.n_fibers
    bright = np.arange(1, nf, 3)
    thr = np.where(np.isin(np.arange(nf), bright), 1.0, 0.0)
    expected = image_of(cam, flat_binned(cam, 2e5), throughput=thr)
    iv = 1.0 / (12.25 + expected)
    faint = np.setdiff1d(np.arange(nf), bright)
    sl = slice(20, -20)

    def xt(spec):
        return np.median(np.abs(spec.flux[faint][:, sl])) / np.median(spec.flux[bright][:, sl])

    dec = xt(D.deconv_extract(expected, iv, None, traces, psf))
    box = xt(E.box_extract(expected, iv, None, traces))
    opt = xt(E.optimal_extract(expected, iv, None, traces))
    assert dec < 0.6 * min(box, opt), (dec, box, opt)
    assert dec < 1e-4, dec


def test_masked_pixels_nan_and_fully_masked_rows(setup):
    cam, traces, psf = setup["cam"], setup["traces"], setup["psf"]
    F = truth_F(cam, setup["binned"], H)
    obs, iv = observe(setup["expected"], setup["rng"])
    f = 6
    x = int(round(cam.trace_x[f, 100]))
    obs[100:106, x - 13:x + 14] = np.nan                      # every pixel of fiber 6, rows 100-105
    obs[150, x - 1:x + 2] = 1e6                               # a cosmic, masked upstream
    mask = np.zeros(obs.shape, np.uint32)
    mask[150, x - 1:x + 2] = Mask.COSMIC
    out = D.deconv_extract(obs, iv, mask, traces, psf)
    assert np.all(np.isfinite(out.flux)) and np.all(np.isfinite(out.ivar)) and np.all(np.isfinite(out.chi2))
    dead_rows = slice(101, 105)
    assert np.all(out.ivar[f, dead_rows] == 0) and np.all(out.flux[f, dead_rows] == 0)
    assert np.all(out.mask[f, dead_rows] & Mask.ALLBADPIX)
    assert np.all(out.mask[f, dead_rows] & Mask.NONFINITE)
    # COSMIC is a fatal bit: it reaches the 1D mask only where the bin is unusable
    assert out.mask[f, 150] & Mask.SOMEBADPIX and out.ivar[f, 150] > 0
    p = _pulls(out, F)
    assert abs(np.nanmean(p)) < 0.08 and abs(np.nanstd(p) - 1) < 0.08
    assert np.nanmax(np.abs(p[f, 140:160])) < 4.5             # the cosmic's neighbours are not biased


def test_dead_fiber(setup):
    cam, traces, psf = setup["cam"], setup["traces"], setup["psf"]
    thr = cam.throughput.copy()
    thr[5] = 0.0
    F = truth_F(cam, setup["binned"], H, throughput=thr)
    obs, iv = observe(image_of(cam, setup["binned"], throughput=thr), setup["rng"])
    tr = TraceSet(traces.coeffs, traces.ny, traces.dead.copy(), traces.rms, traces.sigma)
    tr.dead[5] = True
    out = D.deconv_extract(obs, iv, None, tr, psf)
    assert np.all(out.flux[5] == 0) and np.all(out.ivar[5] == 0) and np.all(out.mask[5] & Mask.DEADFIBER)
    p = _pulls(out, F)
    assert np.all(np.abs(np.nanmean(p[[4, 6]], axis=1)) < 0.25) and np.all(np.nanstd(p[[4, 6]], axis=1) < 1.15)


def test_ccd_edges(setup):
    """Edge rows stay usable; a fiber half off the CCD degrades; one entirely off is OFFCCD."""
    cam, traces, psf = setup["cam"], setup["traces"], setup["psf"]
    F = truth_F(cam, setup["binned"], H)
    obs, iv = observe(setup["expected"], setup["rng"])
    out = D.deconv_extract(obs, iv, None, traces, psf)
    p = _pulls(out, F)
    assert np.all(out.ivar[:, [0, 1, -2, -1]] > 0)
    assert np.nanstd(p[:, [0, 1, -2, -1]]) < 1.3
    # crop the columns so fiber 0 sits on the first column and fiber 1 near it
    crop = int(np.floor(cam.trace_x[0].min()))
    coeffs = traces.coeffs.copy()
    coeffs[:, 0] -= crop
    tr = TraceSet(coeffs, traces.ny, traces.dead, traces.rms, traces.sigma)
    cut = D.deconv_extract(obs[:, crop:], iv[:, crop:], None, tr, psf)
    assert np.all(np.isfinite(cut.flux))
    usable = cut.ivar[0] > 0
    assert np.all(cut.mask[0][~usable] & Mask.OFFCCD)
    assert np.all(cut.ivar[2:] > 0)
    # move fiber 0 entirely off the CCD
    coeffs2 = coeffs.copy()
    coeffs2[0, 0] -= 40.0
    tr2 = TraceSet(coeffs2, traces.ny, traces.dead, traces.rms, traces.sigma)
    off = D.deconv_extract(obs[:, crop:], iv[:, crop:], None, tr2, psf)
    assert np.all(off.ivar[0] == 0) and np.all(off.flux[0] == 0) and np.all(off.mask[0] & Mask.OFFCCD)


def test_failed_patches_are_retried_and_flagged(setup):
    traces, psf = setup["traces"], setup["psf"]
    obs, iv = observe(setup["expected"], setup["rng"])
    # a negative ridge makes every first attempt indefinite: all patches take the retry path
    out = D.deconv_extract(obs, iv, None, traces, psf, D.DeconvParams(regularize=-2.0))
    assert out.info["n_retried_patches"] == out.info["n_patches"]
    assert np.all(np.isfinite(out.flux))
    assert np.all(out.mask[out.ivar > 0] & Mask.BAD2DFIT)


def test_patch_layout_does_not_change_the_result(setup):
    traces, psf = setup["traces"], setup["psf"]
    obs, iv = observe(setup["expected"], np.random.default_rng(SEED + 11))  # its own noise: not the order of the tests
    a = D.deconv_extract(obs, iv, None, traces, psf, D.DeconvParams(fibers_per_patch=5, rows_per_patch=50))
    b = D.deconv_extract(obs, iv, None, traces, psf,
                         D.DeconvParams(fibers_per_patch=3, rows_per_patch=30, pad_rows=12, overlap_fibers=2))
    good = (a.ivar > 0) & (b.ivar > 0)
    diff = (a.flux - b.flux)[good] * np.sqrt(a.ivar[good])
    assert np.sqrt(np.mean(diff**2)) < 0.08  # in units of the noise: 0.050-0.052 on the noise draws seen


def test_invariant_psf_on_a_rectified_frame():
    """Straight traces and a PSF that does not vary: the invariant model is enough."""
    from dataclasses import replace

    from synthetic_deconv import NO_DEAD, TINY

    rng = np.random.default_rng(SEED + 2)
    inst = replace(TINY, distortion_k=0.0)
    params = replace(NO_DEAD, psf_growth=0.0, psf_ellipticity=0.0, wing_frac_corner=NO_DEAD.wing_frac_centre,
                     wing_offset_px=0.0, smile_px=0.0)
    cam = camera(SEED + 2, instrument=inst, params=params)
    traces = traces_from_truth(cam)
    flat, flat_iv = observe(image_of(cam, flat_binned(cam)), rng)
    arc, arc_iv = observe(cam.render(cam.throughput[:, None] * arc_rows(cam, rng)), rng)
    psf = P.fit_psf(flat, flat_iv, None, arc, arc_iv, None, traces, invariant=True)
    binned = science_binned(cam, rng, np.full(cam.instrument.n_fibers, 16.5))
    obs, iv = observe(image_of(cam, binned), rng)
    p = _pulls(D.deconv_extract(obs, iv, None, traces, psf), truth_F(cam, binned, H))
    assert abs(np.nanmean(p)) < 0.08 and abs(np.nanstd(p) - 1) < 0.08


def test_apply_resolution_identity_and_shapes():
    res = np.zeros((2, 2 * 3 + 1, 10), np.float32)
    res[:, 3] = 1.0
    model = np.arange(20.0).reshape(2, 10)
    np.testing.assert_allclose(D.apply_resolution(res, model), model)
    np.testing.assert_allclose(D.apply_resolution(res, np.pad(model, ((0, 0), (3, 3)))), model)
    with pytest.raises(ValueError):
        D.apply_resolution(res, np.zeros((2, 11)))


def test_cuda_matches_cpu(setup):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    traces, psf = setup["traces"], setup["psf"]
    obs, iv = observe(setup["expected"], setup["rng"])
    a = D.deconv_extract(obs, iv, None, traces, psf, D.DeconvParams(device="cpu"))
    b = D.deconv_extract(obs, iv, None, traces, psf, D.DeconvParams(device="cuda"))
    assert b.info["device"].startswith("cuda")
    np.testing.assert_allclose(a.flux, b.flux, rtol=0, atol=1e-6 * np.abs(a.flux).max())
    np.testing.assert_allclose(a.ivar, b.ivar, rtol=1e-5)
    np.testing.assert_allclose(a.resolution, b.resolution, atol=1e-6)


# --------------------------------------------------------------------- issue 19: same products, faster


def test_solver_matches_the_solver_before_issue_19(setup):
    """The batched solver (fused triangular solves, band of R read off Q's diagonals) against
    the torch solver as it was before issue 19: the same products within 1e-6 (observed ~3e-8:
    the blocks' condition number ~1e10 turns summation-order rounding into ~1e-8)."""
    import torch

    from fiberlake.processors.deconv_reference import solve_patches_torch_dense

    traces, psf = setup["traces"], setup["psf"]
    obs, iv = observe(setup["expected"], np.random.default_rng(SEED + 21))
    params = D.DeconvParams()
    tab = D.prepare(obs, iv, None, traces, psf, params.pad_rows)
    D.set_model_weights(tab, D.row_fit(tab), D.read_noise_variance(tab.img, tab.w))
    plan = D.plan_patches(traces.n_fibers, obs.shape[0], params)
    sel = np.arange(plan.n_patches)
    args = (*D.gather_patches(tab, plan, sel), plan.core_slots)
    kw = dict(regularize=params.regularize, halfwidth=H, device=torch.device("cpu"))
    new, old = D.solve_patches_torch(*args, **kw), solve_patches_torch_dense(*args, **kw)
    assert not old["failed"].any() and np.array_equal(new["failed"], old["failed"])
    np.testing.assert_allclose(new["flux"], old["flux"], rtol=0, atol=1e-6 * np.abs(old["flux"]).max())
    np.testing.assert_allclose(new["ivar"], old["ivar"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(new["res"], old["res"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(new["g"], old["g"], rtol=0, atol=1e-5 * np.abs(old["g"]).max())
    light = D.solve_patches_torch(*args, **kw, products=False)           # the deconv variance model's pass
    np.testing.assert_array_equal(light["g"], new["g"])
    assert not light["failed"].any() and not light["flux"].any()


def test_cholesky_R_decorrelates_too_but_is_not_the_products_R(setup):
    """Why the solver keeps the eigen-decomposition: R from the Cholesky factor of C^-1 also gives
    uncorrelated unit-variance errors, but it is a one-sided line-spread (its rows' centroids
    sit a row or more off their bin), not the symmetric R of the stored products."""
    import scipy.linalg

    from fiberlake.processors.deconv_reference import cholesky_resolution, patch_matrix

    traces, psf = setup["traces"], setup["psf"]
    obs, iv = observe(setup["expected"], np.random.default_rng(SEED + 22))
    params = D.DeconvParams(fibers_per_patch=2, rows_per_patch=20)
    tab = D.prepare(obs, iv, None, traces, psf, params.pad_rows)
    plan = D.plan_patches(traces.n_fibers, obs.shape[0], params)
    p = plan.n_patches // 2 + 3                                         # an interior patch
    A, pix = patch_matrix(tab, plan, p)
    Hm = (A.T @ (A.multiply(tab.w.ravel()[pix][:, None]))).toarray()
    nb = plan.nb
    Hm += 1e-10 * Hm.diagonal().max() * np.eye(Hm.shape[0])
    blk = slice(plan.core_slots[0] * nb, (plan.core_slots[0] + 1) * nb)
    C = np.linalg.inv(Hm)[blk, blk]
    icov = np.linalg.inv(0.5 * (C + C.T))
    icov = 0.5 * (icov + icov.T)
    w, V = np.linalg.eigh(icov)
    Q = (V * np.sqrt(w)) @ V.T
    U = scipy.linalg.cholesky(icov, lower=False)
    for M in (Q, U):                                                    # both decorrelate: M C M^T = I
        np.testing.assert_allclose(M @ C @ M.T, np.eye(nb), atol=1e-6)
    R_sym = Q / Q.sum(axis=1)[:, None]
    R_chol, ivar_chol = cholesky_resolution(icov)
    rows = np.arange(10, nb - 10)
    centroid = lambda R: (R[rows] * np.arange(nb)).sum(axis=1) - rows  # noqa: E731
    assert np.max(np.abs(centroid(R_sym))) < 0.2
    assert np.median(np.abs(centroid(R_chol))) > 1.0
    assert np.abs(R_sym - R_chol)[rows].max() > 0.1


def test_window_gathers_match_flat_index_gathers_off_the_ccd(setup):
    """The strided-view window gathers (prepare, reduce_rows, model_image, chi^2) against the
    flat-index gathers they replaced, on a frame cropped so fiber 0's windows leave the CCD."""
    cam, traces, psf = setup["cam"], setup["traces"], setup["psf"]
    obs, iv = observe(setup["expected"], np.random.default_rng(SEED + 23))
    crop = int(np.floor(cam.trace_x[0].min()))
    coeffs = traces.coeffs.copy()
    coeffs[:, 0] -= crop
    tr = TraceSet(coeffs, traces.ny, traces.dead, traces.rms, traces.sigma)
    img, ivc = obs[:, crop:], iv[:, crop:].copy()
    mask = np.zeros(img.shape, np.uint32)
    mask[60:63, 0:12] = Mask.COSMIC
    ivc[60:63, 0:12] = 0
    tab = D.prepare(img, ivc, mask, tr, psf, 10)
    nf, ny, nw = tab.prof.shape
    nx = img.shape[1]
    cols = tab.first[..., None] + np.arange(nw)
    on = (cols >= 0) & (cols < nx)
    assert not on.all() and on.any(axis=-1).all()                       # some windows hang off the CCD
    idx = np.arange(ny)[None, :, None] * nx + np.clip(cols, 0, nx - 1)
    wv = np.where(on, tab.w.ravel()[idx], 0.0)
    P = tab.prof
    # sums of the same products in another order (stacked vector products): equal to rounding
    np.testing.assert_allclose(tab.K0[:, 10:10 + ny], np.sum(P * wv * P, axis=-1), rtol=1e-13, atol=0)
    np.testing.assert_allclose(tab.b[:, 10:10 + ny], np.sum(P * wv * np.where(on, tab.img.ravel()[idx], 0.0),
                                                              axis=-1), rtol=1e-12, atol=1e-12 * np.abs(tab.b).max())
    good = on & tab.good.ravel()[idx]
    np.testing.assert_array_equal(tab.gx, np.sum(np.where(good, P, 0.0), axis=-1))
    np.testing.assert_array_equal(tab.ox, np.sum(np.where(on, 0.0, P), axis=-1))
    sig = on & (P > D.SIGNIFICANT_WEIGHT)
    np.testing.assert_array_equal(tab.ngood, np.sum(sig & good, axis=-1))
    g = np.random.default_rng(1).uniform(0, 1e4, (nf, ny))
    model = np.zeros(ny * nx)
    for grp in range(2):
        model[idx[grp::2][on[grp::2]]] += (g[..., None] * P)[grp::2][on[grp::2]]
    np.testing.assert_allclose(D.model_image(tab, g), model.reshape(ny, nx), rtol=1e-14, atol=0)
