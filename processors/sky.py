"""Sky model and subtraction on the common wavelength grid.

The sky model is one spectrum per camera: at every wavelength bin the inverse-variance
weighted mean of the sky fibers after sigma clipping (astropy ``sigma_clip`` across fibers,
median centre, MAD-based spread). Fibers are assumed flat-fielded and resampled to the same
grid, with the same line-spread function (LSF differences between fibers are not modelled).
"""

from __future__ import annotations

import numpy as np
from astropy.stats import sigma_clip
from scipy.ndimage import median_filter

from fiberlake.schemas.containers import Spectra1D
from fiberlake.schemas.maskbits import MASK_DTYPE, Mask

LINE_WIDTH = 51
"""Running-median width (bins) that defines the sky continuum under the emission lines."""
LINE_THRESHOLD = 0.5
"""A bin is a bright-sky-line bin where the line flux (model - continuum) exceeds this
fraction of the continuum and 5 sigma of the model."""
BRIGHT_SNR = 10.0
"""Line bins enter ``line_frac_resid`` where the line flux exceeds this many residual sigma."""


def _as_index(sky_fibers: np.ndarray, nf: int) -> np.ndarray:
    sky = np.asarray(sky_fibers)
    if sky.dtype == bool:
        if sky.size != nf:
            raise ValueError(f"boolean sky_fibers has {sky.size} entries for {nf} fibers")
        return np.flatnonzero(sky)
    return np.unique(sky.astype(int))


def sky_model(spectra: Spectra1D, sky_fibers: np.ndarray, *, clip_sigma: float = 3.0) -> Spectra1D:
    """Sigma-clipped, inverse-variance weighted mean of the sky fibers.

    Parameters
    ----------
    spectra : Spectra1D
        Flat-fielded spectra on the common grid, shape ``(n_fibers, nwave)``.
    sky_fibers : ndarray of int or bool
        Indices (or a boolean selection) of the sky fibers.
    clip_sigma : float
        Clipping threshold across fibers at each bin (values with ivar 0 never enter).
        Clipping needs at least 3 valid fibers at a bin.

    Returns
    -------
    Spectra1D
        Shape ``(1, nwave)``; ``ivar`` is the sum of the weights used; ``mask`` is ``BADSKY``
        (ivar 0) where no sky fiber is valid.
    """
    nf, nw = spectra.flux.shape
    idx = _as_index(sky_fibers, nf)
    flux = spectra.flux[idx].astype(float)
    ivar = spectra.ivar[idx].astype(float)
    valid = (ivar > 0) & np.isfinite(flux)
    if idx.size >= 3:
        clipped = sigma_clip(np.ma.masked_array(flux, ~valid), sigma=clip_sigma, axis=0,
                             maxiters=5, cenfunc="median", stdfunc="mad_std", masked=True)
        use = valid & ~np.ma.getmaskarray(clipped) & (valid.sum(axis=0) >= 3)[None, :]
        use |= valid & (valid.sum(axis=0) < 3)[None, :]
    else:
        use = valid
    w = np.where(use, ivar, 0.0)
    wsum = w.sum(axis=0)
    ok = wsum > 0
    mean = np.where(ok, (w * np.where(use, flux, 0.0)).sum(axis=0) / np.where(ok, wsum, 1.0), 0.0)
    mask = np.where(ok, MASK_DTYPE(0), MASK_DTYPE(Mask.BADSKY))
    return Spectra1D(mean[None, :], wsum[None, :], mask[None, :].astype(MASK_DTYPE))


def subtract_sky(spectra: Spectra1D, sky: Spectra1D) -> Spectra1D:
    """Subtract a sky model from every fiber.

    Parameters
    ----------
    spectra : Spectra1D
        Shape ``(n_fibers, nwave)``.
    sky : Spectra1D
        Shape ``(1, nwave)`` (one model for all fibers) or ``(n_fibers, nwave)``.

    Returns
    -------
    Spectra1D
        ``flux - sky``, ``1/ivar = 1/ivar + 1/ivar_sky`` (0 where either is 0), masks OR-ed.
    """
    if sky.flux.shape[-1] != spectra.flux.shape[-1]:
        raise ValueError(f"sky has {sky.flux.shape[-1]} bins, spectra {spectra.flux.shape[-1]}")
    ok = (spectra.ivar > 0) & (sky.ivar > 0)
    with np.errstate(divide="ignore"):
        var = 1.0 / np.where(ok, spectra.ivar, 1.0).astype(float) + 1.0 / np.where(ok, sky.ivar, 1.0)
    ivar = np.where(ok, 1.0 / var, 0.0)
    flux = spectra.flux.astype(float) - sky.flux
    return Spectra1D(flux, ivar, spectra.mask | sky.mask)


def sky_residuals(spectra: Spectra1D, sky_fibers: np.ndarray, *,
                  clip_sigma: float = 3.0) -> dict[str, float]:
    """Leave-one-out quality of the sky model on the sky fibers.

    Each sky fiber is compared with the model built from the *other* sky fibers, so its own
    noise does not enter the model it is compared with.

    Parameters
    ----------
    spectra : Spectra1D
        Flat-fielded spectra on the common grid (before sky subtraction).
    sky_fibers : ndarray of int or bool
        Sky fibers (at least 2).
    clip_sigma : float
        Passed to :func:`sky_model`.

    Returns
    -------
    dict
        ``median_abs_chi`` (median of ``|residual| / sigma``; 0.674 for Gaussian noise),
        ``rms_chi`` (rms of ``residual / sigma``; 1 when the model and errors are right),
        ``line_rms_chi`` (the same over bright-sky-line bins),
        ``line_frac_resid`` (fractional residual in bright sky lines: the rms over sky fibers
        of each fiber's ``sum(residual) / sum(sky)`` over the bright-line bins; a scale error of
        one fiber shows, the noise averages away), ``cont_frac_resid`` (the same over the
        continuum bins), ``n_line_bins`` (fiber-bins in the line statistics) and ``n_used``
        (fiber-bins in the chi statistics).
    """
    nf, nw = spectra.flux.shape
    idx = _as_index(sky_fibers, nf)
    if idx.size < 2:
        raise ValueError("leave-one-out needs at least 2 sky fibers")
    full = sky_model(spectra, idx, clip_sigma=clip_sigma)
    model = full.flux[0].astype(float)
    cont = median_filter(model, size=LINE_WIDTH, mode="nearest")
    with np.errstate(divide="ignore"):
        msig = np.where(full.ivar[0] > 0, 1.0 / np.sqrt(np.maximum(full.ivar[0], 1e-300)), np.inf)
    line = (model - cont > LINE_THRESHOLD * np.abs(cont)) & (model - cont > 5 * msig)
    chis, ex_line, ex_cont, chi_line = [], [], [], []
    for i in idx:
        others = idx[idx != i]
        m = sky_model(spectra, others, clip_sigma=clip_sigma)
        ok = (spectra.ivar[i] > 0) & (m.ivar[0] > 0)
        var = 1.0 / np.where(ok, spectra.ivar[i], 1.0) + 1.0 / np.where(ok, m.ivar[0], 1.0)
        r = spectra.flux[i].astype(float) - m.flux[0]
        chis.append((r / np.sqrt(var))[ok])
        sky_i = m.flux[0].astype(float)
        bright = ok & line & (model - cont > BRIGHT_SNR * np.sqrt(var))
        quiet = ok & ~line & (sky_i > 0)
        # signed mean fractional residual per fiber: a scale (throughput, LSF) error survives,
        # the noise averages away
        if bright.any():
            ex_line.append(np.sum(r[bright]) / np.sum(sky_i[bright]))
        if quiet.any():
            ex_cont.append(np.sum(r[quiet]) / np.sum(sky_i[quiet]))
        chi_line.append((r / np.sqrt(var))[bright])
    chi = np.concatenate(chis)
    el, ec, cl = np.array(ex_line), np.array(ex_cont), np.concatenate(chi_line)
    nan = float("nan")
    return {
        "median_abs_chi": float(np.median(np.abs(chi))) if chi.size else nan,
        "rms_chi": float(np.sqrt(np.mean(chi**2))) if chi.size else nan,
        "line_rms_chi": float(np.sqrt(np.mean(cl**2))) if cl.size else nan,
        "line_frac_resid": float(np.sqrt(np.mean(el**2))) if el.size else nan,
        "cont_frac_resid": float(np.sqrt(np.mean(ec**2))) if ec.size else nan,
        "n_line_bins": float(cl.size),
        "n_used": float(chi.size),
    }
