"""Tests of processors/rectify.py: flux-conserving resampling into the rectified frame, masks,
variance, PSF moments, and the stage inside the calibration and reduction of a simulated camera."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.polynomial import legendre
from scipy.special import erf

from fiberlake.processors import rectify
from fiberlake.processors.rectify import RectifyConfig, fit_rectification, rectify_image, spot_moments
from fiberlake.processors.rectify_map import Frame, LegendreMap, MapConfig
from fiberlake.schemas.containers import TraceSet
from fiberlake.schemas.maskbits import Mask


def pixel_gauss(t, mu, sigma):
    """Unit-flux Gaussian integrated over unit pixels centred on ``t``."""
    a = (np.asarray(t, float) + 0.5 - mu) / (np.sqrt(2.0) * sigma)
    b = (np.asarray(t, float) - 0.5 - mu) / (np.sqrt(2.0) * sigma)
    return 0.5 * (erf(a) - erf(b))


def poly_map(ny, nx, dcol=(), drow=()):
    """Legendre displacement map from {(i, j): coefficient} of P_i(u) P_j(v), forward only (inverse = -)."""
    c = np.zeros((2, 4, 4))
    for k, terms in enumerate((dcol, drow)):
        for (i, j), v in dict(terms).items():
            c[k, i, j] = v
    return LegendreMap(Frame(ny, nx), MapConfig(kind="legendre", deg=3), {}, fwd=c, inv=-c)


def spots_image(ny, nx, spots, sigma=(2.0, 1.5)):
    img = np.zeros((ny, nx))
    for x, y, f in spots:
        img += f * pixel_gauss(np.arange(ny)[:, None], y, sigma[1]) * pixel_gauss(np.arange(nx)[None, :], x, sigma[0])
    return img


def centroid(img, x, y, h=8):
    ys, xs = np.mgrid[int(y) - h:int(y) + h + 1, int(x) - h:int(x) + h + 1]
    w = img[ys, xs]
    return (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum(), (w * (xs - (w * xs).sum() / w.sum()) ** 2).sum() / w.sum()


@pytest.mark.parametrize("order", [1, 3])
def test_identity_and_integer_shifts_are_exact(order):
    rng = np.random.default_rng(0)
    img = rng.uniform(10, 100, (60, 40)).astype(np.float32)
    ivar = (1 / img).astype(np.float32)
    out = rectify_image(img, ivar, None, poly_map(60, 40), order=order)
    np.testing.assert_allclose(out.image, img, rtol=1e-6)
    np.testing.assert_allclose(out.ivar, ivar, rtol=1e-5)
    assert not out.mask.any()
    out = rectify_image(img, ivar, None, poly_map(60, 40, {(0, 0): 3.0}, {(0, 0): -2.0}), order=order)
    np.testing.assert_allclose(out.image[:-2, 3:], img[2:, :-3], rtol=1e-6)
    assert np.all(out.mask[:, :3] & Mask.OFFCCD) and np.all(out.ivar[:, :3] == 0)
    assert np.all(out.mask[-2:] & Mask.OFFCCD) and not out.mask[:-2, 3:].any()


@pytest.mark.parametrize("order", [1, 3])
def test_flux_is_conserved_and_spots_move_with_the_map(order):
    ny, nx = 120, 100
    spots = [(30.2, 40.7, 5000.0), (70.6, 80.1, 3000.0), (50.0, 25.4, 4000.0)]
    img = spots_image(ny, nx, spots)
    m = poly_map(ny, nx, {(0, 0): 0.37, (1, 2): 0.9, (0, 1): -0.4}, {(0, 0): -0.21, (2, 0): 0.5})
    out = rectify_image(img, np.ones_like(img), None, m, order=order)
    assert out.image.sum() == pytest.approx(img.sum(), rel=1e-6)
    for x, y, _ in spots:
        fx, fy = m.forward(x, y)
        cx, cy, _ = centroid(out.image.astype(float), fx, fy)
        assert cx == pytest.approx(float(fx), abs=0.01) and cy == pytest.approx(float(fy), abs=0.01)


def test_cubic_keeps_the_profile_width_linear_broadens_it():
    img = spots_image(60, 60, [(30.0, 30.0, 1e4)])
    _, _, m2 = centroid(img, 30, 30)
    half = poly_map(60, 60, {(0, 0): 0.5})
    _, _, lin = centroid(rectify_image(img, np.ones_like(img), None, half, order=1).image.astype(float), 30.5, 30)
    _, _, cub = centroid(rectify_image(img, np.ones_like(img), None, half, order=3).image.astype(float), 30.5, 30)
    assert lin - m2 == pytest.approx(0.25, abs=0.02)  # s (1 - s) at s = 1/2
    assert abs(cub - m2) < 0.02


def test_variance_of_sums_is_propagated():
    # Monte Carlo: the variance of an aperture sum of resampled noise equals the sum of the
    # propagated variances, and every pixel's propagated variance bounds its own scatter
    rng = np.random.default_rng(1)
    ny = nx = 40
    var = rng.uniform(1.0, 4.0, (ny, nx))
    m = poly_map(ny, nx, {(0, 0): 0.3}, {(0, 0): 0.45})
    sums, pix = [], []
    for _ in range(600):
        out = rectify_image(rng.normal(0, np.sqrt(var)), 1 / var, None, m, order=3)
        sums.append(out.image[10:30, 10:30].sum())
        pix.append(out.image[20, 20])
    pvar = 1 / np.where(out.ivar > 0, out.ivar, np.nan).astype(float)
    assert np.var(sums) == pytest.approx(pvar[10:30, 10:30].sum(), rel=0.15)
    assert np.var(pix) < 1.1 * pvar[20, 20]


def test_bad_pixels_are_flagged_not_spread():
    rng = np.random.default_rng(2)
    img = rng.uniform(100, 110, (50, 50)).astype(np.float32)
    ivar = np.full_like(img, 0.01)
    mask = np.zeros(img.shape, np.uint32)
    img[20, 20], ivar[20, 20], mask[20, 20] = 1e6, 0.0, Mask.COSMIC  # a cosmic ray, masked
    img[35, 10] = np.nan  # NaN in the data
    out = rectify_image(img, ivar, mask, poly_map(50, 50, {(0, 0): 0.4}, {(0, 0): 0.3}))
    assert np.isfinite(out.image).all() and np.isfinite(out.ivar).all()
    assert out.ivar[20, 20] == 0 and out.mask[20, 20] & Mask.COSMIC
    assert out.ivar[35, 10] == 0 and out.mask[35, 10] & Mask.NONFINITE
    flagged = out.ivar == 0
    assert flagged[0].all() and flagged[:, 0].all()  # shifted by (0.3, 0.4) px: mostly off the CCD
    assert flagged[1:, 1:].sum() <= 8  # each bad pixel touches at most 2 x 2 outputs
    assert np.abs(out.image[~flagged] - 105).max() < 10  # no leak of the 1e6 count
    # on a flat image the bad pixels are filled from their neighbours: the outputs next to them
    # that are kept (less than 2 % bad) are exact
    flat = np.full_like(img, 100.0)
    flat[20, 20] = 1e6
    for order in (1, 3):
        out = rectify_image(flat, ivar, mask, poly_map(50, 50, {(0, 0): 0.015}, {(0, 0): 0.0}), order=order)
        kept = out.ivar > 0
        assert not kept[20, 20] and kept[20, 19] and kept[20, 21]
        np.testing.assert_allclose(out.image[kept][out.image[kept] > 0], 100.0, rtol=1e-5)


def test_folding_map_is_refused():
    fold = poly_map(40, 40, {(3, 0): -40.0})  # d(col')/d(col) < 0 somewhere
    with pytest.raises(ValueError, match="folds"):
        rectify_image(np.ones((40, 40)), np.ones((40, 40)), None, fold)


def _pincushion(ny, nx, nf, k):
    r = 0.5 * max(nx, ny)
    x0 = (nx - 1) / 2 + (np.arange(nf) - (nf - 1) / 2) * 16.0
    y0 = np.linspace(-40, ny + 40, 3000)
    dx, dy = x0[:, None] - (nx - 1) / 2, y0[None, :] - (ny - 1) / 2
    s = 1 + k * (dx**2 + dy**2) / r**2
    X, Y = (nx - 1) / 2 + dx * s, (ny - 1) / 2 + dy * s
    rows = np.arange(ny, dtype=float)
    return np.stack([np.interp(rows, Y[f], X[f]) for f in range(nf)])


def test_rectified_fibers_are_straight_and_keep_their_flux():
    ny, nx, nf = 400, 260, 14
    x = _pincushion(ny, nx, nf, 0.04)
    u = 2 * np.arange(ny) / (ny - 1) - 1
    traces = TraceSet(coeffs=legendre.legfit(u, x.T, 7).T, ny=ny, dead=np.zeros(nf, bool), rms=np.zeros(nf))
    cols = np.arange(nx)
    flux_rows = 1000.0 * (1 + 0.3 * np.sin(np.arange(ny) / 17.0))
    img = sum(flux_rows[:, None] * pixel_gauss(cols[None, :], x[f][:, None], 2.2) for f in range(nf))
    rect = fit_rectification(traces, nx, RectifyConfig(n_samples=5000, labels="tls"))
    assert np.nanmedian(rect.straightness_raw) > 0.5 and np.nanmax(rect.residual) < 0.01
    out = rectify_image(img, np.ones_like(img), None, rect.map)
    lines = rect.samples  # fiber, col, row, col target, row target
    for f in (0, nf // 2, nf - 1):
        sel = lines[:, 0] == f
        a, b = np.polyfit(lines[sel, 4], lines[sel, 3], 1)  # the fiber's target line
        rows = np.arange(20, ny - 20)
        xs = a * rows + b
        win = np.rint(xs)[:, None].astype(int) + np.arange(-7, 8)
        vals = out.image[rows[:, None], win].astype(float)
        cen = (vals * win).sum(1) / vals.sum(1)
        assert np.sqrt(np.mean((cen - xs) ** 2)) < 0.02  # straight, on its line
        np.testing.assert_allclose(vals.sum(1), flux_rows[rows], rtol=0.01)


def test_spot_moments_recover_gaussian_widths():
    spots = [(15.3, 20.7, 2.4, 1.4), (40.6, 30.2, 2.0, 1.8)]
    img = sum(1e5 * pixel_gauss(np.arange(60)[:, None], y, sy) * pixel_gauss(np.arange(60)[None, :], x, sx)
              for x, y, sx, sy in spots)
    m = spot_moments(img, np.ones_like(img), np.array([15.7, 40.2]), np.array([20.4, 30.5]))
    assert m["ok"].all()
    np.testing.assert_allclose(m["x"], [15.3, 40.6], atol=2e-3)
    np.testing.assert_allclose(np.sqrt(m["mxx"]), np.sqrt(np.array([2.4, 2.0]) ** 2 + 1 / 12), rtol=2e-3)
    np.testing.assert_allclose(np.sqrt(m["myy"]), np.sqrt(np.array([1.4, 1.8]) ** 2 + 1 / 12), rtol=2e-3)
    np.testing.assert_allclose(m["skew_x"], 0.0, atol=0.01)


@pytest.fixture(scope="module")
def mini_camera():
    from fiberlake.ingest.simulate import make_fibermap, plan_night, simulate_frame
    from fiberlake.schemas.instrument import MINI

    night, seed = "2026-12-02", 4242
    frames: dict[str, list] = {}
    for e in plan_night(MINI, night, seed, n_science=1, n_standard=0):
        fm = make_fibermap(MINI, night, seed, e.obstype, e.plate, e.expid) if e.obstype == "SCIENCE" else None
        frames.setdefault(e.obstype, []).append(
            simulate_frame(MINI, "r1", e.obstype, night=night, expid=e.expid, seed=seed, exptime=e.exptime,
                           fibermap=fm))
    return frames


@pytest.mark.slow  # builds a calibration set and reduces a simulated mini frame
def test_stage_inside_calibration_and_reduction(mini_camera):
    from fiberlake.processors.ccd import CCDParams
    from fiberlake.processors.pipeline import Calibration, ReductionParams, build_calibration, reduce_frame
    from fiberlake.schemas.instrument import MINI

    frames = mini_camera
    ccdp = CCDParams.from_header(frames["FLAT"][0].header)
    params = ReductionParams().updated({"extractions": ("box",)})
    cal = build_calibration([f.raw for f in frames["BIAS"]], [f.raw for f in frames["FLAT"]],
                            [f.raw for f in frames["ARC"]], ccdp, MINI, "r", params)
    assert cal.info["rectify"]["applied"] and cal.rectification is not None
    straight = rectify.trace_straightness(cal.traces)
    assert np.nanmedian(cal.rectification.straightness_raw) > 0.2 and np.nanmax(straight) < 0.02
    truth = frames["FLAT"][0].camera
    live = ~truth.dead
    x, wave = rectify.truth_in_frame(cal.rectification.map, truth.trace_x, truth.wave)
    inner = slice(30, MINI.ny - 30)
    assert np.sqrt(np.mean((cal.traces.x()[live][:, inner] - x[live][:, inner]) ** 2)) < 0.02
    assert np.sqrt(np.mean((cal.wave.wave()[live][:, inner] - wave[live][:, inner]) ** 2)) < 0.05
    assert np.array_equal(cal.traces.dead, truth.dead)

    back = Calibration.from_arrays(cal.to_arrays(), cal.info)
    assert back.rectification.map.config == cal.rectification.map.config
    sci = frames["SCIENCE"][0]
    sky = np.array([t == "SKY" for t in sci.truth["TARGETS"]["OBJTYPE"]])
    red = reduce_frame(sci.raw, CCDParams.from_header(sci.header), back, sky, params)["box"]
    red0 = reduce_frame(sci.raw, CCDParams.from_header(sci.header), cal, sky, params)["box"]
    np.testing.assert_array_equal(red.spectra.flux, red0.spectra.flux)
    assert np.isfinite(red.spectra.flux).all()
    for name in ("trace_straightness", "trace_straightness_raw", "map_residual"):
        assert red.metrics[name].shape == (MINI.n_fibers,)
    assert np.nanmax(red.metrics["map_residual"]) < 0.05

    # the old path: no map, traces on the distorted frame, metrics say so
    off = build_calibration([f.raw for f in frames["BIAS"]], [f.raw for f in frames["FLAT"]],
                            [f.raw for f in frames["ARC"]], ccdp, MINI, "r", ReductionParams().updated({"extractions": ("box",), "rectify.enabled": False}))
    assert off.rectification is None and not off.info["rectify"]["applied"]
    red_off = reduce_frame(sci.raw, CCDParams.from_header(sci.header), off, sky, params)["box"]
    assert np.isnan(red_off.metrics["map_residual"]).all()
    np.testing.assert_allclose(red_off.metrics["trace_straightness"][live], cal.rectification.straightness_raw[live],
                               rtol=0.05)


def test_evaluation_figures_against_an_exact_inverse():
    from fiberlake.processors.rectify_accuracy import iso_column_residual

    dist = {"k": 0.03, "cx": 149.5, "cy": 249.5, "R": 250.0}
    x0 = np.arange(30.0, 270.0, 2.0)
    straight, spacing = iso_column_residual(None, dist, x0, 500, 300)
    assert straight > 0.3 and spacing > 0.05  # the pincushion bends and spreads the columns

    class Undo:
        """The exact inverse of the pincushion (Newton on the radius)."""

        def forward(self, X, Y):
            dx, dy = X - dist["cx"], Y - dist["cy"]
            r = np.hypot(dx, dy)
            rho = r.copy()
            for _ in range(30):
                rho -= (rho * (1 + dist["k"] * rho**2 / dist["R"] ** 2) - r) / (1 + 3 * dist["k"] * rho**2 / dist["R"] ** 2)
            s = np.where(r > 0, rho / np.where(r > 0, r, 1), 1.0)
            return dist["cx"] + dx * s, dist["cy"] + dy * s

    straight, spacing = iso_column_residual(Undo(), dist, x0, 500, 300)
    assert straight < 1e-9 and spacing < 1e-9
