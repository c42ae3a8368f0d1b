"""Baselines of the Bayesian denoiser (seed 004, 4): the convolutional DAE and wavelet shrinkage.

* **DAE**: the generator's architecture (:class:`~fiberlake.processors.denoise_generator.IsometricAE`:
  the same encoder, the same transposed convolutions) trained without the isometry term to map
  noisy spectra (high and low S/N) to the clean ones, as the paper's comparison.
* **DAE with zero-imputation**: the same, retrained on inputs whose random missing intervals are
  set to zero (the paper's 4.2); the loss is on the full clean spectrum.
* **Wavelets**: :func:`skimage.restoration.denoise_wavelet` (BayesShrink, soft thresholding,
  noise level estimated from the data).

All take and return unit-flux-sum spectra on the model grid (the DAEs work in scaled units inside).
"""

from __future__ import annotations

import numpy as np
import torch

from fiberlake.processors.denoise_generator import IsometricAE, forward
from fiberlake.processors.denoise_map import normalise


def dae_denoise(model: IsometricAE, flux: np.ndarray, observed: np.ndarray | None = None) -> np.ndarray:
    """Denoise with a DAE: inputs normalised over their observed bins, missing bins zero-imputed.

    Returns unit-absolute-sum spectra (zeros for rows that cannot be normalised)."""
    flux = np.asarray(flux, np.float64)
    observed = np.isfinite(flux) if observed is None else np.asarray(observed, bool)
    y, _obs, total = normalise(flux, observed)
    n = y.shape[-1]
    out = forward(model, (y * n).astype(np.float32)).astype(np.float64)
    out = np.where(np.isfinite(out), out, 0.0)
    norm = np.abs(out).sum(-1, keepdims=True)
    out = np.where(norm > 0, out / np.where(norm > 0, norm, 1.0), 0.0)
    return np.where((total > 0)[:, None], out, 0.0)


def wavelet_denoise(flux: np.ndarray, observed: np.ndarray | None = None, wavelet: str = "db4",
                    method: str = "BayesShrink") -> np.ndarray:
    """Wavelet shrinkage of each spectrum (missing bins linearly interpolated first), unit absolute sum."""
    from skimage.restoration import denoise_wavelet

    flux = np.asarray(flux, np.float64)
    observed = np.isfinite(flux) if observed is None else np.asarray(observed, bool)
    y, obs, total = normalise(flux, observed)
    out = np.zeros_like(y)
    x = np.arange(y.shape[-1])
    for i in range(y.shape[0]):
        if total[i] <= 0 or obs[i].sum() < 2:
            continue
        row = np.interp(x, x[obs[i]], y[i, obs[i]]) if not obs[i].all() else y[i]
        scale = np.abs(row).max() or 1.0
        den = denoise_wavelet(row / scale, wavelet=wavelet, method=method, mode="soft",
                              rescale_sigma=True) * scale
        out[i] = den / max(np.abs(den).sum(), 1e-300)
    return out


def random_interval_mask(rng: np.random.Generator, n: int, n_wave: int, max_fraction: float,
                         position: str = "random") -> np.ndarray:
    """Observed-bin masks with one random missing interval each (length uniform in 0..max_fraction).

    ``position``: ``blue`` (from bin 0), ``red`` (to the last bin), ``middle`` (centred), ``random``.
    """
    lengths = rng.integers(0, int(max_fraction * n_wave) + 1, size=n)
    obs = np.ones((n, n_wave), bool)
    for i, length in enumerate(lengths):
        if position == "blue":
            start = 0
        elif position == "red":
            start = n_wave - length
        elif position == "middle":
            start = (n_wave - length) // 2
        else:
            start = int(rng.integers(0, n_wave - length + 1))
        obs[i, start:start + length] = False
    return obs


def interval_mask(n_wave: int, length: int, position: str) -> np.ndarray:
    """One mask (n_wave,) with ``length`` missing bins at ``blue``, ``middle`` or ``red``."""
    obs = np.ones(n_wave, bool)
    start = {"blue": 0, "red": n_wave - length, "middle": (n_wave - length) // 2}[position]
    obs[start:start + length] = False
    return obs


def n_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters of a model."""
    return int(sum(p.numel() for p in model.parameters()))
