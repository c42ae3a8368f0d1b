"""Tests of processors/ccd.py: overscan, combine, preprocess (gain, ivar, masks, cosmics)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_dilation
from synthetic import distorted_traces, fiber_image, nominal_columns, raw_frame

from fiberlake.processors.ccd import (CCDImage, CCDParams, combine_frames, overscan_level, overscan_subtract,
                                      preprocess)
from fiberlake.schemas.header import parse_section
from fiberlake.schemas.instrument import MINI
from fiberlake.schemas.maskbits import MASK_DTYPE, Mask

NY, NX, NOVER = 256, 96, 24
GAIN, RN = 1.3, 3.5


def params(**kw) -> CCDParams:
    rows = slice(0, NY)
    return CCDParams(gain=GAIN, read_noise=RN, datasec=(rows, slice(0, NX)),
                     biassec=(rows, slice(NX, NX + NOVER)), **kw)


def test_overscan_level_follows_row_drift_and_ignores_hot_overscan_pixels():
    rng = np.random.default_rng(0)
    raw = raw_frame(np.zeros((NY, NX)), rng, gain=GAIN, read_noise=RN, n_overscan=NOVER, row_drift=8.0,
                    poisson=False).astype(float)
    raw[::7, NX + 3] = 60000.0  # hot overscan pixels (e.g. a cosmic ray in the overscan)
    truth = 1000.0 + 8.0 * np.sin(np.arange(NY) / NY * 2 * np.pi)  # raw_frame's bias level
    biassec = (slice(0, NY), slice(NX, NX + NOVER))
    level = overscan_level(raw, biassec)
    per_row = overscan_level(raw, biassec, smooth=1)
    # per-row noise is (RN/GAIN)/sqrt(24) ~ 0.55 ADU; the smoothing cuts it ~3x, ends included
    assert np.std(per_row - truth) == pytest.approx(0.55, abs=0.12)
    assert np.std(level - truth) < 0.25 and np.abs(level - truth).max() < 0.8
    assert abs(np.mean(level - truth)) < 0.1  # the 60000-ADU pixels were clipped
    assert np.abs(level[:5] - truth[:5]).max() < 0.8 and np.abs(level[-5:] - truth[-5:]).max() < 0.8


def test_overscan_subtract_returns_data_section_minus_level():
    rng = np.random.default_rng(5)
    raw = raw_frame(np.full((NY, NX), 300.0), rng, gain=GAIN, read_noise=RN, n_overscan=NOVER,
                    poisson=False).astype(float)
    datasec, biassec = (slice(0, NY), slice(0, NX)), (slice(0, NY), slice(NX, NX + NOVER))
    out = overscan_subtract(raw, datasec, biassec)
    assert out.dtype == np.float32 and out.shape == (NY, NX)
    np.testing.assert_allclose(out, raw[:, :NX] - overscan_level(raw, biassec)[:, None], atol=1e-3)
    assert out.mean() == pytest.approx(300.0 / GAIN, abs=0.1)


def test_overscan_subtract_rejects_mismatched_rows():
    raw = np.zeros((10, 8))
    with pytest.raises(ValueError):
        overscan_subtract(raw, (slice(0, 10), slice(0, 6)), (slice(0, 9), slice(6, 8)))


def test_combine_frames_clips_outliers_against_numpy_reference():
    rng = np.random.default_rng(1)
    frames = [100.0 + rng.normal(0, 2.0, (40, 30)) for _ in range(9)]
    frames[3][5, 7] = 5000.0  # cosmic ray in one frame
    frames[6][20, 1] = np.nan
    out = combine_frames(frames, sigma=3.0, block_rows=16)
    stack = np.stack(frames)
    others = np.delete(stack[:, 5, 7], 3)
    assert out[5, 7] == pytest.approx(others.mean(), abs=1e-4)
    assert out[20, 1] == pytest.approx(np.delete(stack[:, 20, 1], 6).mean(), abs=1e-4)
    # most pixels have no clipped value: plain mean
    plain = np.isclose(out, stack.mean(axis=0), atol=1e-4)
    assert plain.mean() > 0.97
    assert np.isfinite(out).all() and out.dtype == np.float32


def test_preprocess_gain_ivar_and_masks():
    rng = np.random.default_rng(2)
    truth = np.zeros((NY, NX))
    truth[:, 40:56] = 5000.0  # electrons
    raw = raw_frame(truth, rng, gain=GAIN, read_noise=RN, n_overscan=NOVER).astype(float)
    raw[10, 10] = 65535.0  # saturated
    raw[20, 20] = np.nan  # bad value
    img = preprocess(raw, params())
    assert isinstance(img, CCDImage)
    assert img.image.dtype == np.float32 and img.ivar.dtype == np.float32 and img.mask.dtype == MASK_DTYPE
    assert img.image.shape == (NY, NX)
    # electrons: the stripe mean matches the truth to within the Poisson error of the mean
    stripe = img.image[30:, 40:56]
    assert stripe.mean() == pytest.approx(5000.0, abs=5 * np.sqrt(5000.0 / stripe.size) + 1.0)
    # the pixel scatter matches the model ivar: unit normalised residuals where Poisson noise
    # dominates; slightly below 1 on empty pixels, where max(noise, 0) adds to the variance
    z = (img.image - truth) * np.sqrt(img.ivar)
    assert np.std(z[30:, 40:56]) == pytest.approx(1.0, abs=0.05)
    assert 0.9 < np.std(z[30:, :30]) < 1.0
    # independent ivar formula
    good = img.mask == 0
    expected = 1.0 / (RN ** 2 + np.maximum(img.image.astype(np.float64), 0.0))
    np.testing.assert_allclose(img.ivar[good], expected[good], rtol=1e-5)
    assert img.mask[10, 10] & Mask.SATURATED and img.ivar[10, 10] == 0
    assert img.mask[20, 20] & Mask.NONFINITE and img.ivar[20, 20] == 0 and img.image[20, 20] == 0
    assert np.isfinite(img.image).all()
    assert (img.mask != 0).sum() == 2


def test_preprocess_master_bias_removes_fixed_pattern():
    rng = np.random.default_rng(3)
    pattern = 4.0 * np.sin(np.arange(NX) / 5.0)[None, :] * np.ones((NY, 1))  # ADU
    def biasframe():
        r = raw_frame(np.zeros((NY, NX)), rng, gain=GAIN, read_noise=RN, n_overscan=NOVER, poisson=False)
        r = r.astype(float)
        r[:, :NX] += pattern
        return r
    p = params()
    master = combine_frames([overscan_subtract(biasframe(), p.datasec, p.biassec) for _ in range(8)])
    frame = biasframe()
    without = preprocess(frame, p).image
    with_mb = preprocess(frame, p, master_bias=master).image
    col_without = without.mean(axis=0)
    col_with = with_mb.mean(axis=0)
    assert np.std(col_without) > 2.0 * GAIN  # the pattern is there
    assert np.std(col_with) < 0.5  # and gone (electrons)
    with pytest.raises(ValueError):
        preprocess(frame, p, master_bias=master[:-1])


def test_preprocess_cosmics_flags_hits_not_arc_lines():
    rng = np.random.default_rng(4)
    ny, nx = 200, 160
    nom = nominal_columns(nx, 8)
    xt = distorted_traces(ny, nx, nom)
    spec = np.full((8, ny), 50.0)
    rows = np.arange(ny)
    for r0 in (30.3, 77.8, 120.1, 165.6):  # sharp arc lines, sigma 1.4 px
        spec += 3e4 * np.exp(-0.5 * ((rows - r0) / 1.4) ** 2) / (np.sqrt(2 * np.pi) * 1.4)
    truth = fiber_image(xt, nx, 2.4, spec)
    hits = np.zeros((ny, nx), bool)
    cr_r = rng.integers(5, ny - 5, 25)
    cr_c = rng.integers(5, nx - 5, 25)
    hits[cr_r, cr_c] = True
    hits[cr_r[:10] + 1, cr_c[:10]] = True  # some 2-pixel tracks
    with_cr = truth + hits * 4000.0
    sec = dict(datasec=(slice(0, ny), slice(0, nx)), biassec=(slice(0, ny), slice(nx, nx + NOVER)))
    p = CCDParams(gain=GAIN, read_noise=RN, **sec)
    raw = raw_frame(with_cr, rng, gain=GAIN, read_noise=RN, n_overscan=NOVER)
    img = preprocess(raw, p, cosmics=True)
    cr = (img.mask & MASK_DTYPE(Mask.COSMIC)) != 0
    assert cr[hits].mean() > 0.9
    # flags away from the hits (their 8 neighbours may be grown into the mask) are rare: the sharp
    # arc-line cores and fiber peaks are not taken for cosmic rays
    near = binary_dilation(hits, structure=np.ones((3, 3)))
    assert (cr & ~near).sum() <= 2
    assert np.all(img.ivar[cr] == 0)
    clean = preprocess(raw_frame(truth, rng, gain=GAIN, read_noise=RN, n_overscan=NOVER), p, cosmics=True)
    assert ((clean.mask & MASK_DTYPE(Mask.COSMIC)) != 0).sum() <= 2


def test_params_from_instrument_and_header_agree():
    from_inst = CCDParams.from_instrument(MINI)
    header = {"GAIN": MINI.gain, "RDNOISE": MINI.read_noise, "DATASEC": f"[1:{MINI.nx},1:{MINI.ny}]",
              "BIASSEC": f"[{MINI.nx + 1}:{MINI.nx + MINI.n_overscan},1:{MINI.ny}]"}
    from_hdr = CCDParams.from_header(header)
    assert from_inst == from_hdr
    d = from_inst.to_dict()
    assert parse_section(d["datasec"]) == from_inst.datasec and d["gain"] == MINI.gain
    assert CCDParams.from_instrument(MINI, cr_objlim=8.0).cr_objlim == 8.0
