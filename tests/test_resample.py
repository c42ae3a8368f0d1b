"""Flux-conserving resampling from CCD rows to a wavelength grid."""

from __future__ import annotations

import numpy as np
import pytest

from fiberlake.schemas.containers import Spectra1D
from fiberlake.processors.resample import resample_to_grid
from fiberlake.schemas.maskbits import Mask

NF, NY = 4, 600


def _wave(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r = np.arange(NY, dtype=float)
    # nonlinear dispersion, a different offset per fiber
    return 5000.0 + rng.uniform(-4, 4, (NF, 1)) + 0.55 * r + 4e-5 * r**2 - 2e-8 * r**3


def _spectra(flux, ivar=None, mask=None):
    flux = np.asarray(flux, float)
    ivar = np.ones_like(flux) if ivar is None else ivar
    mask = np.zeros(flux.shape, np.uint32) if mask is None else mask
    return Spectra1D(flux, ivar, mask)


def _grid(wave, step=0.6, margin=2.0):
    lo, hi = wave[:, 0].max() + margin, wave[:, -1].min() - margin
    return lo + step * np.arange(int((hi - lo) / step))


def _edges(c):
    m = 0.5 * (c[1:] + c[:-1])
    return np.concatenate([[2 * c[0] - m[0]], m, [2 * c[-1] - m[-1]]])


@pytest.mark.parametrize("step", [0.6, 1.9])
def test_counts_conserved_against_supersampled_reference(step):
    wave = _wave(1)
    rng = np.random.default_rng(1)
    counts = rng.uniform(10, 200, (NF, NY))
    grid = _grid(wave, step)
    out = resample_to_grid(wave, _spectra(counts), grid)
    got = out.flux.astype(float) * step                    # counts per bin
    # reference: every row split into 400 equal sub-rows, binned with a histogram
    sub = 400
    gedges = _edges(grid)
    for f in range(NF):
        redges = _edges(wave[f])
        pos = redges[:-1, None] + (np.arange(sub) + 0.5)[None, :] / sub * np.diff(redges)[:, None]
        ref, _ = np.histogram(pos.ravel(), bins=gedges, weights=np.repeat(counts[f] / sub, sub))
        np.testing.assert_allclose(got[f], ref, rtol=2e-3 * (1 + 2 / step), atol=0.1)
        # exact conservation over the covered rows: sum of bins == counts between the outer edges
        lo_t = np.interp(gedges[0], redges, np.arange(NY + 1))
        hi_t = np.interp(gedges[-1], redges, np.arange(NY + 1))
        cum = np.concatenate([[0], np.cumsum(counts[f])])
        expect = np.interp(hi_t, np.arange(NY + 1), cum) - np.interp(lo_t, np.arange(NY + 1), cum)
        assert got[f].astype(float).sum() == pytest.approx(expect, rel=1e-6)  # float32 output


def test_constant_flux_density_is_exact():
    wave = _wave(2)
    redges = np.stack([_edges(w) for w in wave])
    counts = 7.5 * np.diff(redges, axis=1)                 # 7.5 e-/A in every row
    out = resample_to_grid(wave, _spectra(counts), _grid(wave))
    np.testing.assert_allclose(out.flux, 7.5, rtol=1e-6)  # float32 in and out


def test_ivar_propagation_noise_only():
    wave = _wave(3)
    rng = np.random.default_rng(3)
    sigma = rng.uniform(2, 6, (NF, NY))
    grid = _grid(wave, 0.8)
    n_real = 300
    outs = []
    for _ in range(n_real):
        s = _spectra(sigma * rng.normal(size=(NF, NY)), 1 / sigma**2)
        outs.append(resample_to_grid(wave, s, grid))
    ivar = outs[0].ivar
    flux = np.stack([o.flux for o in outs])
    chi2 = np.mean(flux**2 * ivar)
    assert chi2 == pytest.approx(1.0, abs=0.02)
    # bin by bin: Monte Carlo variance against the propagated one
    ratio = np.var(flux, axis=0) * ivar
    assert np.median(ratio) == pytest.approx(1.0, abs=0.03)
    assert np.all(np.abs(ratio - 1) < 0.45)


def test_bad_rows_offccd_and_extrapolation():
    wave = _wave(4)
    counts = np.full((NF, NY), 100.0)
    ivar = np.ones((NF, NY))
    mask = np.zeros((NF, NY), np.uint32)
    ivar[1, 300] = 0
    mask[1, 300] = Mask.COSMIC
    mask[2, 200] = Mask.SOMEBADPIX  # non-fatal: travels, ivar kept
    lo = wave.min() - 10
    grid = lo + 0.6 * np.arange(int((wave.max() + 10 - lo) / 0.6))
    row_range = np.tile([50.0, 550.0], (NF, 1))
    out = resample_to_grid(wave, _spectra(counts, ivar, mask), grid, row_range=row_range)
    assert np.all(np.isfinite(out.flux)) and np.all(np.isfinite(out.ivar))
    # the bad row kills the 1-3 bins it overlaps, and only those
    hit = (out.mask[1] & Mask.COSMIC) != 0
    assert 1 <= hit.sum() <= 3 and np.all(out.ivar[1][hit] == 0)
    w300 = wave[1, 300]
    assert np.all(np.abs(grid[hit] - w300) < 1.2)
    soft = (out.mask[2] & Mask.SOMEBADPIX) != 0
    assert 1 <= soft.sum() <= 3 and np.all(out.ivar[2][soft] > 0)
    # beyond the rows: OFFCCD, flux 0, ivar 0
    off = (out.mask & Mask.OFFCCD) != 0
    for f in range(NF):
        beyond = (grid - 0.3 < wave[f, 0] - 0.27) | (grid + 0.3 > wave[f, -1] + 0.27)
        inside = (grid > wave[f, 0] + 1) & (grid < wave[f, -1] - 1)
        assert np.all(off[f][beyond]) and not np.any(off[f][inside])
    assert np.all(out.ivar[off] == 0) and np.all(out.flux[off] == 0)
    # extrapolated wavelengths flagged, not killed
    ext = (out.mask & Mask.EXTRAPWAVE) != 0
    inner = (grid > wave[:, 60:61]) & (grid < wave[:, 540:541])
    assert not np.any(ext & inner)
    assert np.all(ext[(grid < wave[:, 40:41]) & ~off])
    assert np.all(out.ivar[ext & ~off & ~hit[None, :]] > 0)


def test_decreasing_wavelength_rows():
    wave = _wave(5)
    rng = np.random.default_rng(5)
    counts = rng.uniform(10, 50, (NF, NY))
    grid = _grid(wave)
    a = resample_to_grid(wave, _spectra(counts), grid)
    b = resample_to_grid(wave[:, ::-1], _spectra(counts[:, ::-1]), grid)
    np.testing.assert_allclose(a.flux, b.flux, rtol=1e-10)
    np.testing.assert_allclose(a.ivar, b.ivar, rtol=1e-6)
    with pytest.raises(ValueError):
        mixed = wave.copy()
        mixed[0] = mixed[0, ::-1]
        resample_to_grid(mixed, _spectra(counts), grid)
