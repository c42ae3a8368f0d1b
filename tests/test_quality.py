"""Quality metrics: seed 000 eq. 14 and 15, DER_SNR."""

from __future__ import annotations

import numpy as np
import pytest

from fiberlake.processors.quality import der_snr, snr_eq15, variance_eq14
from fiberlake.schemas.maskbits import Mask


def _noisy(seed=0, n_fibers=50, n=3000, level=100.0, sigma=5.0):
    rng = np.random.default_rng(seed)
    return level + sigma * rng.normal(size=(n_fibers, n))


def test_variance_eq14_against_numpy_and_masks():
    f = _noisy(1, 4, 500)
    np.testing.assert_allclose(variance_eq14(f), np.var(f, axis=1), rtol=1e-12)
    bits = np.zeros(f.shape, np.uint32)
    bits[0, :100] = Mask.COSMIC        # fatal: excluded
    bits[1, :100] = Mask.SOMEBADPIX    # not fatal: kept
    f2 = f.copy()
    f2[0, :100] = 1e6
    f2[2, 5] = np.nan                  # non-finite: excluded
    v = variance_eq14(f2, bits)
    assert v[0] == pytest.approx(np.var(f[0, 100:]), rel=1e-12)
    assert v[1] == pytest.approx(np.var(f[1]), rel=1e-12)
    assert v[2] == pytest.approx(np.var(np.delete(f[2], 5)), rel=1e-12)
    boolmask = np.zeros(f.shape, bool)
    boolmask[3] = True
    assert np.isnan(variance_eq14(f, boolmask)[3])
    assert np.ndim(variance_eq14(f[0])) == 0


def _snr15_reference(y, good, width, a, b):
    """Plain-Python transcription of the ratio-of-means reading, shrinking windows."""
    half = width // 2
    n = len(y)
    num = den = 0.0
    for i in range(a, b):
        if not good[i]:
            continue
        win = [y[j] for j in range(max(0, i - half), min(n, i + half + 1)) if good[j]]
        m = float(np.median(win))
        num += m
        den += abs(y[i] - m)
    return num / den


def test_snr_eq15_against_loop_reference():
    rng = np.random.default_rng(2)
    y = 50 + 10 * np.sin(np.arange(300) / 20) + 3 * rng.normal(size=300)
    good = rng.uniform(size=300) > 0.1
    for width, rng_ in [(11, None), (11, (0, 120)), (7, (250, 300))]:
        a, b = rng_ if rng_ else (0, 300)
        got = snr_eq15(y, ~good, width=width, pixel_range=rng_)
        assert got == pytest.approx(_snr15_reference(y, good, width, a, b), rel=1e-12)


def test_snr_eq15_scale_for_white_noise():
    f = _noisy(3)
    ratio = snr_eq15(f) / (100.0 / 5.0)
    # documented: mean|F - median11| ~ 0.74 sigma, so eq. 15 reads ~1.35x the true SNR
    assert np.median(ratio) == pytest.approx(1.35, abs=0.03)
    # and it scales with the true SNR
    assert np.median(snr_eq15(_noisy(3, sigma=10.0))) == pytest.approx(np.median(snr_eq15(f)) / 2, rel=0.03)


def _der_snr_reference(flux):
    """Stoehr et al. (2008) reference code, transcribed (zeros removed, n > 4)."""
    flux = np.array(flux[np.where(flux != 0.0)])
    n = len(flux)
    signal = np.median(flux)
    noise = 0.6052697 * np.median(np.abs(2.0 * flux[2:n - 2] - flux[0:n - 4] - flux[4:n]))
    return float(signal / noise)


def test_der_snr_matches_reference_and_true_snr():
    f = _noisy(4, 5, 2000)
    got = der_snr(f)
    for i in range(5):
        assert got[i] == pytest.approx(_der_snr_reference(f[i]), rel=1e-6)
    assert np.median(der_snr(_noisy(5))) == pytest.approx(20.0, rel=0.03)


def test_der_snr_ignores_masked_pixels():
    f = _noisy(6, 3, 2000)
    clean = der_snr(f)
    bad = np.zeros(f.shape, bool)
    bad[:, 300:700] = True
    f2 = f.copy()
    f2[:, 300:700] = 1e5 * np.random.default_rng(0).uniform(size=(3, 400))
    masked = der_snr(f2, bad)
    reference = [_der_snr_reference(np.delete(f[i], np.arange(300, 700))) for i in range(3)]
    np.testing.assert_allclose(masked, reference, rtol=1e-6)  # 0.6052697 vs 1.482602/sqrt(6)
    np.testing.assert_allclose(masked, clean, rtol=0.08)
    assert np.all(der_snr(f2) < 0.85 * clean)  # unmasked garbage drags it down (robustly)
    few = np.ones(f.shape, bool)
    few[0, :4] = False
    assert np.isnan(der_snr(f, few)[0])
