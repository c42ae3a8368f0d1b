"""PSF-conditioned CAE deconvolution (seed 002): network, inputs, afterburner, extraction, artifacts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import fftconvolve

from fiberlake.ingest.sim_chunks import simulate_chunks
from fiberlake.processors.cae import DeconvCAE, bce_loss
from fiberlake.processors.cae_afterburner import fit_flux_bias, flux_bias_factor, ml_amplitude
from fiberlake.processors.cae_extract import (Deconvolver, cae_extract, deconvolve_chunk, deconvolver_from_artifact,
                                              network_tensors)
from fiberlake.processors.cae_inputs import COMBINATIONS, gaussian_kernel, input_channels, minmax_scale, tile_starts
from fiberlake.schemas.containers import PSFModel, TraceSet
from fiberlake.schemas.maskbits import Mask
from fiberlake.storage import models as store


def _tiny_model(combination: str = "PSF-iPSF-iPSF1", seed: int = 0) -> Deconvolver:
    torch.manual_seed(seed)
    net = DeconvCAE(len(COMBINATIONS[combination]), (4, 8, 16)).eval()
    return Deconvolver(network=net, combination=combination, tile=32, stride=24)


def _traces(x, ny, sigma=2.4) -> TraceSet:
    coeffs = np.zeros((len(x), 1))
    coeffs[:, 0] = x
    return TraceSet(coeffs=coeffs, ny=ny, dead=np.zeros(len(x), bool), rms=np.zeros(len(x)),
                    sigma=np.full(len(x), sigma))


def test_network_shapes_and_layers_follow_the_input():
    net = DeconvCAE(2, (4, 8, 16))
    y = net(torch.rand(3, 2, 32, 48))
    assert y.shape == (3, 1, 32, 48) and float(y.min()) >= 0
    kinds = [type(m).__name__ for m in net.encoder]
    assert kinds[:4] == ["Conv2d", "LeakyReLU", "MaxPool2d", "BatchNorm2d"] and kinds.count("Conv2d") == 3
    assert [type(m).__name__ for m in net.decoder].count("ConvTranspose2d") == 3
    assert type(net.head[-1]).__name__ == "Softplus"
    with pytest.raises(ValueError):
        net(torch.rand(1, 2, 30, 32))
    with pytest.raises(ValueError):
        net(torch.rand(1, 3, 32, 32))
    assert float(bce_loss(torch.full((1, 1, 8, 8), 0.5), torch.zeros(1, 1, 8, 8))) == pytest.approx(np.log(2), 1e-4)


def test_input_channels_match_direct_filtering():
    rng = np.random.default_rng(1)
    truth = np.zeros((64, 64))
    truth[20:44, 30] = 100.0
    truth[32, 10:50] += 50.0
    k = gaussian_kernel(1.4, 2.4, half=8)
    img = fftconvolve(truth, k, mode="same") + rng.normal(0, 0.01, truth.shape)
    psf, ipsf, ipsf1 = input_channels(img, k, ("psf", "ipsf", "ipsf1"), reg=1e-6, sigma1=1.0)
    direct = fftconvolve(img, k[::-1, ::-1], mode="same")
    assert np.allclose(psf[12:-12, 12:-12], direct[12:-12, 12:-12], atol=1e-3 * direct.max())
    # the regularised inverse undoes the blur where the data were blurred (interior)
    smooth_truth = fftconvolve(truth, gaussian_kernel(1.0), mode="same")
    assert np.abs(ipsf1 - smooth_truth)[12:-12, 12:-12].max() < 0.1 * smooth_truth.max()
    assert np.abs(ipsf - truth)[12:-12, 12:-12].max() < np.abs(img - truth)[12:-12, 12:-12].max()
    scaled, lo, hi = minmax_scale(np.stack([psf, ipsf])[None])
    assert scaled.min() == 0 and scaled.max() == 1 and hi.shape == (1, 2)
    assert list(tile_starts(100, 32, 24)) == [0, 24, 48, 68] and list(tile_starts(20, 32, 24)) == [0]


def test_ml_amplitude_and_flux_bias_recover_known_values():
    rng = np.random.default_rng(2)
    out = np.zeros((1, 48, 48))
    out[0, 20:28, 22:26] = 1.0
    k = gaussian_kernel(1.5)
    data = 37.0 * fftconvolve(out[0], k, mode="same")[None] + rng.normal(0, 0.05, (1, 48, 48))
    assert ml_amplitude(out, data, k)[0] == pytest.approx(37.0, rel=1e-3)
    assert ml_amplitude(np.zeros_like(out), data, k)[0] == 0.0  # blank output: amplitude 0, no NaN
    rec = 10 ** rng.uniform(1, 5, 400)
    u = np.log10(rec)
    true = rec * 10 ** (0.05 - 0.01 * u + 0.001 * u**2)
    c = fit_flux_bias(rec, true)
    assert np.allclose(c, [0.05, -0.01, 0.001], atol=1e-6)
    assert np.allclose(flux_bias_factor(rec, c) * rec, true, rtol=1e-6)
    assert flux_bias_factor(np.array([0.0]), c)[0] == 1.0


def test_simulated_chunks_truth_and_noise_are_consistent():
    s = simulate_chunks(6, 11, (48, 48), blank_fraction=0.5)
    assert s.noisy.shape == s.truth.shape == (6, 48, 48)
    assert np.allclose(s.kernel.sum(axis=(1, 2)), 1)
    assert np.all(s.truth[s.blank] == 0) and np.all(s.expected[s.blank] == 0)
    lit = ~s.blank
    # same scene, two PSFs: total light agrees up to what crosses the chunk edges
    ratio = s.truth[lit].sum(axis=(1, 2)) / s.expected[lit].sum(axis=(1, 2))
    assert np.all(np.abs(ratio - 1) < 0.1)
    again = simulate_chunks(6, 11, (48, 48), blank_fraction=0.5)
    assert np.array_equal(again.noisy, s.noisy)


def test_cae_extract_flags_bad_input_and_never_returns_nan():
    model = _tiny_model()
    ny, nx = 64, 80
    x = np.array([-3.0, 14.0, 30.0, 46.0, 62.0, 78.5])  # first and last off / at the CCD edge
    tr = _traces(x, ny)
    psf = PSFModel.gaussian(1.4, 2.4, ny, nx)
    rng = np.random.default_rng(3)
    img = rng.normal(0, 3.5, (ny, nx)) + 200.0
    ivar = np.full((ny, nx), 1 / (3.5**2 + 200.0))
    mask = np.zeros((ny, nx), np.uint32)
    img[10, 30] = np.nan
    img[40:43, 46] = 6e4
    mask[40:43, 46] |= np.uint32(Mask.SATURATED)
    ivar[20, 14] = 0
    s = cae_extract(img, ivar, mask, tr, psf, model)
    assert s.flux.shape == (6, ny)
    assert np.isfinite(s.flux).all() and np.isfinite(s.ivar).all() and (s.ivar >= 0).all()
    assert (s.mask[0] & Mask.OFFCCD).all() and (s.ivar[0] == 0).all()
    assert (s.mask[5] & Mask.OFFCCD).all()
    assert s.ivar[2, 10] == 0 and s.mask[2, 10] & Mask.NONFINITE
    assert s.ivar[3, 41] == 0 and s.mask[3, 41] & Mask.SATURATED
    assert s.ivar[1, 20] == 0 and s.mask[1, 20] != 0
    assert (s.ivar[4, 20:30] > 0).all() and (s.mask[4, 20:30] == 0).all()
    # a chunk smaller than a tile (the CCD's last columns) is padded, not refused
    small = cae_extract(img[:, :20], ivar[:, :20], mask[:, :20], _traces(np.array([8.0]), ny), psf, model)
    assert np.isfinite(small.flux).all() and small.flux.shape == (1, ny)


def test_deconvolve_scales_with_the_data():
    """The afterburner's amplitude follows the data: twice the light, twice the output."""
    model = _tiny_model("PSF-iPSF1")
    s = simulate_chunks(1, 5, (48, 64), blank_fraction=0.0)
    ivar = np.ones_like(s.noisy[0])
    a, _ = deconvolve_chunk(s.expected[0], ivar, None, s.kernel[0], model)
    b, _ = deconvolve_chunk(2 * s.expected[0], ivar, None, s.kernel[0], model)
    assert np.allclose(b, 2 * a, rtol=1e-3, atol=1e-3 * np.abs(a).max())


def test_artifact_round_trip_and_truncation(tmp_path):
    model = _tiny_model("iPSF1")
    card = {"stage": "deconvolve", "architecture": "cae", "arch_params": model.network.arch(), "classes": [],
            "input_shape": [1, 32, 32],
            "prep": {"combination": "iPSF1", "tile": 32, "stride": 24, "reg": 1e-3, "sigma1": 1.0,
                     "target_sigma": 0.8, "bias_coeffs": [0.0, 0.0, 0.0], "bias_range": [0.0, 9.0],
                     "pull_scale": 1.5}}
    written = store.write_artifact(tmp_path / "m", network_tensors(model.network, np.float32), card)
    tensors, card2 = store.read_artifact(tmp_path / "m")
    loaded = deconvolver_from_artifact(tensors, card2, device="cpu")
    assert loaded.model_id == written["model_id"] and loaded.pull_scale == 1.5
    x = np.random.default_rng(0).random((2, 1, 32, 32)).astype(np.float32)
    assert np.allclose(loaded.predict(x), model.predict(x), atol=1e-5)
    data = (tmp_path / "m" / store.WEIGHTS).read_bytes()
    (tmp_path / "m" / store.WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(store.ArtifactError):
        store.read_artifact(tmp_path / "m")


def test_shipped_default_model_loads():
    from fiberlake.jobs.train_cae import load_deconvolve_model

    model = load_deconvolve_model("default", device="cpu")
    assert model.model_id.startswith("deconvolve-") and model.combination in COMBINATIONS
    assert model.pull_scale > 0 and len(model.bias_coeffs) == 3
    size = sum(p.stat().st_size for p in store.shipped_dir("deconvolve").iterdir())
    assert size < 2_500_000
