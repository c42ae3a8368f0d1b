"""Accuracy figures of flux-calibrated and coadded spectra against the simulator's truth (pure).

Inputs are arrays on one grid: measured flux with its inverse variance, the true flux above the
atmosphere (``FLAM_ROWS`` of the truth files, on the same grid), and masks of the wavelength
ranges to compare. The figures are what issue 14 asks to show: the median flux ratio and its
scatter per camera, the blue/red colour error, the residual shape of the response, the telluric
residuals, and the coadd's S/N against the single exposures.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import median_filter

from fiberlake.processors.accuracy import robust_std


def fiber_ratios(flux: np.ndarray, ivar: np.ndarray, truth: np.ndarray, ranges: dict[str, np.ndarray],
                 min_bins: int = 50) -> dict[str, np.ndarray]:
    """Per spectrum and range: median of measured over true flux (NaN when too few good bins).

    Parameters
    ----------
    flux, ivar, truth : ndarray, shape (n, nwave)
    ranges : dict of str to ndarray of bool, shape (nwave,)
        E.g. one mask per camera's range.
    """
    out = {}
    for name, sel in ranges.items():
        vals = np.full(flux.shape[0], np.nan)
        for i in range(flux.shape[0]):
            good = sel & (ivar[i] > 0) & (truth[i] > 0)
            if good.sum() >= min_bins:
                vals[i] = np.median(flux[i, good] / truth[i, good])
        out[name] = vals
    return out


def shape_error(flux: np.ndarray, ivar: np.ndarray, truth: np.ndarray, sel: np.ndarray, smooth: int = 101) -> float:
    """Rms over spectra of the smoothed ratio's departure from its median within ``sel``: the
    relative response error (noise removed by a running median of ``smooth`` bins)."""
    vals = []
    for i in range(flux.shape[0]):
        good = sel & (ivar[i] > 0) & (truth[i] > 0)
        if good.sum() < 2 * smooth:
            continue
        r = flux[i, good] / truth[i, good]
        r = median_filter(r, size=smooth, mode="nearest")[smooth // 2:-(smooth // 2)]
        vals.append(np.sqrt(np.mean((r / np.median(r) - 1.0) ** 2)))
    return float(np.median(vals)) if vals else float("nan")


def empirical_snr(flux: np.ndarray, truth: np.ndarray, good: np.ndarray, smooth: int = 51) -> float:
    """Mean true flux over the noise of ``flux - g * truth`` (``g`` the median ratio), the slow part of
    the residual (calibration shape) removed by a running median, on ``good`` bins."""
    if good.sum() < 3 * smooth:
        return float("nan")
    f, t = flux[good], truth[good]
    g = np.median(f / t)
    resid = f - g * t
    resid = resid - median_filter(resid, size=smooth, mode="nearest")
    noise = robust_std(resid)
    return float(g * np.mean(t) / noise) if noise > 0 else float("nan")


def summary(ratios: dict[str, np.ndarray]) -> dict[str, float]:
    """Median ratio and robust scatter per range, and the colour error between the first two ranges."""
    out = {}
    for name, vals in ratios.items():
        v = vals[np.isfinite(vals)]
        out[f"ratio_{name}"] = float(np.median(v)) if v.size else float("nan")
        out[f"scatter_{name}"] = robust_std(v) if v.size else float("nan")
        out[f"n_{name}"] = int(v.size)
    names = list(ratios)
    if len(names) >= 2:
        colour = ratios[names[0]] / ratios[names[1]]
        colour = colour[np.isfinite(colour)]
        out["colour_median"] = float(np.median(colour) - 1.0) if colour.size else float("nan")
        out["colour_rms"] = float(np.sqrt(np.mean((colour - 1.0) ** 2))) if colour.size else float("nan")
    return out


def phase_ripple(ivar: np.ndarray, q: np.ndarray, window: int = 101) -> float:
    """Amplitude (fractional rms) of the part of ``ivar`` that follows the bins' sampling phase.

    ``q`` is :func:`fiberlake.processors.resample.ripple_factor` on the same bins (after any
    further rebinning). Both are divided by their running medians; the regression slope of one on
    the other times the rms of ``q``'s ripple is the ripple ``ivar`` carries (about ``rms(q)``
    for the frame spectra, whose ivar goes as ``1/q``; 0 when the ripple is gone). Lines and sky
    features, which do not follow the phase, do not count.
    """
    ivar = np.atleast_2d(np.asarray(ivar, float))
    q = np.atleast_2d(np.asarray(q, float))
    num = den = 0.0
    rq_all = []
    for iv, qq in zip(ivar, q):
        good = (iv > 0) & (qq > 0)
        if good.sum() < 3 * window:
            continue
        ri = iv[good] / median_filter(iv[good], size=window, mode="nearest") - 1.0
        rq = qq[good] / median_filter(qq[good], size=window, mode="nearest") - 1.0
        cut = slice(window // 2, -(window // 2))
        num += float(np.sum(ri[cut] * rq[cut]))
        den += float(np.sum(rq[cut] ** 2))
        rq_all.append(rq[cut])
    if den <= 0:
        return float("nan")
    return float(abs(num / den) * np.sqrt(np.mean(np.concatenate(rq_all) ** 2)))


def coadd_noise_gain(singles: np.ndarray, coadd: np.ndarray, truth: np.ndarray, good: np.ndarray,
                     smooth: int = 51) -> float:
    """Measured over expected noise reduction of a coadd, free of the truth's own mismatch.

    Residuals ``r = f - g * truth`` (``g`` each spectrum's median ratio, slow parts removed by a
    running median) hold the noise plus a part ``s`` common to every exposure (model and
    calibration mismatch), which no coadd averages down. Pairwise differences of the singles give
    each single's noise variance ``v_i`` without ``s``; ``var(s) = mean(var(r_i) - v_i)``; the
    coadd's noise variance is ``var(r_c) - var(s)``. Returns ``sqrt(expected / measured)`` with
    ``expected = 1 / sum(1 / v_i)``: 1 when the coadd's S/N is the quadrature sum of the singles'
    (``sqrt(N)`` times a single's for equal exposures).
    """
    from scipy.ndimage import median_filter as mf

    def resid(f: np.ndarray) -> np.ndarray:
        ff, tt = f[good], truth[good]
        g = np.median(ff / tt)
        r = ff - g * tt
        return r - mf(r, size=smooth, mode="nearest")

    if len(singles) < 3 or good.sum() < 3 * smooth:  # e.g. a fiber masked in every exposure
        return float("nan")
    rs = [resid(np.asarray(f, float)) for f in singles]
    n = len(rs)
    pairs, rhs = [], []
    for i in range(n):
        for j in range(i + 1, n):
            row = np.zeros(n)
            row[[i, j]] = 1.0
            pairs.append(row)
            rhs.append(robust_std(rs[i] - rs[j]) ** 2)
    v, *_ = np.linalg.lstsq(np.array(pairs), np.array(rhs), rcond=None)
    if np.any(v <= 0):
        return float("nan")
    common = float(np.mean([robust_std(r) ** 2 - vi for r, vi in zip(rs, v)]))
    measured = robust_std(resid(np.asarray(coadd, float))) ** 2 - common
    expected = 1.0 / np.sum(1.0 / v)
    return float(np.sqrt(expected / measured)) if measured > 0 else float("nan")
