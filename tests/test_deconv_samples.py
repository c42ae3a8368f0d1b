"""PSF samples of a calibration set, sampled once and reused across frames (issue 19)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from fiberlake.processors import deconv as D  # noqa: E402
from fiberlake.processors import psf as P  # noqa: E402
from fiberlake.schemas.maskbits import Mask  # noqa: E402
from synthetic_deconv import (arc_rows, camera, flat_binned, image_of, observe, science_binned,  # noqa: E402
                              traces_from_truth)

SEED = 7319  # used by no other test


@pytest.fixture(scope="module")
def calib():
    rng = np.random.default_rng(SEED)
    cam = camera(SEED)
    traces = traces_from_truth(cam, dead=(3,))
    flat, flat_iv = observe(image_of(cam, flat_binned(cam)), rng)
    arc, arc_iv = observe(cam.render(cam.throughput[:, None] * arc_rows(cam, rng)), rng)
    psf = P.fit_psf(flat, flat_iv, None, arc, arc_iv, None, traces)
    mags = np.linspace(13.0, 18.0, cam.instrument.n_fibers)
    frames = []
    for _ in range(2):                                   # two exposures of the same calibration set
        img, iv = observe(image_of(cam, science_binned(cam, rng, mags)), rng)
        frames.append((img, iv))
    return traces, psf, frames


def test_samples_sampled_once_per_set_change_no_table(calib, monkeypatch):
    traces, psf, frames = calib
    params = D.DeconvParams(device="cpu")
    D._samples_cache.clear()
    img, iv = frames[1]
    mask = np.zeros(img.shape, np.uint32)
    mask[40:44, 30:60] = Mask.COSMIC                     # a frame's own bad pixels, not the set's
    iv = np.where(mask > 0, 0.0, iv)
    fresh = D.prepare(img, iv, mask, traces, psf, params.pad_rows)        # sampled for this frame
    calls = []
    real = D.sample_psf
    monkeypatch.setattr(D, "sample_psf", lambda *a, **k: calls.append(1) or real(*a, **k))
    D.deconv_extract(frames[0][0], frames[0][1], None, traces, psf, params)
    D.deconv_extract(img, iv, mask, traces, psf, params)
    assert len(calls) == 1                               # the second frame reused the samples
    samples = D.sample_psf(traces, psf, *img.shape, params.pad_rows)
    reused = D.prepare(img, iv, mask, traces, psf, params.pad_rows, samples=samples)
    for name in ("lsf", "first", "prof", "gx", "ox", "bits", "ngood", "K0", "K1", "b"):
        np.testing.assert_array_equal(getattr(reused, name), getattr(fresh, name), err_msg=name)
    assert not np.array_equal(reused.gx, D.prepare(img, frames[1][1], None, traces, psf, params.pad_rows,
                                                   samples=samples).gx)       # the frame's mask still counts


def test_samples_of_another_shape_are_refused(calib):
    traces, psf, frames = calib
    img, iv = frames[0]
    samples = D.sample_psf(traces, psf, *img.shape, 5)
    with pytest.raises(ValueError, match="PSF samples"):
        D.prepare(img, iv, None, traces, psf, 8, samples=samples)
