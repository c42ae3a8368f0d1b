"""The CCD of the instrument simulator: bias, pixel response, cosmic rays, noise, digitisation.

Static per camera (the same every night and frame, from ``(seed, camera)``): gain, read noise,
bias level, a weak fixed 2D bias pattern (column offsets, a gradient, amplifier glow in one
corner) and the pixel response non-uniformity. Per frame: a bias-level offset and a weak
row-dependent drift that the overscan columns see as well, cosmic rays, Poisson and read noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fiberlake.ingest.sim_params import DEFAULT_PARAMS, SimParams
from fiberlake.ingest.sim_rng import TAG, rng_for
from fiberlake.schemas.instrument import Instrument


@dataclass(eq=False)
class DetectorModel:
    """Static properties of one camera's CCD.

    Attributes
    ----------
    gain : float
        Electrons per ADU.
    read_noise : float
        Read noise (electrons).
    bias_adu : float
        Mean bias level (ADU).
    pattern : ndarray, shape (ny, nx), float32
        Fixed bias structure in the data section (ADU, mean ~0); a master bias removes it.
    prnu : ndarray, shape (ny, nx), float32
        Pixel response (mean 1, rms ``params.prnu``).
    """

    gain: float
    read_noise: float
    bias_adu: float
    pattern: np.ndarray
    prnu: np.ndarray


def build_detector(instrument: Instrument, camera: str, seed: int,
                   params: SimParams = DEFAULT_PARAMS) -> DetectorModel:
    """Static CCD properties of ``camera`` (independent of the night)."""
    rng = rng_for(seed, TAG.DETECTOR, camera)
    ny, nx = instrument.ny, instrument.nx
    gain = instrument.gain * (1.0 + rng.uniform(-params.gain_scatter, params.gain_scatter))
    read_noise = instrument.read_noise * (1.0 + rng.uniform(-params.read_noise_scatter, params.read_noise_scatter))
    bias_adu = instrument.bias_level + rng.uniform(-50.0, 50.0)
    amp = params.bias_pattern_adu
    yy = (np.arange(ny, dtype=np.float32) / ny - 0.5)[:, None]
    xx = (np.arange(nx, dtype=np.float32) / nx - 0.5)[None, :]
    a = rng.normal(0.0, 0.5, size=4).astype(np.float32)
    gradient = amp * (a[0] * xx + a[1] * yy + a[2] * xx * yy + a[3] * (xx**2 - 1 / 12))
    columns = rng.normal(0.0, 0.2 * amp, size=nx).astype(np.float32)[None, :]
    corner = rng.integers(4)
    cy = 0 if corner < 2 else ny - 1
    cx = 0 if corner % 2 == 0 else nx - 1
    dist = np.hypot(np.arange(ny, dtype=np.float32)[:, None] - cy, np.arange(nx, dtype=np.float32)[None, :] - cx)
    glow = 2.0 * amp * np.exp(-dist / (0.03 * max(nx, ny)))
    pattern = (gradient + columns + glow).astype(np.float32)
    pattern -= pattern.mean(dtype=np.float64)
    prnu = (1.0 + params.prnu * rng.standard_normal((ny, nx), dtype=np.float32)).astype(np.float32)
    return DetectorModel(gain=float(gain), read_noise=float(read_noise), bias_adu=float(bias_adu),
                         pattern=pattern, prnu=prnu)


def bias_drift(rng: np.random.Generator, ny: int, params: SimParams = DEFAULT_PARAMS) -> np.ndarray:
    """Per-frame bias offset plus a smooth row-dependent drift (ADU), shape ``(ny,)``.

    Data and overscan columns of a row share it, so overscan subtraction removes it.
    """
    t = np.arange(ny) / ny
    offset = rng.normal(0.0, 1.5)
    amp = params.bias_drift_adu
    wave_amp = amp * rng.uniform(0.3, 1.0)
    cycles = rng.uniform(0.5, 2.0)
    phase = rng.uniform(0, 2 * np.pi)
    slope = amp * rng.normal(0.0, 0.5)
    return offset + wave_amp * np.sin(2 * np.pi * cycles * t + phase) + slope * (t - 0.5)


def cosmic_rays(rng: np.random.Generator, shape: tuple[int, int], exptime: float,
                params: SimParams = DEFAULT_PARAMS) -> np.ndarray:
    """Electrons deposited by cosmic rays during an exposure, shape ``shape`` (float32).

    The number of events is Poisson with mean ``cosmic_rate`` per cm^2 per minute times the CCD
    area and ``exptime``. Events are spots (1-4 pixels) or straight tracks of 2 to ~60 pixels at
    random angles, with total charge log-normal between a few hundred and tens of thousands of
    electrons, and 8 % of each pixel's charge diffusing into its four neighbours.
    """
    ny, nx = shape
    area_cm2 = ny * nx * (params.pixel_um * 1e-4) ** 2
    n = rng.poisson(params.cosmic_rate * area_cm2 * max(exptime, 0.0) / 60.0)
    out = np.zeros(ny * nx, dtype=np.float32)
    if n == 0:
        return out.reshape(ny, nx)
    y0 = rng.uniform(-0.5, ny - 0.5, n)
    x0 = rng.uniform(-0.5, nx - 0.5, n)
    energy = np.clip(rng.lognormal(np.log(2500.0), 1.0, n), 200.0, 60000.0)
    kind = rng.uniform(size=n)
    length = np.where(kind < 0.35, rng.uniform(0.0, 1.5, n),
                      np.where(kind < 0.95, rng.exponential(6.0, n) + 2.0, rng.uniform(20.0, 60.0, n)))
    angle = rng.uniform(0.0, np.pi, n)
    n_steps = np.maximum((length * 4).astype(int), 1)
    event = np.repeat(np.arange(n), n_steps)
    start = np.cumsum(n_steps) - n_steps
    frac = (np.arange(n_steps.sum()) - start[event] + 0.5) / n_steps[event] - 0.5
    ys = y0[event] + frac * length[event] * np.sin(angle[event])
    xs = x0[event] + frac * length[event] * np.cos(angle[event])
    q = energy[event] / n_steps[event]
    iy = np.rint(ys).astype(np.int64)
    ix = np.rint(xs).astype(np.int64)
    for dy, dx, w in ((0, 0, 0.92), (1, 0, 0.02), (-1, 0, 0.02), (0, 1, 0.02), (0, -1, 0.02)):
        yy, xx = iy + dy, ix + dx
        ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        np.add.at(out, yy[ok] * nx + xx[ok], (w * q[ok]).astype(np.float32))
    return out.reshape(ny, nx)


def digitize(electrons: np.ndarray, det: DetectorModel, drift: np.ndarray, n_overscan: int,
             saturation: int, rng: np.random.Generator, cosmic_e: np.ndarray | None = None) -> np.ndarray:
    """Turn an expected-electron image into a raw frame.

    Parameters
    ----------
    electrons : ndarray, shape (ny, nx)
        Expected photo-electrons per pixel (after the pixel response), >= 0.
    det : DetectorModel
    drift : ndarray, shape (ny,)
        Per-row bias drift of this frame (ADU), shared with the overscan.
    n_overscan : int
        Overscan columns appended to the right.
    saturation : int
        ADC ceiling (ADU).
    rng : Generator
        Noise stream of this frame and camera.
    cosmic_e : ndarray, optional
        Cosmic-ray electrons (not Poisson-resampled).

    Returns
    -------
    ndarray of uint16, shape (ny, nx + n_overscan)
    """
    ny, nx = electrons.shape
    signal = rng.poisson(np.maximum(electrons, 0.0)).astype(np.float64)
    if cosmic_e is not None:
        signal += cosmic_e
    signal += det.read_noise * rng.standard_normal((ny, nx), dtype=np.float32)
    raw = np.empty((ny, nx + n_overscan), dtype=np.float64)
    level = det.bias_adu + drift[:, None]
    raw[:, :nx] = signal / det.gain + level + det.pattern
    raw[:, nx:] = (det.read_noise / det.gain) * rng.standard_normal((ny, n_overscan), dtype=np.float32) + level
    return np.clip(np.floor(raw + 0.5), 0, saturation).astype(np.uint16)
