"""Joined, flux-calibrated 1D spectra straight from the simulator's models (no frames).

The denoiser (seed 004) trains on thousands of stars and on noise from repeated exposures; rendering
4096x4096 frames for them would take hours on two cores. This module draws the same stars
(:func:`~fiberlake.ingest.sim_spectra.draw_stellar_params` classes, :func:`stellar_spectra`
shapes) and the same noise sources as the frame simulator, but directly on the denoiser's grid:

* **truth**: the star's photon shape times ``hc / lambda`` (a flux density), averaged over each
  bin of the 2048-point linear grid over 4000-9000 A (:data:`DENOISE_GRID`), normalised to unit
  absolute flux sum (the paper's 2);
* **one exposure**: star and sky electrons per bin through the atmosphere (airmass), the arms'
  efficiency (the two arms' curves summed: the joined spectrum combines them by inverse variance),
  aperture and transparency losses; Poisson noise (Gaussian), read noise of the extraction
  aperture, a per-exposure sky-subtraction residual proportional to each sky line, and rare
  cosmic-ray residuals; then flux-calibrated by the true response, so ``exposure = truth + noise``
  in the truth's units. Several exposures of one star share the star and differ in conditions.

Everything is seeded: the same ``(seed, index)`` gives the same star and the same noise.
Subclasses (:data:`SUBCLASSES`) split the simulator's classes by temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fiberlake.ingest.sim_params import DEFAULT_PARAMS, SimParams
from fiberlake.ingest.sim_rng import TAG, rng_for
from fiberlake.ingest.sim_spectra import (FineGrid, SPECTRAL_CLASSES, atmosphere_transmission, efficiency,
                                          sky_continuum, sky_line_list, stellar_spectra)

DENOISE_WAVE_MIN, DENOISE_WAVE_MAX, DENOISE_NWAVE = 4000.0, 9000.0, 2048
"""The paper's grid: 2048 points, uniform over 4000-9000 A."""
DENOISE_GRID = np.linspace(DENOISE_WAVE_MIN, DENOISE_WAVE_MAX, DENOISE_NWAVE)
FINE_STEP = 0.5
"""Step (A) of the model spectra averaged into each 2.44 A bin."""


@dataclass(frozen=True)
class Subclass:
    """A temperature slice of one of the simulator's classes."""

    name: str
    spectype: str
    teff: tuple[float, float]


def _split(spectype: str, n: int, geometric: bool = False) -> list[Subclass]:
    lo, hi = SPECTRAL_CLASSES[spectype][0]
    edges = np.geomspace(lo, hi, n + 1) if geometric else np.linspace(lo, hi, n + 1)
    return [Subclass(f"{spectype}{i}", spectype, (float(edges[i]), float(edges[i + 1]))) for i in range(n)]


SUBCLASSES: tuple[Subclass, ...] = tuple(_split("A", 2) + _split("F", 2) + _split("G", 2) + _split("K", 3)
                                         + _split("M", 2) + _split("DA", 2, geometric=True) + _split("C", 2))
"""The simulator's classes split by temperature (cool part first, e.g. A0 = 7500-8650 K): 15
subclasses, DA white dwarfs split geometrically (their temperatures are drawn log-uniform)."""


def subclass_names() -> list[str]:
    """Names of :data:`SUBCLASSES` in order."""
    return [s.name for s in SUBCLASSES]


def subclass_of(spectype: str, teff: float) -> str | None:
    """The subclass of a star of the simulator's class ``spectype`` and temperature ``teff``."""
    for s in SUBCLASSES:
        if s.spectype == spectype and s.teff[0] <= teff <= s.teff[1]:
            return s.name
    return None


def bin_edges(wave: np.ndarray) -> np.ndarray:
    """Edges of bins centred on a uniform ``wave``."""
    step = wave[1] - wave[0]
    return np.concatenate([wave - 0.5 * step, [wave[-1] + 0.5 * step]])


def _fine_grid() -> FineGrid:
    edges = bin_edges(DENOISE_GRID)
    return FineGrid.covering(edges[0], edges[-1], FINE_STEP)


def bin_average(fine_wave: np.ndarray, values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Average of ``values`` (..., n_fine) over the bins ``edges`` (every bin holds fine points)."""
    idx = np.clip(np.searchsorted(edges, fine_wave, side="right") - 1, 0, edges.size - 2)
    counts = np.bincount(idx, minlength=edges.size - 1).astype(float)
    flat = values.reshape(-1, values.shape[-1])
    out = np.stack([np.bincount(idx, weights=row, minlength=edges.size - 1) for row in flat]) / counts
    return out.reshape(values.shape[:-1] + (edges.size - 1,))


@dataclass
class Stars:
    """Stars drawn for the denoiser: labels, subclass, truth and photon shape on :data:`DENOISE_GRID`."""

    subclass: np.ndarray
    spectype: np.ndarray
    teff: np.ndarray
    logg: np.ndarray
    feh: np.ndarray
    rv: np.ndarray
    truth: np.ndarray
    """(n, 2048) flux density, unit absolute sum."""
    photons: np.ndarray
    """(n, 2048) photon shape (mean 1 over the r band), bin-averaged."""
    flam_per_photon: np.ndarray
    """(n,) factor from the photon shape to ``truth`` (``truth = photons * hc/lambda * factor``)."""


def draw_labels(rng: np.random.Generator, sub: Subclass) -> tuple[float, float, float, float]:
    """Labels of one star of subclass ``sub`` (the simulator's dwarf/giant mix and metallicities)."""
    (_t, dwarf, giant, f_giant) = SPECTRAL_CLASSES[sub.spectype]
    if sub.spectype == "DA":   # as the simulator: log-uniform temperatures, solar metallicity (no metals)
        teff = float(np.exp(rng.uniform(np.log(sub.teff[0]), np.log(sub.teff[1]))))
    else:
        teff = rng.uniform(*sub.teff)
    lo, hi = giant if rng.uniform() < f_giant else dwarf
    logg = rng.uniform(lo, hi)
    if sub.spectype == "DA":
        feh = 0.0
    elif sub.spectype == "C":
        feh = float(np.clip(rng.normal(-0.3, 0.3), -1.5, 0.3))
    else:
        feh = float(np.clip(rng.normal(-0.3, 0.35), -2.0, 0.5))
    rv = rng.normal(0.0, 40.0)
    return float(teff), float(logg), feh, float(rv)


def make_stars(labels: dict[str, np.ndarray], stellar_model: str = "analytic", chunk: int = 256) -> Stars:
    """Truth spectra of stars with the given labels (``subclass``, ``spectype``, ``teff``, ``logg``,
    ``feh``, ``rv`` arrays)."""
    grid = _fine_grid()
    edges = bin_edges(DENOISE_GRID)
    n = len(labels["teff"])
    photons = np.empty((n, DENOISE_NWAVE))
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        shape = stellar_spectra(grid, labels["teff"][sl], labels["logg"][sl], labels["feh"][sl], labels["rv"][sl],
                                stellar_model, spectype=np.asarray(labels["spectype"])[sl])
        photons[sl] = bin_average(grid.wave, shape, edges)
    flam = photons / DENOISE_GRID[None, :]
    factor = 1.0 / np.abs(flam).sum(axis=1)
    return Stars(np.asarray(labels["subclass"]), np.asarray(labels["spectype"]),
                 *(np.asarray(labels[k], float) for k in ("teff", "logg", "feh", "rv")),
                 truth=flam * factor[:, None], photons=photons, flam_per_photon=factor)


def draw_stars(seed: int, per_subclass: int, subclasses: tuple[Subclass, ...] = SUBCLASSES,
               stellar_model: str = "analytic") -> Stars:
    """``per_subclass`` stars of every subclass, reproducible from ``seed``."""
    rng = rng_for(seed, TAG.TARGET, "denoise1d")
    rows = {k: [] for k in ("subclass", "spectype", "teff", "logg", "feh", "rv")}
    for sub in subclasses:
        for _ in range(per_subclass):
            t, g, f, v = draw_labels(rng, sub)
            for k, val in zip(rows, (sub.name, sub.spectype, t, g, f, v)):
                rows[k].append(val)
    return make_stars({k: np.asarray(v) for k, v in rows.items()}, stellar_model)


@dataclass(frozen=True)
class ExposureSettings:
    """Observing settings of simulated 1D exposures (the frame simulator's ranges)."""

    mag_range: tuple[float, float] = (13.0, 17.0)
    exptime_choices: tuple[float, ...] = (1200.0, 1500.0, 1800.0)
    extraction_pixels: float = 4.0
    """Effective number of CCD columns whose read noise enters one extracted row."""
    sky_residual: float = 0.03
    """Rms fraction of each sky line left by sky subtraction (per exposure, per line)."""
    cosmic_rate: float = 2e-4
    """Probability per bin of a cosmic-ray residual the pipeline did not reject."""


def _rows_per_bin(wave: np.ndarray) -> np.ndarray:
    """CCD rows per 2.44 A bin (inverse-variance combination of the arms' row widths)."""
    from fiberlake.schemas.instrument import get_instrument

    inst = get_instrument("lamost")
    step = DENOISE_GRID[1] - DENOISE_GRID[0]
    b, r = inst.arms
    eb, er = efficiency("b", wave), efficiency("r", wave)
    return step / np.where(eb >= er, b.dispersion, r.dispersion)


def observe(stars: Stars, seed: int, n_exposures: int, settings: ExposureSettings = ExposureSettings(),
            params: SimParams = DEFAULT_PARAMS, mags: np.ndarray | None = None,
            key: str = "obs") -> tuple[np.ndarray, np.ndarray]:
    """Simulated flux-calibrated exposures of every star: ``(n_stars, n_exposures, 2048)``.

    Returns
    -------
    exposures : ndarray
        In the truth's units (truth + noise), before any renormalisation.
    mags : ndarray, shape (n_stars,)
        The stars' magnitudes.
    """
    wave = DENOISE_GRID
    step = wave[1] - wave[0]
    n = stars.truth.shape[0]
    rng = rng_for(seed, TAG.NOISE, "denoise1d", key)
    if mags is None:
        mags = rng.uniform(*settings.mag_range, size=n)
    eff = efficiency("b", wave) + efficiency("r", wave)
    rows = _rows_per_bin(wave)
    sky_cont = params.sky_rate * sky_continuum(wave) * eff * step
    rn2 = 3.5 ** 2 * settings.extraction_pixels * rows
    out = np.empty((n, n_exposures, wave.size))
    edges = bin_edges(wave)
    for e in range(n_exposures):
        airmass = rng.uniform(1.0, 1.6, size=n)
        transparency = rng.uniform(0.75, 1.0, size=n) * rng.uniform(0.75, 0.95, size=n)
        sky_scale = rng.lognormal(0.0, 0.2, size=n)
        exptime = rng.choice(settings.exptime_choices, size=n)
        lw, strength = sky_line_list(rng)
        inside = (lw > edges[0]) & (lw < edges[-1])
        line_bin = np.searchsorted(edges, lw[inside]) - 1
        line_e = np.zeros(wave.size)
        np.add.at(line_e, line_bin, params.sky_line_ew * params.sky_rate * sky_continuum(np.array([5577.338]))[0]
                  * strength[inside] * (efficiency("b", lw[inside]) + efficiency("r", lw[inside])))
        for i in range(n):
            atm = atmosphere_transmission(wave, airmass[i])
            response = params.rate_mag16 * 10.0 ** (-0.4 * (mags[i] - 16.0)) * transparency[i] * exptime[i] \
                * atm * eff * step
            star = stars.photons[i] * response
            sky = (sky_cont + line_e) * sky_scale[i] * exptime[i]
            var = np.maximum(star, 0) + sky + rn2
            noise = rng.standard_normal(wave.size) * np.sqrt(var)
            resid = line_e * sky_scale[i] * exptime[i] * rng.normal(0.0, settings.sky_residual)
            cosmic = (rng.uniform(size=wave.size) < settings.cosmic_rate) * rng.exponential(20.0, wave.size) \
                * np.sqrt(var)
            photons = (star + noise + resid + cosmic) / response
            out[i, e] = photons / wave * stars.flam_per_photon[i]
    return out, mags


def noise_from_repeats(exposures: np.ndarray) -> np.ndarray:
    """The paper's training noise: each exposure minus the mean of the star's exposures.

    Rescaled by ``sqrt(n / (n - 1))`` so a residual has the variance of one exposure's noise
    (the mean holds ``1/n`` of each exposure's own noise).

    Parameters
    ----------
    exposures : ndarray, shape (n_stars, n_exposures, n_wave)
        Each exposure normalised alike.
    """
    n = exposures.shape[1]
    if n < 2:
        raise ValueError("noise from repeats needs at least two exposures per star")
    resid = exposures - exposures.mean(axis=1, keepdims=True)
    return (resid * np.sqrt(n / (n - 1.0))).reshape(-1, exposures.shape[-1])
