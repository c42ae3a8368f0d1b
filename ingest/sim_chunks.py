"""Training and test chunks for the PSF-conditioned CAE (seed 002): one scene, two renderings.

Each chunk is a window of a rectified frame (rows: wavelength, columns: across the slit): fibers
at the instrument's pitch on straight traces, each with a spectrum (continuum with absorption
lines, sky continuum and sky emission lines shared by every fiber at the same rows, as a
rectified frame has them). The scene is rendered twice, as the paper's data set is:

* with the instrument PSF (the simulator's own core + wing profile,
  :func:`fiberlake.ingest.sim_optics.pixel_weights`, drawn per chunk within the range the
  simulator produces), plus Poisson and read noise: the noisy chunk;
* with a small invariant Gaussian target PSF (``target_sigma``), noiseless: the truth.

Some chunks are blank (no light at all, only read noise), as the paper's "blanks". Spectral
shapes come from the simulator's spectra module (:func:`~fiberlake.ingest.sim_spectra.planck_photons`
continua, :func:`~fiberlake.ingest.sim_spectra.sky_line_list` sky lines); the truth per fiber
(electrons per row before any LSF) is returned too, for spectral figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fiberlake.ingest.sim_optics import pixel_weights
from fiberlake.ingest.sim_spectra import planck_photons, sky_continuum, sky_line_list


@dataclass
class ChunkScene:
    """A set of simulated chunks.

    Attributes
    ----------
    noisy : ndarray, shape (n, H, W)
        Electrons, instrument PSF, Poisson + read noise.
    ivar : ndarray, shape (n, H, W)
        Inverse variance of ``noisy`` (read noise^2 + expected counts).
    expected : ndarray, shape (n, H, W)
        Noiseless instrument-PSF rendering.
    truth : ndarray, shape (n, H, W)
        Noiseless rendering with the target PSF.
    kernel : ndarray, shape (n, 2 W_l + 1, 2 W_x + 1)
        Instrument PSF of each chunk (unit sum, centred).
    fiber_x : ndarray, shape (n, m)
        Trace column of each fiber (NaN when a chunk has fewer).
    rows_flux : ndarray, shape (n, m, H)
        Electrons per row of each fiber before any LSF (the spectral truth).
    blank : ndarray of bool, shape (n,)
    target_sigma : float
    read_noise : float
    """

    noisy: np.ndarray
    ivar: np.ndarray
    expected: np.ndarray
    truth: np.ndarray
    kernel: np.ndarray
    fiber_x: np.ndarray
    rows_flux: np.ndarray
    blank: np.ndarray
    target_sigma: float
    read_noise: float
    sigma_rows: np.ndarray | None = None
    sigma_cols: np.ndarray | None = None
    rows_inst: np.ndarray | None = None
    """``(n, m, H)`` electrons per row of each fiber after the instrument LSF."""
    rows_target: np.ndarray | None = None
    """``(n, m, H)`` electrons per row of each fiber after the target LSF."""
    line_rows: list | None = None
    """Per chunk, the ``(fiber, row, flux)`` of its emission lines."""

    def __len__(self) -> int:
        return self.noisy.shape[0]


def _profile(rel, sigma, frac, sep, ratio=1.5):
    return pixel_weights(rel, np.asarray(sigma, float), np.asarray(frac, float), np.asarray(sep, float), ratio,
                         dtype=np.float64)


def _gauss(rel, sigma):
    return _profile(rel, sigma, np.zeros_like(np.asarray(sigma, float)), np.zeros_like(np.asarray(sigma, float)))


def _render(rows_img: np.ndarray, x: np.ndarray, W: int, profile_of, half: int) -> np.ndarray:
    """Spread per-row electrons ``(m, H)`` of fibers at columns ``x`` across ``W`` columns."""
    m, H = rows_img.shape
    pad = half + 2 + int(np.ceil(max(0.0, -float(np.min(x)), float(np.max(x)) - W)))
    img = np.zeros((H, W + 2 * pad))
    start = np.rint(x).astype(int) - half
    rel = start[:, None] + np.arange(2 * half + 1)[None, :] - x[:, None]
    w = profile_of(rel)  # (m, 2 half + 1)
    for f in range(m):
        c0 = start[f] + pad
        img[:, c0:c0 + 2 * half + 1] += rows_img[f][:, None] * w[f][None, :]
    return img[:, pad:pad + W]


def _lsf_apply(pre: np.ndarray, lines: list, H: int, lsf_of, half: int) -> np.ndarray:
    """Rows after an LSF: continuum ``pre`` (m, H) convolved, plus lines ``(fiber, row, flux)``."""
    rel = np.arange(-half, half + 1, dtype=float)
    k = lsf_of(rel[None, :])[0]
    out = np.stack([np.convolve(np.pad(p, half, mode="edge"), k[::-1], mode="valid") for p in pre])
    for f, r, a in lines:
        first = int(np.rint(r)) - half
        w = lsf_of((first + np.arange(2 * half + 1) - r)[None, :])[0]
        idx = first + np.arange(2 * half + 1)
        ok = (idx >= 0) & (idx < H)
        out[f, idx[ok]] += a * w[ok]
    return out


def simulate_chunks(n: int, seed: int, shape: tuple[int, int] = (96, 96), *, pitch: float = 16.0,
                    sigma_cols: tuple[float, float] = (1.9, 3.0), sigma_rows: tuple[float, float] = (1.1, 1.9),
                    wing_frac: tuple[float, float] = (0.08, 0.2), wing_offset: float = 1.5,
                    target_sigma: float = 0.8, read_noise: float = 3.5, blank_fraction: float = 0.1,
                    empty_fiber_fraction: float = 0.15, level: tuple[float, float] = (0.5, 4.0),
                    wave_range: tuple[float, float] = (3700.0, 9000.0), fixed_psf: dict | None = None,
                    with_sky: bool = True) -> ChunkScene:
    """Simulate ``n`` chunks (see the module notes). The same seed gives the same chunks.

    Parameters
    ----------
    n : int
    seed : int
    shape : tuple of int
        (rows, columns) of each chunk.
    pitch : float
        Fiber spacing (px): the instrument's ``fiber_pitch``.
    sigma_cols, sigma_rows : tuple of float
        Ranges of the instrument PSF's core sigma across / along the slit (px).
    wing_frac : tuple of float
        Range of the wing's flux fraction.
    wing_offset : float
        Wing offsets drawn in ``[-wing_offset, wing_offset]`` (px) on each axis.
    target_sigma : float
        Sigma (px) of the truth's invariant Gaussian PSF.
    read_noise : float
        Electrons.
    blank_fraction : float
        Chunks with no light.
    empty_fiber_fraction : float
        Fibers without light in lit chunks (dark neighbours: crosstalk).
    level : tuple of float
        log10 range of a fiber's continuum (electrons per row).
    wave_range : tuple of float
        Wavelength range from which a chunk's central wavelength is drawn (continuum shapes).
    fixed_psf : dict, optional
        ``{"sigma_cols", "sigma_rows", "frac", "dx", "dy"}``: one PSF for every chunk.
    with_sky : bool
        Add sky continuum and lines.
    """
    rng = np.random.default_rng(seed)
    H, W = shape
    hx, hy = 12, 8
    m = int(np.ceil(W / pitch)) + 2
    sky_wave, sky_flux = sky_line_list(np.random.default_rng(seed + 1))
    sky_flux = np.asarray(sky_flux, float)
    out = {k: np.zeros((n, H, W)) for k in ("noisy", "expected", "truth")}
    kernels = np.zeros((n, 2 * hy + 1, 2 * hx + 1))
    fiber_x = np.full((n, m), np.nan)
    rows_flux = np.zeros((n, m, H))
    rows_inst = np.zeros((n, m, H), np.float32)
    rows_target = np.zeros((n, m, H), np.float32)
    line_rows: list = []
    blank = rng.random(n) < blank_fraction
    s_rows = np.zeros(n)
    s_cols = np.zeros(n)
    for i in range(n):
        if fixed_psf is None:
            sc, sr = rng.uniform(*sigma_cols), rng.uniform(*sigma_rows)
            fr = rng.uniform(*wing_frac)
            dx, dy = rng.uniform(-wing_offset, wing_offset, size=2)
        else:
            sc, sr, fr, dx, dy = (fixed_psf[k] for k in ("sigma_cols", "sigma_rows", "frac", "dx", "dy"))
        s_rows[i], s_cols[i] = sr, sc

        def xsf(rel, sc=sc, fr=fr, dx=dx):
            return _profile(rel, np.full(rel.shape[0], sc), np.full(rel.shape[0], fr), np.full(rel.shape[0], dx))

        def lsf(rel, sr=sr, fr=fr, dy=dy):
            return _profile(rel, np.full(rel.shape[0], sr), np.full(rel.shape[0], fr), np.full(rel.shape[0], dy))

        def target(rel):
            return _gauss(rel, np.full(rel.shape[0], target_sigma))
        kernels[i] = np.outer(lsf(np.arange(-hy, hy + 1.0)[None])[0], xsf(np.arange(-hx, hx + 1.0)[None])[0])
        x = rng.uniform(-pitch, 0) + pitch * np.arange(m) + rng.normal(0, 0.2, m)
        fiber_x[i] = x
        pre = np.zeros((m, H))
        lines: list = []
        if not blank[i]:
            rows = np.arange(H, dtype=float)
            wave0 = rng.uniform(*wave_range)
            dwave = rng.uniform(0.5, 0.9)
            wave = wave0 + dwave * (rows - H / 2)
            lit = rng.random(m) >= empty_fiber_fraction
            teff = rng.uniform(3500, 12000, m)
            amp = 10 ** rng.uniform(*level, m)
            for f in np.flatnonzero(lit):
                cont = planck_photons(wave, teff[f])
                cont = cont / cont.mean() * amp[f]
                for _ in range(rng.poisson(1.5)):  # absorption lines
                    r0, w0, d = rng.uniform(0, H), rng.uniform(0.6, 2.5), rng.uniform(0.1, 0.8)
                    cont = cont * (1 - d * np.exp(-0.5 * ((rows - r0) / w0) ** 2))
                pre[f] = cont
                for _ in range(rng.poisson(0.4)):  # narrow emission lines of the target
                    lines.append((f, rng.uniform(0, H - 1), amp[f] * rng.uniform(2, 30)))
            if with_sky:
                sky = sky_continuum(wave)
                sky = sky / max(sky.mean(), 1e-30) * 10 ** rng.uniform(0.3, 1.8)
                pre += sky[None, :]
                sel = (sky_wave > wave[0]) & (sky_wave < wave[-1])
                scale = 10 ** rng.uniform(2.5, 3.5)
                for w, a in zip(sky_wave[sel], sky_flux[sel]):
                    r = (w - wave[0]) / dwave
                    lines += [(f, r, a * scale) for f in range(m)]
        rows_flux[i] = pre
        for f, r, a in lines:  # the spectral truth: lines land within one row
            ri = int(np.floor(r + 0.5))
            if 0 <= ri < H:
                rows_flux[i, f, ri] += a
        inst_rows = _lsf_apply(pre, lines, H, lsf, hy)
        targ_rows = _lsf_apply(pre, lines, H, target, hy)
        rows_inst[i], rows_target[i] = inst_rows, targ_rows
        line_rows.append(lines)
        expected = _render(inst_rows, x, W, xsf, hx)
        out["expected"][i] = expected
        out["truth"][i] = _render(targ_rows, x, W, target, hx)
        out["noisy"][i] = rng.poisson(np.clip(expected, 0, None)) + rng.normal(0, read_noise, expected.shape)
    ivar = 1.0 / (read_noise**2 + np.clip(out["expected"], 0, None))
    return ChunkScene(noisy=out["noisy"].astype(np.float32), ivar=ivar.astype(np.float32),
                      expected=out["expected"].astype(np.float32), truth=out["truth"].astype(np.float32),
                      kernel=kernels, fiber_x=fiber_x, rows_flux=rows_flux.astype(np.float32), blank=blank,
                      target_sigma=target_sigma, read_noise=read_noise, sigma_rows=s_rows, sigma_cols=s_cols,
                      rows_inst=rows_inst, rows_target=rows_target, line_rows=line_rows)
