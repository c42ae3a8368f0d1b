"""2D fiber stripes for DRC-Net (seed 003): 11 pixels across each trace over the wavelength window.

The paper cuts, from each arm's CCD frame, a stripe of 11 pixels centred on the fiber's trace
(the brightest, least contaminated part of the cross-dispersion profile) over rows 500-3500 of
4096 (the wavelength window that holds a star's features; the ends are mostly noise), and
z-scores each stripe. Here:

* the window scales with the frame's rows (:func:`stripe_window`: ``mini``'s 1024 rows give
  rows 125-875);
* a stripe follows the trace row by row (the column of pixel ``k`` at row ``y`` is
  ``round(x(y)) + k - 5``), so it is the same cut on a raw or a rectified frame;
* cosmic-ray, saturated and otherwise bad pixels (``ivar == 0`` or a fatal mask bit) are masked:
  they take the value 0 after the z-score (the stripe's mean), and do not enter its mean and
  standard deviation;
* :func:`aperture_spectra` sums a stripe across (the paper's aperture extraction), giving the 1D
  spectrum that RC-Net and the template fit see, from the same pixels.

Pure functions: arrays in, arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STRIPE_HALF = 5
"""Half width (px) of a stripe: 2 * 5 + 1 = 11 pixels across the trace."""
PAPER_ROWS = (500, 3500, 4096)
"""The paper's wavelength window: rows 500-3500 of a 4096-row frame."""
MIN_GOOD_FRACTION = 0.5
"""A stripe with fewer good pixels than this is unusable (dead fiber, masked, off the CCD)."""


def stripe_window(ny: int) -> tuple[int, int]:
    """Rows ``[r0, r1)`` of the paper's window scaled to a frame of ``ny`` rows."""
    lo, hi, full = PAPER_ROWS
    return int(round(ny * lo / full)), int(round(ny * hi / full))


@dataclass
class Stripes:
    """The stripes of a frame's fibers.

    Attributes
    ----------
    pixels : ndarray of float32, shape (n_fibers, 11, n_rows)
        Electrons (spatial offset from the trace, then wavelength row); 0 where not good.
    ivar : ndarray of float32, same shape
        Inverse variance; 0 where not good.
    good : ndarray of bool, same shape
    rows : tuple of int
        The window ``[r0, r1)`` of CCD rows.
    """

    pixels: np.ndarray
    ivar: np.ndarray
    good: np.ndarray
    rows: tuple[int, int]

    @property
    def good_fraction(self) -> np.ndarray:
        """Fraction of good pixels of each stripe, shape ``(n_fibers,)``."""
        return self.good.reshape(self.good.shape[0], -1).mean(axis=1)


def cut_stripes(image: np.ndarray, ivar: np.ndarray, bad: np.ndarray, trace_x: np.ndarray,
                rows: tuple[int, int] | None = None, half: int = STRIPE_HALF) -> Stripes:
    """Cut an 11-pixel stripe around every trace.

    Parameters
    ----------
    image, ivar : ndarray, shape (ny, nx)
        Corrected frame (electrons) and its inverse variance.
    bad : ndarray of bool, shape (ny, nx)
        Pixels not to use (cosmic rays, saturation, bad columns, ...).
    trace_x : ndarray, shape (n_fibers, ny)
        Trace column at each row.
    rows : (int, int), optional
        Window ``[r0, r1)``; default :func:`stripe_window`.
    half : int
        Half width of the stripe.

    Returns
    -------
    Stripes
    """
    ny, nx = image.shape
    r0, r1 = rows if rows is not None else stripe_window(ny)
    trace_x = np.asarray(trace_x, dtype=float)
    centre = np.rint(trace_x[:, r0:r1])                                   # (n, w)
    finite = np.isfinite(centre)
    centre = np.where(finite, centre, -10 * nx).astype(np.int64)
    offsets = np.arange(-half, half + 1)
    cols = centre[:, None, :] + offsets[None, :, None]                    # (n, 11, w)
    inside = (cols >= 0) & (cols < nx) & finite[:, None, :]
    cols = np.clip(cols, 0, nx - 1)
    row_idx = np.broadcast_to(np.arange(r0, r1)[None, None, :], cols.shape)
    pix = np.asarray(image, dtype=np.float32)[row_idx, cols]
    iv = np.asarray(ivar, dtype=np.float32)[row_idx, cols]
    good = inside & ~np.asarray(bad, bool)[row_idx, cols] & (iv > 0) & np.isfinite(pix)
    return Stripes(pixels=np.where(good, pix, 0.0).astype(np.float32), ivar=np.where(good, iv, 0.0).astype(np.float32),
                   good=good, rows=(r0, r1))


def zscore_stripes(pixels: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score each stripe over its good pixels (the paper's Eq. 1); bad pixels become 0.

    Parameters
    ----------
    pixels, good : ndarray, shape (n, ...)

    Returns
    -------
    z : ndarray of float32, shape of ``pixels``
    usable : ndarray of bool, shape (n,)
        At least :data:`MIN_GOOD_FRACTION` good pixels and a non-zero spread.
    """
    n = pixels.shape[0]
    flat = pixels.reshape(n, -1).astype(np.float64)
    g = good.reshape(n, -1)
    count = g.sum(axis=1)
    mean = np.where(count > 0, (flat * g).sum(axis=1) / np.maximum(count, 1), 0.0)
    var = np.where(count > 1, (((flat - mean[:, None]) * g) ** 2).sum(axis=1) / np.maximum(count - 1, 1), 0.0)
    std = np.sqrt(var)
    usable = (count >= MIN_GOOD_FRACTION * g.shape[1]) & (std > 0) & np.isfinite(std)
    z = np.where(g & usable[:, None], (flat - mean[:, None]) / np.where(std > 0, std, 1.0)[:, None], 0.0)
    return z.reshape(pixels.shape).astype(np.float32), usable


def aperture_spectra(stripes: Stripes) -> tuple[np.ndarray, np.ndarray]:
    """Aperture extraction of the stripes: the sum across the 11 pixels, per row.

    Rows with some bad pixels are scaled up by ``11 / n_good`` (the missing pixels take the
    row's mean, a rough profile correction); rows with fewer than half their pixels good get
    ``ivar = 0``.

    Returns
    -------
    flux, ivar : ndarray of float32, shape (n_fibers, n_rows)
    """
    width = stripes.pixels.shape[1]
    n_good = stripes.good.sum(axis=1)
    scale = width / np.maximum(n_good, 1)
    flux = stripes.pixels.sum(axis=1) * scale
    with np.errstate(divide="ignore"):
        var = np.where(stripes.good, 1.0 / np.where(stripes.ivar > 0, stripes.ivar, 1.0), 0.0).sum(axis=1) * scale ** 2
    ok = n_good >= (width + 1) // 2
    ivar = np.where(ok & (var > 0), 1.0 / np.where(var > 0, var, 1.0), 0.0)
    return np.where(ok, flux, 0.0).astype(np.float32), ivar.astype(np.float32)


def median_snr(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """Median S/N per pixel of spectra over their rows with ``ivar > 0`` (0 when none)."""
    snr = np.where(ivar > 0, flux * np.sqrt(np.maximum(ivar, 0.0)), np.nan)
    has = np.isfinite(snr).any(axis=1)
    out = np.zeros(flux.shape[0], dtype=np.float32)
    if has.any():
        out[has] = np.nanmedian(snr[has], axis=1)
    return out


def zscore_spectra(flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score 1D spectra over their good rows (``ivar > 0``); bad rows become 0."""
    return zscore_stripes(flux, ivar > 0)


@dataclass
class ArmInputs:
    """What the classifiers take from one arm of an exposure, per fiber.

    Attributes
    ----------
    stripes : ndarray of float32, shape (n_fibers, 11, w)
        Z-scored stripes (DRC-Net's input); 0 at masked pixels.
    usable : ndarray of bool, shape (n_fibers,)
        The stripe has enough good pixels and a spread (else: dead, masked or off the CCD).
    flux, ivar : ndarray of float32, shape (n_fibers, w)
        Aperture spectra minus the median of the sky fibers' (RC-Net's and the template fit's input).
    snr : ndarray of float32, shape (n_fibers,)
        Median S/N per row of the sky-subtracted aperture spectrum.
    """

    stripes: np.ndarray
    usable: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    snr: np.ndarray


def arm_inputs(image: np.ndarray, ivar: np.ndarray, bad: np.ndarray, trace_x: np.ndarray,
               sky_fibers: np.ndarray, dead: np.ndarray | None = None) -> ArmInputs:
    """Stripes, their z-scores and sky-subtracted aperture spectra of every fiber of one arm.

    Parameters
    ----------
    image, ivar : ndarray, shape (ny, nx)
        Corrected frame (electrons).
    bad : ndarray of bool, shape (ny, nx)
        Masked pixels (cosmic rays, saturation, ...).
    trace_x : ndarray, shape (n_fibers, ny)
    sky_fibers : ndarray of bool, shape (n_fibers,)
    dead : ndarray of bool, shape (n_fibers,), optional
        Dead fibers: never usable.
    """
    stripes = cut_stripes(image, ivar, bad, trace_x)
    z, usable = zscore_stripes(stripes.pixels, stripes.good)
    if dead is not None:
        usable &= ~np.asarray(dead, bool)
    flux, fivar = aperture_spectra(stripes)
    sky = np.asarray(sky_fibers, bool) & usable
    if sky.sum() >= 1:
        masked = np.where(fivar[sky] > 0, flux[sky], np.nan)
        sky_flux = np.nan_to_num(np.nanmedian(masked, axis=0)) if np.isfinite(masked).any() else 0.0
        flux = flux - sky_flux
    return ArmInputs(stripes=z, usable=usable, flux=flux.astype(np.float32), ivar=fivar, snr=median_snr(flux, fivar))
