"""The CAE's afterburner (seed 002, section III.3): amplitude by maximum likelihood, then the
quadratic flux-bias correction.

The network sees min-max scaled inputs and is trained against max-scaled truths, so its output
has the right shape and an arbitrary normalisation. The paper's answer to the limited dynamic
range of a network is not to derive the factor from anything the truth would give, but to fit
it: re-convolve the output ``O`` with the PSF and find the amplitude that best explains the
noisy data ``D`` (their eq. 2)::

    A = sum(w (O * PSF) D) / sum(w (O * PSF)^2)

(``w`` the inverse variance; the paper's unweighted form is ``w = 1``). Any imperfection of the
recovered shape biases ``A`` low, so the paper then models the true flux as a quadratic function
of the recovered one. Our chunks span four decades of flux, so the quadratic is in
``u = log10(recovered flux)`` for ``log10(true / recovered)`` (a quadratic in the flux itself
would be fitted by the brightest chunks alone); the coefficients are fitted on simulated
calibration chunks that the test figures never use, and shipped in the model card.
"""

from __future__ import annotations

import numpy as np


def reconvolve(images: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve images ``(..., H, W)`` with a centred kernel (zero outside: 'same' size)."""
    from scipy.signal import fftconvolve

    k = np.asarray(kernel, float)
    k = k.reshape((1,) * (images.ndim - 2) + k.shape)
    return fftconvolve(np.asarray(images, float), k, mode="same", axes=(-2, -1))


def ml_amplitude(output: np.ndarray, data: np.ndarray, kernel: np.ndarray, weight: np.ndarray | None = None,
                 region: tuple[slice, slice] | None = None) -> np.ndarray:
    """Maximum-likelihood amplitude of each output tile (paper eq. 2, inverse-variance weighted).

    Parameters
    ----------
    output : ndarray, shape (n, H, W)
        Network outputs (arbitrary normalisation, non-negative).
    data : ndarray, shape (n, H, W)
        The noisy tiles (electrons).
    kernel : ndarray
        The instrument PSF (unit sum, centred).
    weight : ndarray, shape (n, H, W), optional
        Inverse variance (0: ignore the pixel); default uniform.
    region : tuple of slice, optional
        Part of the tiles used in the sums (e.g. away from the tile edges, where the
        re-convolution misses light from outside).

    Returns
    -------
    ndarray, shape (n,)
        Amplitudes; 0 where the re-convolved output has no weight (a blank output).
    """
    model = reconvolve(output, kernel)
    w = np.ones_like(model) if weight is None else np.asarray(weight, float)
    if region is not None:
        sl = (slice(None),) + tuple(region)
        model, data, w = model[sl], np.asarray(data)[sl], w[sl]
    num = (w * model * data).sum(axis=(-2, -1))
    den = (w * model * model).sum(axis=(-2, -1))
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def fit_flux_bias(recovered: np.ndarray, true: np.ndarray, min_flux: float = 1.0) -> np.ndarray:
    """Quadratic ``log10(true / recovered) = c0 + c1 u + c2 u^2`` with ``u = log10(recovered)``.

    Parameters
    ----------
    recovered, true : ndarray
        Total fluxes (electrons) after :func:`ml_amplitude`, and their truths.
    min_flux : float
        Pairs with either flux below this are left out (blanks, noise).

    Returns
    -------
    ndarray, shape (3,)
        ``c0, c1, c2`` (zeros when fewer than 10 pairs).
    """
    rec, tru = np.asarray(recovered, float), np.asarray(true, float)
    ok = (rec > min_flux) & (tru > min_flux) & np.isfinite(rec) & np.isfinite(tru)
    if ok.sum() < 10:
        return np.zeros(3)
    u = np.log10(rec[ok])
    c2, c1, c0 = np.polyfit(u, np.log10(tru[ok] / rec[ok]), 2)
    return np.array([c0, c1, c2])


def flux_bias_factor(recovered: np.ndarray, coeffs: np.ndarray, u_range: tuple[float, float] | None = None
                     ) -> np.ndarray:
    """Multiplicative correction ``true / recovered`` for recovered total fluxes (1 where <= 0).

    ``u_range`` clamps ``log10(recovered)`` to the range the coefficients were fitted on (no
    extrapolation of the quadratic)."""
    rec = np.asarray(recovered, float)
    u = np.log10(np.where(rec > 0, rec, 1.0))
    if u_range is not None:
        u = np.clip(u, *u_range)
    c0, c1, c2 = coeffs
    return np.where(rec > 0, 10 ** (c0 + c1 * u + c2 * u * u), 1.0)
