"""Bayesian denoiser (seed 004): the pieces against independent references, bad input, the grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fiberlake.processors.denoise_baselines import interval_mask, random_interval_mask, wavelet_denoise
from fiberlake.processors.denoise_generator import AEArch, IsometricAE, isometry_loss
from fiberlake.processors.denoise_map import STATUSES, BayesianDenoiser, KDEPrior, MapSettings, normalise
from fiberlake.processors.denoise_prep import to_denoise_grid
from fiberlake.processors.noiseflow import FlowArch, NoiseFlow, window_mask

N_WAVE = 256


def _tiny_denoiser(seed: int = 0) -> BayesianDenoiser:
    torch.manual_seed(seed)
    ae = IsometricAE(AEArch(n_wave=N_WAVE, latent_dim=3, channels=(2, 4), hidden=8))
    flow = NoiseFlow(FlowArch(n_wave=N_WAVE, window=3, channels=4, hidden=(4,)))
    flow.noise_scale.fill_(0.1)
    rng = np.random.default_rng(seed)
    latents = np.concatenate([rng.normal(c * 3.0, 0.5, size=(20, 3)) for c in range(3)]).astype(np.float32)
    prior = KDEPrior.fit(latents, np.repeat(np.arange(3), 20), 3)
    return BayesianDenoiser(ae.decoder, flow, prior, ["a", "b", "c"], "denoise-test")


def test_kde_matches_scipy_gaussian_kde():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(40, 3)) * [1.0, 2.0, 0.5]
    prior = KDEPrior.fit(z.astype(np.float32), np.zeros(40, int), 1)
    q = rng.normal(size=(5, 3))
    ours = prior.log_prob(torch.as_tensor(q, dtype=torch.float32))[:, 0].numpy()
    ref = stats.gaussian_kde(z.T).logpdf(q.T)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-3)


def test_noiseflow_density_is_the_papers_eq15():
    """With the network's heads zeroed the flow is independent Gaussians: compare with scipy."""
    flow = NoiseFlow(FlowArch(n_wave=32, window=4, channels=3, hidden=(2,)))
    with torch.no_grad():
        for p in flow.heads.parameters():
            p.zero_()
        flow.alpha_bias.copy_(torch.linspace(-1, 1, 32))
        flow.mu_first.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
        flow.noise_scale.fill_(2.0)
    x = torch.randn(2, 32)
    ours = flow.log_prob(x).detach().numpy()
    mu = np.r_[[0.1, -0.2, 0.0, 0.3], np.zeros(28)]
    sigma = np.exp(np.linspace(-1, 1, 32)) * 2.0
    ref = stats.norm.logpdf(x.numpy(), mu * 2.0, sigma).sum(-1)
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_noiseflow_is_autoregressive_over_k_predecessors():
    flow = NoiseFlow(FlowArch(n_wave=40, window=5, channels=4, hidden=(3,)))
    x = torch.randn(1, 40)
    mu, alpha = flow.conditionals(x)
    y = x.clone()
    y[0, 20] += 5.0
    mu2, alpha2 = flow.conditionals(y)
    changed = torch.nonzero((mu2 - mu).abs() + (alpha2 - alpha).abs() > 0)[:, 1].tolist()
    assert changed and set(changed) <= {21, 22, 23, 24, 25}     # only the K bins after it


def test_window_mask_eq16():
    obs = torch.ones(1, 20, dtype=torch.bool)
    obs[0, 8] = False
    counted = window_mask(obs, 3)[0].numpy()
    assert not counted[8:12].any() and counted[:8].all() and counted[12:].all()


def test_isometry_loss_zero_for_an_isometry():
    dec = torch.nn.Linear(3, 10, bias=False)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(10, 3))
        dec.weight.copy_(q)
    assert float(isometry_loss(dec, torch.randn(8, 3), 0.5).detach()) < 1e-10


def test_denoise_grid_resampling_flux_and_coverage():
    loglam0, dlog = np.log10(4500.0), 2e-5
    n = int(np.log10(8000 / 4500) / dlog)
    wave = 10 ** (loglam0 + dlog * np.arange(n))
    flam = (1 + wave / 1e4)[None]
    ivar = np.ones_like(flam)
    mask = np.zeros_like(flam, np.uint32)
    ivar[0, 1000:1100] = 0
    flux, obs = to_denoise_grid(loglam0, dlog, flam, ivar, mask)
    grid = np.linspace(4000, 9000, 2048)
    inside = (grid > 4505) & (grid < 7995)
    assert not obs[0, grid < 4495].any() and not obs[0, grid > 8005].any()
    good = obs[0] & inside
    np.testing.assert_allclose(flux[0, good], 1 + grid[good] / 1e4, rtol=2e-4)
    assert (~obs[0, inside]).sum() >= 5                              # the masked input stretch


def test_bad_input_flagged_never_nan():
    den = _tiny_denoiser()
    rng = np.random.default_rng(0)
    flux = rng.uniform(0.5, 1.5, size=(6, N_WAVE))
    obs = np.ones_like(flux, bool)
    flux[0] = np.nan                    # NaN flux
    flux[1] = 0.0                       # all zero
    obs[2] = False                      # all masked
    obs[3, 10:] = False                 # too few bins
    flux[4, :50] = np.nan               # partly NaN: fitted on the rest, NaN bins imputed
    res = den.denoise(flux, obs, MapSettings(steps=3))
    assert res.status[:4] == ["no_data", "nonpositive", "no_data", "few_bins"]
    assert res.status[4] in STATUSES and res.status[4] not in ("no_data", "few_bins", "nonpositive")
    for arr in (res.flux, res.latent, res.posterior, res.objective, res.log_prior, res.residual_rms):
        assert np.isfinite(arr).all()
    assert res.imputed[4, :50].all() and not res.imputed[4, 50:].any()
    assert res.class_index[0] == -1 and res.posterior[0].sum() == 0
    np.testing.assert_allclose(res.posterior[4:].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.abs(res.flux[4:]).sum(-1), 1.0, rtol=1e-4)


def test_map_recovers_a_generated_spectrum_and_its_class():
    """A spectrum the generator makes from a training latent of class 2, plus noise, comes back (and class 2)."""
    tiny = _tiny_denoiser(3)
    torch.manual_seed(3)
    linear = torch.nn.Linear(3, N_WAVE)                # a smooth, z-sensitive, positive generator
    with torch.no_grad():
        linear.weight.mul_(0.03)
        linear.bias.fill_(2.0)
    den = BayesianDenoiser(linear, tiny.flow, tiny.prior, tiny.classes, "denoise-test")
    with torch.no_grad():
        s = den.decoder(den.prior.points[2, 5][None]).numpy()[0].astype(np.float64)
    assert (s > 0).all()
    truth = s / s.sum()
    rng = np.random.default_rng(2)
    noisy = truth + rng.normal(0, 0.05 / N_WAVE, size=(4, N_WAVE))
    for steps in (0, 5):
        res = den.denoise(noisy, settings=MapSettings(steps=steps, lr=0.01))
        mse_noisy = ((noisy / noisy.sum(1, keepdims=True) - truth) ** 2).mean(1)
        mse_ours = ((res.flux - truth) ** 2).mean(1)
        assert (mse_ours < mse_noisy / 10).all(), (mse_ours, mse_noisy)
        assert (res.class_index == 2).all() and (res.posterior[:, 2] > 0.5).all()


def test_normalise_and_baselines():
    rng = np.random.default_rng(4)
    truth = np.sin(np.linspace(0, 6, 512)) + 2.0
    noisy = truth[None] + rng.normal(0, 0.2, size=(3, 512))
    obs = np.ones_like(noisy, bool)
    obs[1, :100] = False
    y, o, total = normalise(noisy, obs)
    np.testing.assert_allclose(y.sum(-1), 1.0)
    den = wavelet_denoise(noisy, obs)
    t = truth / truth.sum()
    assert ((den[0] - t) ** 2).mean() < ((y[0] - t) ** 2).mean() / 3
    m = random_interval_mask(np.random.default_rng(0), 50, 2048, 0.4, "blue")
    assert (~m).sum(-1).max() <= 819 and all(not r[:1].any() or r.all() for r in m)
    assert (~interval_mask(2048, 800, "red"))[-800:].all()


@pytest.mark.parametrize("bad", ["truncated", "missing"])
def test_bad_artifact_is_a_clear_error(tmp_path, bad):
    from fiberlake.jobs.train_denoise import load_denoiser
    from fiberlake.storage.models import ArtifactError, write_artifact

    card = {"stage": "denoise", "architecture": "x", "arch_params": {}, "classes": [], "input_shape": [1],
            "prep": {}}
    write_artifact(tmp_path, {"a": np.zeros(3, np.float32)}, card)
    target = tmp_path / "weights.safetensors"
    if bad == "truncated":
        target.write_bytes(target.read_bytes()[:-4])
    else:
        target.unlink()
    with pytest.raises(ArtifactError):
        load_denoiser(str(tmp_path))


def test_several_exposures_of_one_star_in_one_map():
    """Eq. 7 with n exposures: each exposure has its own mask (one arm missing in one of them)."""
    den = _tiny_denoiser(5)
    rng = np.random.default_rng(5)
    flux = rng.uniform(0.8, 1.2, size=(2, 2, N_WAVE))
    obs = np.ones_like(flux, bool)
    obs[0, 0, N_WAVE // 2:] = False                # only the blue half in the first exposure
    obs[1, 1] = False                              # the second exposure of star 1 lost entirely
    res = den.denoise(flux, obs, MapSettings(steps=2))
    assert res.flux.shape == (2, N_WAVE) and np.isfinite(res.flux).all()
    assert not res.imputed.any()                   # every bin observed by some exposure
    assert all(s not in ("no_data", "few_bins", "nonpositive") for s in res.status)


def test_shipped_model_loads_and_recognises_its_own_generated_spectra():
    """The shipped artifact (float16 decoder copied into float32 weights) loads strictly, and the MAP
    puts a spectrum the generator makes from a training latent of a subclass back in that subclass."""
    from fiberlake.jobs.train_denoise import load_denoiser

    den = load_denoiser("default", device="cpu")
    assert all(p.dtype == torch.float32 for p in den.decoder.parameters())
    picks = [den.classes.index(c) for c in ("G0", "M1", "DA1")]
    spectra = den.templates[picks, 0].numpy()
    res = den.denoise(spectra, settings=MapSettings(steps=3))
    assert res.class_index.tolist() == picks
    truth = spectra / spectra.sum(-1, keepdims=True)
    assert (((res.flux - truth) ** 2).mean(-1) / (truth ** 2).mean(-1)).max() < 1e-3


def test_one_extraction_is_denoised_by_default():
    from fiberlake.jobs.denoise_stage import extractions_to_denoise

    assert extractions_to_denoise(("box", "optimal"), "best") == ("optimal",)
    assert extractions_to_denoise(("box", "deconv"), "best") == ("deconv",)
    assert extractions_to_denoise(("box",), "best") == ("box",)
    assert extractions_to_denoise(("box", "optimal"), "all") == ("box", "optimal")
    assert extractions_to_denoise(("box", "optimal"), "box") == ("box",)
    assert extractions_to_denoise(("box",), "deconv") == ()


# ------------------------------------------------------------------ the discrepancy term (posterior mean)
def test_posterior_mean_follows_the_data_where_the_generator_errs_and_g_where_noise_dominates():
    from fiberlake.processors.denoise_discrepancy import posterior_mean

    d = 6
    g = np.ones((1, d))
    y = np.array([[[2.0, 2.0, 2.0, 2.0, 2.0, 2.0], [4.0, 4.0, 4.0, 4.0, 4.0, 4.0]]])   # two exposures
    amp = np.array([[1.0, 2.0]])                   # the second exposure is twice as bright: both say s = 2
    obs = np.ones((1, 2, d), bool)
    obs[0, :, 5] = False                           # bin 5 seen by no exposure: G
    obs[0, 1, 4] = False                           # bin 4 seen by the first exposure only
    s_c = np.array([[1e6, 1e-6, 1.0, 1.0, 1.0, 1.0]])
    noise = np.ones((1, 2, d))
    out = posterior_mean(g, y, amp, obs, s_c, noise)[0]
    assert out[0] == pytest.approx(2.0, rel=1e-5)    # S >> N: the (combined) data
    assert out[1] == pytest.approx(1.0, abs=1e-5)    # S << N: G(z)
    # S = 1, two exposures of variance 1 and 1/4 in G's units: N = 1 / (1 + 4) = 0.2, gain 1 / 1.2
    assert out[2] == pytest.approx(1.0 + (2.0 - 1.0) / 1.2, rel=1e-9)
    assert out[4] == pytest.approx(1.0 + (2.0 - 1.0) / 2.0, rel=1e-9)   # one exposure: gain 1 / 2
    assert out[5] == 1.0


def test_noise_variance_recovers_sky_and_photon_terms():
    from fiberlake.processors.denoise_discrepancy import noise_variance

    rng = np.random.default_rng(3)
    d = 2048
    shape = np.exp(np.linspace(-1.0, 1.0, d))
    model = np.abs(np.sin(np.linspace(0, 20, d))) * 2.0 + 0.2
    true = shape * (0.05 + 0.3 * model)
    resid = rng.standard_normal((4, d)) * np.sqrt(true)
    obs = np.ones((4, d), bool)
    obs[1, :1500] = False                          # a gap: the fit uses the observed chunks
    est = noise_variance(resid, np.broadcast_to(model, (4, d)), obs, shape)
    assert est.shape == (4, d) and (est > 0).all()
    ratio = np.median(est / true, axis=-1)
    np.testing.assert_allclose(ratio, 1.0, atol=0.2)


def test_discrepancy_variance_is_the_per_subclass_mean_square():
    from fiberlake.processors.denoise_discrepancy import discrepancy_variance

    gen = np.array([[1.0, 2.0], [3.0, 2.0], [0.0, 0.0]])
    truth = np.array([[0.0, 2.0], [2.0, 0.0], [0.0, 1.0]])
    out = discrepancy_variance(gen, truth, np.array([0, 0, 1]), 2)
    np.testing.assert_allclose(out, [[1.0, 2.0], [0.0, 1.0]])
    with pytest.raises(ValueError):
        discrepancy_variance(gen, truth, np.array([0, 0, 0]), 2)


def test_shipped_posterior_mean_beats_its_generator_on_bright_stars_and_gauss_newton_start_is_finite():
    """The shipped model stores S_C; on bright simulated stars (not the generator's own spectra) the
    posterior mean is closer to the truth than G(z), and G(z) is returned beside it."""
    from fiberlake.ingest import sim_spectra1d as s1d
    from fiberlake.jobs.train_denoise import load_denoiser

    den = load_denoiser("default", device="cpu")
    assert den.discrepancy is not None and den.discrepancy.shape == (len(den.classes), den.n_wave)
    stars = s1d.make_stars({"subclass": np.array(["G0", "K1"]), "spectype": np.array(["G", "K"]),
                            "teff": np.array([5400.0, 4500.0]), "logg": np.array([4.4, 4.6]),
                            "feh": np.array([0.1, -0.3]), "rv": np.array([20.0, -35.0])})
    rng = np.random.default_rng(5)
    truth = stars.truth
    noisy = truth * (1.0 + 0.01 * rng.standard_normal(truth.shape))
    res = den.denoise(noisy, settings=MapSettings(steps=4, start_iterations=2))
    rel = lambda a: ((a - truth) ** 2).mean(-1) / (truth ** 2).mean(-1)   # noqa: E731
    assert np.isfinite(res.flux).all() and np.isfinite(res.generator_flux).all()
    assert (rel(res.flux) < 0.7 * rel(res.generator_flux)).all()
    off = den.denoise(noisy, settings=MapSettings(steps=4, start_iterations=2, posterior_mean=False))
    np.testing.assert_array_equal(off.flux, off.generator_flux)
