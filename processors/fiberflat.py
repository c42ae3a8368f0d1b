"""Fiber flat: relative response of every fiber at every CCD row, from the extracted master flat.

The master flat is extracted exactly like the science frames (same traces, same extractor, on
the CCD row grid), so pixel-level response, profile-model errors and the fiber's own
dispersion (electrons per row) cancel in the ratio ``science / flat``.

Two ways to remove the lamp spectrum, which differs from fiber to fiber in row space because
every fiber has its own ``wavelength(row)``:

* default (``wave_rows=None``): each fiber is divided by its own smoothed spectrum (a running
  median of ``smooth`` rows) and multiplied by its throughput (the median of that smooth
  spectrum relative to the median over live fibers). This keeps fiber-to-fiber throughput and
  row-scale (pixel) structure and drops only the fiber's slow spectral shape; no wavelength
  mixing is involved.
* with ``wave_rows``: the flat is turned into electrons per Angstrom, the median over live
  fibers on a common wavelength grid is the lamp reference, and each fiber's response is its
  flat over that reference at its own wavelengths times its own dispersion. This also keeps
  slow, wavelength-dependent throughput differences between fibers.

Either way the response is normalised so that live fibers have median response 1.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.ndimage import median_filter

from fiberlake.schemas.containers import Spectra1D
from fiberlake.schemas.maskbits import FATAL, MASK_DTYPE, Mask

LOW_RESPONSE = 0.1
"""Response below which ``LOWFLAT`` is set (and the flat-fielded value gets ivar 0)."""


def _fill_bad(y: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Linear interpolation over bad samples along the last axis (loop per fiber with gaps)."""
    out = np.where(good, y, 0.0).astype(float)
    idx = np.arange(y.shape[-1])
    for f in np.flatnonzero(~good.all(axis=-1) & good.any(axis=-1)):
        g = good[f]
        out[f, ~g] = np.interp(idx[~g], idx[g], y[f, g])
    return out


def running_median(y: np.ndarray, good: np.ndarray, width: int) -> np.ndarray:
    """Running median along the last axis that ignores bad samples and keeps linear trends
    at the ends.

    Bad samples are first filled by linear interpolation; the ends are padded by odd
    reflection about a local median anchor (``2 a - y[k]``), so a straight line is returned
    unchanged up to its noise.

    Parameters
    ----------
    y : ndarray, shape (n_spec, n)
    good : ndarray of bool, shape (n_spec, n)
    width : int
        Filter width (samples); made odd.

    Returns
    -------
    ndarray, shape (n_spec, n)
    """
    width = int(width) | 1
    n = y.shape[-1]
    if width <= 1 or n < 3:
        return _fill_bad(y, good)
    half = min(width // 2, n - 1)
    filled = _fill_bad(y, good)
    k = max(3, half // 2) | 1  # anchors: medians of the first / last k samples, at their centres
    if n < k + half:
        return median_filter(filled, size=(1, width), mode="nearest")
    a0 = np.median(filled[:, :k], axis=-1, keepdims=True)
    a1 = np.median(filled[:, -k:], axis=-1, keepdims=True)
    # odd reflection about (c, a0), c = (k - 1) / 2: y(c - d) -> 2 a0 - y(c + d)
    left = 2 * a0 - filled[:, k - 1 + half:k - 1:-1]
    right = 2 * a1 - filled[:, n - k:n - k - half:-1]
    padded = np.concatenate([left, filled, right], axis=-1)
    return median_filter(padded, size=(1, width), mode="nearest")[:, half:half + n]


def compute_fiberflat(flat: Spectra1D, dead: np.ndarray, *, smooth: int = 51,
                      wave_rows: np.ndarray | None = None) -> Spectra1D:
    """Relative response of each fiber at each CCD row.

    Parameters
    ----------
    flat : Spectra1D
        Master flat extracted on the CCD row grid, shape ``(n_fibers, ny)``.
    dead : ndarray of bool, shape (n_fibers,)
        Fibers without light (e.g. ``TraceSet.dead``).
    smooth : int
        Width (rows) of the running median that defines each fiber's smooth spectrum
        (default mode), or of the lamp reference in grid steps (``wave_rows`` mode).
    wave_rows : ndarray, shape (n_fibers, ny), optional
        Wavelength of every row centre; selects the lamp-reference mode (module notes).

    Returns
    -------
    Spectra1D
        ``flux`` is the response (live fibers have median 1), ``ivar`` its inverse variance
        from the flat's noise, ``mask`` the flat's bits plus ``DEADFIBER`` (ivar 0) and
        ``LOWFLAT`` where the response is below :data:`LOW_RESPONSE`.
    """
    nf, ny = flat.flux.shape
    dead = np.asarray(dead, bool).ravel()
    if dead.size != nf:
        raise ValueError(f"dead has {dead.size} entries for {nf} fibers")
    flux = flat.flux.astype(float)
    good = (flat.ivar > 0) & np.isfinite(flux) & ~dead[:, None]
    if wave_rows is None:
        sm = running_median(flux, good, smooth)
        level = np.array([np.median(sm[f][good[f]]) if good[f].any() else 0.0 for f in range(nf)])
        live = ~dead & (level > 0)
        if not live.any():
            raise ValueError("no live fiber with positive flat flux")
        through = level / np.median(level[live])
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(sm > 0, through[:, None] / sm, 0.0)
    else:
        scale = _lamp_scale(flux, good, dead, np.asarray(wave_rows, float), smooth)
    resp = flux * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        rivar = np.where(scale > 0, flat.ivar / scale**2, 0.0)
    sel = good & (scale > 0)
    ref = float(np.median(resp[sel])) if sel.any() else np.nan
    if not np.isfinite(ref) or ref <= 0:
        raise ValueError("flat has no positive response")
    resp /= ref
    rivar *= ref**2
    mask = flat.mask.astype(MASK_DTYPE).copy()
    mask[dead] |= MASK_DTYPE(Mask.DEADFIBER)
    low = (resp < LOW_RESPONSE) & ~dead[:, None]
    mask[low] |= MASK_DTYPE(Mask.LOWFLAT)
    unusable = dead[:, None] | ~good | ((mask & MASK_DTYPE(FATAL)) != 0)
    rivar = np.where(unusable, 0.0, rivar)
    resp = np.where(np.isfinite(resp), resp, 0.0)
    return Spectra1D(resp.astype(np.float32), rivar.astype(np.float32), mask)


def _lamp_scale(flux: np.ndarray, good: np.ndarray, dead: np.ndarray,
                wave_rows: np.ndarray, smooth: int) -> np.ndarray:
    """``1 / (reference(lambda_f(row)) * dispersion_f(row))`` with the reference in e-/A:
    the median over live fibers on a common grid, smoothed by a running median of ``smooth``
    grid steps (the lamp is a smooth continuum; this keeps the fibers' pixel noise out of it)."""
    nf, ny = flux.shape
    if wave_rows.shape != flux.shape:
        raise ValueError(f"wave_rows shape {wave_rows.shape} differs from flat shape {flux.shape}")
    disp = np.abs(np.gradient(wave_rows, axis=1))
    per_a = np.where(good, flux / disp, np.nan)
    live = np.flatnonzero(~dead & good.any(axis=1))
    if live.size == 0:
        raise ValueError("no live fiber on the flat")
    step = float(np.median(disp[live]))
    lo, hi = float(np.min(wave_rows[live])), float(np.max(wave_rows[live]))
    grid = lo + step * np.arange(int(np.ceil((hi - lo) / step)) + 1)
    stack = np.full((live.size, grid.size), np.nan)
    for i, f in enumerate(live):
        w, g = wave_rows[f], good[f]
        o = np.argsort(w)
        w, v, g = w[o], per_a[f][o], g[o]
        inside = (grid >= w[0]) & (grid <= w[-1])
        stack[i, inside] = np.interp(grid[inside], w[g], v[g])
    # Fibers cover slightly different ranges: scale each to a preliminary reference where
    # most fibers overlap, so the ends (few fibers) do not inherit one fiber's throughput.
    n_cover = np.isfinite(stack).sum(axis=0)
    core = n_cover >= max(1, n_cover.max() // 2)
    prelim = np.nanmedian(stack[:, core], axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = np.nanmedian(stack[:, core] / prelim, axis=1)
    t = np.where(np.isfinite(t) & (t > 0), t, 1.0)
    covered = n_cover > 0
    reference = np.full(grid.size, np.nan)
    reference[covered] = np.nanmedian(stack[:, covered] / t[:, None], axis=0)
    ok = np.isfinite(reference)
    reference = running_median(reference[None, :], ok[None, :], smooth)[0]
    ref_rows = np.interp(wave_rows, grid, reference)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ref_rows > 0, 1.0 / (ref_rows * disp), 0.0)


def apply_fiberflat(spectra: Spectra1D, fiberflat: Spectra1D) -> Spectra1D:
    """Divide spectra by the fiber flat, propagating both variances.

    Parameters
    ----------
    spectra : Spectra1D
        Extracted spectra on the CCD row grid, shape ``(n_fibers, ny)``.
    fiberflat : Spectra1D
        Output of :func:`compute_fiberflat`, same shape.

    Returns
    -------
    Spectra1D
        ``flux / R`` with ``var = var_s / R^2 + flux_out^2 var_R / R^2``; masks OR-ed; ivar 0
        (flux 0) where the response is unusable (ivar 0, ``LOWFLAT``, ``DEADFIBER``).
    """
    if spectra.flux.shape != fiberflat.flux.shape:
        raise ValueError(f"shape {spectra.flux.shape} differs from fiber flat {fiberflat.flux.shape}")
    R = fiberflat.flux.astype(float)
    ok = (fiberflat.ivar > 0) & (R >= LOW_RESPONSE) & ((fiberflat.mask & MASK_DTYPE(Mask.LOWFLAT)) == 0)
    Rs = np.where(ok, R, 1.0)
    flux = np.where(ok, spectra.flux / Rs, 0.0)
    with np.errstate(divide="ignore"):
        var = np.where(spectra.ivar > 0, 1.0 / np.where(spectra.ivar > 0, spectra.ivar, 1.0) / Rs**2, np.inf)
        var += flux**2 / np.where(ok, fiberflat.ivar, 1.0) / Rs**2
    use = ok & (spectra.ivar > 0) & np.isfinite(var)
    ivar = np.where(use, 1.0 / np.where(use, var, 1.0), 0.0)
    mask = spectra.mask | fiberflat.mask
    return Spectra1D(flux.astype(np.float32), ivar.astype(np.float32), mask)
