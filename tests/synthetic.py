"""Small analytic frame builder for the CCD, tracing and wavecal tests (not the simulator).

Fiber profiles are Gaussians integrated over pixels, laid along given traces; arc lines are
pixel-integrated Gaussians along rows at the rows where a per-fiber wavelength solution hits
each line. Everything is float64 and written independently of the processors.
"""

from __future__ import annotations

import numpy as np
from numpy.polynomial import legendre
from scipy.special import erf


def pixel_gauss(t: np.ndarray, mu, sigma) -> np.ndarray:
    """Unit-flux Gaussian integrated over unit pixels centred on ``t``."""
    a = (np.asarray(t, float) + 0.5 - mu) / (np.sqrt(2.0) * sigma)
    b = (np.asarray(t, float) - 0.5 - mu) / (np.sqrt(2.0) * sigma)
    return 0.5 * (erf(a) - erf(b))


def nominal_columns(nx: int, n_fibers: int, pitch: float = 16.0) -> np.ndarray:
    """Undistorted fiber columns, the instrument convention."""
    f = np.arange(n_fibers, dtype=float)
    return (nx - 1) / 2.0 + (f - (n_fibers - 1) / 2.0) * pitch


def distorted_traces(ny: int, nx: int, nominal_x: np.ndarray, k: float = 0.012, shift: float = 0.0) -> np.ndarray:
    """Pincushion-distorted trace columns ``x[fiber, row]``."""
    r = 0.5 * max(nx, ny)
    dx = nominal_x[:, None] - (nx - 1) / 2.0
    dy = np.arange(ny)[None, :] - (ny - 1) / 2.0
    return (nx - 1) / 2.0 + dx * (1.0 + k * (dx ** 2 + dy ** 2) / r ** 2) + shift


def fiber_image(xtrace: np.ndarray, nx: int, sigma, flux) -> np.ndarray:
    """Image ``[row, col]`` of fibers with Gaussian profiles along ``xtrace[fiber, row]``.

    ``sigma`` is a scalar or one value per fiber; ``flux`` (electrons per row) a scalar, one
    value per fiber, or ``[fiber, row]``.
    """
    nf, ny = xtrace.shape
    sig = np.broadcast_to(np.asarray(sigma, float), (nf,))
    fl = np.broadcast_to(np.asarray(flux, float).reshape(-1, 1) if np.ndim(flux) == 1 else np.asarray(flux, float),
                         (nf, ny))
    cols = np.arange(nx, dtype=float)
    image = np.zeros((ny, nx))
    for f in range(nf):
        image += fl[f][:, None] * pixel_gauss(cols[None, :], xtrace[f][:, None], sig[f])
    return image


def halo_fiber_image(xtrace: np.ndarray, nx: int, sigma: float, flux: float, frac: np.ndarray,
                     sep: np.ndarray, ratio: float = 1.5) -> np.ndarray:
    """Like :func:`fiber_image`, with a core + halo profile whose flux centroid is ``xtrace``.

    The halo (``ratio * sigma``, flux fraction ``frac[fiber, row]``) is offset by
    ``sep[fiber, row]`` pixels from the core: core at ``x - frac * sep``, halo at
    ``x + (1 - frac) * sep``.
    """
    nf, ny = xtrace.shape
    cols = np.arange(nx, dtype=float)[None, :]
    image = np.zeros((ny, nx))
    for f in range(nf):
        x, fr, d = xtrace[f][:, None], frac[f][:, None], sep[f][:, None]
        image += flux * ((1 - fr) * pixel_gauss(cols, x - fr * d, sigma)
                         + fr * pixel_gauss(cols, x + (1 - fr) * d, ratio * sigma))
    return image


def wave_solutions(n_fibers: int, ny: int, wave_center: float, dispersion: float, rng: np.random.Generator,
                   offset_px: float = 4.0, quad_px: float = 6.0, cubic_px: float = 3.0) -> np.ndarray:
    """Per-fiber cubic wavelength solutions, Legendre coefficients ``[fiber, 4]`` in ``u``.

    Offsets: a smooth trend across fibers plus random per-fiber zero points (``offset_px`` rms),
    a quadratic and a cubic term displacing the ends by about ``quad_px`` and ``cubic_px``.
    """
    half = (ny - 1) / 2.0 * dispersion
    f = np.linspace(-1, 1, n_fibers)
    off = (0.5 * offset_px * f ** 2 + offset_px * rng.standard_normal(n_fibers)) * dispersion
    coeffs = np.zeros((n_fibers, 4))
    coeffs[:, 0] = wave_center + off
    coeffs[:, 1] = half * (1.0 + 0.002 * f)
    coeffs[:, 2] = quad_px * dispersion * (1.0 + 0.1 * f)
    coeffs[:, 3] = cubic_px * dispersion
    return coeffs


def wave_at_rows(coeffs: np.ndarray, ny: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Evaluate Legendre wavelength solutions, shape ``[fiber, row]``."""
    rows = np.arange(ny, dtype=float) if rows is None else np.asarray(rows, float)
    u = 2.0 * rows / (ny - 1) - 1.0
    return np.stack([legendre.legval(u, c) for c in coeffs])


def arc_spectra(wave: np.ndarray, line_waves: np.ndarray, line_flux: np.ndarray, lsf_sigma: float = 1.4):
    """Arc spectra ``[fiber, row]`` (electrons per row) and the true line rows ``[fiber, line]``."""
    nf, ny = wave.shape
    rows = np.arange(ny, dtype=float)
    spec = np.zeros((nf, ny))
    line_rows = np.zeros((nf, line_waves.size))
    for f in range(nf):
        line_rows[f] = np.interp(line_waves, wave[f], rows, left=np.nan, right=np.nan)
        ok = np.isfinite(line_rows[f])
        spec[f] = (line_flux[ok][:, None] * pixel_gauss(rows[None, :], line_rows[f][ok][:, None], lsf_sigma)).sum(0)
    return spec, line_rows


def raw_frame(image_e: np.ndarray, rng: np.random.Generator, *, gain: float = 1.2, read_noise: float = 3.5,
              bias_level: float = 1000.0, n_overscan: int = 32, row_drift: float = 5.0, poisson: bool = True,
              saturation: int = 65535) -> np.ndarray:
    """Raw ``uint16`` frame (data section + overscan) from an electron image.

    The bias level drifts smoothly with row by ``row_drift`` ADU (sinusoid) in both the data
    section and the overscan, as a serial-overscan correction should remove.
    """
    ny, nx = image_e.shape
    level = bias_level + row_drift * np.sin(np.arange(ny) / ny * 2 * np.pi)[:, None]
    sig = rng.poisson(np.clip(image_e, 0, None)) if poisson else image_e
    data = sig / gain + level + rng.normal(0, read_noise / gain, (ny, nx))
    over = level + rng.normal(0, read_noise / gain, (ny, n_overscan))
    raw = np.concatenate([data, over], axis=1)
    return np.clip(np.rint(raw), 0, saturation).astype(np.uint16)
