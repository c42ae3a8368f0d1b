"""Fiber flat in row space: response recovery, propagation, dead and low fibers."""

from __future__ import annotations

import numpy as np
import pytest

from fiberlake.schemas.containers import Spectra1D
from fiberlake.processors.fiberflat import apply_fiberflat, compute_fiberflat, running_median
from fiberlake.schemas.maskbits import Mask

NF, NY = 12, 1200


def _setup(seed: int, tilt: float = 0.0, disp_spread: float = 0.02, max_shift: float = 15.0):
    """Flat lamp seen through fibers with their own wavelength(row), throughput, pixel response."""
    rng = np.random.default_rng(seed)
    rows = np.arange(NY)
    shift = rng.uniform(-max_shift, max_shift, (NF, 1))        # Angstrom, fiber to fiber
    disp = (0.54 * (1 + 0.05 * (rows - NY / 2) / NY)[None, :]
            * rng.uniform(1 - disp_spread, 1 + disp_spread, (NF, 1)))
    wave = 4800 + shift + np.cumsum(disp, axis=1)
    lamp = 2e5 * np.exp(-0.5 * ((wave - 5000) / 600) ** 2) * (1 + 0.2 * np.sin(wave / 90))
    through = rng.uniform(0.6, 1.4, (NF, 1)) * (1 + tilt * rng.uniform(-1, 1, (NF, 1)) * (wave - 5100) / 500)
    pixel = 1 + 0.01 * rng.normal(size=(NF, NY))
    true_resp = through * pixel
    counts = lamp * disp * true_resp
    noise = np.sqrt(counts + 12.0)
    flat = Spectra1D(counts + noise * rng.normal(size=counts.shape), 1 / noise**2,
                     np.zeros((NF, NY), np.uint32))
    return wave, disp, true_resp, flat


def _relative_error(resp, true):
    ratio = resp / true
    return ratio / np.median(ratio) - 1


@pytest.mark.parametrize("mode", ["own_smooth", "lamp_reference"])
def test_recovers_throughput_and_pixel_response(mode):
    # own smoothing cannot tell throughput from dispersion or from the lamp slope times a
    # wavelength shift: give every fiber the same dispersion and shifts of 1 A at most
    own = mode == "own_smooth"
    wave, disp, true, flat = _setup(1, disp_spread=0.0 if own else 0.02, max_shift=1.0 if own else 15.0)
    dead = np.zeros(NF, bool)
    ff = compute_fiberflat(flat, dead, smooth=51, wave_rows=wave if mode == "lamp_reference" else None)
    err = _relative_error(ff.flux, true)
    assert np.std(err[:, 30:-30]) < 0.005          # flat noise ~0.3 % per row
    assert np.max(np.abs(err.mean(axis=1))) < 0.005  # throughput per fiber
    assert np.max(np.abs(err)) < 0.02              # ends included
    live_median = np.median(ff.flux)
    assert live_median == pytest.approx(1.0, abs=1e-3)
    # ivar from the flat's noise (row to row, about each fiber's own level); the smooth
    # reference adds its own (uncounted, correlated) error: ~1.17x in own-smoothing mode
    pull = (ff.flux - true * np.median(ff.flux / true, axis=1, keepdims=True)) * np.sqrt(ff.ivar)
    assert 0.95 < np.std(pull[:, 30:-30]) < (1.3 if own else 1.1)
    assert np.all(ff.mask == 0)


def test_own_smoothing_mistakes_dispersion_for_throughput():
    # documented limitation: without wavelengths, a fiber with 2 % more A/row looks 2 % brighter
    wave, disp, true, flat = _setup(5, disp_spread=0.02, max_shift=1.0)
    dead = np.zeros(NF, bool)
    own = _relative_error(compute_fiberflat(flat, dead).flux, true).mean(axis=1)
    ref = _relative_error(compute_fiberflat(flat, dead, wave_rows=wave).flux, true).mean(axis=1)
    rel_disp = disp.mean(axis=1) / np.median(disp.mean(axis=1)) - 1
    assert np.corrcoef(own, rel_disp)[0, 1] > 0.9
    assert np.std(ref) < np.std(own) / 4


def test_lamp_reference_keeps_slow_throughput_differences():
    wave, disp, true, flat = _setup(2, tilt=0.05)
    dead = np.zeros(NF, bool)
    ref_mode = _relative_error(compute_fiberflat(flat, dead, wave_rows=wave).flux, true)
    own_mode = _relative_error(compute_fiberflat(flat, dead).flux, true)
    # a factor common to all fibers (here: the median tilt) cancels later; remove it
    ref_mode -= ref_mode.mean(axis=0)
    own_mode -= own_mode.mean(axis=0)
    assert np.std(ref_mode) < 0.004
    assert np.std(own_mode) > 3 * np.std(ref_mode)  # own smoothing cannot see a slow tilt


def test_dead_and_low_fibers():
    wave, disp, true, flat = _setup(3)
    flat.flux[4] = np.random.default_rng(0).normal(0, 3, NY)   # no light
    flat.flux[7] *= 0.05                                        # 5 % throughput
    dead = np.zeros(NF, bool)
    dead[4] = True
    ff = compute_fiberflat(flat, dead)
    assert np.all(ff.ivar[4] == 0) and np.all(ff.mask[4] & Mask.DEADFIBER)
    assert np.all(ff.mask[7] & Mask.LOWFLAT)
    assert np.median(ff.flux[~dead]) == pytest.approx(1.0, abs=2e-3)  # low fibers are live
    live = np.delete(np.arange(NF), [4, 7])
    sci = Spectra1D(np.full((NF, NY), 100.0), np.full((NF, NY), 0.01), np.zeros((NF, NY), np.uint32))
    out = apply_fiberflat(sci, ff)
    assert np.all(out.ivar[[4, 7]] == 0) and np.all(np.isfinite(out.flux))
    assert np.all(out.mask[4] & Mask.DEADFIBER) and np.all(out.mask[7] & Mask.LOWFLAT)
    assert np.all(out.ivar[live] > 0)


def test_apply_divides_and_propagates_variance():
    rng = np.random.default_rng(4)
    n = 200_000
    R, sR, F, sF = 0.8, 0.01, 500.0, 20.0
    ff = Spectra1D(np.full((1, 1), R), np.full((1, 1), 1 / sR**2), np.zeros((1, 1), np.uint32))
    sci = Spectra1D(np.full((1, 1), F), np.full((1, 1), 1 / sF**2), np.zeros((1, 1), np.uint32))
    out = apply_fiberflat(sci, ff)
    assert out.flux[0, 0] == pytest.approx(F / R, rel=1e-6)
    # Monte Carlo of the ratio of two noisy numbers
    mc = (F + sF * rng.normal(size=n)) / (R + sR * rng.normal(size=n))
    assert 1 / np.sqrt(out.ivar[0, 0]) == pytest.approx(np.std(mc), rel=0.02)


def test_running_median_keeps_linear_trends_and_skips_bad():
    x = np.arange(300, dtype=float)
    y = (2.0 + 0.01 * x)[None, :].repeat(2, axis=0)
    good = np.ones_like(y, bool)
    y[1, 100:110] = 1e6
    good[1, 100:110] = False
    sm = running_median(y, good, 51)
    np.testing.assert_allclose(sm, np.broadcast_to(2.0 + 0.01 * x, sm.shape), atol=1e-9)
