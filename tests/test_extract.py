"""Box and optimal extraction on small analytic frames (tests/synthetic_extract.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtr
from scipy.stats import norm

from fiberlake.processors.extract import solve_tridiagonal, box_extract, measure_profile, optimal_extract
from fiberlake.schemas.containers import Spectra1D
from fiberlake.schemas.maskbits import FATAL, Mask

from synthetic_extract import make_traces, observe, render, with_columns

NF, NY = 8, 240
NX = NF * 16 + 24
RN = 3.5


def _frame(seed: int, level: float = 3000.0, ny: int = NY, sigma: float = 2.4):
    rng = np.random.default_rng(seed)
    tr = make_traces(NF, ny, NX, sigma=sigma)
    flux = level * (1 + 0.3 * np.sin(np.arange(ny) / 25.0))[None, :] * rng.uniform(0.6, 1.4, (NF, 1))
    expected = render(tr, flux, NX)
    image, ivar = observe(expected, rng, read_noise=RN)
    return tr, flux, expected, image, ivar


def _assert_clean(s: Spectra1D) -> None:
    assert np.all(np.isfinite(s.flux)) and np.all(np.isfinite(s.ivar))
    assert np.all(s.ivar >= 0)
    fatal = (s.mask & np.uint32(FATAL)) != 0
    assert np.all(s.ivar[fatal] == 0)


def test_box_matches_loop_reference():
    tr, flux, expected, image, ivar = _frame(1)
    s = box_extract(image, ivar, None, tr, halfwidth=7.0)
    xc = tr.x()
    for f, r in [(0, 0), (3, 100), (7, NY - 1)]:  # plain-Python fractional aperture sum
        x = xc[f, r]
        tot = var = 0.0
        for c in range(NX):
            w = max(0.0, min(c + 0.5, x + 7) - max(c - 0.5, x - 7))
            tot += w * image[r, c]
            var += w * w / ivar[r, c]
        assert s.flux[f, r] == pytest.approx(tot, rel=1e-5)
        assert s.ivar[f, r] == pytest.approx(1 / var, rel=1e-5)
    np.testing.assert_allclose(s.npix, 14.0, atol=1e-4)


@pytest.mark.parametrize("method", ["box", "optimal", "optimal_deblend"])
def test_recovers_input_flux_and_errors(method):
    tr, flux, expected, image, ivar = _frame(2)
    if method == "box":
        s = box_extract(image, ivar, None, tr)
    else:
        s = optimal_extract(image, ivar, None, tr, deblend=method == "optimal_deblend")
    _assert_clean(s)
    assert s.flux.shape == (NF, NY) and s.flux.dtype == np.float32 and s.mask.dtype == np.uint32
    ratio = np.median(s.flux / flux)
    # +-7 px truncation of a sigma 2.4 Gaussian keeps 99.65 % (box, plain Horne)
    assert abs(ratio - 1) < 0.006
    pull = (s.flux - flux) * np.sqrt(s.ivar)
    assert abs(np.std(pull) - 1) < 0.06
    assert np.all(s.mask == 0)


def test_optimal_noise_free_is_exact_with_deblend():
    tr, flux, expected, _, _ = _frame(3)
    s = optimal_extract(expected, np.ones_like(expected), None, tr, read_noise=RN)
    np.testing.assert_allclose(s.flux, flux, rtol=1e-4)


def test_optimal_beats_box_on_faint_fibers():
    rng = np.random.default_rng(4)
    ny = 1500
    tr = make_traces(NF, ny, NX)
    flux = np.full((NF, ny), 30.0)  # read-noise dominated: 30 e-/row against 3.5 e- per pixel
    image, ivar = observe(render(tr, flux, NX), rng, read_noise=RN)
    b = box_extract(image, ivar, None, tr)
    o = optimal_extract(image, ivar, None, tr)
    gain = np.std(b.flux - flux) / np.std(o.flux - flux)
    # theory: box var 14 rn^2 + F, optimal rn^2 / sum(P^2) + F (sum P^2 ~ 0.116) -> 1.22
    p = np.diff(ndtr((np.arange(-10, 11) + 0.5) / 2.4))
    p = np.concatenate([[ndtr(-10.5 / 2.4)], p])
    theory = np.sqrt((14 * RN**2 + 30) / (RN**2 / np.sum(p**2) + 30))
    assert 1.12 < gain < 1.35
    assert gain == pytest.approx(theory, rel=0.06)
    # both unbiased on faint fibers (model-based variance, no data-weighting bias)
    assert abs(np.mean(o.flux) / 30 - 1) < 0.01
    pull = (o.flux - flux) * np.sqrt(o.ivar)
    assert abs(np.std(pull) - 1) < 0.05


@pytest.mark.parametrize("deblend", [False, True])
def test_cosmic_rays_rejected(deblend):
    tr, flux, expected, image, _ = _frame(5)
    rng = np.random.default_rng(50)
    xc = tr.x()
    hits = []
    for f, r in zip(rng.choice(NF, 25), rng.choice(NY - 1, 25, replace=False)):
        c = int(round(xc[f, r])) + int(rng.integers(-2, 3))
        image[r, c] += 6000.0
        image[r + 1, c] += 1500.0  # two-pixel track
        hits.append((f, r))
    ivar = 1.0 / (RN**2 + np.clip(image, 0, None))  # the hits are not flagged on input
    o = optimal_extract(image, ivar, None, tr, deblend=deblend)
    b = box_extract(image, ivar, None, tr)
    _assert_clean(o)
    f_idx, r_idx = np.array(hits).T
    pull_o = (o.flux[f_idx, r_idx] - flux[f_idx, r_idx]) * np.sqrt(o.ivar[f_idx, r_idx])
    pull_b = (b.flux[f_idx, r_idx] - flux[f_idx, r_idx]) * np.sqrt(b.ivar[f_idx, r_idx])
    assert np.all(np.abs(pull_o) < 4.5)
    assert np.all(pull_b > 20)  # the box sum keeps the cosmic
    # rows without hits are untouched by the rejection (no false rejections on bright fibers)
    clean = np.ones((NF, NY), bool)
    clean[f_idx, r_idx] = clean[f_idx, r_idx + 1] = False
    assert np.mean(o.mask[clean] & np.uint32(Mask.SOMEBADPIX) != 0) < 0.01


def test_masked_pixels_corrected_or_flagged():
    tr, flux, expected, image, ivar = _frame(6)
    xc = tr.x()
    mask = np.zeros(image.shape, np.uint32)
    # fiber 2, rows 50-59: the two core columns bad -> corrected, SOMEBADPIX
    for r in range(50, 60):
        c = int(round(xc[2, r]))
        ivar[r, c - 1:c + 1] = 0
        mask[r, c - 1:c + 1] = Mask.BADPIX
    # fiber 5, rows 100-104: every column bad -> ALLBADPIX, ivar 0
    for r in range(100, 105):
        c = int(round(xc[5, r]))
        ivar[r, c - 12:c + 13] = 0
        mask[r, c - 12:c + 13] = Mask.SATURATED
    image[120, :] = np.nan  # a non-finite row
    for s in (box_extract(image, ivar, mask, tr), optimal_extract(image, ivar, mask, tr)):
        _assert_clean(s)
        part = s.mask[2, 50:60]
        assert np.all(part & Mask.SOMEBADPIX) and np.all(s.ivar[2, 50:60] > 0)
        assert np.all(part & Mask.BADPIX == 0)  # a corrected value does not carry fatal bits
        pull = (s.flux[2, 50:60] - flux[2, 50:60]) * np.sqrt(s.ivar[2, 50:60])
        assert np.all(np.abs(pull) < 4)
        assert np.all(s.ivar[5, 100:105] == 0)
        assert np.all(s.mask[5, 100:105] & Mask.ALLBADPIX)
        assert np.all(s.mask[5, 100:105] & Mask.SATURATED)  # the cause travels with it
        assert np.all(s.ivar[:, 120] == 0) and np.all(s.mask[:, 120] & Mask.NONFINITE)
        assert np.all(s.ivar[:, 119] > 0)


def test_fibers_near_and_over_the_ccd_edge():
    ny = 80
    tr = make_traces(4, ny, NX, tilt=0.0, bend=0.0)
    # fiber 0 fully off the CCD, fiber 1 half on it, fiber 2 near the edge, fiber 3 inside
    tr = with_columns(tr, np.array([-30.0, 0.0, 9.0, 40.0]))
    flux = np.full((4, ny), 2000.0)
    expected = render(tr, flux, NX)
    rng = np.random.default_rng(7)
    image, ivar = observe(expected, rng)
    for s in (box_extract(image, ivar, None, tr), optimal_extract(image, ivar, None, tr),
              optimal_extract(image, ivar, None, tr, deblend=False)):
        _assert_clean(s)
        assert np.all(s.ivar[:2] == 0) and np.all(s.mask[:2] & Mask.OFFCCD)
        assert np.all(s.flux[0] == 0)
        assert np.all(s.ivar[2:] > 0) and np.all(s.mask[2:] & Mask.OFFCCD == 0)
        assert abs(np.median(s.flux[3]) / 2000 - 1) < 0.01


def test_dead_fiber_flagged():
    tr, flux, expected, image, ivar = _frame(8)
    tr.dead[4] = True
    for s in (box_extract(image, ivar, None, tr), optimal_extract(image, ivar, None, tr)):
        assert np.all(s.ivar[4] == 0) and np.all(s.mask[4] & Mask.DEADFIBER)
        assert np.all(s.ivar[3] > 0)


def test_deblend_reduces_crosstalk_from_bright_neighbours():
    ny, nx = 120, 5 * 16 + 24
    tr = make_traces(5, ny, nx, sigma=3.0)  # corner-like profile, wings reach the neighbour
    flux = np.zeros((5, ny))
    flux[1] = flux[3] = 1e5  # empty fiber 2 between two bright ones
    flux[0] = flux[4] = 500.0
    expected = render(tr, flux, nx)
    ivar = 1 / (RN**2 + expected)
    plain = optimal_extract(expected, ivar, None, tr, deblend=False)
    deb = optimal_extract(expected, ivar, None, tr, deblend=True)
    box = box_extract(expected, ivar, None, tr)
    x_plain, x_deb, x_box = (np.median(np.abs(s.flux[2])) for s in (plain, deb, box))
    assert x_box > 100 and x_plain > 10  # 1e-4 .. 3e-3 of the neighbour
    assert x_deb < x_plain / 10
    np.testing.assert_allclose(deb.flux[[1, 3]], 1e5, rtol=1e-4)
    np.testing.assert_allclose(deb.flux[[0, 4]], 500.0, rtol=2e-3)


def test_unsorted_fiber_order_is_kept():
    tr, flux, expected, image, ivar = _frame(9)
    perm = np.random.default_rng(0).permutation(NF)
    tr_p = type(tr)(coeffs=tr.coeffs[perm], ny=tr.ny, dead=tr.dead[perm], rms=tr.rms[perm],
                    sigma=tr.sigma[perm])
    a = optimal_extract(image, ivar, None, tr)
    b = optimal_extract(image, ivar, None, tr_p)
    np.testing.assert_allclose(b.flux, a.flux[perm], rtol=1e-6)


def test_tridiagonal_solver_matches_dense():
    rng = np.random.default_rng(10)
    n, m = 7, 5
    d = rng.uniform(2, 3, (n, m))
    e = rng.uniform(-0.8, 0.8, (n - 1, m))
    b = rng.normal(size=(n, m))
    x, vd = solve_tridiagonal(d, e, b)
    for j in range(m):
        A = np.diag(d[:, j]) + np.diag(e[:, j], 1) + np.diag(e[:, j], -1)
        np.testing.assert_allclose(x[:, j], np.linalg.solve(A, b[:, j]), rtol=1e-10)
        np.testing.assert_allclose(vd[:, j], np.diag(np.linalg.inv(A)), rtol=1e-10)


def _winged(seed: int, flux: np.ndarray, traces, nx: int, offsets: np.ndarray):
    rng = np.random.default_rng(seed)
    # wing 1.5x the core (the simulator's value): the profile support stays below the fiber
    # pitch (nearest-neighbour coupling), so much wider wings would leak past it
    expected = render(traces, flux, nx, wing_fraction=0.15, wing_sigma=1.5 * 2.5, wing_offset=offsets)
    return observe(expected, rng, read_noise=RN)


def test_measure_profile_recovers_core_and_wing():
    nf, ny = 10, 200
    nx = nf * 16 + 24
    tr = make_traces(nf, ny, nx, sigma=2.5)
    offsets = np.linspace(-1.0, 1.0, nf)            # wing pushed outward, as at the CCD edges
    flat, flat_ivar = _winged(11, np.full((nf, ny), 4e4), tr, nx, offsets)
    tr.sigma[:] = 2.9                               # a single-Gaussian width absorbs the wing
    prof = measure_profile(flat, flat_ivar, None, tr, n_bands=6, rows_per_band=4)
    assert np.median(prof.sigma) == pytest.approx(2.5, abs=0.08)
    # a 1.5x wing trades fraction against width: check the profile itself, pixel by pixel
    edges = np.arange(-15.5, 16.0)
    far = np.abs(edges[:-1] + 0.5) > 8
    for f in (0, nf // 2, nf - 1):
        meas = np.array([prof.sigma[f, 100], prof.wing_fraction[f, 100], prof.wing_offset[f, 100],
                         prof.wing_ratio])
        true = np.array([2.5, 0.15, offsets[f], 1.5])
        pm, pt = (np.diff(norm.cdf((edges[:, None] - (p[2] * np.array([-p[1], 1 - p[1]])))
                                   / (p[0] * np.array([1.0, p[3]]))), axis=0) @ [1 - p[1], p[1]]
                  for p in (meas, true))
        assert np.max(np.abs(pm - pt)) < 0.003          # peak ~0.15
        assert pm[far].sum() == pytest.approx(pt[far].sum(), rel=0.25)  # wing light > 8 px
    assert np.all(np.diff(np.median(prof.wing_offset, axis=1)) > 0)     # offsets follow the CCD
    # the measured profile fits the flat: reduced chi^2 ~1 against >> 1 for the Gaussian
    gauss = optimal_extract(flat, flat_ivar, None, tr, reject_sigma=np.inf)
    winged = optimal_extract(flat, flat_ivar, None, tr, profile=prof, reject_sigma=np.inf)
    assert np.median(winged.chi2) < 1.3 < 5 < np.median(gauss.chi2)


def test_wing_model_removes_crosstalk():
    nf, ny = 7, 160
    nx = nf * 16 + 24
    tr = make_traces(nf, ny, nx, sigma=2.5)
    offsets = np.linspace(-1.0, 1.0, nf)
    flat, flat_ivar = _winged(12, np.full((nf, ny), 4e4), tr, nx, offsets)
    prof = measure_profile(flat, flat_ivar, None, tr, n_bands=5, rows_per_band=4)
    flux = np.full((nf, ny), 40.0)                  # faint fibers ...
    flux[[1, 3, 5]] = 2e4                           # ... between bright ones
    image, ivar = _winged(13, flux, tr, nx, offsets)
    gauss = optimal_extract(image, ivar, None, tr)
    winged = optimal_extract(image, ivar, None, tr, profile=prof)
    faint = [0, 2, 4, 6]
    bias_g = np.mean(gauss.flux[faint] - flux[faint], axis=1)
    bias_w = np.mean(winged.flux[faint] - flux[faint], axis=1)
    err = np.std(winged.flux[faint] - flux[faint], axis=1) / np.sqrt(ny)
    assert np.all(np.abs(bias_w) < np.maximum(4 * err, 0.6))
    assert np.mean(np.abs(bias_g)) > 4 * np.mean(np.abs(bias_w))
    pull = (winged.flux - flux) * np.sqrt(winged.ivar)
    assert 0.9 < np.std(pull) < 1.1
    # box sees the wings of the bright fibers
    box = box_extract(image, ivar, None, tr)
    assert np.mean(box.flux[faint] - flux[faint]) > 5
