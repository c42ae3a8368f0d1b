"""Quality metrics of extracted spectra: variance (seed 000 eq. 14), SNR (seed 000 eq. 15,
after Qin et al. 2009) and DER_SNR (Stoehr et al. 2008).

Every function takes ``flux`` of shape ``(n_fibers, n)`` (or ``(n,)``) and an optional mask,
either boolean (``True`` = exclude) or a :class:`~fiberlake.schemas.maskbits.Mask` bitfield
(excluded where any :data:`~fiberlake.schemas.maskbits.FATAL` bit is set); non-finite flux is
always excluded. Each returns one value per fiber (a 0-d array for 1D input); a fiber with too
few usable pixels gets NaN (undefined, store as null).
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fiberlake.schemas.maskbits import FATAL

DER_SNR_NOISE = 1.482602 / np.sqrt(6.0)
"""Stoehr et al. (2008): MAD-to-sigma factor over the rms of ``2 f_i - f_{i-2} - f_{i+2}``."""


def _prepare(flux: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """float64 2D flux with excluded pixels set to NaN; and whether the input was 1D."""
    f = np.array(flux, dtype=np.float64, copy=True)
    one_d = f.ndim == 1
    f = np.atleast_2d(f)
    if mask is not None:
        m = np.atleast_2d(np.asarray(mask))
        if m.shape != f.shape:
            raise ValueError(f"mask shape {m.shape} differs from flux shape {f.shape}")
        bad = m if m.dtype == bool else (m.astype(np.int64) & int(FATAL)) != 0
        f[bad] = np.nan
    f[~np.isfinite(f)] = np.nan
    return f, one_d


def _out(v: np.ndarray, one_d: bool) -> np.ndarray:
    return v[0] if one_d else v


def _compress(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move each row's finite values to the front (order kept), NaN after; and their counts."""
    good = np.isfinite(f)
    order = np.argsort(~good, axis=1, kind="stable")
    return np.take_along_axis(f, order, axis=1), good.sum(axis=1)


def variance_eq14(flux: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Variance of each spectrum about its mean, seed 000 eq. 14 (Wu et al. 2018).

    ``V = (1/N) sum_i [spec(i) - (1/N) sum_j spec(j)]^2`` over the N usable pixels (the
    population variance, ``ddof = 0``). Smaller means smoother.

    Parameters
    ----------
    flux : ndarray, shape (n_fibers, n) or (n,)
    mask : ndarray of bool or uint32, optional

    Returns
    -------
    ndarray, shape (n_fibers,)
        NaN where a fiber has no usable pixel.
    """
    f, one_d = _prepare(flux, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        v = np.nanvar(f, axis=1, ddof=0)
    return _out(v, one_d)


def running_nanmedian(f: np.ndarray, width: int) -> np.ndarray:
    """Centred running median along the last axis ignoring NaN; the window shrinks at the
    ends (NaN padding). NaN where a window holds no finite value."""
    half = int(width) // 2
    pad = np.pad(f, ((0, 0), (half, half)), constant_values=np.nan)
    # each window sorted (NaN last), its median picked from its finite count: the same values as
    # np.nanmedian over the windows (which goes through masked arrays, ~4x slower)
    windows = np.sort(sliding_window_view(pad, 2 * half + 1, axis=1), axis=-1)
    count = np.count_nonzero(np.isfinite(windows), axis=-1)
    low = np.take_along_axis(windows, np.maximum((count - 1) // 2, 0)[..., None], axis=-1)[..., 0]
    high = np.take_along_axis(windows, (count // 2)[..., None], axis=-1)[..., 0]
    with np.errstate(invalid="ignore"):
        median = np.where(count % 2 == 1, low, (low + high) / 2)
    return np.where(count > 0, median, np.nan)


def snr_eq15(flux: np.ndarray, mask: np.ndarray | None = None, *, width: int = 11,
             pixel_range: tuple[int, int] | None = None) -> np.ndarray:
    """Signal-to-noise ratio of seed 000 eq. 15 (Qin et al. 2009).

    How the garbled equation is read: the extracted text is
    ``SNR = (1/N) sum_{i=0}^{N-1} (F_M^i / F_i - F_M^i)`` with ``F_i`` the flux of pixel i,
    ``F_M^i`` the continuum there (an 11-pixel median filter) and N the number of selected
    pixels. Read literally per pixel as ``mean_i F_M^i / |F_i - F_M^i|`` it is not defined:
    the median of an odd window *is* one of its samples, so ``F_i == F_M^i`` at about one
    pixel in ``width`` and the sum diverges (its expectation is infinite even without ties).
    The most faithful well-defined reading keeps the same two sums, continuum over deviation,
    as a ratio of means::

        SNR = sum_i F_M^i / sum_i |F_i - F_M^i|  =  mean(F_M) / mean(|F - F_M|)

    For white Gaussian noise ``mean|F - F_M|`` is only about 0.74 sigma (the pixel is in its
    own median window, so the continuum follows it), so this SNR is about 1.35 times
    ``mean / sigma`` (measured in the tests; not corrected here, to keep the paper's
    definition). Use :func:`der_snr` for a calibrated figure.

    Parameters
    ----------
    flux : ndarray, shape (n_fibers, n) or (n,)
    mask : ndarray of bool or uint32, optional
        Excluded pixels neither enter the median windows nor the sums.
    width : int
        Median-filter width (pixels); the paper uses 11. Windows shrink at the ends.
    pixel_range : (int, int), optional
        Pixels ``[start, stop)`` that enter the sums (the paper uses the first ~500 pixels,
        where sky lines are few); the continuum is always computed on the full spectrum.

    Returns
    -------
    ndarray, shape (n_fibers,)
        NaN where no usable pixel is selected or every deviation is 0.
    """
    f, one_d = _prepare(flux, mask)
    cont = running_nanmedian(f, width)
    if pixel_range is not None:
        a, b = pixel_range
        f, cont = f[:, a:b], cont[:, a:b]
    use = np.isfinite(f) & np.isfinite(cont)
    num = np.where(use, cont, 0.0).sum(axis=1)
    den = np.where(use, np.abs(f - cont), 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where((den > 0) & use.any(axis=1), num / den, np.nan)
    return _out(snr, one_d)


def der_snr(flux: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """DER_SNR of Stoehr et al. (2008), per fiber, ignoring masked pixels.

    ``signal = median(F)``, ``noise = 1.482602 / sqrt(6) * median(|2 F_i - F_{i-2} - F_{i+2}|)``,
    computed, as in the reference implementation, on the spectrum with excluded pixels
    removed (the reference drops zero fluxes; here masked and non-finite pixels are dropped
    and a zero flux is kept as a value).

    Parameters
    ----------
    flux : ndarray, shape (n_fibers, n) or (n,)
    mask : ndarray of bool or uint32, optional

    Returns
    -------
    ndarray, shape (n_fibers,)
        NaN where fewer than 5 usable pixels remain or the noise is 0.
    """
    f, one_d = _prepare(flux, mask)
    c, n = _compress(f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        signal = np.nanmedian(c, axis=1)
        if c.shape[1] > 4:
            d = np.abs(2.0 * c[:, 2:-2] - c[:, :-4] - c[:, 4:])
        else:
            d = np.full((c.shape[0], 1), np.nan)
        noise = DER_SNR_NOISE * np.nanmedian(d, axis=1)
        snr = np.where((n > 4) & (noise > 0), signal / noise, np.nan)
    return _out(snr, one_d)
