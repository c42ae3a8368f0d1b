"""Chi-square template fit over a grid of stellar templates, radial velocity free (the survey baseline).

What LAMOST's 1D pipeline and DESI's redrock do, reduced to its core: for every template of a
grid (several per class, spanning Teff and log g), every radial velocity of a grid and every
spectrum, the template redshifted to the spectrum's wavelengths times a low-order polynomial per
arm (which absorbs the unknown throughput, atmosphere and flux scale, as the aperture spectra are
not flux calibrated) is fitted by weighted linear least squares; the class is that of the best
chi-square. Class probabilities are ``exp(-(chi2_c - chi2_min) / 2)`` normalised over the classes,
with ``chi2_c`` the best chi-square of class ``c``, divided by the reduced chi-square of the best
fit (so a model mismatch shared by every template does not make every decision certain).

The templates come from outside (arrays in): the caller builds them from a star model other
than the one that drew the data (:mod:`fiberlake.jobs.classify_templates`). Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

C_KMS = 299792.458


@dataclass
class TemplateGrid:
    """Templates on a common fine wavelength grid, already smoothed to the instrument's resolution.

    Attributes
    ----------
    wave : ndarray, shape (n_wave,)
        Rest-frame wavelengths (A), increasing.
    flux : ndarray, shape (n_templates, n_wave)
        Photon spectra (any normalisation).
    classes : ndarray of str, shape (n_templates,)
    labels : ndarray, shape (n_templates, 3)
        Teff, log g, [Fe/H] of each template (for reports).
    source : str
        Which star model made them.
    """

    wave: np.ndarray
    flux: np.ndarray
    classes: np.ndarray
    labels: np.ndarray
    source: str = ""


def smooth_to_resolution(wave: np.ndarray, flux: np.ndarray, sigma_a: float) -> np.ndarray:
    """Gaussian smoothing of spectra on a uniform grid to a line-spread sigma of ``sigma_a`` Angstrom."""
    from scipy.ndimage import gaussian_filter1d

    step = float(wave[1] - wave[0])
    return gaussian_filter1d(np.asarray(flux, dtype=float), sigma_a / step, axis=-1, mode="nearest")


def _design(waves: list[np.ndarray], degree: int) -> np.ndarray:
    """Polynomial columns per arm (Legendre in the arm's scaled wavelength), block diagonal."""
    from numpy.polynomial import legendre

    n = sum(w.size for w in waves)
    cols = np.zeros((n, len(waves) * (degree + 1)))
    start = 0
    for a, w in enumerate(waves):
        x = 2.0 * (w - w.min()) / max(np.ptp(w), 1e-9) - 1.0
        cols[start:start + w.size, a * (degree + 1):(a + 1) * (degree + 1)] = legendre.legvander(x, degree)
        start += w.size
    return cols


def fit_one(waves: list[np.ndarray], flux: np.ndarray, ivar: np.ndarray, grid: TemplateGrid,
            velocities: np.ndarray, degree: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Chi-square of every template (best velocity) for one spectrum.

    Parameters
    ----------
    waves : list of ndarray
        Observed wavelengths of each arm's pixels (the arms' pixels concatenated give ``flux``).
    flux, ivar : ndarray, shape (sum of arm sizes,)
    grid : TemplateGrid
    velocities : ndarray
        Radial velocities tried (km/s).
    degree : int
        Degree of each arm's multiplicative polynomial.

    Returns
    -------
    chi2 : ndarray, shape (n_templates,)
        Best chi-square over the velocities (inf when nothing was fitted).
    velocity : ndarray, shape (n_templates,)
        The velocity that gave it.
    """
    wave = np.concatenate(waves)
    w = np.sqrt(np.clip(ivar, 0.0, None))
    n_good = int((w > 0).sum())
    n_templates = grid.flux.shape[0]
    n_par = len(waves) * (degree + 1)
    if n_good <= n_par + 1:
        return np.full(n_templates, np.inf), np.zeros(n_templates)
    poly = _design(waves, degree)                                             # (n, p)
    best = np.full(n_templates, np.inf)
    best_v = np.zeros(n_templates)
    wy = w * flux
    for v in velocities:
        rest = wave / (1.0 + v / C_KMS)
        t = np.stack([np.interp(rest, grid.wave, f) for f in grid.flux])      # (K, n)
        a = t[:, :, None] * poly[None, :, :] * w[None, :, None]               # (K, n, p)
        ata = np.einsum("knp,knq->kpq", a, a) + 1e-10 * np.eye(n_par)[None]
        aty = np.einsum("knp,n->kp", a, wy)
        try:
            coef = np.linalg.solve(ata, aty[..., None])[..., 0]
        except np.linalg.LinAlgError:
            continue
        model = np.einsum("knp,kp->kn", a, coef)
        chi2 = ((wy[None, :] - model) ** 2).sum(axis=1)
        better = chi2 < best
        best[better], best_v[better] = chi2[better], v
    return best, best_v


def class_probabilities(chi2: np.ndarray, template_classes: np.ndarray, classes: tuple[str, ...],
                        dof: int) -> np.ndarray:
    """Class probabilities from the templates' chi-square (see the module's note); NaN row if no fit.

    Parameters
    ----------
    chi2 : ndarray, shape (n_templates,)
    template_classes : ndarray of str, shape (n_templates,)
    classes : tuple of str
        Output order.
    dof : int
        Degrees of freedom of a fit (good pixels minus parameters), for the reduced chi-square.
    """
    per_class = np.array([chi2[template_classes == c].min() if np.any(template_classes == c) else np.inf
                          for c in classes])
    if not np.isfinite(per_class).any():
        return np.full(len(classes), np.nan)
    best = per_class.min()
    scale = max(best / max(dof, 1), 1.0)
    logp = -0.5 * (per_class - best) / scale
    p = np.exp(logp - logp.max())
    return p / p.sum()


def fit_spectra(waves_b: np.ndarray, flux_b: np.ndarray, ivar_b: np.ndarray, waves_r: np.ndarray,
                flux_r: np.ndarray, ivar_r: np.ndarray, grid: TemplateGrid, classes: tuple[str, ...],
                velocities: np.ndarray | None = None, degree: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Template fit of many spectra of both arms (either arm may be absent: ivar 0 there).

    Parameters
    ----------
    waves_b, flux_b, ivar_b : ndarray, shape (n, w_b)
        Blue arm: observed wavelength, flux and inverse variance of each pixel.
    waves_r, flux_r, ivar_r : ndarray, shape (n, w_r)
        Red arm.
    grid : TemplateGrid
    classes : tuple of str
        Output order of the probabilities.
    velocities : ndarray, optional
        Default -150 to 150 km/s in steps of 30.

    Returns
    -------
    probabilities : ndarray, shape (n, n_classes)
        NaN rows for spectra that could not be fitted.
    velocity : ndarray, shape (n,)
        Radial velocity of the best template.
    """
    velocities = np.arange(-150.0, 151.0, 30.0) if velocities is None else np.asarray(velocities, float)
    n = flux_b.shape[0]
    probs = np.full((n, len(classes)), np.nan)
    vel = np.zeros(n)
    for i in range(n):
        arms = [(waves_b[i], flux_b[i], ivar_b[i]), (waves_r[i], flux_r[i], ivar_r[i])]
        arms = [a for a in arms if np.any(a[2] > 0)]
        if not arms:
            continue
        waves = [a[0].astype(float) for a in arms]
        chi2, v = fit_one(waves, np.concatenate([a[1] for a in arms]).astype(float),
                          np.concatenate([a[2] for a in arms]).astype(float), grid, velocities, degree)
        dof = int(sum((a[2] > 0).sum() for a in arms)) - len(arms) * (degree + 1)
        probs[i] = class_probabilities(chi2, grid.classes, classes, dof)
        if np.isfinite(chi2).any():
            vel[i] = v[int(np.argmin(chi2))]
    return probs, vel
