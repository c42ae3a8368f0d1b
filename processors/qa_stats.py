"""Numbers behind the nightly QA figures: the expected S/N-magnitude relation, sky residuals, a
confusion matrix. Pure: arrays in, arrays out.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

MAG0 = 15.0
"""Reference magnitude of the S/N model's signal scale."""


@dataclass(frozen=True)
class SnrModel:
    """Photon-noise S/N of a source of magnitude ``m`` over a fixed background.

    ``snr(m) = S / sqrt(S + B)`` with ``S = signal * 10 ** (-0.4 (m - MAG0))``: the source's
    electrons per bin (``signal`` at magnitude :data:`MAG0`) against its own Poisson noise and a
    background variance ``B`` (sky, read noise) that does not depend on the source. Bright sources
    follow ``S/N ~ sqrt(S)`` (slope -0.2 dex per magnitude), faint ones ``S / sqrt(B)`` (slope -0.4).

    Attributes
    ----------
    signal : float
        Electrons per bin at ``MAG0``.
    background : float
        Background variance per bin (electrons^2).
    n : int
        Fibers fitted.
    """

    signal: float
    background: float
    n: int

    def __call__(self, mag: np.ndarray) -> np.ndarray:
        s = self.signal * 10.0 ** (-0.4 * (np.asarray(mag, float) - MAG0))
        return s / np.sqrt(s + self.background)


def fit_snr_model(mag: np.ndarray, snr: np.ndarray) -> SnrModel | None:
    """Fit :class:`SnrModel` to measured S/N (robust least squares on ``log10 S/N``).

    Parameters
    ----------
    mag : ndarray
        Catalogue magnitudes.
    snr : ndarray
        Measured S/N per bin (e.g. the median of ``flux * sqrt(ivar)``).

    Returns
    -------
    SnrModel or None
        None when fewer than 3 fibers have a finite magnitude and a positive S/N.

    Examples
    --------
    >>> truth = SnrModel(4.0e4, 900.0, 0)
    >>> m = np.linspace(12, 19, 30)
    >>> fit = fit_snr_model(m, truth(m))
    >>> bool(np.allclose(fit(m), truth(m), rtol=1e-3))
    True
    """
    mag, snr = np.asarray(mag, float), np.asarray(snr, float)
    good = np.isfinite(mag) & np.isfinite(snr) & (snr > 0)
    if good.sum() < 3:
        return None
    m, y = mag[good], np.log10(snr[good])
    flux = 10.0 ** (-0.4 * (m - MAG0))
    # start: the brightest fibers photon-limited (S ~ snr^2), background from the faintest
    bright = np.argsort(m)[: max(1, m.size // 4)]
    s0 = float(np.median(snr[good][bright] ** 2 / flux[bright]))
    faint = np.argsort(m)[-max(1, m.size // 4):]
    s_faint = s0 * flux[faint]
    b0 = float(np.median(np.clip(s_faint ** 2 / snr[good][faint] ** 2 - s_faint, 1e-3 * s0, None)))

    def resid(p: np.ndarray) -> np.ndarray:
        s = 10.0 ** p[0] * flux
        return np.log10(s / np.sqrt(s + 10.0 ** p[1])) - y

    fit = least_squares(resid, [np.log10(max(s0, 1e-6)), np.log10(max(b0, 1e-6))], loss="soft_l1", f_scale=0.1)
    return SnrModel(float(10.0 ** fit.x[0]), float(10.0 ** fit.x[1]), int(good.sum()))


@dataclass(frozen=True)
class SkyResiduals:
    """Sky-subtracted sky fibers, bin by bin: ``chi = flux * sqrt(ivar)`` across fibers and exposures.

    Attributes
    ----------
    median, p16, p84 : ndarray (nwave,)
        Percentiles of chi over the spectra with ``ivar > 0`` in the bin (NaN where none).
    rms : ndarray (nwave,)
        Root mean square of chi (1 for a perfect sky model and noise model).
    n : int
        Spectra used.
    """

    median: np.ndarray
    p16: np.ndarray
    p84: np.ndarray
    rms: np.ndarray
    n: int


def sky_residuals(flux: np.ndarray, ivar: np.ndarray) -> SkyResiduals:
    """:class:`SkyResiduals` of sky fibers' sky-subtracted spectra, shape ``(nspec, nwave)``."""
    flux, ivar = np.atleast_2d(flux), np.atleast_2d(ivar)
    chi = np.where(ivar > 0, flux * np.sqrt(np.clip(ivar, 0, None)), np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN bins stay NaN
        p16, med, p84 = np.nanpercentile(chi, [16, 50, 84], axis=0)
        rms = np.sqrt(np.nanmean(chi ** 2, axis=0))
    return SkyResiduals(med, p16, p84, rms, int(flux.shape[0]))


def confusion(truth: list[str], predicted: list[str], classes: list[str] | None = None) -> tuple[np.ndarray, list[str], list[str]]:
    """Counts of (truth, predicted) pairs.

    Parameters
    ----------
    truth, predicted : list of str
        Same length; ``None`` is counted as ``"none"``.
    classes : list of str, optional
        Row and column order (others are added after, sorted).

    Returns
    -------
    counts : ndarray (n_truth, n_predicted)
    rows, cols : list of str
        The labels of the rows (truth) and columns (predicted).
    """
    t = ["none" if v is None else str(v).upper() for v in truth]
    p = ["none" if v is None else str(v).upper() for v in predicted]
    base = [c.upper() for c in (classes or [])]
    rows = base + sorted(set(t) - set(base))
    cols = base + sorted(set(p) - set(base))
    counts = np.zeros((len(rows), len(cols)), int)
    for a, b in zip(t, p):
        counts[rows.index(a), cols.index(b)] += 1
    keep_r = [i for i, r in enumerate(rows) if counts[i].sum() or r in base]
    keep_c = [j for j, c in enumerate(cols) if counts[:, j].sum() or c in base]
    return counts[np.ix_(keep_r, keep_c)], [rows[i] for i in keep_r], [cols[j] for j in keep_c]
