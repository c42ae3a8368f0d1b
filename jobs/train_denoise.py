"""``fiberlake train denoise``: the Bayesian denoiser (seed 004) and its DAE baselines, from simulated stars.

Steps (the paper's Fig. 4):

1. training stars: ``per_subclass`` noiseless stars of every subclass on the 2048-bin grid
   (:func:`fiberlake.ingest.sim_spectra1d.draw_stars`, seed ``seed``);
2. the isometric autoencoder on them (eq. 10), the KDE prior of their latents per subclass;
3. NoiseFlow on the noise of repeated exposures: ``noise_per_subclass`` other stars, each observed
   ``n_exposures`` times (magnitudes 13 to ``noise_mag_max``), every exposure minus the mean of its
   star's exposures (the paper's 2);
4. the baselines: the DAE (the generator's architecture) on simulated exposures of the training
   stars paired with their truth, and the DAE retrained with zero-imputed random missing intervals.

Writes one artifact (safetensors + card) holding the generator, the prior and NoiseFlow (what the
pipeline uses) plus a second artifact ``<out>/baselines`` with the two DAEs (for the figures and
the bench; the pipeline never loads them). Held-out figures come from ``bench/denoise.py
--evaluate`` on seeds the training never used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from fiberlake.ingest import sim_spectra1d as s1d
from fiberlake.processors import denoise_baselines as bl
from fiberlake.processors.denoise_discrepancy import discrepancy_variance
from fiberlake.processors.denoise_generator import AEArch, FitSettings, IsometricAE, encode, fit_autoencoder
from fiberlake.processors.denoise_map import BayesianDenoiser, KDEPrior, normalise
from fiberlake.processors.noiseflow import FlowArch, FlowFitSettings, NoiseFlow, fit_noiseflow
from fiberlake.processors.params import DenoiseTrainParams
from fiberlake.storage import models as art

STAGE = "denoise"
BASELINE_STAGE = "denoise-baselines"
ARCHITECTURE = "isometric-ae+kde+noiseflow"


def _code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except Exception:
        return ""


def scaled_exposures(exposures: np.ndarray) -> np.ndarray:
    """Exposures (..., D) normalised to unit flux sum, times D (the networks' units)."""
    y, _obs, _total = normalise(exposures, np.isfinite(exposures))
    return (y * exposures.shape[-1]).astype(np.float32)


def _state(model: torch.nn.Module, prefix: str, dtype=np.float32) -> dict[str, np.ndarray]:
    """A module's weights as arrays named ``prefix.<name>`` (``dtype``: float16 halves the artifact;
    loading copies them into the float32 parameters)."""
    return {f"{prefix}.{k}": v.detach().cpu().numpy().astype(dtype) for k, v in model.state_dict().items()}


def _load(model: torch.nn.Module, tensors: dict[str, np.ndarray], prefix: str) -> torch.nn.Module:
    own = {k[len(prefix) + 1:]: torch.as_tensor(v) for k, v in tensors.items() if k.startswith(prefix + ".")}
    try:
        model.load_state_dict(own, strict=True)
    except RuntimeError as err:
        raise art.ArtifactError(f"denoise model weights do not fit the card's architecture ({err})") from None
    return model


EXTRA_NOISE_SIGMA = (0.02, 2.0)
"""Range (log-uniform, scaled units: mean |flux| 1) of the white noise added to half of the DAE's
training inputs and to a copy of NoiseFlow's training noise, so both see S/N below the simulated
exposures' (down to DER_SNR ~0.5, the figures' sweep reaches 2)."""
NOISE_AUGMENTATION = ("the repeats' noise vectors plus a copy of them with extra white noise of rms log-uniform in "
                      f"{EXTRA_NOISE_SIGMA} (scaled units)")


def with_extra_white_noise(x: np.ndarray, rng: np.random.Generator, fraction: float = 0.5) -> np.ndarray:
    """``x`` (n, D) plus white noise of rms log-uniform in :data:`EXTRA_NOISE_SIGMA` on a random ``fraction``
    of the rows."""
    extra = rng.uniform(size=x.shape[0]) < fraction
    sigma = np.exp(rng.uniform(np.log(EXTRA_NOISE_SIGMA[0]), np.log(EXTRA_NOISE_SIGMA[1]), x.shape[0])) * extra
    return x + sigma[:, None] * rng.standard_normal(x.shape).astype(np.float32)


def train_noiseflow(params: DenoiseTrainParams, n_wave: int, log=print) -> tuple[NoiseFlow, dict, int]:
    """NoiseFlow on the noise of repeated exposures (each minus its star's mean), plus a copy of that
    noise with extra white noise (:data:`EXTRA_NOISE_SIGMA`); returns the flow, its fit figures and the
    number of noise vectors."""
    log(f"noise stars: {params.noise_per_subclass} x {len(s1d.SUBCLASSES)}, {params.n_exposures} exposures each")
    noise_stars = s1d.draw_stars(params.seed + 1, params.noise_per_subclass)
    settings = s1d.ExposureSettings(mag_range=(13.0, params.noise_mag_max))
    exposures, _ = s1d.observe(noise_stars, params.seed + 1, params.n_exposures, settings, key="noise")
    noise = s1d.noise_from_repeats(scaled_exposures(exposures)).astype(np.float32)
    rng = np.random.default_rng(params.seed + 3)
    noise = np.concatenate([noise, with_extra_white_noise(noise, rng, fraction=1.0)]).astype(np.float32)
    flow = NoiseFlow(FlowArch(n_wave=n_wave, window=params.flow_window))
    log(f"NoiseFlow, {bl.n_parameters(flow)} weights, {noise.shape[0]} noise vectors, {params.flow_steps} steps")
    fig = fit_noiseflow(flow, noise, FlowFitSettings(steps=params.flow_steps, batch=params.batch, seed=params.seed),
                        log)
    return flow, fig, int(noise.shape[0])


def training_discrepancy(decoder: torch.nn.Module, prior: KDEPrior, params_or_card: DenoiseTrainParams | dict,
                         classes: list[str]) -> tuple[np.ndarray, dict]:
    """``S_C`` of a generator: per subclass and bin, the mean squared ``G(z*) - s`` over its training stars.

    ``z*`` are the prior's stored training latents (the encoder's latents of the training stars, in
    the order :func:`fiberlake.ingest.sim_spectra1d.draw_stars` gives them per subclass), so the
    training stars are drawn again from the training seed. Returns ``S_C`` (n_classes, D) and a
    summary (median relative floor per subclass) for the card.
    """
    if isinstance(params_or_card, dict):
        seed, per_subclass = int(params_or_card["seed"]), int(params_or_card["per_subclass"])
    else:
        seed, per_subclass = params_or_card.seed, params_or_card.per_subclass
    stars = s1d.draw_stars(seed, per_subclass)
    n_wave = s1d.DENOISE_NWAVE
    targets = (stars.truth * n_wave).astype(np.float32)
    labels = np.array([classes.index(c) for c in stars.subclass])
    generated = np.zeros_like(targets)
    with torch.no_grad():
        for c in range(len(classes)):
            rows = np.flatnonzero(labels == c)
            if rows.size != int(prior.valid[c].sum()):
                raise ValueError(f"subclass {classes[c]}: {rows.size} training stars drawn, the prior holds "
                                 f"{int(prior.valid[c].sum())} latents (another seed or size?)")
            generated[rows] = decoder(prior.points[c, :rows.size]).cpu().numpy()
    var = discrepancy_variance(generated, targets, labels, len(classes))
    rel = ((generated - targets) ** 2).mean(-1) / (targets ** 2).mean(-1)
    summary = {"z_star": "the prior's training latents (encoder)", "train_seed": seed, "per_subclass": per_subclass,
               "median_relative_floor": {c: round(float(np.median(rel[labels == k])), 6)
                                         for k, c in enumerate(classes)}}
    return var, summary


def add_discrepancy(source: str | Path, out: str | Path, command: str = "", log=print) -> dict:
    """A new artifact: ``source`` (decoder, prior, NoiseFlow unchanged) plus the discrepancy ``S_C``
    (tensor ``discrepancy_var``) from its training stars; the card's ``lineage`` records the source."""
    tensors, card = art.read_artifact(art.locate(str(source), STAGE))
    den = load_denoiser(str(art.locate(str(source), STAGE)), device="cpu")
    t0 = time.perf_counter()
    var, summary = training_discrepancy(den.decoder, den.prior, card["training"], den.classes)
    lineage = dict(card.get("lineage", {}))
    card = {k: v for k, v in card.items() if k not in ("model_id", "weights_sha256", "size_bytes", "path")}
    card["discrepancy"] = summary | {"seconds": round(time.perf_counter() - t0, 1)}
    card["weights_dtype"] = dict(card.get("weights_dtype", {})) | {"discrepancy": "float32"}
    card["lineage"] = lineage | {"discrepancy_added_to": card_id(source),
                                 "discrepancy_added_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                 "discrepancy_command": command, "discrepancy_code_version": _code_version()}
    tensors = {k: v for k, v in tensors.items() if k != "discrepancy_var"} | {"discrepancy_var": var}
    card, path = art.write_artifact_named(out, tensors, card, STAGE)
    card["path"] = str(path)
    log(f"wrote {card['model_id']} ({card['size_bytes']} bytes) to {path}")
    return card


def card_id(source: str | Path) -> str:
    """The model id of an artifact."""
    return art.read_artifact(art.locate(str(source), STAGE))[1]["model_id"]


def retrain_noiseflow(source: str | Path, params: DenoiseTrainParams, out: str | Path, command: str = "",
                      log=print) -> dict:
    """A new artifact: the generator and prior of ``source``, NoiseFlow trained again from ``params``.

    The card keeps the source's training record and adds ``lineage`` (the source's model id, when and
    how the flow was retrained)."""
    torch.set_num_threads(params.cpu_threads)
    torch.manual_seed(params.seed)
    tensors, card = art.read_artifact(art.locate(str(source), STAGE))
    source_id = card.get("lineage", {}).get("generator_and_prior_from", card["model_id"])
    t0 = time.perf_counter()
    flow, fig, n_noise = train_noiseflow(params, int(card["input_shape"][0]), log)
    card = {k: v for k, v in card.items() if k not in ("model_id", "weights_sha256", "size_bytes", "path")}
    card["training"] = dict(card["training"]) | {"noiseflow": fig, "flow_steps": params.flow_steps,
                                                 "noise_per_subclass": params.noise_per_subclass,
                                                 "noise_mag_max": params.noise_mag_max}
    card["training"]["seconds"] = dict(card["training"].get("seconds", {})) | {
        "noiseflow": round(time.perf_counter() - t0, 1)}
    card["data"] = dict(card["data"]) | {"noise_vectors": n_noise, "noise_extra_white": NOISE_AUGMENTATION}
    card["arch_params"] = dict(card["arch_params"]) | {"noiseflow": flow.arch.to_dict()}
    card["lineage"] = {"generator_and_prior_from": source_id,
                       "noiseflow_retrained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "command": command, "code_version": _code_version()}
    tensors = {k: v for k, v in tensors.items() if not k.startswith("flow.")} | _state(flow, "flow")
    card, path = art.write_artifact_named(out, tensors, card, STAGE)
    card["path"] = str(path)
    log(f"wrote {card['model_id']} ({card['size_bytes']} bytes) to {path}")
    return card


def train_denoise(params: DenoiseTrainParams | None = None, *, out: str | Path, command: str = "",
                  log=print, baselines: bool = True) -> dict:
    """Train the denoiser and its baselines; write the artifacts under ``out``; return the card.

    ``baselines=False`` skips the DAEs (train them with :func:`train_baselines_only`, e.g. in a
    second process on the other core: same stars, same ``params``, so the same data and budget).
    """
    params = params or DenoiseTrainParams()
    torch.set_num_threads(params.cpu_threads)
    torch.manual_seed(params.seed)
    out = Path(out)
    t0 = time.perf_counter()
    classes = s1d.subclass_names()
    n_wave = s1d.DENOISE_NWAVE
    log(f"training stars: {params.per_subclass} x {len(classes)} subclasses (seed {params.seed})")
    stars = s1d.draw_stars(params.seed, params.per_subclass)
    targets = (stars.truth * n_wave).astype(np.float32)
    labels = np.array([classes.index(c) for c in stars.subclass])

    arch = AEArch(n_wave=n_wave, latent_dim=params.latent_dim)
    fit = FitSettings(steps=params.ae_steps, batch=params.batch, lr=params.lr, delta=params.delta,
                      seed=params.seed)
    ae = IsometricAE(arch)
    log(f"isometric autoencoder (eq. 10), {bl.n_parameters(ae)} weights, {params.ae_steps} steps")
    ae_fig = fit_autoencoder(ae, lambda idx, rng: targets[idx], targets, fit, log)
    latents = encode(ae, targets)
    prior = KDEPrior.fit(latents, labels, len(classes))
    t_ae = time.perf_counter()

    flow, flow_fig, n_noise = train_noiseflow(params, n_wave, log)
    t_flow = time.perf_counter()

    # the decoder in float16 keeps the shipped artifact near 2 MB (rounding ~5e-4 relative per weight,
    # far below the generator's reconstruction floor); NoiseFlow and the prior stay float32
    tensors = _state(ae.decoder, "decoder", np.float16) | _state(flow, "flow") | prior.tensors()
    # the discrepancy S_C of the decoder as shipped (float16 weights, as loading gives them)
    shipped = _load(IsometricAE(arch).decoder, {k: v.astype(np.float32) for k, v in tensors.items()}, "decoder")
    discrepancy, discrepancy_card = training_discrepancy(shipped, prior, params, classes)
    tensors["discrepancy_var"] = discrepancy
    card = {
        "stage": STAGE, "architecture": ARCHITECTURE,
        "arch_params": {"autoencoder": arch.to_dict(), "noiseflow": flow.arch.to_dict()},
        "classes": classes, "input_shape": [n_wave],
        "prep": {"grid": {"wave_min": s1d.DENOISE_WAVE_MIN, "wave_max": s1d.DENOISE_WAVE_MAX, "nwave": n_wave,
                          "spacing": "linear"},
                 "normalisation": "unit flux sum over observed bins; networks see flux * nwave"},
        "weights_dtype": {"decoder": "float16", "flow": "float32", "kde": "float32", "discrepancy": "float32"},
        "discrepancy": discrepancy_card,
        "n_parameters": bl.n_parameters(ae.decoder) + bl.n_parameters(flow),
        "command": command, "code_version": _code_version(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "training": params.to_dict() | {"autoencoder": ae_fig, "noiseflow": flow_fig,
                                        "seconds": {"autoencoder": round(t_ae - t0, 1),
                                                    "noiseflow": round(t_flow - t_ae, 1)}},
        "data": {"train_stars": int(len(labels)), "noise_vectors": n_noise,
                 "noise_extra_white": NOISE_AUGMENTATION,
                 "subclasses": {c: {"teff": list(s.teff), "spectype": s.spectype} for c, s in
                                zip(classes, s1d.SUBCLASSES)}},
        "simulator": {"stellar_model": "analytic", "module": "fiberlake.ingest.sim_spectra1d",
                      "seeds": {"train": params.seed, "noise": params.seed + 1, "dae": params.seed + 2}},
        "machine": platform.machine(),
    }
    pending = out / ".pending-denoise"
    card = art.write_artifact(pending, tensors, card)
    final = out / card["model_id"]
    if final.exists():
        import shutil

        shutil.rmtree(final)
    pending.rename(final)
    card["path"] = str(final)
    log(f"wrote {card['model_id']} ({card['size_bytes']} bytes) to {final}")

    if params.dae_steps > 0 and baselines:
        train_baselines(params, stars, targets, out / f"{card['model_id']}-baselines", log)
        card["baselines"] = str(out / f"{card['model_id']}-baselines")
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return card


def train_baselines_only(params: DenoiseTrainParams, out: str | Path, log=print) -> dict:
    """The DAE baselines of ``params`` alone (the generator's training stars, drawn again from ``params.seed``)."""
    torch.set_num_threads(params.cpu_threads)
    torch.manual_seed(params.seed)
    stars = s1d.draw_stars(params.seed, params.per_subclass)
    targets = (stars.truth * s1d.DENOISE_NWAVE).astype(np.float32)
    return train_baselines(params, stars, targets, Path(out), log)


def train_baselines(params: DenoiseTrainParams, stars: s1d.Stars, targets: np.ndarray, out: Path, log=print) -> dict:
    """The DAE and the zero-imputation DAE on simulated exposures of the training stars."""
    n_wave = targets.shape[1]
    settings = s1d.ExposureSettings(mag_range=(13.0, params.noise_mag_max))
    exposures, _ = s1d.observe(stars, params.seed + 2, params.n_exposures, settings, key="dae")
    noisy = scaled_exposures(exposures)                                   # (n, E, D)
    n_exp = noisy.shape[1]

    def plain(idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = noisy[idx, rng.integers(0, n_exp, idx.size)].copy()
        return with_extra_white_noise(x, rng, 0.5)                        # also lower S/N, as the figures add

    def zero_imputed(idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = plain(idx, rng)
        obs = bl.random_interval_mask(rng, idx.size, n_wave, params.max_missing_fraction)
        y, _o, _t = normalise(x, obs)
        return (y * n_wave).astype(np.float32)

    arch = AEArch(n_wave=n_wave, latent_dim=params.latent_dim)
    tensors, figs = {}, {}
    for name, inputs in (("dae", plain), ("dae_zero", zero_imputed)):
        model = IsometricAE(arch)
        log(f"baseline {name}: {bl.n_parameters(model)} weights, {params.dae_steps} steps")
        figs[name] = fit_autoencoder(model, inputs, targets, FitSettings(steps=params.dae_steps, batch=params.batch,
                                                                         lr=params.lr, delta=0.0,
                                                                         seed=params.seed + 2), log)
        tensors |= _state(model, name)
    card = {"stage": BASELINE_STAGE, "architecture": "conv-dae (the generator's autoencoder, no isometry)",
            "arch_params": arch.to_dict(), "classes": s1d.subclass_names(), "input_shape": [n_wave],
            "prep": {"normalisation": "unit flux sum over observed bins, missing bins 0; flux * nwave"},
            "training": figs, "code_version": _code_version(),
            "data": {"pairs": int(noisy.shape[0] * n_exp),
                     "extra_white_noise": f"half the inputs, rms log-uniform in {EXTRA_NOISE_SIGMA} (scaled units)"}}
    return art.write_artifact(out, tensors, card)


def load_denoiser(source: str = "default", lake_root=None, device: str = "auto") -> BayesianDenoiser:
    """The pipeline's denoiser from an artifact (strict: a bad artifact is an :class:`ArtifactError`)."""
    from fiberlake.processors.spit import resolve_device

    tensors, card = art.read_artifact(art.locate(source, STAGE, lake_root))
    if card.get("stage") != STAGE:
        raise art.ArtifactError(f"model {card.get('model_id')} is a {card.get('stage')!r} model, not {STAGE!r}")
    arch = AEArch.from_dict(card["arch_params"]["autoencoder"])
    flow_arch = FlowArch.from_dict(card["arch_params"]["noiseflow"])
    decoder = _load(IsometricAE(arch).decoder, tensors, "decoder")
    flow = _load(NoiseFlow(flow_arch), tensors, "flow")
    prior = KDEPrior.from_tensors(tensors)
    return BayesianDenoiser(decoder, flow, prior, list(card["classes"]), card["model_id"], resolve_device(device),
                            discrepancy=tensors.get("discrepancy_var"))


def load_baselines(directory: str | Path) -> tuple[IsometricAE, IsometricAE]:
    """The DAE and the zero-imputation DAE of a training run."""
    tensors, card = art.read_artifact(Path(directory))
    arch = AEArch.from_dict(card["arch_params"])
    return (_load(IsometricAE(arch), tensors, "dae").eval(), _load(IsometricAE(arch), tensors, "dae_zero").eval())


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fiberlake train denoise`` (from :class:`DenoiseTrainParams`)."""
    from fiberlake.jobs.cli_params import add_parset_flags

    add_parset_flags(parser, DenoiseTrainParams, "train", "training parameters")


def train_params_from_args(args: argparse.Namespace) -> DenoiseTrainParams:
    from fiberlake.jobs.cli_params import parset_from_args

    return parset_from_args(args, DenoiseTrainParams, "train")
