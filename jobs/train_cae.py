"""``fiberlake train deconvolve``: simulate chunks, train the PSF-conditioned CAE, calibrate its
afterburner, evaluate on held-out chunks, write the artifact (seed 002).

Steps (each a call into ingest/ or processors/):

1. training chunks (``seed``), calibration chunks (``seed + 1``) and held-out chunks
   (``heldout_seed``) from :func:`fiberlake.ingest.sim_chunks.simulate_chunks`;
2. inputs: the chosen combination of PSF / iPSF / iPSF1 over each chunk, the central tile cut
   out, min-max scaled; truths max-scaled;
3. training: BCE loss, Adam, exponential learning-rate decay (the paper's recipe, at CPU scale);
4. afterburner: on the calibration chunks, amplitudes by eq. 2, then the quadratic flux-bias
   fit; the error scale of the extracted flux (see :mod:`fiberlake.processors.cae_extract`);
5. held-out figures (PSNR, 1-SSIM, flux bias before/after the afterburner's correction) and the
   artifact: safetensors (float16 weights) + card, content-hash ``model_id``.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fiberlake.ingest.sim_chunks import ChunkScene, simulate_chunks
from fiberlake.processors.cae_afterburner import fit_flux_bias, flux_bias_factor, ml_amplitude
from fiberlake.processors.cae_inputs import COMBINATIONS, input_channels, max_scale, minmax_scale
from fiberlake.processors.params import CAETrainParams
from fiberlake.storage import models as store

STAGE = "deconvolve"
TRAIN_PREFIX = "train"


@dataclass
class TileSet:
    """Central tiles of simulated chunks, ready for the network and for the figures."""

    inputs: np.ndarray      # (n, c, T, T) scaled
    target: np.ndarray      # (n, 1, T, T) max-scaled truth
    truth: np.ndarray       # (n, T, T) electrons, target PSF
    noisy: np.ndarray       # (n, T, T) electrons
    ivar: np.ndarray        # (n, T, T)
    kernel: np.ndarray      # (n, kh, kw)
    scene: ChunkScene
    crop: int


def chunk_tiles(scene: ChunkScene, combination: str, tile: int, *, reg: float, sigma1: float) -> TileSet:
    """Filter each chunk with its own PSF, cut its central ``tile`` x ``tile`` square, scale."""
    n, H, W = scene.noisy.shape
    m = (H - tile) // 2
    sl = (slice(None), slice(m, m + tile), slice(m, m + tile))
    chans = np.stack([input_channels(scene.noisy[i], scene.kernel[i], COMBINATIONS[combination], reg=reg,
                                     sigma1=sigma1)[:, m:m + tile, m:m + tile] for i in range(n)])
    scaled, _, _ = minmax_scale(chans)
    target, _ = max_scale(scene.truth[sl])
    return TileSet(inputs=scaled, target=target[:, None], truth=scene.truth[sl], noisy=scene.noisy[sl],
                   ivar=scene.ivar[sl], kernel=scene.kernel, scene=scene, crop=m)


def simulate_tiles(n: int, seed: int, params: CAETrainParams, combination: str | None = None,
                   scene_cache: dict | None = None) -> TileSet:
    """Chunks of ``tile + 2 margin`` px simulated with ``seed`` and cut to their central tile
    (``scene_cache``: reuse scenes already simulated with the same settings, e.g. across input
    combinations)."""
    side = params.tile + 2 * params.margin
    key = (n, seed, side, params.pitch, params.target_sigma)
    if scene_cache is not None and key in scene_cache:
        scene = scene_cache[key]
    else:
        scene = simulate_chunks(n, seed, (side, side), pitch=params.pitch, target_sigma=params.target_sigma)
        if scene_cache is not None:
            scene_cache[key] = scene
    return chunk_tiles(scene, combination or params.combination, params.tile, reg=params.reg, sigma1=params.sigma1)


def predict(network, inputs: np.ndarray, device: str = "cpu", batch: int = 64) -> np.ndarray:
    """Network outputs ``(n, T, T)``."""
    import torch

    network.eval()
    out = np.empty((inputs.shape[0],) + inputs.shape[2:], np.float32)
    with torch.no_grad():
        for s in range(0, len(inputs), batch):
            out[s:s + batch] = network(torch.from_numpy(inputs[s:s + batch]).to(device))[:, 0].cpu().numpy()
    return out


def fit(network, data: TileSet, params: CAETrainParams, device: str, log: Callable[[str], None] = print) -> dict:
    """Train with BCE, Adam and an exponential learning-rate decay; stop at ``max_minutes``."""
    import torch

    from fiberlake.processors.cae import bce_loss

    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    opt = torch.optim.Adam(network.parameters(), lr=params.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=params.lr_decay ** (1.0 / params.decay_steps))
    x_all = torch.from_numpy(data.inputs)
    y_all = torch.from_numpy(data.target)
    t0 = time.perf_counter()
    steps, losses, stopped = 0, [], False
    for epoch in range(params.epochs):
        network.train()
        order = rng.permutation(len(x_all))
        epoch_loss = []
        for s in range(0, len(order), params.batch):
            idx = torch.from_numpy(order[s:s + params.batch])
            if len(idx) < 2:
                continue
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            flip = rng.integers(4)  # the sky is symmetric under these flips; the PSF input flips with it
            if flip & 1:
                x, y = x.flip(-1), y.flip(-1)
            if flip & 2:
                x, y = x.flip(-2), y.flip(-2)
            loss = bce_loss(network(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
            epoch_loss.append(float(loss.detach()))
            if time.perf_counter() - t0 > 60 * params.max_minutes:
                stopped = True
                break
        losses.append(float(np.mean(epoch_loss)) if epoch_loss else float("nan"))
        log(f"epoch {epoch + 1}: BCE {losses[-1]:.5f}, lr {sched.get_last_lr()[0]:.2e}, "
            f"{time.perf_counter() - t0:.0f} s")
        if stopped:
            break
    return {"steps": steps, "epochs_done": len(losses), "loss": losses, "seconds": time.perf_counter() - t0,
            "stopped_by_time": stopped}


def amplitudes(out: np.ndarray, data: TileSet) -> np.ndarray:
    """Eq. 2 amplitude of each output tile against its noisy tile (each chunk its own PSF)."""
    return np.array([ml_amplitude(out[i:i + 1], data.noisy[i:i + 1], data.kernel[i], data.ivar[i:i + 1])[0]
                     for i in range(len(out))])


def fiber_pulls(decon: np.ndarray, data: TileSet, target_sigma: float) -> np.ndarray:
    """``(flux - truth) / sigma_box`` per fiber and row of tiles (fibers fully inside), unit error scale."""
    h = int(np.ceil(3 * target_sigma))
    T = decon.shape[-1]
    pulls = []
    for i in range(len(decon)):
        prof = data.kernel[i].sum(axis=0)
        support = np.flatnonzero(prof > 1e-3 * prof.max()) - data.kernel[i].shape[1] // 2
        var_pix = 1.0 / data.ivar[i]
        for x in data.scene.fiber_x[i] - data.crop:
            if not np.isfinite(x):
                continue
            xc = int(np.rint(x))
            if xc - h < 0 or xc + h >= T or xc + support[0] < 0 or xc + support[-1] >= T:
                continue
            f = decon[i][:, xc - h:xc + h + 1].sum(axis=1)
            t = data.truth[i][:, xc - h:xc + h + 1].sum(axis=1)
            v = var_pix[:, xc + support].sum(axis=1)
            pulls.append(((f - t) / np.sqrt(v))[8:-8])
    return np.concatenate(pulls) if pulls else np.zeros(0)


def fiber_mode(out: np.ndarray, data: TileSet) -> np.ndarray:
    """Outputs rescaled with one amplitude per fiber and tile (:func:`~fiberlake.processors.cae_extract.fiber_amplitudes`)."""
    from fiberlake.processors.cae_extract import fiber_amplitudes

    res = []
    for i in range(len(out)):
        fx = data.scene.fiber_x[i]
        fx = fx[np.isfinite(fx)]
        res.append(fiber_amplitudes(out[i].astype(float), data.noisy[i].astype(float), data.ivar[i].astype(float),
                                    data.kernel[i], -data.crop, fx))
    return np.stack(res)


def robust_std(x: np.ndarray) -> float:
    x = np.asarray(x)
    x = x[np.isfinite(x)]
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) if x.size else float("nan")


def image_scores(out: np.ndarray, data: TileSet) -> dict:
    """PSNR and 1-SSIM (scikit-image) of max-scaled outputs against max-scaled truths, lit tiles."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    lit = ~data.scene.blank
    psnr, dssim = [], []
    for i in np.flatnonzero(lit):
        t = data.target[i, 0].astype(np.float64)
        p = out[i].astype(np.float64)
        p = p / p.max() if p.max() > 0 else p
        psnr.append(peak_signal_noise_ratio(t, p, data_range=1.0))
        dssim.append(1.0 - structural_similarity(t, p, data_range=1.0))
    return {"psnr_mean": float(np.mean(psnr)), "psnr_median": float(np.median(psnr)),
            "dssim_mean": float(np.mean(dssim)), "dssim_median": float(np.median(dssim))}


def train_deconvolve(params: CAETrainParams | None = None, *, out: str | Path | None = None, command: str = "",
                     log: Callable[[str], None] = print, scene_cache: dict | None = None) -> tuple[dict, Path]:
    """Simulate, train, calibrate the afterburner, evaluate, write the artifact.

    Returns
    -------
    card : dict
    path : Path
        The artifact folder.
    """
    import torch

    from fiberlake.processors.cae import DeconvCAE
    from fiberlake.processors.cae_extract import network_tensors

    params = params or CAETrainParams()
    torch.set_num_threads(params.cpu_threads)
    device = "cuda" if params.device == "auto" and torch.cuda.is_available() else (
        "cpu" if params.device == "auto" else params.device)
    t0 = time.perf_counter()
    train = simulate_tiles(params.chunks, params.seed, params, scene_cache=scene_cache)
    calib = simulate_tiles(params.calib_chunks, params.seed + 1, params, scene_cache=scene_cache)
    held = simulate_tiles(params.heldout_chunks, params.heldout_seed, params, scene_cache=scene_cache)
    log(f"simulated {params.chunks}+{params.calib_chunks}+{params.heldout_chunks} chunks in "
        f"{time.perf_counter() - t0:.0f} s")
    f = params.filters
    network = DeconvCAE(train.inputs.shape[1], (f, 2 * f, 4 * f)).to(device)
    history = fit(network, train, params, device, log)
    network.cpu()
    # afterburner: amplitude (eq. 2) on the calibration chunks, then the quadratic bias fit
    out_c = predict(network, calib.inputs)
    amp_c = amplitudes(out_c, calib)
    rec_c = amp_c * out_c.sum(axis=(1, 2))
    true_c = calib.truth.sum(axis=(1, 2))
    coeffs = fit_flux_bias(rec_c, true_c)
    ok = (rec_c > 1) & (true_c > 1)
    u_range = (float(np.log10(rec_c[ok]).min()), float(np.log10(rec_c[ok]).max())) if ok.any() else (0.0, 9.0)
    dec_c = out_c * (amp_c * flux_bias_factor(rec_c, coeffs, u_range))[:, None, None]
    pull_scale = robust_std(fiber_pulls(dec_c, calib, params.target_sigma))
    pull_scale_fibers = robust_std(fiber_pulls(fiber_mode(out_c, calib), calib, params.target_sigma))
    # held-out figures
    out_h = predict(network, held.inputs)
    figures = heldout_figures(out_h, held, coeffs, u_range, pull_scale, params.target_sigma)
    log(f"held-out: {figures}")
    tensors = network_tensors(network)
    card = {
        "stage": STAGE, "architecture": "cae", "arch_params": network.arch(), "classes": [],
        "input_shape": [network.in_channels, params.tile, params.tile],
        "prep": {"combination": params.combination, "tile": params.tile, "stride": params.stride,
                 "reg": params.reg, "sigma1": params.sigma1, "target_sigma": params.target_sigma,
                 "bias_coeffs": [float(c) for c in coeffs], "bias_range": list(u_range),
                 "pull_scale": float(pull_scale), "pull_scale_fibers": float(pull_scale_fibers), "scaling": "inputs min-max per tile and channel; truth / max"},
        "n_parameters": int(sum(p.numel() for p in network.parameters())),
        "train_params": params.to_dict(), "command": command,
        "seeds": {"train": params.seed, "calibration": params.seed + 1, "heldout": params.heldout_seed},
        "data": {"train_chunks": params.chunks, "calib_chunks": params.calib_chunks,
                 "heldout_chunks": params.heldout_chunks, "chunk_side": params.tile + 2 * params.margin},
        "simulator": {"module": "fiberlake.ingest.sim_chunks", "pitch": params.pitch,
                      "target_sigma": params.target_sigma},
        "training": history, "heldout": figures, "code_version": _code_version(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "weights_dtype": "float16",
    }
    tmp = Path(out or ".") / ".deconvolve-artifact.tmp"
    card = store.write_artifact(tmp, tensors, card)
    path = Path(out or ".") / card["model_id"]
    if path.exists():
        import shutil
        shutil.rmtree(path)
    tmp.rename(path)
    return card, path


def heldout_figures(out: np.ndarray, data: TileSet, coeffs: np.ndarray, u_range, pull_scale: float,
                    target_sigma: float) -> dict:
    """Image scores, flux bias before/after the quadratic, blank false detections, pulls."""
    amp = amplitudes(out, data)
    rec = amp * out.sum(axis=(1, 2))
    true = data.truth.sum(axis=(1, 2))
    fac = flux_bias_factor(rec, coeffs, u_range)
    lit = ~data.scene.blank & (true > 100)
    dec = out * (amp * fac)[:, None, None]
    pulls = fiber_pulls(dec, data, target_sigma) / pull_scale
    blank = data.scene.blank
    noise_flux = np.sqrt((1.0 / data.ivar).sum(axis=(1, 2)))
    return image_scores(out, data) | {
        "flux_bias_eq2_median": float(np.median(rec[lit] / true[lit] - 1)),
        "flux_bias_corrected_median": float(np.median(rec[lit] * fac[lit] / true[lit] - 1)),
        "flux_scatter_corrected": robust_std(rec[lit] * fac[lit] / true[lit]),
        "blank_tiles": int(blank.sum()),
        "blank_false_detections_5sigma": int(((rec * fac)[blank] > 5 * noise_flux[blank]).sum()),
        "pull_robust_std": robust_std(pulls),
    }


def _code_version() -> str:
    try:
        from fiberlake.storage.lineage import code_version
        return code_version()
    except Exception:  # lineage helpers are optional here
        return ""


def load_deconvolve_model(source: str = "default", lake_root=None, device: str = "auto", batch: int = 32):
    """The deconvolve model a setting names (``default``, a folder, or a model id of the lake).

    Raises
    ------
    fiberlake.storage.models.ArtifactError
        Missing, truncated or corrupt files.
    fiberlake.processors.cae_extract.ModelError
        Weights that do not fit the card.
    """
    from fiberlake.processors.cae_extract import deconvolver_from_artifact

    directory = store.locate(source, STAGE, lake_root)
    tensors, card = store.read_artifact(directory)
    model = deconvolver_from_artifact(tensors, card, device=device)
    model.batch = batch
    return model


def ensure_model(source: str = "default", lake_root=None, device: str = "auto", batch: int = 32):
    """Load the deconvolve model once per process and install it for the pipeline's ``cae`` extraction."""
    from fiberlake.processors import cae_extract

    try:
        return cae_extract.installed(source)
    except LookupError:
        model = load_deconvolve_model(source, lake_root, device, batch)
        cae_extract.install(model, source)
        return model


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def add_train_flags(parser) -> None:
    """One flag per :class:`CAETrainParams` field (``--train-epochs``, ...)."""
    from fiberlake.jobs.cli_params import add_parset_flags

    add_parset_flags(parser, CAETrainParams, TRAIN_PREFIX, "training parameters")


def train_params_from_args(args) -> CAETrainParams:
    from fiberlake.jobs.cli_params import parset_from_args

    return parset_from_args(args, CAETrainParams, TRAIN_PREFIX)
