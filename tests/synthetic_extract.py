"""Tiny analytic frame builder for the extraction tests (not the instrument simulator).

Fibers are Gaussian profiles (``scipy.stats.norm`` integrated exactly over each pixel, untruncated)
along Legendre traces, with an optional second, wider Gaussian as a wing.
"""

from __future__ import annotations

import numpy as np
from numpy.polynomial import legendre
from scipy.stats import norm

from fiberlake.schemas.containers import TraceSet


def make_traces(n_fibers: int, ny: int, nx: int, *, pitch: float = 16.0, x0: float | None = None,
                bend: float = 1.5, tilt: float = 0.7, sigma: float = 2.4,
                dead: np.ndarray | None = None) -> TraceSet:
    """Evenly spaced traces with a gentle tilt and a bow that grows toward the outer fibers."""
    f = np.arange(n_fibers, dtype=float)
    if x0 is None:
        x0 = (nx - 1) / 2.0 - (n_fibers - 1) / 2.0 * pitch
    xc = x0 + f * pitch
    rel = (f - (n_fibers - 1) / 2.0) / max(1.0, (n_fibers - 1) / 2.0)
    coeffs = np.zeros((n_fibers, 3))
    coeffs[:, 0] = xc
    coeffs[:, 1] = tilt * rel
    coeffs[:, 2] = bend * rel
    return TraceSet(coeffs=coeffs, ny=ny,
                    dead=np.zeros(n_fibers, bool) if dead is None else np.asarray(dead, bool),
                    rms=np.zeros(n_fibers), sigma=np.full(n_fibers, float(sigma)))


def with_columns(traces: TraceSet, x: np.ndarray) -> TraceSet:
    """Copy of ``traces`` with the constant terms replaced (move fibers, e.g. off the CCD)."""
    coeffs = traces.coeffs.copy()
    coeffs[:, 0] = np.asarray(x, float)
    return TraceSet(coeffs=coeffs, ny=traces.ny, dead=traces.dead.copy(), rms=traces.rms.copy(),
                    sigma=traces.sigma.copy())


def render(traces: TraceSet, flux: np.ndarray, nx: int, *, sigma: np.ndarray | float | None = None,
           wing_fraction: float = 0.0, wing_sigma: float = 8.0,
           wing_offset: np.ndarray | float = 0.0) -> np.ndarray:
    """Noise-free image: ``flux[f, row]`` electrons spread over the pixel-integrated profile.

    With a wing, the core sits at ``x - wing_fraction * wing_offset[f]`` and the wing at
    ``x + (1 - wing_fraction) * wing_offset[f]`` so the flux centroid stays on the trace.
    """
    nf, ny = flux.shape
    rows = np.arange(ny)
    u = 2.0 * rows / (ny - 1) - 1.0
    xc = np.stack([legendre.legval(u, c) for c in traces.coeffs])  # independent of TraceSet.x
    sig = np.broadcast_to(np.asarray(traces.sigma if sigma is None else sigma, float).reshape(-1, 1)
                          if np.ndim(traces.sigma if sigma is None else sigma) <= 1
                          else np.asarray(sigma, float), (nf, ny))
    edges = np.arange(nx + 1) - 0.5
    image = np.zeros((ny, nx))
    offs = np.broadcast_to(np.asarray(wing_offset, float), (nf,))
    for f in range(nf):
        core = xc[f] - wing_fraction * offs[f]
        t = (edges[None, :] - core[:, None]) / sig[f][:, None]
        prof = np.diff(norm.cdf(t), axis=1)
        if wing_fraction:
            tw = (edges[None, :] - (core + offs[f])[:, None]) / wing_sigma
            prof = (1 - wing_fraction) * prof + wing_fraction * np.diff(norm.cdf(tw), axis=1)
        image += flux[f][:, None] * prof
    return image


def observe(expected: np.ndarray, rng: np.random.Generator, *, read_noise: float = 3.5):
    """Poisson + Gaussian read noise; returns ``(image, ivar)`` with data-based ivar."""
    image = rng.poisson(np.clip(expected, 0, None)).astype(float) + rng.normal(0, read_noise, expected.shape)
    ivar = 1.0 / (read_noise**2 + np.clip(image, 0, None))
    return image, ivar
