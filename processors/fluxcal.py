"""Flux calibration from the standard stars of an exposure (pure: arrays in, arrays out).

For one exposure and spectrograph (desispec's ``fluxcalibration`` and PypeIt's ``sensfunc`` are
the anchors):

1. :func:`fit_standard` fits every standard star with the model spectra of
   :mod:`fiberlake.processors.stellar_models` (Teff, log g, [Fe/H], radial velocity), each
   camera's continuum left free as a Legendre multiplier (it holds the unknown response), the
   telluric bands masked. The spectrum's free continuum leaves the temperature to the lines, which
   independent models do not reproduce exactly, so the fiber map's blue and red catalogue
   magnitudes add a photometric chi^2 on the model's synthetic colours (g - r, r - i, each with
   ``colour_error``), as DESI fits its standards with their g, r, z photometry, and a weak prior
   holds log g and [Fe/H] (which the spectrum then barely constrains) near an F dwarf's. The
   best model is scaled to the star's catalogue magnitude (a photon-counting AB magnitude through
   a top-hat band, :class:`FluxCalParams`'s ``band_*``), so it is an absolute flux in
   erg s^-1 cm^-2 A^-1.
2. :func:`fit_response` divides each standard's counts per second by its model (at the
   instrument's resolution) and fits one cubic B-spline to all standards of a camera together
   (telluric bands and the cores of strong stellar lines masked, standards whose grey offset
   departs from the others rejected, pixels sigma-clipped); the spline's covariance gives the
   response's uncertainty. :func:`~fiberlake.processors.telluric.telluric_from_ratios` gives the
   transmission inside the telluric bands.
3. :func:`apply_calibration` divides any fiber's counts by ``exptime * response * telluric`` and
   propagates the inverse variance, the response's and telluric's uncertainty included.

An exposure with fewer good standards than ``min_standards`` is calibrated with the night's mean
response (:func:`mean_calibration`) and its spectra carry ``FLUXFALLBACK``.

Units: counts are electrons per Angstrom (the ``spectra`` table); the response is electrons per
second per (erg s^-1 cm^-2 A^-1), i.e. e- cm^2 A / erg; calibrated flux is erg s^-1 cm^-2 A^-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.polynomial import legendre
from scipy.interpolate import BSpline
from scipy.optimize import minimize, minimize_scalar

from fiberlake.processors import stellar_models as sm
from fiberlake.processors.telluric import band_mask, telluric_from_ratios
from fiberlake.schemas.containers import Spectra1D
from fiberlake.schemas.maskbits import FATAL, MASK_DTYPE, Mask

H_ERG_S = 6.62607015e-27
C_ANGSTROM_S = 2.99792458e18
HC_ERG_ANGSTROM = H_ERG_S * C_ANGSTROM_S

STRONG_LINES = (3933.7, 3968.5, 3970.1, 4101.7, 4340.5, 4861.3, 5172.7, 5183.6, 5892.9, 6562.8,
                8498.0, 8542.1, 8662.1)
"""Air wavelengths (A) of the strong stellar lines whose cores are masked in the response fit."""


@dataclass(frozen=True)
class FluxCalSettings:
    """What the flux calibration needs from :class:`~fiberlake.processors.params.FluxCalParams`
    (kept here so that this module depends on nothing above ``schemas``)."""

    min_standards: int = 2
    max_standards: int = 8
    cont_deg: int = 5
    model_error: float = 0.02
    knot_spacing: float = 40.0
    clip_sigma: float = 4.0
    star_clip: float = 0.1
    line_mask: float = 10.0
    band_min: float = 5600.0
    band_max: float = 6900.0
    telluric_flag: float = 0.95
    max_chi2: float = 50.0
    g_band_min: float = 4000.0
    g_band_max: float = 5500.0
    i_band_min: float = 7000.0
    i_band_max: float = 8500.0
    colour_error: float = 0.02
    spectrum_weight: float = 0.33
    logg_prior: float = 4.2
    logg_prior_sigma: float = 0.5
    feh_prior: float = -0.5
    feh_prior_sigma: float = 1.0

    @property
    def bands(self) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
        """The blue, catalogue (r) and red top hats (A)."""
        return ((self.g_band_min, self.g_band_max), (self.band_min, self.band_max),
                (self.i_band_min, self.i_band_max))


@dataclass
class Arm:
    """One camera's spectra of the exposure, on that camera's wavelength grid.

    Attributes
    ----------
    wave : ndarray, shape (nwave,)
        Bin centres (A, air).
    spectra : Spectra1D
        Counts (electrons per Angstrom, sky subtracted), one row per fiber.
    sigma_lsf : float
        Gaussian sigma (A) of the line-spread function.
    """

    wave: np.ndarray
    spectra: Spectra1D
    sigma_lsf: float


@dataclass
class StandardFit:
    """One standard star fitted with the model grid."""

    fiber: int
    labels: sm.StarLabels
    chi2: float
    """Reduced chi^2 of the fit (model error included)."""
    scale: float
    """Model units to erg s^-1 cm^-2 A^-1 (from the catalogue magnitude)."""
    models: dict[str, np.ndarray] = field(default_factory=dict)
    """Per camera: the absolute model flux on the camera's grid at its resolution."""
    ok: bool = True
    colours: np.ndarray | None = None
    """Catalogue colours ``(g - r, r - i)`` (NaN where a magnitude is missing); None without photometry."""
    model_colours: np.ndarray | None = None
    """The best model's synthetic colours ``(g - r, r - i)``."""


@dataclass
class CameraCalibration:
    """Response and telluric transmission of one camera (per second), on its wavelength grid."""

    response: np.ndarray
    response_ivar: np.ndarray
    telluric: np.ndarray
    telluric_ivar: np.ndarray
    n_used: int = 0


@dataclass
class ExposureCalibration:
    """Flux calibration of one exposure and spectrograph."""

    status: str
    """``ok`` (enough good standards), ``too_few`` (fewer than ``min_standards``)."""
    cameras: dict[str, CameraCalibration]
    fits: list[StandardFit]
    n_standards: int


# --------------------------------------------------------------------------- magnitudes
def band_scale(model_wave: np.ndarray, model_flux: np.ndarray, mag: float) -> float:
    """Factor making ``model_flux`` (f_lambda) a star of photon-counting AB magnitude ``mag`` in the band
    covered by ``model_wave`` (a top-hat filter)."""
    photons = model_flux * model_wave / HC_ERG_ANGSTROM
    ab = 10.0 ** (-0.4 * (mag + 48.6)) / (H_ERG_S * model_wave)
    mean = float(np.mean(photons))
    return float(np.mean(ab) / mean) if mean > 0 else 0.0


# --------------------------------------------------------------------------- stellar fit
def _fit_mask(arm: Arm, fiber: int) -> np.ndarray:
    s = arm.spectra
    return (s.ivar[fiber] > 0) & np.isfinite(s.flux[fiber]) & ~band_mask(arm.wave)


def _chi2(labels: sm.StarLabels, arms: dict[str, Arm], fiber: int, settings: FluxCalSettings) -> tuple[float, int]:
    """Chi^2 of the star against a model with a free Legendre continuum per camera (solved linearly)."""
    total, n = 0.0, 0
    for arm in arms.values():
        good = _fit_mask(arm, fiber)
        if good.sum() < 3 * (settings.cont_deg + 1):
            continue
        wave = arm.wave[good]
        data = arm.spectra.flux[fiber][good].astype(float)
        model = sm.model_spectrum(arm.wave, labels, arm.sigma_lsf)[good]
        x = 2.0 * (wave - arm.wave[0]) / (arm.wave[-1] - arm.wave[0]) - 1.0
        basis = legendre.legvander(x, settings.cont_deg) * model[:, None]
        var = 1.0 / arm.spectra.ivar[fiber][good] + (settings.model_error * np.abs(data)) ** 2
        w = 1.0 / np.sqrt(var)
        coef, *_ = np.linalg.lstsq(basis * w[:, None], data * w, rcond=None)
        total += float(np.sum(((data - basis @ coef) * w) ** 2))
        n += good.sum() - settings.cont_deg - 1
    return total, n


def catalogue_colours(mag: float, mag_g: float | None, mag_i: float | None) -> np.ndarray:
    """``(g - r, r - i)`` from the fiber map's magnitudes; NaN where one is missing or not finite."""
    def ok(m: float | None) -> bool:
        return m is not None and bool(np.isfinite(m)) and abs(float(m)) < 90.0

    return np.array([float(mag_g) - mag if ok(mag_g) and ok(mag) else np.nan,
                     mag - float(mag_i) if ok(mag_i) and ok(mag) else np.nan])


def model_colours(labels: sm.StarLabels, settings: FluxCalSettings) -> np.ndarray:
    """The model's synthetic ``(g - r, r - i)`` through the settings' top hats (photon-counting AB)."""
    g, r, i = sm.band_magnitudes(labels, settings.bands)
    return np.array([g - r, r - i])


def _colour_chi2(labels: sm.StarLabels, colours: np.ndarray | None, settings: FluxCalSettings) -> float:
    if colours is None or not np.any(np.isfinite(colours)):
        return 0.0
    have = np.isfinite(colours)
    diff = (model_colours(labels, settings) - colours)[have]
    return float(np.sum((diff / settings.colour_error) ** 2))


def _prior_chi2(labels: sm.StarLabels, settings: FluxCalSettings) -> float:
    return float(((labels.logg - settings.logg_prior) / settings.logg_prior_sigma) ** 2
                 + ((labels.feh - settings.feh_prior) / settings.feh_prior_sigma) ** 2)


LABEL_BOUNDS = ((4500.0, 8500.0), (2.5, 5.5), (-2.5, 0.6))
"""Teff, log g and [Fe/H] ranges of the stellar fit."""


def fit_standard(arms: dict[str, Arm], fiber: int, mag: float, settings: FluxCalSettings,
                 colours: np.ndarray | None = None) -> StandardFit:
    """Fit one standard star: radial velocity, then Teff and [Fe/H] on a grid, then all labels.

    The cost is ``spectrum_weight`` times the spectrum's reduced chi^2 (each camera's continuum
    free), plus the chi^2 of the model's synthetic colours against the catalogue's
    (``colour_error`` each, when the star has them), plus a weak Gaussian prior on log g and [Fe/H]
    (``logg_prior``, ``feh_prior`` and their sigmas: an F dwarf). The spectrum's residuals against
    independent models are their line mismatch, correlated over the whole spectrum rather than
    independent per pixel, so its reduced chi^2 counts as a fraction of one measurement; alone it
    puts F stars ~1000 K too cool (the models' Balmer lines grow faster with Teff than the stars'),
    with log g at a bound. The colours hold the continuum's slope, which is what the response
    needs; the prior keeps log g and [Fe/H], which the spectrum then barely constrains, off the
    bounds.

    Parameters
    ----------
    arms : dict of str to Arm
        The exposure's cameras of this spectrograph.
    fiber : int
        The star's row in every arm's spectra.
    mag : float
        Its catalogue magnitude.
    settings : FluxCalSettings
    colours : ndarray, shape (2,), optional
        Its catalogue colours ``(g - r, r - i)`` (:func:`catalogue_colours`; NaN: not used).

    Returns
    -------
    StandardFit
        ``ok`` False when no camera had enough good pixels or the fit's chi^2 exceeds
        ``max_chi2``.
    """
    use_colours = colours is not None and bool(np.any(np.isfinite(colours)))

    def spectral(labels: sm.StarLabels) -> float:
        c, n = _chi2(labels, arms, fiber, settings)
        return c / max(n, 1) if n > 0 else np.inf

    def cost(labels: sm.StarLabels) -> float:
        value = settings.spectrum_weight * spectral(labels)
        if not np.isfinite(value):
            return value
        return value + _prior_chi2(labels, settings) + (_colour_chi2(labels, colours, settings) if use_colours else 0.0)

    start = sm.StarLabels(6500.0, 4.2, -0.5, 0.0)
    if not np.isfinite(spectral(start)):
        return StandardFit(fiber, start, np.inf, 0.0, ok=False, colours=colours)
    rvs = np.arange(-300.0, 301.0, 15.0)
    rv = float(rvs[int(np.argmin([spectral(sm.StarLabels(6500.0, 4.2, -0.5, v)) for v in rvs]))])
    grid = [(t, z) for t in np.arange(5400.0, 7801.0, 300.0) for z in (-1.5, -0.75, 0.0)]
    best = min(grid, key=lambda tz: cost(sm.StarLabels(tz[0], 4.2, tz[1], rv)))

    def f(p: np.ndarray) -> float:
        teff, logg, feh, v = p
        if not all(lo <= x <= hi for x, (lo, hi) in zip((teff, logg, feh), LABEL_BOUNDS)):
            return 1e30
        return cost(sm.StarLabels(float(teff), float(logg), float(feh), float(v)))

    res = minimize(f, np.array([best[0], 4.2, best[1], rv]), method="Nelder-Mead",
                   options={"maxfev": 120, "initial_simplex": np.array([
                       [best[0], 4.2, best[1], rv], [best[0] + 250.0, 4.2, best[1], rv],
                       [best[0], 4.6, best[1], rv], [best[0], 4.2, best[1] + 0.4, rv],
                       [best[0], 4.2, best[1], rv + 10.0]]), "xatol": 5.0, "fatol": 1e-3})
    teff, logg, feh, v = (float(x) for x in res.x)
    # the radial velocity enters the spectrum only, whose small weight stops the simplex early in it: polished alone
    polish = minimize_scalar(lambda x: spectral(sm.StarLabels(teff, logg, feh, float(x))), bounds=(v - 15.0, v + 15.0),
                             method="bounded", options={"xatol": 0.5})
    labels = sm.StarLabels(teff, logg, feh, v)
    chi2 = spectral(labels)
    if polish.fun < chi2:
        labels, chi2 = sm.StarLabels(teff, logg, feh, float(polish.x)), float(polish.fun)
    band = np.arange(settings.band_min, settings.band_max + 0.5, 1.0)
    scale = band_scale(band, sm.model_spectrum(band, labels, 1.0), mag)
    models = {cam: scale * sm.model_spectrum(arm.wave, labels, arm.sigma_lsf) for cam, arm in arms.items()}
    ok = bool(np.isfinite(chi2) and chi2 < settings.max_chi2 and scale > 0)
    return StandardFit(fiber, labels, chi2, scale, models, ok, colours=colours,
                       model_colours=model_colours(labels, settings) if use_colours else None)


# --------------------------------------------------------------------------- response
def _knots(wave: np.ndarray, spacing: float) -> np.ndarray:
    n_inner = max(int(np.floor((wave[-1] - wave[0]) / spacing)), 1)
    inner = np.linspace(wave[0], wave[-1], n_inner + 1)
    return np.concatenate([[wave[0]] * 3, inner, [wave[-1]] * 3])


def _spline_fit(wave: np.ndarray, x: np.ndarray, y: np.ndarray, w: np.ndarray,
                knots: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Weighted least-squares cubic B-spline; returns values and variances on ``wave`` and chi2/dof."""
    design = BSpline.design_matrix(x, knots, 3).toarray()
    a = design.T @ (design * w[:, None])
    b = design.T @ (y * w)
    ncoef = a.shape[0]
    a += np.eye(ncoef) * 1e-10 * np.trace(a) / ncoef
    cov = np.linalg.pinv(a)
    coef = cov @ b
    dof = max(x.size - ncoef, 1)
    rchi2 = float(np.sum(w * (y - design @ coef) ** 2) / dof)
    out = BSpline.design_matrix(wave, knots, 3).toarray()
    value = out @ coef
    var = np.einsum("ij,jk,ik->i", out, cov, out) * max(rchi2, 1.0)
    return value, var, rchi2


def fit_response(wave: np.ndarray, ratio: np.ndarray, ratio_ivar: np.ndarray,
                 settings: FluxCalSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smooth response of one camera from its standards' observed/model ratios.

    Parameters
    ----------
    wave : ndarray, shape (nwave,)
    ratio, ratio_ivar : ndarray, shape (n_stars, nwave)
        Counts per second over absolute model flux, and its inverse variance (0 where masked).
    settings : FluxCalSettings

    Returns
    -------
    response, response_ivar : ndarray, shape (nwave,)
    used : ndarray of bool, shape (n_stars,)
        Standards kept (not rejected for a deviant grey level).
    """
    n_stars = ratio.shape[0]
    fit_px = ~band_mask(wave)
    for line in STRONG_LINES:
        fit_px &= np.abs(wave - line) > settings.line_mask
    var_model = (settings.model_error * np.abs(ratio)) ** 2
    weights = np.where(ratio_ivar > 0, 1.0 / (1.0 / np.where(ratio_ivar > 0, ratio_ivar, 1.0) + var_model), 0.0)
    weights = weights * fit_px[None, :]
    used = weights.sum(axis=1) > 0
    knots = _knots(wave, settings.knot_spacing)
    response = np.zeros_like(wave)
    var = np.full_like(wave, np.inf)
    for _ in range(4):
        sel = used[:, None] & (weights > 0)
        if sel.sum() < 2 * (knots.size - 4):
            return np.zeros_like(wave), np.zeros_like(wave), np.zeros(n_stars, bool)
        star, px = np.nonzero(sel)
        response, var, _ = _spline_fit(wave, wave[px], ratio[star, px], weights[star, px], knots)
        good_resp = response > 0
        grey = np.array([np.median(ratio[i][sel[i] & good_resp] / response[sel[i] & good_resp])
                         if np.any(sel[i] & good_resp) else np.nan for i in range(n_stars)])
        ref = np.nanmedian(grey[used]) if used.any() else np.nan
        keep = used & np.isfinite(grey) & (np.abs(grey - ref) <= settings.star_clip * max(ref, 1e-30))
        resid = (ratio - response[None, :]) * np.sqrt(weights)
        clipped = sel & (np.abs(resid) > settings.clip_sigma)
        weights = np.where(clipped, 0.0, weights)
        if np.array_equal(keep, used) and not clipped.any():
            break
        used = keep
    ivar = np.where((response > 0) & np.isfinite(var) & (var > 0), 1.0 / np.where(var > 0, var, 1.0), 0.0)
    return np.where(response > 0, response, 0.0), ivar, used


def calibrate_exposure(arms: dict[str, Arm], std_fibers: np.ndarray, mags: np.ndarray, exptime: float,
                       settings: FluxCalSettings, *, mags_g: np.ndarray | None = None,
                       mags_i: np.ndarray | None = None) -> ExposureCalibration:
    """Response and telluric transmission of every camera of an exposure from its standards.

    Parameters
    ----------
    arms : dict of str to Arm
        The cameras present (a missing camera simply has no entry).
    std_fibers : ndarray of int
        Rows of the standard stars.
    mags : ndarray of float
        Their catalogue magnitudes.
    exptime : float
        Exposure time (s).
    settings : FluxCalSettings
    mags_g, mags_i : ndarray of float, optional
        Their blue and red catalogue magnitudes (NaN where a star has none): the colours of the
        stellar fit (:func:`fit_standard`).

    Returns
    -------
    ExposureCalibration
        ``status`` ``ok`` when at least ``min_standards`` standards were fitted and kept in
        every camera, else ``too_few`` (cameras then hold what could be measured, possibly
        nothing; the caller falls back to the night's mean).
    """
    std_fibers = np.asarray(std_fibers, dtype=int)
    mags = np.asarray(mags, dtype=float)
    mags_g, mags_i = (None if m is None else np.asarray(m, dtype=float) for m in (mags_g, mags_i))
    order = np.argsort(mags)[: settings.max_standards]

    def colours(i: int) -> np.ndarray | None:
        if mags_g is None and mags_i is None:
            return None
        pick = [None if m is None else m[i] for m in (mags_g, mags_i)]
        return catalogue_colours(float(mags[i]), *pick)

    fits = [fit_standard(arms, int(std_fibers[i]), float(mags[i]), settings, colours(i)) for i in order
            if np.isfinite(mags[i]) and mags[i] < 90.0]
    good = [f for f in fits if f.ok]
    cameras: dict[str, CameraCalibration] = {}
    n_min = len(good)
    for cam, arm in arms.items():
        if not good:
            n_min = 0
            break
        rows = np.array([f.fiber for f in good])
        model = np.stack([f.models[cam] for f in good])
        counts = arm.spectra.flux[rows].astype(float) / exptime
        civar = arm.spectra.ivar[rows].astype(float) * exptime**2
        civar = np.where((arm.spectra.mask[rows] & MASK_DTYPE(FATAL)) != 0, 0.0, civar)
        ok = (model > 0) & (civar > 0) & np.isfinite(counts)
        ratio = np.where(ok, counts / np.where(ok, model, 1.0), 0.0)
        rivar = np.where(ok, civar * model**2, 0.0)
        response, response_ivar, used = fit_response(arm.wave, ratio, rivar, settings)
        telluric, telluric_ivar = telluric_from_ratios(arm.wave, ratio[used], rivar[used], response)
        cameras[cam] = CameraCalibration(response, response_ivar, telluric, telluric_ivar, int(used.sum()))
        n_min = min(n_min, int(used.sum()) if np.any(response > 0) else 0)
    status = "ok" if n_min >= settings.min_standards and cameras else "too_few"
    return ExposureCalibration(status=status, cameras=cameras, fits=fits, n_standards=int(std_fibers.size))


def mean_calibration(cals: list[CameraCalibration]) -> CameraCalibration | None:
    """Inverse-variance mean of several exposures' calibrations of one camera (the night's mean).

    Returns None when no calibration has a positive response anywhere.
    """
    cals = [c for c in cals if np.any(c.response > 0)]
    if not cals:
        return None

    def wmean(values: list[np.ndarray], ivars: list[np.ndarray], default: float) -> tuple[np.ndarray, np.ndarray]:
        v, w = np.stack(values), np.stack(ivars)
        wsum = w.sum(axis=0)
        mean = np.where(wsum > 0, (v * w).sum(axis=0) / np.where(wsum > 0, wsum, 1.0), default)
        return mean, wsum

    response, rivar = wmean([c.response for c in cals], [c.response_ivar for c in cals], 0.0)
    telluric, tivar = wmean([c.telluric for c in cals], [c.telluric_ivar for c in cals], 1.0)
    return CameraCalibration(response, rivar, telluric, tivar, sum(c.n_used for c in cals))


def apply_calibration(spectra: Spectra1D, cal: CameraCalibration | None, exptime: float, *, fallback: bool,
                      settings: FluxCalSettings) -> Spectra1D:
    """Counts per Angstrom to erg s^-1 cm^-2 A^-1, with the inverse variance propagated.

    ``var(F) = var(c) / (t R T)^2 + F^2 (var(R) / R^2 + var(T) / T^2)``. Bins where the response
    is not positive get ivar 0; ``cal`` None (no response anywhere) gives flux 0, ivar 0 and
    ``NOFLUXCAL`` everywhere. ``fallback`` sets ``FLUXFALLBACK``; a telluric transmission below
    ``telluric_flag`` sets ``TELLURIC``.
    """
    flux = spectra.flux.astype(float)
    ivar = spectra.ivar.astype(float)
    mask = spectra.mask.copy()
    if cal is None or not np.any(cal.response > 0):
        mask |= MASK_DTYPE(Mask.NOFLUXCAL)
        return Spectra1D(np.zeros_like(flux), np.zeros_like(ivar), mask)
    denom = exptime * cal.response * cal.telluric
    good = (denom > 0) & np.isfinite(denom)
    safe = np.where(good, denom, 1.0)
    out = np.where(good[None, :], flux / safe[None, :], 0.0)
    rel = np.where(cal.response_ivar > 0, 1.0 / (np.where(cal.response_ivar > 0, cal.response_ivar, 1.0)
                                                 * np.where(cal.response > 0, cal.response, 1.0) ** 2), 0.0)
    rel = rel + np.where(cal.telluric_ivar > 0, 1.0 / (np.where(cal.telluric_ivar > 0, cal.telluric_ivar, 1.0)
                                                       * cal.telluric**2), 0.0)
    var = np.where(ivar > 0, 1.0 / np.where(ivar > 0, ivar, 1.0), np.inf) / safe[None, :] ** 2 + out**2 * rel[None, :]
    out_ivar = np.where((ivar > 0) & good[None, :] & np.isfinite(var), 1.0 / var, 0.0)
    mask[:, ~good] |= MASK_DTYPE(Mask.NOFLUXCAL)
    mask[:, cal.telluric < settings.telluric_flag] |= MASK_DTYPE(Mask.TELLURIC)
    if fallback:
        mask |= MASK_DTYPE(Mask.FLUXFALLBACK)
    out = np.where(np.isfinite(out), out, 0.0)
    return Spectra1D(out, out_ivar, mask)
