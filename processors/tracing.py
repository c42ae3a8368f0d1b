"""Fiber tracing on a flat: centroids in row bands, a Legendre series per fiber, dead fibers.

Steps (all pure array processing):

1. Median-combine the flat in bands of ``band_rows`` rows (:func:`band_profiles`).
2. In the central band, find the fiber peaks near the nominal columns: a global offset by
   cross-correlating with a comb of the nominal positions, then a walk outward from the centre
   fiber that predicts each next peak from the local (distorted) spacing, so edge fibers pushed
   outward by the distortion and missing (dead) fibers do not shift the assignment.
3. Follow every fiber band by band, up and down from the central band, with a batched fit of a
   pixel-integrated Gaussian (:func:`fit_pixel_gaussians`).
4. Refine all bands at once with the neighbours' models subtracted, even and odd fibers in
   turn, so the overlapping wings of adjacent fibers do not pull the centroids (end fibers
   simply have one neighbour). The default profile is a core plus an offset halo, parametrised
   by its flux centroid (the trace convention of the simulator), whose shape is then smoothed
   over the CCD and held fixed for the last passes.
5. Fit a Legendre series per fiber with iterative sigma clipping, weighted by the centroid
   errors; flag dead fibers and interpolate their coefficients from live neighbours.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from astropy.stats import mad_std
from numpy.polynomial import legendre
from scipy.ndimage import gaussian_filter1d
from scipy.special import erf

from fiberlake.schemas.containers import TraceSet

_SQRT2 = np.sqrt(2.0)
_INV_SQRT2PI = 1.0 / np.sqrt(2.0 * np.pi)


# --------------------------------------------------------------------------------------------
# Batched profile fitting (shared with wavecal)
# --------------------------------------------------------------------------------------------
PROFILES = ("gauss", "hermite", "halo")
"""Profile models of :func:`fit_pixel_gaussians`; all are parametrised by their flux centroid.

* ``gauss``: a Gaussian (no shape parameters).
* ``hermite``: ``phi(z) (1 + h3 He3(z) + h4 He4(z)) / sigma``; He3 and He4 are orthogonal to
  1, z and z^2 under the Gaussian weight, so flux, centroid and rms width are those of the
  Gaussian whatever ``(h3, h4)``.
* ``halo``: a core Gaussian (sigma) plus a broader halo (``halo_ratio * sigma``) holding the
  flux fraction ``frac``, offset by ``sep`` pixels from the core; the core sits at
  ``mu - frac * sep`` and the halo at ``mu + (1 - frac) * sep``, so ``mu`` is the centroid.
  The shape parameters are ``(frac, sep)``.
"""
N_SHAPE = {"gauss": 0, "hermite": 2, "halo": 2}
_SHAPE_BOUNDS = {"hermite": ((-0.3, 0.3), (-0.3, 0.3)), "halo": ((0.01, 0.45), (-4.0, 4.0))}
_SHAPE_START = {"hermite": (0.0, 0.0), "halo": (0.1, 0.0)}
_SHAPE_PRIOR = {"hermite": ((0.0, 0.1), (0.0, 0.1)), "halo": ((0.1, 0.1), (0.0, 1.0))}
# Gaussian priors (mean, sigma) on the shape parameters: they keep them near a symmetric
# profile where the data cannot tell (e.g. a plain Gaussian, where frac and sep are degenerate
# and a wandering ``sep`` would move the centroid), and barely act on a well-measured halo.


def _he(n: int, z: np.ndarray) -> np.ndarray:
    """Probabilists' Hermite polynomial He_n (n <= 4)."""
    if n == 0:
        return np.ones_like(z)
    z2 = z * z
    return (z, z2 - 1.0, z * (z2 - 3.0), z2 * (z2 - 6.0) + 3.0)[n - 1]


def _gauss_terms(t: np.ndarray, mu: np.ndarray, s: np.ndarray, orders=()):
    """Pixel integrals of ``phi(z) He_n(z) / s`` for n = 0 and ``orders``, with their
    derivatives in ``mu`` and ``s``; closed form since ``int phi He_n dz = -phi He_(n-1)``.

    When the pixels of each problem are contiguous (unit steps along the last axis, as in every
    fitting window here) the special functions are evaluated once per pixel edge, not twice.
    """
    mu = mu[..., None]
    s = s[..., None]
    t = np.asarray(t, float)
    contiguous = t.shape[-1] > 1 and np.all(np.diff(t, axis=-1) == 1.0)
    if contiguous:
        edges = np.concatenate([t[..., :1] - 0.5, t + 0.5], axis=-1)
        z = (edges - mu) / s
        phi = np.exp(-0.5 * z * z) * _INV_SQRT2PI
        cdf = 0.5 * erf(z / _SQRT2)
        za, zb, pa, pb = z[..., :-1], z[..., 1:], phi[..., :-1], phi[..., 1:]
        vals = [cdf[..., 1:] - cdf[..., :-1]]
        zp = z * phi
        dmu = [-(pb - pa) / s]
        ds = [-(zp[..., 1:] - zp[..., :-1]) / s]
    else:
        zb = (t + 0.5 - mu) / s
        za = (t - 0.5 - mu) / s
        pb = np.exp(-0.5 * zb * zb) * _INV_SQRT2PI
        pa = np.exp(-0.5 * za * za) * _INV_SQRT2PI
        vals = [0.5 * (erf(zb / _SQRT2) - erf(za / _SQRT2))]
        dmu = [-(pb - pa) / s]
        ds = [-(zb * pb - za * pa) / s]
    for n in orders:
        hb, ha = _he(n, zb), _he(n, za)
        vals.append(pa * _he(n - 1, za) - pb * _he(n - 1, zb))
        dmu.append(-(pb * hb - pa * ha) / s)
        ds.append(-(zb * pb * hb - za * pa * ha) / s)
    return vals, dmu, ds


def _pixel_profile(t: np.ndarray, mu: np.ndarray, s: np.ndarray, profile: str = "gauss",
                   shape: np.ndarray | None = None, halo_ratio: float = 1.5):
    """Unit-flux pixel-integrated profile, d/dmu, d/ds and d/d(shape parameters) (a list)."""
    if profile == "gauss":
        (g,), (gm,), (gs,) = _gauss_terms(t, mu, s)
        return g, gm, gs, []
    if profile == "hermite":
        h3, h4 = shape[..., 0][..., None], shape[..., 1][..., None]
        (g, i3, i4), (gm, m3, m4), (gs, s3, s4) = _gauss_terms(t, mu, s, (3, 4))
        return g + h3 * i3 + h4 * i4, gm + h3 * m3 + h4 * m4, gs + h3 * s3 + h4 * s4, [i3, i4]
    if profile == "halo":
        f, d = shape[..., 0], shape[..., 1]
        (g1,), (m1,), (s1,) = _gauss_terms(t, mu - f * d, s)
        (g2,), (m2,), (s2,) = _gauss_terms(t, mu + (1 - f) * d, halo_ratio * s)
        f, d = f[..., None], d[..., None]
        val = (1 - f) * g1 + f * g2
        dmu = (1 - f) * m1 + f * m2
        dsig = (1 - f) * s1 + f * halo_ratio * s2
        dfrac = g2 - g1 - d * dmu
        dsep = f * (1 - f) * (m2 - m1)
        return val, dmu, dsig, [dfrac, dsep]
    raise ValueError(f"profile {profile!r} not one of {PROFILES}")


def pixel_gaussian(t: np.ndarray, amp: np.ndarray, mu: np.ndarray, sigma: np.ndarray, *, profile: str = "gauss",
                   shape: np.ndarray | None = None, halo_ratio: float = 1.5) -> np.ndarray:
    """A profile of total flux ``amp`` and flux centroid ``mu`` integrated over unit pixels.

    Parameters
    ----------
    t : ndarray, shape (..., W)
        Pixel centres.
    amp, mu, sigma : ndarray, shape (...)
        Total flux, flux centroid and (core) Gaussian sigma (pixels).
    profile : str
        One of :data:`PROFILES`.
    shape : ndarray, shape (..., 2), optional
        Shape parameters of the ``hermite`` / ``halo`` profiles.
    halo_ratio : float
        Halo sigma over core sigma (``halo`` profile).

    Returns
    -------
    ndarray, shape (..., W)
    """
    g = _pixel_profile(np.asarray(t, float), np.asarray(mu, float), np.asarray(sigma, float), profile,
                       None if shape is None else np.asarray(shape, float), halo_ratio)[0]
    return np.asarray(amp, float)[..., None] * g


@dataclass
class GaussFit:
    """Result of :func:`fit_pixel_gaussians` (arrays of the batch shape)."""

    amp: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    bkg: np.ndarray
    mu_err: np.ndarray
    chi2: np.ndarray
    ok: np.ndarray
    shape: np.ndarray
    """Shape parameters, shape ``(..., N_SHAPE[profile])``."""


def fit_pixel_gaussians(y: np.ndarray, t: np.ndarray, weight: np.ndarray, amp: np.ndarray, mu: np.ndarray,
                        sigma: np.ndarray, bkg: np.ndarray | None = None, *, profile: str = "gauss",
                        shape: np.ndarray | None = None, fit_shape: bool = True, halo_ratio: float = 1.5,
                        n_iter: int = 10,
                        sigma_bounds: tuple[float, float] = (0.3, 8.0), max_step: float = 1.0) -> GaussFit:
    """Fit many pixel-integrated profiles (plus an optional constant) at once.

    A vectorised Levenberg-Marquardt loop: every problem of the batch has its own damping and
    accepts a step only if it lowers its chi^2.

    Parameters
    ----------
    y, t, weight : ndarray, shape (..., W)
        Data, pixel centres and weights (inverse variances; 0 ignores a pixel).
    amp, mu, sigma : ndarray, shape (...)
        Starting total flux, centroid and sigma.
    bkg : ndarray, shape (...), optional
        Starting constant background; ``None`` fits no background.
    profile : str
        ``gauss``, ``hermite`` or ``halo`` (see :data:`PROFILES`); for the last two ``mu`` is the
        flux centroid of an asymmetric profile rather than the centre of its core.
    shape : ndarray, shape (..., 2), optional
        Starting shape parameters (default: symmetric).
    fit_shape : bool
        Fit the shape parameters; if False they stay at ``shape`` (a known profile shape).
    halo_ratio : float
        Halo sigma over core sigma (``halo`` profile).
    n_iter : int
        Levenberg-Marquardt iterations.
    sigma_bounds : (float, float)
        Sigma is kept inside these bounds.
    max_step : float
        Largest change of the centre per iteration (pixels).

    Returns
    -------
    GaussFit
        Best parameters, the formal centre error ``mu_err`` (from the weights), chi^2 (with the
        weak Gaussian priors that keep free shape parameters near a symmetric profile when the
        data cannot constrain them) and ``ok`` (finite, positive flux, fitted pixels present).
    """
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r} not one of {PROFILES}")
    y = np.asarray(y, float)
    t = np.asarray(t, float)
    w = np.asarray(weight, float)
    with_bkg = bkg is not None
    batch = np.broadcast_shapes(np.shape(amp), np.shape(mu), np.shape(sigma))
    cols0 = [np.broadcast_to(np.asarray(v, float), batch) for v in (amp, mu, sigma)]
    ib = 3 if with_bkg else None
    if with_bkg:
        cols0.append(np.broadcast_to(np.asarray(bkg, float), batch))
    n_all = N_SHAPE[profile]
    start = np.broadcast_to(np.asarray(_SHAPE_START.get(profile, ()) if shape is None else shape, float),
                            batch + (n_all,))
    ns = n_all if fit_shape else 0
    ish = len(cols0)
    if ns:
        cols0 += [start[..., j] for j in range(ns)]
    p = np.stack(cols0, axis=-1).astype(float)  # (..., k)
    k = p.shape[-1]
    lo, hi = sigma_bounds

    prior = _SHAPE_PRIOR.get(profile, ()) if ns else ()
    prior_mean = np.array([m for m, _ in prior])
    prior_ivar = np.array([1.0 / sg ** 2 for _, sg in prior])

    def prior_chi2(par):
        if not ns:
            return 0.0
        return np.sum((par[..., ish:ish + ns] - prior_mean) ** 2 * prior_ivar, axis=-1)

    def evaluate(par):
        g, dmu, ds, dshape = _pixel_profile(t, par[..., 1], par[..., 2], profile,
                                            par[..., ish:ish + ns] if ns else start, halo_ratio)
        a = par[..., 0][..., None]
        model = a * g
        cols = [g, a * dmu, a * ds]
        if with_bkg:
            model = model + par[..., ib][..., None]
            cols.append(np.ones_like(g))
        if ns:
            cols += [a * d for d in dshape]
        return model, np.stack(cols, axis=-2)  # (..., k, W)

    model, jac = evaluate(p)
    chi2 = np.sum(w * (y - model) ** 2, axis=-1) + prior_chi2(p)
    lam = np.full(chi2.shape, 1e-2)
    eye = np.eye(k)
    for _ in range(n_iter):
        jw = jac * w[..., None, :]
        jtj = np.einsum("...iw,...jw->...ij", jw, jac)
        jtr = np.einsum("...iw,...w->...i", jw, y - model)
        if ns:
            idx = np.arange(ish, ish + ns)
            jtj[..., idx, idx] += prior_ivar
            jtr[..., idx] += (prior_mean - p[..., idx]) * prior_ivar
        diag = np.einsum("...ii->...i", jtj)
        scale = np.maximum(diag, 1e-12 * np.maximum(diag.max(axis=-1, keepdims=True), 1e-300))
        a_mat = jtj + (lam[..., None] * scale)[..., None] * eye
        try:
            step = np.linalg.solve(a_mat, jtr[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.zeros_like(p)
            good = np.linalg.cond(a_mat) < 1e14
            step[good] = np.linalg.solve(a_mat[good], jtr[good][..., None])[..., 0]
        step[..., 1] = np.clip(step[..., 1], -max_step, max_step)
        trial = p + np.where(np.isfinite(step), step, 0.0)
        trial[..., 2] = np.clip(trial[..., 2], lo, hi)
        for j, (blo, bhi) in enumerate(_SHAPE_BOUNDS.get(profile, ()) if ns else ()):
            trial[..., ish + j] = np.clip(trial[..., ish + j], blo, bhi)
        m_t, j_t = evaluate(trial)
        chi2_t = np.sum(w * (y - m_t) ** 2, axis=-1) + prior_chi2(trial)
        better = chi2_t < chi2
        p = np.where(better[..., None], trial, p)
        model = np.where(better[..., None], m_t, model)
        jac = np.where(better[..., None, None], j_t, jac)
        chi2 = np.where(better, chi2_t, chi2)
        lam = np.where(better, lam / 3.0, lam * 4.0)
    jw = jac * w[..., None, :]
    jtj = np.einsum("...iw,...jw->...ij", jw, jac)
    if ns:
        idx = np.arange(ish, ish + ns)
        jtj[..., idx, idx] += prior_ivar
    mu_err = np.full(chi2.shape, np.inf)
    with np.errstate(all="ignore"):
        cond_ok = np.linalg.cond(jtj) < 1e14
        if cond_ok.any():
            cov_mu = np.linalg.inv(jtj[cond_ok])[..., 1, 1]
            mu_err[cond_ok] = np.sqrt(np.where(cov_mu > 0, cov_mu, np.inf))
    ok = np.all(np.isfinite(p), axis=-1) & (p[..., 0] > 0) & np.isfinite(mu_err) & (np.sum(w > 0, axis=-1) > k)
    return GaussFit(amp=p[..., 0], mu=p[..., 1], sigma=p[..., 2], bkg=p[..., ib] if with_bkg else np.zeros(chi2.shape),
                    mu_err=mu_err, chi2=chi2, ok=ok, shape=p[..., ish:ish + ns] if ns else start.copy())


# --------------------------------------------------------------------------------------------
# Band centroids
# --------------------------------------------------------------------------------------------
def band_profiles(image: np.ndarray, ivar: np.ndarray, band_rows: int = 16):
    """Median of each band of ``band_rows`` rows, ignoring pixels with ``ivar == 0``.

    Parameters
    ----------
    image, ivar : ndarray, shape (ny, nx)
    band_rows : int

    Returns
    -------
    profiles : ndarray, shape (n_bands, nx)
        Band medians (0 where every pixel of the band column is masked).
    weight : ndarray, shape (n_bands, nx)
        Inverse variance of each median (``2/pi`` times the summed ivar), 0 where masked.
    rows : ndarray, shape (n_bands,)
        Centre row of each band. A last partial band is dropped.
    """
    ny, nx = image.shape
    nb = ny // band_rows
    cube = np.asarray(image[: nb * band_rows], dtype=np.float64).reshape(nb, band_rows, nx)
    icube = np.asarray(ivar[: nb * band_rows], dtype=np.float64).reshape(nb, band_rows, nx)
    bad = ~(icube > 0) | ~np.isfinite(cube)
    if bad.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-masked band columns
            prof = np.nanmedian(np.where(bad, np.nan, cube), axis=1)
        prof = np.nan_to_num(prof, nan=0.0)
    else:
        prof = np.median(cube, axis=1)
    weight = (2.0 / np.pi) * np.sum(np.where(bad, 0.0, icube), axis=1)
    rows = np.arange(nb) * band_rows + (band_rows - 1) / 2.0
    return prof, weight, rows


def _match_central_peaks(profile: np.ndarray, weight: np.ndarray, nominal_x: np.ndarray, sigma: float,
                         max_offset: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the fibers in one band profile: global offset, then an outward walk."""
    nx = profile.size
    nf = nominal_x.size
    smooth = gaussian_filter1d(profile, sigma, mode="constant")
    cols = np.arange(nx, dtype=float)
    # global offset from the inner half of the fibers, where the distortion is small
    inner = np.abs(np.arange(nf) - (nf - 1) / 2.0) <= max(1.0, nf / 4.0)
    shifts = np.arange(-max_offset, max_offset + 0.125, 0.25)
    score = np.array([np.interp(nominal_x[inner] + s, cols, smooth, left=0, right=0).sum() for s in shifts])
    shift = shifts[np.argmax(score)]
    # candidate peaks
    with np.errstate(divide="ignore"):
        noise = np.sqrt(np.median(1.0 / weight[weight > 0])) if np.any(weight > 0) else 1.0
    height = max(5.0 * noise / np.sqrt(2 * np.sqrt(np.pi) * sigma), 0.01 * np.percentile(smooth, 99.5))
    pitch = np.median(np.diff(nominal_x)) if nf > 1 else 16.0
    from scipy.signal import find_peaks  # lazy: importing scipy.signal costs ~1 s of CLI start-up
    peaks, _ = find_peaks(smooth, height=height, distance=max(1, int(0.4 * pitch)))
    if peaks.size == 0:
        return nominal_x + shift, np.zeros(nf, bool)
    # sub-pixel peak by a 3-point parabola
    p = peaks[(peaks > 0) & (peaks < nx - 1)]
    y0, y1, y2 = smooth[p - 1], smooth[p], smooth[p + 1]
    den = y0 - 2 * y1 + y2
    ppos = p + np.where(den < 0, 0.5 * (y0 - y2) / np.where(den < 0, den, -1), 0.0)
    tol = 0.35 * pitch

    x = nominal_x + shift
    found = np.zeros(nf, bool)

    def nearest(pred):
        j = np.argmin(np.abs(ppos - pred))
        return (ppos[j], True) if abs(ppos[j] - pred) < tol else (pred, False)

    # anchor: the found fiber closest to the centre
    order = np.argsort(np.abs(np.arange(nf) - (nf - 1) / 2.0), kind="stable")
    anchor = None
    for f in order:
        xf, ok = nearest(nominal_x[f] + shift)
        if ok:
            anchor, x[f], found[f] = f, xf, True
            break
    if anchor is None:
        return x, found
    for direction in (1, -1):
        stretch = 1.0
        f = anchor + direction
        while 0 <= f < nf:
            prev = f - direction
            pred = x[prev] + (nominal_x[f] - nominal_x[prev]) * stretch
            x[f], found[f] = nearest(pred)
            if found[f] and found[prev]:
                stretch = 0.5 * stretch + 0.5 * (x[f] - x[prev]) / (nominal_x[f] - nominal_x[prev])
            f += direction
    return x, found


def _windows(x: np.ndarray, hw: int, pad: int) -> np.ndarray:
    """Integer column windows (in the padded frame) centred on round(x)."""
    return np.rint(x).astype(int)[..., None] + pad + np.arange(-hw, hw + 1)


@dataclass
class BandCentroids:
    """Per-band fiber measurements on a flat.

    Attributes
    ----------
    rows : ndarray, shape (n_bands,)
        Centre row of each band.
    x, x_err : ndarray, shape (n_fibers, n_bands)
        Fitted flux centroid column and its formal error (pixels).
    amp : ndarray, shape (n_fibers, n_bands)
        Fitted total flux per row.
    sigma : ndarray, shape (n_fibers, n_bands)
        Equivalent Gaussian sigma of the fitted profile: the Gaussian sigma for ``gauss`` and
        ``hermite``; for ``halo`` the sigma of the Gaussian with the same flux and peak height
        (well defined even where core and halo are degenerate).
    valid : ndarray of bool, shape (n_fibers, n_bands)
        The fit converged close to the followed trace.
    """

    rows: np.ndarray
    x: np.ndarray
    x_err: np.ndarray
    amp: np.ndarray
    sigma: np.ndarray
    valid: np.ndarray


def _smooth_surface(u: np.ndarray, v: np.ndarray, values: np.ndarray, use: np.ndarray, deg: int,
                    clip: float = 3.0) -> np.ndarray:
    """Sigma-clipped least-squares 2D Legendre surface of degree ``deg`` in ``(u, v)``."""
    use = use & np.isfinite(values)
    n_terms = (deg + 1) ** 2
    if use.sum() <= n_terms:
        return np.where(use, values, np.nanmedian(values[use]) if use.any() else 0.0)
    design = legendre.legvander2d(u.ravel(), v.ravel(), [deg, deg])
    y = values.ravel()
    keep = use.ravel().copy()
    for _ in range(5):
        coef = np.linalg.lstsq(design[keep], y[keep], rcond=None)[0]
        resid = y - design @ coef
        scale = mad_std(resid[keep])
        new = keep & (np.abs(resid) <= clip * max(scale, 1e-12))
        if new.sum() <= n_terms or np.array_equal(new, keep):
            break
        keep = new
    return (design @ coef).reshape(values.shape)


def measure_band_centroids(flat: np.ndarray, flat_ivar: np.ndarray, nominal_x: np.ndarray, *,
                           band_rows: int = 16, sigma_guess: float = 2.4, max_offset: float | None = None,
                           n_refine: int = 3, profile: str = "halo", halo_ratio: float = 1.5,
                           shape_deg: int = 2, half_window: float = 0.5) -> BandCentroids:
    """Fiber centroids in row bands of a flat, robust to overlapping neighbour wings.

    Parameters
    ----------
    flat, flat_ivar : ndarray, shape (ny, nx)
        Flat field (electrons) and its inverse variance (0 = masked).
    nominal_x : ndarray, shape (n_fibers,)
        Expected fiber columns, increasing (e.g. ``Instrument.nominal_fiber_columns()``).
    band_rows : int
        Rows median-combined per band.
    sigma_guess : float
        Starting profile sigma (pixels).
    max_offset : float, optional
        Largest global offset of the fibers from ``nominal_x`` searched in the central band
        (default 0.45 fiber pitch; a larger offset is ambiguous by whole pitches).
    n_refine : int
        Passes of the fit with the neighbours' models subtracted.
    half_window : float
        Half width of the fitted window around each fiber, in fiber pitches.
    profile : str
        Profile fitted in those passes (:data:`PROFILES`): ``halo`` (default) and ``hermite``
        measure the flux centroid of an asymmetric profile (a core with an offset wing) and
        model the neighbours' wings; ``gauss`` measures the centre of the core.
    halo_ratio : float
        Halo sigma over core sigma of the ``halo`` profile.
    shape_deg : int
        After the refinement passes, each shape parameter is replaced by a 2D Legendre surface
        of this degree in row and column (sigma-clipped), and two more passes fit with the
        shape fixed.

    Returns
    -------
    BandCentroids
    """
    nominal_x = np.asarray(nominal_x, float)
    nf = nominal_x.size
    pitch = float(np.median(np.diff(nominal_x))) if nf > 1 else 16.0
    if max_offset is None:
        max_offset = 0.45 * pitch
    prof, wgt, rows = band_profiles(flat, flat_ivar, band_rows)
    nb, nx = prof.shape
    hw = max(3, int(round(half_window * pitch)))  # fit half-window
    widest = sigma_guess * (halo_ratio if profile == "halo" else 1.0)
    mw = max(hw, int(np.ceil(5 * widest)))  # half-window of the neighbour models
    pad = hw + mw + 2
    prof_p = np.pad(prof, ((0, 0), (pad, pad)))
    wgt_p = np.pad(wgt, ((0, 0), (pad, pad)))

    # 1. central band
    bc = nb // 2
    x0, _ = _match_central_peaks(prof[bc], wgt[bc], nominal_x, sigma_guess, max_offset)

    def fit_band(b, xpred, sig):
        cols = _windows(xpred, hw, pad)
        yy = prof_p[b][cols]
        ww = wgt_p[b][cols]
        t = cols - pad
        amp0 = np.maximum(yy.sum(-1) - yy.min(-1) * cols.shape[-1], 1e-3)
        return fit_pixel_gaussians(yy, t, ww, amp0, xpred, sig, np.maximum(yy.min(-1), 0.0), n_iter=8)

    # 2. follow band by band from the centre
    x = np.zeros((nf, nb))
    sig = np.full((nf, nb), float(sigma_guess))
    fit = fit_band(bc, x0, np.full(nf, sigma_guess))
    good = fit.ok & (np.abs(fit.mu - x0) < 0.25 * pitch)
    x[:, bc] = np.where(good, fit.mu, x0)
    sig[:, bc] = np.where(good, fit.sigma, sigma_guess)
    for direction in (1, -1):
        b = bc + direction
        hist = [x[:, bc]]
        while 0 <= b < nb:
            prev = hist[-1]
            slope = (hist[-1] - hist[-4]) / 3.0 if len(hist) >= 4 else 0.0
            pred = prev + slope
            s0 = sig[:, b - direction]
            fit = fit_band(b, pred, s0)
            good = fit.ok & (np.abs(fit.mu - pred) < 1.5) & (fit.sigma > 0.5) & (fit.sigma < 3 * sigma_guess)
            x[:, b] = np.where(good, fit.mu, pred)
            sig[:, b] = np.where(good, fit.sigma, s0)
            hist.append(x[:, b])
            b += direction

    # 3. refine with the neighbours' models subtracted (all bands at once); even and odd fibers
    #    alternate (red-black), so two overlapping fibers never both absorb the same residual
    xb = x.T.copy()  # (nb, nf)
    sb = sig.T.copy()
    x_follow = xb.copy()
    ab = np.zeros_like(xb)
    bkg = np.zeros_like(xb)
    err = np.full_like(xb, np.inf)
    shp = np.zeros(xb.shape + (N_SHAPE[profile],))
    shp[:] = _SHAPE_START.get(profile, ())
    ok = np.zeros(xb.shape, bool)
    mcols = np.arange(-mw, mw + 1)
    width = prof_p.shape[1]

    def refit(sel: np.ndarray, subtract: bool, first: bool, free_shape: bool = True) -> None:
        prof_now = "gauss" if first else profile
        cols = _windows(xb[:, sel], hw, pad)  # (nb, ns, W)
        flat_cols = cols.reshape(nb, -1)
        yy = np.take_along_axis(prof_p, flat_cols, axis=1).reshape(cols.shape)
        ww = np.take_along_axis(wgt_p, flat_cols, axis=1).reshape(cols.shape)
        if subtract:
            mc = np.rint(xb).astype(int)[..., None] + pad + mcols  # (nb, nf, M)
            own = pixel_gaussian(mc - pad, ab, xb, sb, profile=profile, shape=shp, halo_ratio=halo_ratio)
            band_idx = np.broadcast_to(np.arange(nb)[:, None, None], mc.shape)
            total = np.bincount((band_idx * width + mc).ravel(), weights=own.ravel(),
                                minlength=nb * width).reshape(nb, width)
            own_w = pixel_gaussian(cols - pad, ab[:, sel], xb[:, sel], sb[:, sel], profile=profile,
                                   shape=shp[:, sel], halo_ratio=halo_ratio)
            yy = yy - (np.take_along_axis(total, flat_cols, axis=1).reshape(cols.shape) - own_w)
        if first:
            amp0 = np.maximum(yy.sum(-1) - yy.min(-1) * cols.shape[-1], 1e-3)
            b0 = np.maximum(yy.min(-1), 0.0)
        else:
            amp0, b0 = np.maximum(ab[:, sel], 1e-3), bkg[:, sel]
        fit = fit_pixel_gaussians(yy, cols - pad, ww, amp0, xb[:, sel], sb[:, sel], b0, profile=prof_now,
                                  shape=shp[:, sel] if not first else None, fit_shape=free_shape,
                                  halo_ratio=halo_ratio, n_iter=8 if first else 6)
        good = (fit.ok & (np.abs(fit.mu - x_follow[:, sel]) < 1.5) & (fit.sigma > 0.5)
                & (fit.sigma < 3 * sigma_guess))
        xb[:, sel] = np.where(good, fit.mu, xb[:, sel])
        sb[:, sel] = np.where(good, fit.sigma, sb[:, sel])
        ab[:, sel] = np.where(good, fit.amp, 0.0)
        bkg[:, sel] = np.where(good, fit.bkg, 0.0)
        err[:, sel] = np.where(good, fit.mu_err, np.inf)
        if not first:
            shp[:, sel] = np.where(good[..., None], fit.shape, shp[:, sel])
        ok[:, sel] = good

    every = np.ones(nf, bool)
    refit(every, subtract=False, first=True)
    parity = np.arange(nf) % 2
    for _ in range(n_refine):
        for p in (0, 1):
            refit(parity == p, subtract=True, first=False)
    if N_SHAPE[profile] and n_refine > 0:
        # the profile shape is a smooth property of the optics across the CCD: replace the fitted
        # shape parameters by a smooth surface in (column, row), then refit with the shape fixed
        # (its noise, and the freedom of a halo to lean into an empty neighbour's gap, no longer
        # enter the centroids)
        uu = np.broadcast_to(_normalise(rows, flat.shape[0])[:, None], xb.shape)
        vv = 2.0 * xb / (nx - 1) - 1.0
        for j in range(shp.shape[-1]):
            shp[..., j] = _smooth_surface(uu, vv, shp[..., j], ok & (ab > 0), shape_deg)
        for _ in range(2):
            for p in (0, 1):
                refit(parity == p, subtract=True, first=False, free_shape=False)
    valid = ok
    width = sb
    if profile == "halo" and n_refine > 0:
        frac, sep = shp[..., 0], shp[..., 1]
        halo_peak = np.exp(-0.5 * (sep / (halo_ratio * sb)) ** 2) / halo_ratio  # at the core centre
        width = sb / ((1 - frac) + frac * halo_peak)
    return BandCentroids(rows=rows, x=xb.T, x_err=np.where(valid, err, np.inf).T, amp=ab.T,
                         sigma=np.where(ok, width, np.nan).T, valid=valid.T)


# --------------------------------------------------------------------------------------------
# Legendre fits and dead fibers
# --------------------------------------------------------------------------------------------
def _normalise(rows: np.ndarray, ny: int) -> np.ndarray:
    return 2.0 * np.asarray(rows, float) / (ny - 1) - 1.0


def fit_legendre_clipped(u: np.ndarray, y: np.ndarray, weight: np.ndarray, deg: int, *, clip: float = 3.0,
                         maxiters: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Weighted Legendre fits of many series at once, with iterative sigma clipping.

    Parameters
    ----------
    u : ndarray, shape (n,) or (m, n)
        Abscissae in ``[-1, 1]`` (shared, or one row per series).
    y, weight : ndarray, shape (m, n)
        Values and weights (inverse variances; 0 excludes a point).
    deg : int
        Degree of the series.
    clip : float
        Clipping threshold, in units of ``max(1, MAD-based std)`` of the normalised residuals
        ``resid * sqrt(weight)``; iterated (one point set per iteration) until stable.
    maxiters : int
        Clipping iterations.

    Returns
    -------
    coeffs : ndarray, shape (m, deg + 1)
    used : ndarray of bool, shape (m, n)
        Points kept in the final fit. Series with fewer than ``deg + 1`` usable points get
        NaN coefficients.
    """
    y = np.atleast_2d(np.asarray(y, float))
    weight = np.atleast_2d(np.asarray(weight, float))
    u = np.broadcast_to(np.asarray(u, float), y.shape)
    vander = legendre.legvander(u, deg)  # (m, n, k)
    used = (weight > 0) & np.isfinite(y)
    coeffs = np.full((y.shape[0], deg + 1), np.nan)
    for _ in range(maxiters + 1):
        w = np.where(used, weight, 0.0)
        ata = np.einsum("mnk,mn,mnl->mkl", vander, w, vander)
        atb = np.einsum("mnk,mn,mn->mk", vander, w, np.where(used, y, 0.0))
        solvable = used.sum(axis=1) > deg
        solvable &= np.abs(np.linalg.det(ata)) > 0 if solvable.any() else solvable
        coeffs[:] = np.nan
        if solvable.any():
            coeffs[solvable] = np.linalg.solve(ata[solvable], atb[solvable][..., None])[..., 0]
        resid = y - np.einsum("mnk,mk->mn", vander, np.nan_to_num(coeffs))
        # normalised residuals, clipped per series about zero; the scale is a MAD-based std,
        # never below 1 (weights are inverse variances: a point within ``clip`` of its own
        # error is never rejected, even when an over-fitted series makes the MAD tiny)
        z = np.where(used, resid * np.sqrt(np.where(used, weight, 0.0)), np.nan)
        scale = np.maximum(mad_std(z, axis=1, ignore_nan=True), 1.0)
        new_used = used & (np.abs(z) <= clip * np.nan_to_num(scale, nan=1.0)[:, None])
        # never clip below deg + 2 points
        keep_old = new_used.sum(axis=1) < deg + 2
        new_used[keep_old] = used[keep_old]
        if np.array_equal(new_used, used):
            break
        used = new_used
    return coeffs, used


def interpolate_fibers(coeffs: np.ndarray, pos: np.ndarray, bad: np.ndarray, n_side: int = 3) -> np.ndarray:
    """Replace the coefficients of ``bad`` fibers by interpolation from good neighbours.

    Parameters
    ----------
    coeffs : ndarray, shape (n_fibers, k)
        Per-fiber series coefficients (e.g. of traces or wavelength solutions).
    pos : ndarray, shape (n_fibers,)
        Abscissa of the interpolation (fiber index or nominal column), increasing.
    bad : ndarray of bool, shape (n_fibers,)
        Fibers to replace.
    n_side : int
        Good fibers used on each side: a local least-squares quadratic in ``pos`` through them
        (also past the first or last good fiber, from the ``n_side`` nearest ones).

    Returns
    -------
    ndarray, shape (n_fibers, k)
        A copy with the bad rows replaced (unchanged if no fiber is good).
    """
    out = coeffs.copy()
    good_idx = np.flatnonzero(~bad)
    if good_idx.size == 0:
        return out
    for f in np.flatnonzero(bad):
        left = good_idx[good_idx < f][-n_side:]
        right = good_idx[good_idx > f][:n_side]
        nb = np.concatenate([left, right])
        order = min(2, nb.size - 1)
        if order < 0:
            continue
        for k in range(coeffs.shape[1]):
            cf = np.polyfit(pos[nb] - pos[f], coeffs[nb, k], order)
            out[f, k] = cf[-1]
    return out


def _neighbour_median(values: np.ndarray, live: np.ndarray, n_side: int) -> np.ndarray:
    nf = values.size
    out = np.full(nf, np.nan)
    for f in range(nf):
        lo, hi = max(0, f - n_side), min(nf, f + n_side + 1)
        sel = np.arange(lo, hi)
        sel = sel[(sel != f) & live[sel]]
        if sel.size:
            out[f] = np.median(values[sel])
    return out


def trace_fibers(flat: np.ndarray, flat_ivar: np.ndarray, nominal_x: np.ndarray, *, deg: int = 5,
                 band_rows: int = 16, dead_fraction: float = 0.1, sigma_guess: float = 2.4,
                 max_offset: float | None = None, clip: float = 3.0, n_neighbours: int = 5,
                 min_valid_fraction: float = 0.3, err_floor: float = 0.01, profile: str = "halo") -> TraceSet:
    """Trace every fiber on a flat.

    Parameters
    ----------
    flat, flat_ivar : ndarray, shape (ny, nx)
        Flat field (electrons, e.g. a master flat) and its inverse variance (0 = masked).
    nominal_x : ndarray, shape (n_fibers,)
        Expected fiber columns, increasing; may be off by several pixels (distortion), the
        peaks are found first.
    deg : int
        Degree of the Legendre series of ``x(row)``.
    band_rows : int
        Rows median-combined per centroid measurement.
    dead_fraction : float
        A fiber is dead when its flux is below this fraction of the median flux of its live
        neighbours (or when fewer than ``min_valid_fraction`` of its bands could be measured).
    sigma_guess : float
        Starting cross-dispersion sigma (pixels).
    max_offset : float, optional
        Largest global offset from ``nominal_x`` searched (default 0.45 fiber pitch).
    clip : float
        Sigma-clipping threshold of the Legendre fits.
    n_neighbours : int
        Fibers on each side used for the dead-fiber flux comparison.
    min_valid_fraction : float
        Minimum fraction of bands with a valid centroid for a fiber to be traced.
    err_floor : float
        Floor (pixels) added in quadrature to the formal centroid errors used as fit weights.
    profile : str
        Cross-dispersion profile fitted (see :func:`measure_band_centroids`): ``halo`` traces the
        flux centroid of profiles with an offset wing; ``gauss`` the centre of a Gaussian core
        (slightly less noisy for truly Gaussian profiles).

    Returns
    -------
    TraceSet
        Coefficients in the normalised row coordinate, per-fiber residual RMS (pixels, of the
        points kept), median equivalent Gaussian sigma of the profile (same flux and peak
        height), and the dead flags (dead fibers' coefficients are
        interpolated from live neighbours; their ``rms`` is NaN and ``sigma`` the neighbours').
    """
    ny = flat.shape[0]
    nominal_x = np.asarray(nominal_x, float)
    nf = nominal_x.size
    bc = measure_band_centroids(flat, flat_ivar, nominal_x, band_rows=band_rows, sigma_guess=sigma_guess,
                                max_offset=max_offset, profile=profile)
    nb = bc.rows.size
    u = _normalise(bc.rows, ny)
    weight = np.where(bc.valid, 1.0 / (bc.x_err ** 2 + err_floor ** 2), 0.0)
    coeffs, used = fit_legendre_clipped(u, bc.x, weight, deg, clip=clip)

    # dead fibers: low flux against live neighbours, or too few measurable bands
    flux = np.array([np.median(bc.amp[f, bc.valid[f]]) if bc.valid[f].any() else 0.0 for f in range(nf)])
    dead = (bc.valid.sum(axis=1) < max(deg + 2, min_valid_fraction * nb)) | ~np.all(np.isfinite(coeffs), axis=1)
    for _ in range(3):
        ref = _neighbour_median(flux, ~dead, n_neighbours)
        new = dead | (flux < dead_fraction * np.nan_to_num(ref, nan=np.inf))
        if np.array_equal(new, dead):
            break
        dead = new

    resid = bc.x - np.einsum("nk,fk->fn", legendre.legvander(u, deg), np.nan_to_num(coeffs))
    rms = np.sqrt(np.sum(np.where(used, resid, 0.0) ** 2, axis=1) / np.maximum(used.sum(axis=1), 1))
    sig_ok = used & np.isfinite(bc.sigma)
    sig = np.array([np.median(bc.sigma[f, sig_ok[f]]) if sig_ok[f].any() else np.nan for f in range(nf)])
    if dead.any() and not dead.all():
        coeffs = interpolate_fibers(np.nan_to_num(coeffs), nominal_x, dead)
        live_sig = np.flatnonzero(~dead)
        sig[dead] = np.interp(np.flatnonzero(dead), live_sig, sig[live_sig])
    rms[dead] = np.nan
    return TraceSet(coeffs=coeffs, ny=ny, dead=dead, rms=rms, sigma=sig)
