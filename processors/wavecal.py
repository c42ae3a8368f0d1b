"""Wavelength calibration from an arc frame: a Legendre series of wavelength(row) per fiber.

Steps (pure array processing):

1. Box-sum each fiber's arc spectrum along its trace (:func:`extract_boxcar`).
2. Detect lines (peaks above ``nsig`` sigma over a running-median continuum) and centroid them
   with a pixel-integrated Gaussian fit, all lines of all fibers in one batch
   (:func:`detect_lines`).
3. Seed: on the fibers with the most lines near the middle of the slit, search the shift,
   stretch and curvature of the nominal linear solution by voting (every detected-line /
   catalogue-line pair votes for the shift it implies, for each stretch and curvature on a
   grid), then iterate from the middle of the CCD outward: match within a tolerance, fit
   (sigma-clipped), widen the row range, and finally re-match with a tighter tolerance.
4. Walk outward from the seed: each fiber takes its solved neighbour's solution as the prior,
   searches only a shift (per-fiber zero points differ by up to tens of pixels), then iterates
   as above.
5. Fibers that fail (too few lines, too large an rms) are retried with a prior interpolated from
   good neighbours on both sides, then with an independent search as for the seed. Those that
   still fail, and dead fibers, get the interpolated solution (shifted to fit their few lines,
   if any) and ``rms = FAILED_RMS``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from numpy.polynomial import legendre
from scipy.ndimage import median_filter

from fiberlake.processors.tracing import fit_legendre_clipped, fit_pixel_gaussians, interpolate_fibers
from fiberlake.schemas.containers import TraceSet, WaveSolution

FAILED_RMS = 99.0
"""``WaveSolution.rms`` (Angstrom) of fibers whose solution is interpolated from neighbours."""


# --------------------------------------------------------------------------------------------
# Extraction and line detection
# --------------------------------------------------------------------------------------------
def extract_boxcar(image: np.ndarray, ivar: np.ndarray, traces: TraceSet, half_width: float = 3.5):
    """Box-sum every fiber along its trace, with fractional edge pixels.

    Parameters
    ----------
    image, ivar : ndarray, shape (ny, nx)
        Frame (electrons) and inverse variance (0 = masked).
    traces : TraceSet
        Fiber traces.
    half_width : float
        Half width of the aperture (pixels) about the trace centre.

    Returns
    -------
    flux, flux_ivar : ndarray, shape (n_fibers, ny)
        Summed flux per row and its inverse variance; ``flux_ivar`` is 0 in rows where a pixel
        of the aperture is masked or off the CCD.
    """
    ny, nx = image.shape
    x = traces.x(np.arange(ny))  # (nf, ny)
    n = int(np.ceil(half_width)) + 1
    c0 = np.floor(x).astype(int)
    cols = c0[..., None] + np.arange(-n, n + 2)  # (nf, ny, k)
    lo = np.maximum(cols - 0.5, (x - half_width)[..., None])
    hi = np.minimum(cols + 0.5, (x + half_width)[..., None])
    w = np.clip(hi - lo, 0.0, 1.0)
    inside = (cols >= 0) & (cols < nx)
    cc = np.clip(cols, 0, nx - 1)
    rows = np.arange(ny)[None, :, None]
    pix = np.asarray(image, float)[rows, cc]
    piv = np.asarray(ivar, float)[rows, cc]
    used = w > 0
    bad = np.any(used & (~inside | ~(piv > 0)), axis=-1)
    flux = np.sum(np.where(inside, w * pix, 0.0), axis=-1)
    with np.errstate(divide="ignore"):
        var = np.sum(np.where(used & inside & (piv > 0), w * w / np.where(piv > 0, piv, 1.0), 0.0), axis=-1)
    flux_ivar = np.where(bad | ~(var > 0), 0.0, 1.0 / np.where(var > 0, var, 1.0))
    return flux, flux_ivar


@dataclass
class ArcLines:
    """Detected arc lines, flattened over fibers.

    Attributes
    ----------
    fiber : ndarray of int
        Fiber of each line.
    row, row_err : ndarray
        Fitted centre row and its formal error.
    amp, sigma : ndarray
        Total flux and Gaussian sigma (rows) of each line.
    """

    fiber: np.ndarray
    row: np.ndarray
    row_err: np.ndarray
    amp: np.ndarray
    sigma: np.ndarray

    def of(self, f: int) -> "ArcLines":
        """The lines of fiber ``f``, sorted by row."""
        sel = np.flatnonzero(self.fiber == f)
        sel = sel[np.argsort(self.row[sel])]
        return ArcLines(self.fiber[sel], self.row[sel], self.row_err[sel], self.amp[sel], self.sigma[sel])


def detect_lines(flux: np.ndarray, flux_ivar: np.ndarray, *, nsig: float = 5.0, lsf_sigma: float = 1.4,
                 min_sep: float = 4.0, cont_width: int = 51, half_window: int = 4,
                 profile: str = "halo") -> ArcLines:
    """Find and centroid emission lines in 1D spectra.

    Parameters
    ----------
    flux, flux_ivar : ndarray, shape (n_fibers, ny)
        Spectra and inverse variances.
    nsig : float
        Detection threshold: peak height above the running-median continuum in units of the
        per-row noise, and fitted flux over its error.
    lsf_sigma : float
        Starting Gaussian sigma of the lines (rows).
    min_sep : float
        Lines closer than this (rows) to another detected line are dropped as blends.
    cont_width : int
        Width of the running median that estimates the continuum.
    half_window : int
        Rows fitted on each side of a peak.
    profile : str
        Line profile fitted after a first Gaussian fit (see
        :data:`fiberlake.processors.tracing.PROFILES`): ``halo`` (default) or ``hermite`` give the
        flux centroid of an asymmetric line-spread function, the row at which the wavelength
        solution is defined; ``gauss`` gives the centre of its core.

    Returns
    -------
    ArcLines
    """
    nf, ny = flux.shape
    cont = median_filter(flux, size=(1, cont_width), mode="nearest")
    resid = flux - cont
    noise = np.where(flux_ivar > 0, 1.0 / np.sqrt(np.where(flux_ivar > 0, flux_ivar, 1.0)), np.inf)
    fib, pk = [], []
    for f in range(nf):
        finite = np.isfinite(noise[f])
        if not finite.any():
            continue
        height = np.where(finite, nsig * noise[f], np.inf)
        from scipy.signal import find_peaks  # lazy: importing scipy.signal costs ~1 s of CLI start-up
        p, _ = find_peaks(np.where(finite, resid[f], 0.0), height=height, distance=2)
        fib.append(np.full(p.size, f))
        pk.append(p)
    if not pk or sum(p.size for p in pk) == 0:
        z = np.zeros(0)
        return ArcLines(z.astype(int), z, z, z, z)
    fib = np.concatenate(fib)
    pk = np.concatenate(pk)
    t = pk[:, None] + np.arange(-half_window, half_window + 1)
    inside = (t >= 0) & (t < ny)
    tc = np.clip(t, 0, ny - 1)
    y = resid[fib[:, None], tc]
    wgt = np.where(inside, flux_ivar[fib[:, None], tc], 0.0)
    core = np.abs(t - pk[:, None]) <= 2
    complete = np.all(~core | (wgt > 0), axis=1)
    amp0 = np.maximum(y[:, half_window] * np.sqrt(2 * np.pi) * lsf_sigma, 1e-3)
    fit = fit_pixel_gaussians(y, t, wgt, amp0, pk.astype(float), np.full(pk.size, lsf_sigma),
                              np.zeros(pk.size), n_iter=10, sigma_bounds=(0.3, 4 * lsf_sigma))
    if profile != "gauss":
        fit = fit_pixel_gaussians(y, t, wgt, np.maximum(fit.amp, 1e-3), fit.mu, fit.sigma, fit.bkg, profile=profile,
                                  n_iter=10, sigma_bounds=(0.3, 4 * lsf_sigma))
    amp_err = np.sqrt(np.sum(np.where(wgt > 0, 1.0 / np.where(wgt > 0, wgt, 1.0), 0.0), axis=1))
    good = (fit.ok & complete & (np.abs(fit.mu - pk) < 1.5) & (fit.sigma > 0.4 * lsf_sigma)
            & (fit.sigma < 3 * lsf_sigma) & (fit.amp > nsig * amp_err) & np.isfinite(fit.mu_err))
    fib, row, err, amp, sig = fib[good], fit.mu[good], fit.mu_err[good], fit.amp[good], fit.sigma[good]
    # drop blends: another detection in the same fiber closer than min_sep
    order = np.lexsort((row, fib))
    fib, row, err, amp, sig = fib[order], row[order], err[order], amp[order], sig[order]
    same_prev = np.r_[False, fib[1:] == fib[:-1]]
    gap_prev = np.r_[np.inf, np.diff(row)]
    gap_prev = np.where(same_prev, gap_prev, np.inf)
    gap_next = np.r_[gap_prev[1:], np.inf]
    keep = (gap_prev >= min_sep) & (gap_next >= min_sep)
    return ArcLines(fib[keep], row[keep], err[keep], amp[keep], sig[keep])


# --------------------------------------------------------------------------------------------
# Identification
# --------------------------------------------------------------------------------------------
def _clean_catalogue(line_waves: np.ndarray, min_sep_a: float) -> np.ndarray:
    w = np.unique(np.asarray(line_waves, float))
    gap = np.diff(w)
    isolated = np.r_[True, gap >= min_sep_a] & np.r_[gap >= min_sep_a, True]
    return w[isolated]


def _vote_shift(rows: np.ndarray, pred_rows: np.ndarray, max_shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Best row shift(s) by voting. ``pred_rows`` (s, n_cat); returns (best_shift[s], score[s])."""
    diff = rows[None, :, None] - pred_rows[:, None, :]  # (s, n_det, n_cat)
    nbin = int(2 * np.ceil(max_shift)) + 1
    idx = np.rint(diff + np.ceil(max_shift)).astype(int)
    ok = (idx >= 0) & (idx < nbin)
    s_idx = np.broadcast_to(np.arange(pred_rows.shape[0])[:, None, None], diff.shape)
    hist = np.bincount((s_idx * nbin + idx)[ok], minlength=pred_rows.shape[0] * nbin).astype(float)
    hist = hist.reshape(pred_rows.shape[0], nbin)
    # tolerate a split between adjacent bins
    sm = hist + 0.5 * (np.pad(hist, ((0, 0), (1, 0)))[:, :-1] + np.pad(hist, ((0, 0), (0, 1)))[:, 1:])
    best = np.argmax(sm, axis=1)
    return best - np.ceil(max_shift), sm[np.arange(sm.shape[0]), best]


def _match(rows: np.ndarray, wave_pred: np.ndarray, disp_local: np.ndarray, cat: np.ndarray, tol_px: float):
    """Unique nearest-neighbour matches of predicted wavelengths to catalogue lines."""
    j = np.clip(np.searchsorted(cat, wave_pred), 1, cat.size - 1)
    j = np.where(np.abs(cat[j - 1] - wave_pred) < np.abs(cat[j] - wave_pred), j - 1, j)
    d = np.abs(cat[j] - wave_pred) / np.abs(disp_local)
    ok = d < tol_px
    # one detection per catalogue line: keep the closest
    order = np.lexsort((d, j))
    first = np.r_[True, j[order][1:] != j[order][:-1]]
    uniq = np.zeros(rows.size, bool)
    uniq[order[first]] = True
    ok &= uniq
    return np.flatnonzero(ok), j[ok]


@dataclass
class _FiberFit:
    coeffs: np.ndarray
    n_lines: int
    rms: float
    rms_px: float
    row_range: tuple[float, float]


def _schedule(grow: bool, deg: int, tol0: float, tol_final: float) -> list[tuple[float, int, float]]:
    """(|u| limit of the lines used, degree, tolerance in pixels) of each match / fit pass."""
    mid_tol = min(2.0, tol0)
    if grow:  # from the middle of the CCD outward, raising the degree as the range grows
        stages = [(0.6, deg, tol0), (0.6, deg, mid_tol), (0.7, deg, mid_tol), (0.8, deg, mid_tol),
                  (0.9, deg, mid_tol), (np.inf, deg, mid_tol)]
    else:
        stages = [(np.inf, deg, tol0)]
    tol = stages[-1][2]
    while tol > tol_final:
        tol = max(tol_final, 0.75 * tol)
        stages.append((np.inf, deg, tol))
    return stages + [(np.inf, deg, tol_final)] * 4


def _fit_fiber(lines: ArcLines, cat: np.ndarray, ny: int, coeffs0: np.ndarray, row_shift: float, deg: int,
               tol0: float, tol_final: float, clip: float, min_lines: int, grow: bool,
               err_floor: float) -> _FiberFit | None:
    """Iterate match / fit from a starting solution ``wave(row - row_shift)``."""
    rows = lines.row
    u_scale = 2.0 / (ny - 1)
    u_det = rows * u_scale - 1.0
    coeffs = np.asarray(coeffs0, float)
    shift = row_shift
    prev = None
    used_idx = np.zeros(0, int)
    used_j = np.zeros(0, int)
    fit_c = None
    for umax, d_stage, tol in _schedule(grow, deg, tol0, tol_final):
        uu = (rows - shift) * u_scale - 1.0
        wave_pred = legendre.legval(uu, coeffs)
        disp = legendre.legval(uu, legendre.legder(coeffs)) * u_scale
        idx, jcat = _match(rows, wave_pred, disp, cat, tol)
        inner = np.abs(u_det[idx]) <= umax
        idx, jcat = idx[inner], jcat[inner]
        if idx.size < 3:
            return None
        d = min(deg, d_stage, max(1, (idx.size - 1) // 3))
        w = 1.0 / ((lines.row_err[idx] ** 2 + err_floor ** 2) * np.abs(disp[idx]) ** 2)
        c, used = fit_legendre_clipped(u_det[idx], cat[jcat][None, :], w[None, :], d, clip=clip)
        if not np.all(np.isfinite(c)):
            return None
        fit_c = np.zeros(deg + 1)
        fit_c[: d + 1] = c[0]
        coeffs, shift = fit_c, 0.0
        used_idx, used_j = idx[used[0]], jcat[used[0]]
        key = (d, umax, tuple(used_idx))
        if prev == key and tol == tol_final:
            break
        prev = key
    if fit_c is None or used_idx.size < min_lines:
        return None
    u = rows[used_idx] * u_scale - 1.0
    resid = cat[used_j] - legendre.legval(u, fit_c)
    disp = np.abs(legendre.legval(u, legendre.legder(fit_c)) * u_scale)
    rms = float(np.sqrt(np.mean(resid ** 2)))
    rms_px = float(np.sqrt(np.mean((resid / disp) ** 2)))
    return _FiberFit(fit_c, int(used_idx.size), rms, rms_px, (float(rows[used_idx].min()), float(rows[used_idx].max())))


def _seed_solution(lines: ArcLines, cat: np.ndarray, ny: int, wave_center: float, dispersion: float,
                   max_shift: float, max_stretch: float, max_curvature: float, n_candidates: int = 3,
                   **kw) -> _FiberFit | None:
    """Solve one fiber from the nominal guess: vote for shift x stretch x curvature, then iterate.

    The vote uses the detections with ``|u| <= 0.6``; a model row ``yc + shift + v + q (v/h)^2``
    with ``v = (wave - wave_center) / (dispersion * stretch)`` and ``h = (ny - 1) / 2`` is tried
    on a grid of stretch and curvature ``q`` fine enough to move the lines used by < 0.5 px; the
    ``n_candidates`` best-voted curvatures are each iterated and the best fit is kept.
    """
    umax = 0.6
    yc = half = (ny - 1) / 2.0
    rows = lines.row[np.abs(lines.row / half - 1.0) <= umax]
    if rows.size < 3:
        return None
    s_step = 0.5 / (umax * half)
    stretches = 1.0 + np.arange(-max_stretch, max_stretch + s_step / 2, s_step)
    q_step = 1.0 / umax ** 2
    curvs = np.arange(-max_curvature, max_curvature + q_step / 2, q_step) if max_curvature > 0 else np.zeros(1)
    v = (cat[None, :] - wave_center) / (dispersion * stretches[:, None])  # (n_s, n_cat)
    cands = []
    for q in curvs:
        pred = yc + v + q * (v / half) ** 2
        shifts, score = _vote_shift(rows, pred, max_shift)
        k = int(np.argmax(score))
        cands.append((score[k], shifts[k], stretches[k], q))
    best_fit = None
    for _, shift, s, q in sorted(cands, key=lambda c: -c[0])[:n_candidates]:
        # invert to first order: wave = wc + disp s (w - q (w/h)^2), w = row - yc - shift = u' h
        coeffs0 = np.zeros(kw["deg"] + 1)
        coeffs0[0] = wave_center - dispersion * s * q / 3.0
        coeffs0[1] = dispersion * s * half
        if kw["deg"] >= 2:
            coeffs0[2] = -dispersion * s * q * 2.0 / 3.0
        fit = _fit_fiber(lines, cat, ny, coeffs0, shift, grow=True, **kw)
        if fit is not None and (best_fit is None or _quality(fit) > _quality(best_fit)):
            best_fit = fit
    return best_fit


def _quality(fit: _FiberFit) -> tuple:
    return (fit.rms_px <= 0.25, fit.n_lines, -fit.rms_px)


def _from_prior(lines: ArcLines, cat: np.ndarray, ny: int, prior: np.ndarray, max_shift: float,
                **kw) -> _FiberFit | None:
    """Solve one fiber from a neighbour's solution: vote for a row shift, then iterate."""
    rows_grid = np.arange(-int(max_shift) - 2, ny + int(max_shift) + 2, dtype=float)
    wgrid = legendre.legval(rows_grid * 2.0 / (ny - 1) - 1.0, prior)
    order = np.argsort(wgrid)
    pred = np.interp(cat, wgrid[order], rows_grid[order], left=np.nan, right=np.nan)
    pred = pred[np.isfinite(pred)]
    if pred.size == 0 or lines.row.size == 0:
        return None
    shift, _ = _vote_shift(lines.row, pred[None, :], max_shift)
    return _fit_fiber(lines, cat, ny, prior, float(shift[0]), grow=False, **kw)


def _low_order_update(lines: ArcLines, cat: np.ndarray, ny: int, prior: np.ndarray,
                      tol_px: float) -> tuple[np.ndarray, int, tuple[float, float] | None]:
    """Prior plus a constant wavelength offset fitted to whatever lines match (maybe none)."""
    if lines.row.size == 0:
        return prior, 0, None
    u = lines.row * 2.0 / (ny - 1) - 1.0
    wave_pred = legendre.legval(u, prior)
    disp = legendre.legval(u, legendre.legder(prior)) * 2.0 / (ny - 1)
    idx, j = _match(lines.row, wave_pred, disp, cat, tol_px)
    if idx.size == 0:
        return prior, 0, None
    off = np.median(cat[j] - wave_pred[idx])
    out = prior.copy()
    out[0] += off
    return out, int(idx.size), (float(lines.row[idx].min()), float(lines.row[idx].max()))


def calibrate_wavelength(arc: np.ndarray, arc_ivar: np.ndarray, traces: TraceSet, line_waves: np.ndarray,
                         wave_center: float, dispersion: float, *, deg: int = 4, half_width: float = 3.5,
                         nsig: float = 5.0, lsf_sigma: float = 1.4, min_sep: float = 4.0,
                         max_shift: float | None = None, max_stretch: float = 0.04,
                         max_curvature: float | None = None, tol0: float = 3.0,
                         tol_final: float = 0.6, clip: float = 3.0, min_lines: int | None = None,
                         max_rms_px: float = 0.25, err_floor: float = 0.01, n_seeds: int = 3,
                         line_profile: str = "halo") -> WaveSolution:
    """Wavelength solution of every fiber from an arc frame.

    Parameters
    ----------
    arc, arc_ivar : ndarray, shape (ny, nx)
        Arc frame (electrons, CCD-corrected) and inverse variance (0 = masked).
    traces : TraceSet
        Fiber traces (dead fibers get interpolated solutions).
    line_waves : ndarray
        Catalogue wavelengths (Angstrom, air), e.g. ``arc_lines()['wave_air']``.
    wave_center, dispersion : float
        Nominal wavelength at the centre row and dispersion (Angstrom per pixel).
    deg : int
        Degree of the Legendre series of ``wave(row)``.
    half_width : float
        Half width (pixels) of the box extraction.
    nsig : float
        Line detection threshold (sigma).
    lsf_sigma : float
        Expected line sigma along rows (pixels).
    min_sep : float
        Catalogue lines closer than this (pixels) to another catalogue line, and detections
        closer than this to another detection, are not used (blends).
    max_shift : float, optional
        Largest row offset searched, from the nominal solution for the seed and from the
        neighbour's solution for the others (default ``max(30, 0.03 ny)``).
    max_stretch : float
        Largest fractional dispersion error searched for the seed.
    max_curvature : float, optional
        Largest quadratic departure (pixels at the CCD ends) from a linear solution searched
        for the seed (default ``0.015 ny``).
    tol0, tol_final : float
        First and last matching tolerance (pixels).
    clip : float
        Sigma-clipping threshold of the fits.
    min_lines : int, optional
        Fewest lines for a fiber's own fit (default ``deg + 3``).
    max_rms_px : float
        Fits with a larger rms (pixels) are treated as failed and retried from the neighbours.
    err_floor : float
        Floor (pixels) added in quadrature to line centroid errors in the fit weights.
    n_seeds : int
        Candidate seed fibers tried.
    line_profile : str
        Profile fitted to the lines (see :func:`detect_lines`).

    Returns
    -------
    WaveSolution
        Per-fiber coefficients, rms (Angstrom; ``FAILED_RMS`` when interpolated from
        neighbours), number of lines fitted and row range of the identified lines (for an
        interpolated fiber, the range of the neighbours it was built from).
    """
    ny = arc.shape[0]
    nf = traces.n_fibers
    if min_lines is None:
        min_lines = deg + 3
    if max_shift is None:
        max_shift = max(30.0, 0.03 * ny)
    if max_curvature is None:
        max_curvature = 0.015 * ny
    lo_w = wave_center - (0.5 * ny + max_shift) * dispersion * (1 + max_stretch)
    hi_w = wave_center + (0.5 * ny + max_shift) * dispersion * (1 + max_stretch)
    cat = _clean_catalogue(line_waves, min_sep * dispersion)
    cat = cat[(cat > lo_w) & (cat < hi_w)]
    if cat.size < 3:
        raise ValueError("fewer than 3 catalogue lines fall in the nominal wavelength range")

    flux, fivar = extract_boxcar(arc, arc_ivar, traces, half_width)
    live = ~np.asarray(traces.dead, bool)
    fivar[~live] = 0.0
    lines = detect_lines(flux, fivar, nsig=nsig, lsf_sigma=lsf_sigma, min_sep=min_sep, profile=line_profile)
    per_fiber = [lines.of(f) for f in range(nf)]
    n_det = np.array([p.row.size for p in per_fiber])

    kw = dict(deg=deg, tol0=tol0, tol_final=tol_final, clip=clip, min_lines=min_lines, err_floor=err_floor)
    sols: list[_FiberFit | None] = [None] * nf

    def acceptable(fit: _FiberFit | None) -> bool:
        return fit is not None and fit.rms_px <= max_rms_px and fit.n_lines >= min_lines

    # seed: fibers with many lines near the middle of the slit
    centre = (nf - 1) / 2.0
    score = n_det * live * (1.0 - 0.5 * np.abs(np.arange(nf) - centre) / max(centre, 1.0))
    order = [f for f in np.argsort(-score, kind="stable") if live[f] and n_det[f] >= 3]
    best = None
    for i, f in enumerate(order[: max(1, n_seeds) + 10]):
        if i >= n_seeds and best is not None:
            break  # the first n_seeds candidates are compared; more are tried only on failure
        fit = _seed_solution(per_fiber[f], cat, ny, wave_center, dispersion, max_shift, max_stretch,
                             max_curvature, **kw)
        if acceptable(fit) and (best is None or (fit.n_lines, -fit.rms_px) > (best[1].n_lines, -best[1].rms_px)):
            best = (f, fit)
    if best is None:
        warnings.warn("wavelength calibration failed: no fiber could be identified; returning the nominal "
                      "linear solution with rms = FAILED_RMS", RuntimeWarning, stacklevel=2)
        coeffs = np.zeros((nf, deg + 1))
        coeffs[:, 0] = wave_center
        coeffs[:, 1] = dispersion * (ny - 1) / 2.0
        return WaveSolution(coeffs=coeffs, ny=ny, rms=np.full(nf, FAILED_RMS), n_lines=np.zeros(nf, int),
                            row_range=np.tile([0.0, ny - 1.0], (nf, 1)))
    seed, sols[seed] = best

    # walk outward from the seed, each fiber from its last good neighbour
    for direction in (1, -1):
        last = seed
        f = seed + direction
        while 0 <= f < nf:
            if live[f] and n_det[f] >= 3:
                fit = _from_prior(per_fiber[f], cat, ny, sols[last].coeffs, max_shift, **kw)
                if acceptable(fit):
                    sols[f] = fit
                    last = f
            f += direction

    # retry failures from a prior interpolated from both sides
    good = np.array([s is not None for s in sols])
    coeffs = np.array([s.coeffs if s is not None else np.zeros(deg + 1) for s in sols])
    fidx = np.arange(nf, dtype=float)
    prior = interpolate_fibers(coeffs, fidx, ~good)
    for f in np.flatnonzero(~good & live):
        if n_det[f] >= 3:
            fit = _from_prior(per_fiber[f], cat, ny, prior[f], max_shift, **kw)
            if not acceptable(fit):  # last resort: an independent search from the nominal guess
                fit = _seed_solution(per_fiber[f], cat, ny, wave_center, dispersion, max_shift, max_stretch,
                                     max_curvature, **kw)
            if acceptable(fit):
                sols[f] = fit
    good = np.array([s is not None for s in sols])
    coeffs = np.array([s.coeffs if s is not None else np.zeros(deg + 1) for s in sols])
    coeffs = interpolate_fibers(coeffs, fidx, ~good)

    rms = np.full(nf, FAILED_RMS)
    n_lines = np.zeros(nf, int)
    row_range = np.zeros((nf, 2))
    for f in range(nf):
        if sols[f] is not None:
            rms[f], n_lines[f], row_range[f] = sols[f].rms, sols[f].n_lines, sols[f].row_range
    good_idx = np.flatnonzero(good)
    for f in np.flatnonzero(~good):
        near = good_idx[np.argsort(np.abs(good_idx - f))[:2]]
        row_range[f] = (row_range[near, 0].max(), row_range[near, 1].min()) if near.size else (0.0, ny - 1.0)
        if live[f]:
            coeffs[f], n_lines[f], _ = _low_order_update(per_fiber[f], cat, ny, coeffs[f], tol_final)
    return WaveSolution(coeffs=coeffs, ny=ny, rms=rms, n_lines=n_lines, row_range=row_range)
