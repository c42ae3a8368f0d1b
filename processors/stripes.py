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
* the sky is subtracted from every stripe before the z-score (:func:`sky_stripes`): the SKY
  fibers' median aperture spectrum spread across the 11 pixels by the fiber's own cross-dispersion
  profile (measured from the fiber's light in bins of the trace's sub-pixel phase). Without it a
  faint star's z-scored stripe is mostly sky (continuum and lines), a picture the network never
  saw on the bright training stars;
* :func:`aperture_spectra` sums a stripe across (the paper's aperture extraction), giving the 1D
  spectrum that RC-Net and the template fit see, from the same (sky-subtracted) pixels;
* :func:`degrade` makes a bright star fainter (training augmentation): the star's signal scaled by
  ``f`` plus the noise that the frame's variance model (read noise + Poisson) gives the fainter
  star on the same sky;
* :func:`optimal_extraction_gain` measures what a stripe carries beyond its aperture sum: the S/N
  of a profile-weighted extraction over the sum's.

Pure functions: arrays in, arrays out.
"""

from __future__ import annotations

import warnings
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
    phase : ndarray of float32, shape (n_fibers, n_rows), optional
        Sub-pixel position of the trace in its central pixel, ``x - round(x)`` (in [-0.5, 0.5]).
    """

    pixels: np.ndarray
    ivar: np.ndarray
    good: np.ndarray
    rows: tuple[int, int]
    phase: np.ndarray | None = None

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
    phase = np.where(finite, trace_x[:, r0:r1] - np.where(finite, centre, 0.0), 0.0).astype(np.float32)
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
                   good=good, rows=(r0, r1), phase=phase)


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


N_PHASE_BINS = 4
"""Bins of the trace's sub-pixel phase in which a fiber's cross-dispersion profile is measured."""


def fiber_profiles(stripes: Stripes, n_bins: int = N_PHASE_BINS) -> np.ndarray:
    """Each fiber's normalised cross-dispersion profile over the stripe, per row.

    The profile is measured from the fiber's own light (star and sky share the fiber's PSF):
    in each of ``n_bins`` bins of the trace's sub-pixel phase, the summed good pixels of each
    of the 11 columns divided by the summed (gap-corrected) aperture flux of the same rows,
    clipped at 0 and normalised to sum 1. A bin without light takes the fiber's mean profile;
    a fiber without light a flat one.

    Returns
    -------
    ndarray of float32, shape (n_fibers, 11, n_rows)
        Fraction of the aperture's light in each pixel at each row (sums to 1 over the 11 pixels).
    """
    n, width, w = stripes.pixels.shape
    phase = stripes.phase if stripes.phase is not None else np.zeros((n, w), np.float32)
    bins = np.clip(((phase + 0.5) * n_bins).astype(np.int64), 0, n_bins - 1)          # (n, w)
    good = stripes.good
    pix = np.where(good, stripes.pixels, 0.0).astype(np.float64)
    n_good = good.sum(axis=1)
    row_total = pix.sum(axis=1) * (width / np.maximum(n_good, 1))                       # (n, w)
    flat = np.full(width, 1.0 / width)
    mean_num = pix.sum(axis=2)                                                          # (n, 11)
    mean_den = (good * row_total[:, None, :]).sum(axis=2)
    mean_prof = _normalise(np.where(mean_den > 0, mean_num / np.where(mean_den > 0, mean_den, 1.0), 0.0), flat)
    out = np.empty((n, width, w), np.float32)
    for b in range(n_bins):
        sel = bins == b                                                                 # (n, w)
        num = (pix * sel[:, None, :]).sum(axis=2)
        den = (good * (row_total * sel)[:, None, :]).sum(axis=2)
        prof = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
        prof = _normalise(prof, mean_prof)
        out[:] = np.where(sel[:, None, :], prof[:, :, None], out)
    return out


def _normalise(profile: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Profiles ``(n, 11)`` clipped at 0 and scaled to sum 1; rows without light take ``fallback``."""
    profile = np.clip(np.nan_to_num(profile), 0.0, None)
    total = profile.sum(axis=1, keepdims=True)
    fallback = np.broadcast_to(fallback, profile.shape)
    return np.where(total > 0, profile / np.where(total > 0, total, 1.0), fallback)


def sky_stripes(stripes: Stripes, sky_spectrum: np.ndarray) -> np.ndarray:
    """The sky's part of every stripe: the sky's aperture spectrum times the fiber's profile.

    Parameters
    ----------
    stripes : Stripes
    sky_spectrum : ndarray, shape (n_rows,)
        Sky aperture spectrum (e.g. the median of the SKY fibers' aperture spectra).

    Returns
    -------
    ndarray of float32, shape (n_fibers, 11, n_rows)
    """
    return (fiber_profiles(stripes) * np.asarray(sky_spectrum, np.float32)[None, None, :]).astype(np.float32)


def degrade(signal: np.ndarray, var: np.ndarray, background_var: np.ndarray, good: np.ndarray, factor: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A star made ``factor`` times fainter on the same sky and detector (training augmentation).

    With ``var = star + B`` (the frame's model: Poisson + read noise; ``B`` = sky + read noise),
    ``factor * signal`` has variance ``factor^2 var``; adding Gaussian noise of variance
    ``var (f - f^2) + B (1 - f)`` gives ``f star + B``, the variance of the fainter star.

    Parameters
    ----------
    signal : ndarray, shape (n, ...)
        Sky-subtracted pixels (electrons).
    var, background_var : ndarray, same shape
        The pixels' variance and the variance they would have without the star.
    good : ndarray of bool, same shape
    factor : ndarray, shape (n,)
        Flux scale, in (0, 1].

    Returns
    -------
    signal, var : ndarray of float32
        The fainter star's pixels (0 where not good) and their variance.
    """
    f = np.clip(np.asarray(factor, np.float64), 1e-4, 1.0).reshape((-1,) + (1,) * (signal.ndim - 1))
    var = np.maximum(np.asarray(var, np.float64), 0.0)
    bkg = np.clip(np.asarray(background_var, np.float64), 0.0, None)
    extra = np.maximum(var * (f - f * f) + bkg * (1.0 - f), 0.0)
    out = f * signal + rng.standard_normal(signal.shape) * np.sqrt(extra)
    new_var = np.maximum(f * (var - bkg), 0.0) + bkg
    return np.where(good, out, 0.0).astype(np.float32), np.where(good, new_var, 0.0).astype(np.float32)


def optimal_extraction_gain(signal: np.ndarray, noise_var: np.ndarray, good: np.ndarray) -> np.ndarray:
    """S/N of a profile-weighted (optimal) extraction over the aperture sum, per stripe: what a stripe can carry
    beyond its aperture spectrum at a given noise.

    With the fiber's cross profile ``p`` (the stripe's summed signal over wavelength, clipped at 0,
    normalised) and per-pixel noise variance ``v`` (median over wavelength), the optimal
    extraction's S/N is ``sqrt(sum p^2 / v)`` per unit flux and the aperture sum's
    ``1 / sqrt(sum v)``; their ratio is >= 1 (equal for a flat profile or noise-free wings).
    ``noise_var = background`` gives the faint (background-limited) limit, ``noise_var = var``
    the star's own brightness.

    Parameters
    ----------
    signal, noise_var : ndarray, shape (n, rows, w)
        Sky-subtracted stripes (electrons) and the variance to weigh by.
    good : ndarray of bool, same shape

    Returns
    -------
    ndarray, shape (n,)
        The gain (NaN for a stripe without light or without good pixels).
    """
    sig = np.where(good, np.asarray(signal, np.float64), 0.0)
    prof = np.clip(sig.sum(axis=2), 0.0, None)
    total = prof.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)                  # all-NaN pixels of a dead stripe
        prof = np.where(total > 0, prof / np.where(total > 0, total, 1.0), np.nan)
        v = np.nanmedian(np.where(good, np.asarray(noise_var, np.float64), np.nan), axis=2)
        v = np.where(v > 0, v, np.nan)
        gain = np.sqrt(np.nansum(prof ** 2 / v, axis=1) * np.nansum(v, axis=1))
    ok = np.isfinite(prof).all(axis=1) & np.isfinite(v).all(axis=1)
    return np.where(ok, gain, np.nan)


def factor_for_snr(star: np.ndarray, background: np.ndarray, snr: np.ndarray) -> np.ndarray:
    """Flux scale that brings a star of aperture signal ``star`` on ``background`` (variance) to ``snr``.

    Solves ``f star / sqrt(f star + B) = snr``: ``f = (s^2 + s sqrt(s^2 + 4 B)) / (2 star)``; in (0, 1].
    """
    star = np.maximum(np.asarray(star, np.float64), 1e-9)
    s = np.asarray(snr, np.float64)
    b = np.maximum(np.asarray(background, np.float64), 0.0)
    return np.clip((s * s + s * np.sqrt(s * s + 4.0 * b)) / (2.0 * star), 1e-4, 1.0)


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
    signal, var, background_var : ndarray of float32, shape (n_fibers, 11, w), optional
        Sky-subtracted stripe (electrons, 0 where not good), its variance, and the variance
        without the star (sky + read noise): what :func:`degrade` needs (training data).
    good : ndarray of bool, shape (n_fibers, 11, w), optional
    """

    stripes: np.ndarray
    usable: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    snr: np.ndarray
    signal: np.ndarray | None = None
    var: np.ndarray | None = None
    background_var: np.ndarray | None = None
    good: np.ndarray | None = None


def arm_inputs(image: np.ndarray, ivar: np.ndarray, bad: np.ndarray, trace_x: np.ndarray,
               sky_fibers: np.ndarray, dead: np.ndarray | None = None) -> ArmInputs:
    """Sky-subtracted stripes, their z-scores and aperture spectra of every fiber of one arm.

    The sky (median aperture spectrum of the usable SKY fibers, spread across each stripe by
    the fiber's profile, :func:`sky_stripes`) is subtracted from the stripes; the aperture
    spectra are sums of the sky-subtracted stripes. Without usable sky fibers nothing is
    subtracted.

    Parameters
    ----------
    image, ivar : ndarray, shape (ny, nx)
        Corrected frame (electrons); ``ivar = 1 / (read_noise^2 + max(image, 0))``.
    bad : ndarray of bool, shape (ny, nx)
        Masked pixels (cosmic rays, saturation, ...).
    trace_x : ndarray, shape (n_fibers, ny)
    sky_fibers : ndarray of bool, shape (n_fibers,)
    dead : ndarray of bool, shape (n_fibers,), optional
        Dead fibers: never usable.
    """
    stripes = cut_stripes(image, ivar, bad, trace_x)
    _, usable = zscore_stripes(stripes.pixels, stripes.good)
    if dead is not None:
        usable &= ~np.asarray(dead, bool)
    raw_flux, fivar = aperture_spectra(stripes)
    sky = np.asarray(sky_fibers, bool) & usable
    sky_flux = np.zeros(raw_flux.shape[1], np.float32)
    if sky.sum() >= 1:
        masked = np.where(fivar[sky] > 0, raw_flux[sky], np.nan)
        if np.isfinite(masked).any():
            with np.errstate(all="ignore"):
                sky_flux = np.nan_to_num(np.nanmedian(masked, axis=0)).astype(np.float32)
    sky_model = sky_stripes(stripes, sky_flux)
    good = stripes.good
    signal = np.where(good, stripes.pixels - sky_model, 0.0).astype(np.float32)
    var = np.where(good, 1.0 / np.where(stripes.ivar > 0, stripes.ivar, 1.0), 0.0).astype(np.float32)
    # read noise^2 = var - max(pixel, 0) in the frame's variance model; plus the sky's Poisson part
    background_var = np.where(good, var - np.maximum(stripes.pixels, 0.0) + np.maximum(sky_model, 0.0),
                              0.0).astype(np.float32)
    z, usable_z = zscore_stripes(signal, good)
    usable &= usable_z
    sub = Stripes(pixels=signal, ivar=stripes.ivar, good=good, rows=stripes.rows, phase=stripes.phase)
    flux, fivar = aperture_spectra(sub)
    return ArmInputs(stripes=z, usable=usable, flux=flux, ivar=fivar, snr=median_snr(flux, fivar),
                     signal=signal, var=var, background_var=background_var, good=good)


def stripe_inputs(signal: np.ndarray, var: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The networks' inputs of sky-subtracted stripes: z-scored stripes and aperture spectra.

    Returns
    -------
    z : ndarray of float32, shape (n, 11, w)
    flux, ivar : ndarray of float32, shape (n, w)
    """
    z, _ = zscore_stripes(signal, good)
    ivar = np.where(good & (var > 0), 1.0 / np.where(var > 0, var, 1.0), 0.0).astype(np.float32)
    flux, fivar = aperture_spectra(Stripes(pixels=signal, ivar=ivar, good=good, rows=(0, signal.shape[2])))
    return z, flux, fivar
