"""Joined spectra and coadds onto the denoiser's grid (2048 bins, 4000-9000 A, linear), pure.

A product row holds ``flam`` on the log-linear joined grid (``loglam_min``, ``dloglam``,
``nwave``) with ``flam_ivar`` and ``flam_mask``. Each output bin is the overlap-weighted mean of the
good input bins inside it (ivar > 0, finite, no fatal bit); a bin is *observed* when good input
covers at least ``min_coverage`` of it. Bins outside the arms (the mini instrument covers a quarter
of 4000-9000 A; LAMOST stops at ~8930 A) are simply not observed: the MAP's masked likelihood
handles them and the output marks them imputed.
"""

from __future__ import annotations

import numpy as np

from fiberlake.processors.coadd import overlap_matrix
from fiberlake.schemas.maskbits import FATAL, MASK_DTYPE

WAVE_MIN, WAVE_MAX, NWAVE = 4000.0, 9000.0, 2048


def denoise_grid(wave_min: float = WAVE_MIN, wave_max: float = WAVE_MAX, nwave: int = NWAVE) -> np.ndarray:
    """Bin centres of the denoiser's grid (A)."""
    return np.linspace(wave_min, wave_max, nwave)


def _edges_linear(wave: np.ndarray) -> np.ndarray:
    step = wave[1] - wave[0]
    return np.concatenate([wave - 0.5 * step, [wave[-1] + 0.5 * step]])


def log_edges(loglam_min: float, dloglam: float, nwave: int) -> np.ndarray:
    """Bin edges (A) of a log-linear grid."""
    return 10.0 ** (loglam_min + dloglam * (np.arange(nwave + 1) - 0.5))


def to_denoise_grid(loglam_min: float, dloglam: float, flam: np.ndarray, ivar: np.ndarray, mask: np.ndarray,
                    grid: np.ndarray | None = None, min_coverage: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Resample spectra of one log-linear grid onto the denoiser's grid.

    Parameters
    ----------
    loglam_min, dloglam : float
        The input grid.
    flam, ivar, mask : ndarray, shape (n, nwave_in)
    grid : ndarray, optional
        Output bin centres (default :func:`denoise_grid`).
    min_coverage : float
        Fraction of an output bin good input must cover for it to count as observed.

    Returns
    -------
    flux : ndarray, shape (n, n_out)
        Overlap-weighted mean flux density (0 where not observed).
    observed : ndarray of bool, shape (n, n_out)
    """
    grid = denoise_grid() if grid is None else grid
    flam = np.atleast_2d(np.asarray(flam, np.float64))
    ivar = np.atleast_2d(np.asarray(ivar, np.float64))
    mask = np.atleast_2d(np.asarray(mask)).astype(MASK_DTYPE)
    n, n_in = flam.shape
    in_edges = log_edges(loglam_min, dloglam, n_in)
    out_edges = _edges_linear(grid)
    k, j, frac = overlap_matrix(in_edges, out_edges)
    width = np.diff(in_edges)[j] * frac                     # A of input bin j inside output bin k
    good = (ivar > 0) & np.isfinite(flam) & np.isfinite(ivar) & ((mask & MASK_DTYPE(FATAL)) == 0)
    w = good[:, j] * width[None, :]
    num = np.zeros((n, grid.size))
    cover = np.zeros((n, grid.size))
    vals = np.where(good, flam, 0.0)[:, j]
    for f in range(n):
        np.add.at(num[f], k, w[f] * vals[f])
        np.add.at(cover[f], k, w[f])
    out_w = np.diff(out_edges)
    observed = cover >= min_coverage * out_w[None, :]
    flux = np.where(observed, num / np.where(cover > 0, cover, 1.0), 0.0)
    return flux, observed
