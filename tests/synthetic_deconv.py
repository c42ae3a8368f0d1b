"""Small simulated frames with known pre-LSF input for the PSF and deconvolution tests.

A tiny instrument (12 fibers, 256 rows) goes through the simulator's optics
(:func:`fiberlake.ingest.sim_optics.build_camera_model`): curved traces, a PSF that grows and
becomes asymmetric toward the corners (core + offset wing Gaussians). Frames are rendered in
electrons with Poisson and read noise (no CCD stage), from row-binned light *before* the LSF,
so the deconvolution's truth ``F`` is known exactly.
"""

from __future__ import annotations

import numpy as np
from numpy.polynomial import legendre

from fiberlake.ingest.sim_optics import build_camera_model
from fiberlake.ingest.sim_params import SimParams
from fiberlake.schemas.containers import TraceSet
from fiberlake.schemas.instrument import ArmSpec, Instrument

TINY = Instrument(
    name="tiny", n_spectrographs=1,
    arms=(ArmSpec("b", wave_center=4950.0, dispersion=2200.0 / 4096, lsf_sigma_px=1.4),),
    n_fibers=12, ny=256, nx=224, n_overscan=0,
)
READ_NOISE = 3.5
NO_DEAD = SimParams(dead_fiber_probs=(1.0, 0.0, 0.0))


def camera(seed: int, night: str = "2026-02-02", instrument: Instrument = TINY, params: SimParams = NO_DEAD):
    """Camera model of the tiny instrument (no dead fibers by default)."""
    return build_camera_model(instrument, "b1", night, seed, params)


def traces_from_truth(cam, dead=(), deg: int = 5) -> TraceSet:
    """Legendre fits of the true trace columns (the tracing stage is tested elsewhere)."""
    ny = cam.instrument.ny
    u = 2.0 * np.arange(ny) / (ny - 1) - 1.0
    coeffs = np.stack([legendre.legfit(u, x, deg) for x in cam.trace_x])
    nf = coeffs.shape[0]
    d = np.zeros(nf, bool)
    d[list(dead)] = True
    return TraceSet(coeffs=coeffs, ny=ny, dead=d, rms=np.zeros(nf), sigma=np.median(cam.sigma_x, axis=1))


def observe(expected: np.ndarray, rng: np.random.Generator, read_noise: float = READ_NOISE):
    """Poisson + read noise; ivar from the data (as the CCD stage computes it)."""
    obs = rng.poisson(np.clip(expected, 0, None)).astype(float) + rng.normal(0.0, read_noise, expected.shape)
    return obs, 1.0 / (read_noise**2 + np.clip(obs, 0, None))


def image_of(cam, binned_ext: np.ndarray, throughput: np.ndarray | None = None) -> np.ndarray:
    """Noiseless image of pre-LSF row-binned light ``(n_fibers, ny + 2 margin)``."""
    thr = cam.throughput if throughput is None else throughput
    return cam.render(thr[:, None] * cam.convolve_lsf(binned_ext))


def flat_binned(cam, level: float = 4.0e4) -> np.ndarray:
    """A continuum lamp: ``level`` electrons per row, slowly varying."""
    n_ext = cam.x_ext.shape[1]
    t = np.linspace(-1, 1, n_ext)
    return np.broadcast_to(level * (1.0 + 0.2 * t), (cam.instrument.n_fibers, n_ext)).copy()


def arc_rows(cam, rng: np.random.Generator, spacing: int = 22, flux=(2e4, 3e5)) -> np.ndarray:
    """Per-row electrons (after the LSF) of isolated lamp lines every ~``spacing`` rows."""
    ny = cam.instrument.ny
    rows = np.arange(10, ny - 10, spacing) + rng.uniform(-3, 3, size=len(range(10, ny - 10, spacing)))
    mid = cam.instrument.n_fibers // 2
    wave = np.interp(rows, np.arange(ny), cam.wave[mid])
    return cam.deposit_lines(wave, rng.uniform(*flux, size=wave.size))


def science_binned(cam, rng: np.random.Generator, mags: np.ndarray, exptime: float = 1200.0,
                   n_lines: int = 12) -> np.ndarray:
    """Pre-LSF electrons per extended row: continuum with absorption and emission lines."""
    grid = cam.fine_grid
    w = grid.wave
    lo, hi = float(cam.wave.min()), float(cam.wave.max())
    t = (w - lo) / (hi - lo)
    nf = cam.instrument.n_fibers
    spec = np.empty((nf, w.size))
    for f in range(nf):
        s = 1.0 + 0.3 * np.sin(2 * np.pi * (t * rng.uniform(1, 3) + rng.uniform()))
        for _ in range(n_lines):
            c, width, a = rng.uniform(lo, hi), rng.uniform(0.05, 1.0), rng.uniform(-0.6, 2.0)
            s += a * np.exp(-0.5 * ((w - c) / width) ** 2)
        spec[f] = np.clip(s, 0.02, None)
    scale = 1.5 * 10 ** (-0.4 * (np.asarray(mags, float) - 16.0)) * exptime
    return cam.bin_continuum(grid, spec * scale[:, None])


def truth_F(cam, binned_ext: np.ndarray, h: int, throughput: np.ndarray | None = None) -> np.ndarray:
    """What the deconvolution estimates: ``throughput * binned`` on rows ``-h .. ny + h - 1``."""
    thr = cam.throughput if throughput is None else throughput
    m, ny = cam.margin, cam.instrument.ny
    return thr[:, None] * binned_ext[:, m - h:m + ny + h]


def truth_stamp(cam):
    """A ``stamp`` callable (see :func:`fiberlake.processors.psf.arc_line_residuals`) from the
    simulator's true PSF."""
    from fiberlake.ingest.sim_optics import pixel_weights

    ratio = cam.params.wing_sigma_ratio
    ny = cam.instrument.ny
    cache: dict = {}

    def across(f, r0, r1, c0, c1):
        key = (f, r0, r1, c0, c1)
        if key not in cache:
            rows = np.arange(r0, r1)
            relc = np.arange(c0, c1)[None, :] - cam.trace_x[f, rows][:, None]
            cache[key] = pixel_weights(relc, cam.sigma_x[f, rows], cam.wing_frac[f, rows], cam.wing_dx[f, rows],
                                       ratio, dtype=np.float64)
        return cache[key]

    def stamp(f, centre, r0, r1, c0, c1):
        ci = int(np.clip(np.rint(centre), 0, ny - 1))
        rel = np.arange(r0, r1) - centre
        lw = pixel_weights(rel, cam.sigma_y[f, ci], cam.wing_frac[f, ci], cam.wing_dy[f, ci], ratio,
                           dtype=np.float64)
        return lw[:, None] * across(f, r0, r1, c0, c1)
    return stamp
