"""Telluric absorption measured on the flux standards (pure: arrays in, arrays out).

Outside the molecular bands of the atmosphere the standards' ratio of observed to model flux is
the smooth instrument response; inside them it is the response times the telluric transmission.
:func:`telluric_from_ratios` divides the smooth response (fitted with the bands masked) out of
every standard's ratio inside the bands and combines the standards by inverse variance, as
PypeIt's sensitivity function and desispec's calibration treat these regions.
"""

from __future__ import annotations

import numpy as np

TELLURIC_BANDS = (
    (6270.0, 6330.0),   # O2 gamma
    (6860.0, 6960.0),   # O2 B
    (7150.0, 7400.0),   # H2O
    (7580.0, 7710.0),   # O2 A
    (8100.0, 8450.0),   # H2O
    (8900.0, 9400.0),   # H2O
)
"""Air wavelength windows (A) of the telluric bands in the optical (O2 A, B, gamma; H2O)."""


def band_mask(wave: np.ndarray, bands: tuple[tuple[float, float], ...] = TELLURIC_BANDS) -> np.ndarray:
    """True where ``wave`` falls in a telluric band."""
    wave = np.asarray(wave, dtype=float)
    out = np.zeros(wave.shape, bool)
    for lo, hi in bands:
        out |= (wave >= lo) & (wave <= hi)
    return out


def telluric_from_ratios(wave: np.ndarray, ratio: np.ndarray, ratio_ivar: np.ndarray, response: np.ndarray,
                         bands: tuple[tuple[float, float], ...] = TELLURIC_BANDS,
                         floor: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """Telluric transmission of one camera from its standards.

    Parameters
    ----------
    wave : ndarray, shape (nwave,)
        Wavelengths (A).
    ratio, ratio_ivar : ndarray, shape (n_stars, nwave)
        Observed over model flux of each standard (per second), and its inverse variance (0 where
        masked).
    response : ndarray, shape (nwave,)
        Smooth response fitted with the bands masked.
    bands : tuple of (lo, hi)
        Telluric windows (A).
    floor : float
        Smallest transmission kept (deeper bins are clipped here).

    Returns
    -------
    transmission, ivar : ndarray, shape (nwave,)
        1 outside the bands (ivar 0 there: nothing was measured); inside, the inverse-variance
        mean over the standards of ``ratio / response``, clipped to ``[floor, 1.2]``.
    """
    inside = band_mask(wave, bands)
    resp = np.where(response > 0, response, np.inf)
    t = ratio / resp[None, :]
    w = ratio_ivar * (resp[None, :] ** 2)
    w = np.where(np.isfinite(t) & np.isfinite(w), w, 0.0)
    wsum = w.sum(axis=0)
    mean = np.where(wsum > 0, (np.where(w > 0, t, 0.0) * w).sum(axis=0) / np.where(wsum > 0, wsum, 1.0), 1.0)
    trans = np.where(inside, np.clip(mean, floor, 1.2), 1.0)
    ivar = np.where(inside & (wsum > 0), wsum, 0.0)
    return trans, ivar
