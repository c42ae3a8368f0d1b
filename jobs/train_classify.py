"""``fiberlake train classify``: DRC-Net and RC-Net from simulated exposures, scored beside the template fit.

Steps (:func:`train_classify`):

1. simulate the training exposures (:mod:`fiberlake.jobs.classify_data`, flat class mix, brighter
   plates, a few exposures per night over ``designs`` instrument designs: the 2D PSF, traces and
   wavelength solution are drawn per simulation seed, and a network on stripes of one design
   learns that design) and the held-out exposures (other seeds and designs, fainter plates so
   every S/N bin is filled), of the training's star model and, when the Cannon models are
   installed, of the other one; and exposures of the demo's night (its seed and survey mix);
2. keep training stars above ``snr_min`` (the paper: S/N_r > 30); the stars of 10 % of the
   designs (whole instruments, so validation measures what held-out nights ask: a PSF never
   seen) for validation;
3. train each network with AdaGrad (weight decay) and cross-entropy, early stopping on the
   validation loss (best weights kept), within ``max_minutes``. Each batch makes a fraction of
   its stars fainter (:func:`fiberlake.processors.stripes.degrade`: target S/N_r log-uniform from
   ``augment_snr_min`` to the star's own, noise from the frame's variance model), the same draws
   for both networks (same seed), so DRC-Net and RC-Net see the same stars, noise and budget.
   Each arm's stripe is also mirrored across the trace for ``mirror_fraction`` of the stars (the
   cross profile is the instrument's, not the star's), and ``arm_dropout`` of the stars lose one
   arm (zeroed, as inference does for a missing camera).
   The validation stars are degraded once the same way (fixed draws);
4. score both on every held-out set in the paper's S/N bins (and DRC-Net on one arm), beside the
   template fit on every held-out star (templates from the other star model than the held-out
   set's, :mod:`fiberlake.jobs.classify_templates`);
5. write one artifact (both networks' weights, safetensors; the card holds the figures).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fiberlake.processors.classify_scores import confusion, format_confusion, format_table, scores
from fiberlake.processors.params import ClassifyTrainParams
from fiberlake.schemas.tables import LABEL_CLASSES as CLASSES
from fiberlake.storage import models as store

STAGE = "classify"
TRAIN_PREFIX = "train"
HELDOUT_SEEDS = {"analytic": 1551, "cannon": 1552}
"""First simulation seeds of the held-out exposures of each star model (designs: + 10000 k; no training run uses
them: training seeds are 1501 / 1502 + 10000 k)."""
TEMPLATE_STARS: int | None = None
"""Held-out stars scored with the template fit (None: all; it costs ~0.2 s a star, cached)."""
DEMO_SEED = 0
"""Seed of ``fiberlake demo``'s night (:data:`fiberlake.jobs.demo.NIGHT`, analytic stars, survey mix)."""
DEMO_EXPOSURES = 8


def data_sets(params: ClassifyTrainParams, cache, progress: bool, log: Callable[[str], None]) -> dict:
    """The training set and the held-out sets (``heldout_analytic``, ``heldout_cannon`` when available)."""
    from fiberlake.ingest.sim_spectra import resolve_stellar_model
    from fiberlake.jobs.classify_data import load_or_build, plan_exposures

    out = {}
    import dataclasses

    from fiberlake.jobs.demo import NIGHT as DEMO_NIGHT

    specs = plan_exposures(params.seed, params.exposures, stellar_model=params.stellar_model, mag_offset=(-3.0, 0.0),
                           exposures_per_night=params.exposures_per_night, designs=params.designs)
    t0 = time.time()
    out["train"], cached = load_or_build(specs, cache, params.workers, progress, with_raw=True)
    out["train_specs"] = specs
    log(f"training stars: {len(out['train']['label'])} ({'cache' if cached else f'{time.time() - t0:.0f} s'})")
    models = ["analytic"] + (["cannon"] if resolve_stellar_model("cannon")[0] == "cannon" else [])
    for model in models:
        held = plan_exposures(HELDOUT_SEEDS[model], params.heldout_exposures, stellar_model=model, mag_offset=(-1.5, 1.0),
                              exposures_per_night=params.exposures_per_night, designs=params.heldout_designs)
        t0 = time.time()
        out[f"heldout_{model}"], cached = load_or_build(held, cache, params.workers, progress)
        out[f"heldout_{model}_specs"] = held
        log(f"held-out stars ({model}): {len(out[f'heldout_{model}']['label'])} "
            f"({'cache' if cached else f'{time.time() - t0:.0f} s'})")
    demo = [dataclasses.replace(s, night=DEMO_NIGHT)
            for s in plan_exposures(DEMO_SEED, DEMO_EXPOSURES, flat_mix=False, exposures_per_night=DEMO_EXPOSURES)]
    out["heldout_demo"], _ = load_or_build(demo, cache, params.workers, progress)
    out["heldout_demo_specs"] = demo
    log(f"demo night stars (seed {DEMO_SEED}, {DEMO_NIGHT}, survey mix): {len(out['heldout_demo']['label'])}")
    return out


def network_inputs(kind: str, data: dict[str, np.ndarray], idx: np.ndarray | None = None) -> tuple:
    """The numpy inputs of a network for the samples ``idx`` of a data set."""
    from fiberlake.processors.drcnet import spectrum_input

    sel = slice(None) if idx is None else idx
    if kind == "drcnet":
        return (data["stripes_b"][sel].astype(np.float32), data["stripes_r"][sel].astype(np.float32))
    return (spectrum_input(data["flux_b"][sel], data["ivar_b"][sel], data["flux_r"][sel], data["ivar_r"][sel]),)


def build_network(kind: str, shapes: dict, n_classes: int):
    """A fresh DRC-Net or RC-Net for inputs of ``shapes`` (``rows``, ``width_b``, ``width_r``)."""
    from fiberlake.processors.drcnet import DRCNet, RCNet

    if kind == "drcnet":
        return DRCNet(shapes["rows"], shapes["width_b"], shapes["width_r"], n_classes)
    return RCNet(shapes["width_b"] + shapes["width_r"], n_classes)


class Augmenter:
    """Training batches of both networks from the raw (sky-subtracted, electrons) stripes.

    Each call draws, per star, whether it is made fainter (probability ``augment_fraction``), its
    target S/N_r (log-uniform from ``augment_snr_min`` to its own), which arm it loses (arm
    dropout) and which arm's stripe is mirrored across the trace (``mirror_fraction``; only
    DRC-Net sees it: an aperture sum does not change), always with the same calls on ``rng``, so
    two networks trained with generators of one seed see the same stars, noise and dropped arms.
    """

    def __init__(self, data: dict[str, np.ndarray], params: ClassifyTrainParams) -> None:
        self.data = data
        self.params = params
        good, sig, bkg = data["good_r"], data["signal_r"], data["bkg_r"]
        n_good = np.maximum(good.sum(axis=1), 1)
        width = good.shape[1]
        # per star: median aperture signal and background variance of the red arm (S/N_r defines the bins)
        self.star = np.median(sig.sum(axis=1) * width / n_good, axis=1)
        self.background = np.median(np.where(good, bkg, 0.0).sum(axis=1) * width / n_good, axis=1)

    def batch(self, idx: np.ndarray, rng: np.random.Generator) -> dict[str, tuple]:
        """Inputs of both networks (``drcnet``, ``rcnet``) for the samples ``idx``."""
        from fiberlake.processors.drcnet import spectrum_input
        from fiberlake.processors.stripes import degrade, factor_for_snr, stripe_inputs

        p, d = self.params, self.data
        n = idx.size
        own = np.maximum(d["snr_r"][idx].astype(np.float64), p.augment_snr_min)
        target = np.exp(rng.uniform(np.log(p.augment_snr_min), np.log(own)))
        fainter = rng.uniform(size=n) < p.augment_fraction
        factor = np.where(fainter, factor_for_snr(self.star[idx], self.background[idx], target), 1.0)
        drop = rng.uniform(size=n)
        mirror = rng.uniform(size=(2, n)) < p.mirror_fraction
        arms = {}
        for a in ("b", "r"):
            sig, var = degrade(d[f"signal_{a}"][idx], d[f"var_{a}"][idx], d[f"bkg_{a}"][idx], d[f"good_{a}"][idx],
                               factor, rng)
            arms[a] = stripe_inputs(sig, var, d[f"good_{a}"][idx])
        lost = {"b": drop < p.arm_dropout / 2, "r": (drop >= p.arm_dropout / 2) & (drop < p.arm_dropout)}
        for i, a in enumerate(("b", "r")):
            z, flux, ivar = arms[a]
            z[mirror[i]] = z[mirror[i], ::-1, :]
            z[lost[a]] = 0.0
            ivar[lost[a]] = 0.0
        zb, fb, ib = arms["b"]
        zr, fr, ir = arms["r"]
        return {"drcnet": (zb, zr), "rcnet": (spectrum_input(fb, ib, fr, ir),)}


def fit_network(kind: str, model, augmenter: Augmenter, tr_idx: np.ndarray, val: tuple, y_val: np.ndarray,
                params: ClassifyTrainParams, log: Callable[[str], None]) -> dict:
    """AdaGrad + cross-entropy with early stopping on the validation loss; the best weights are kept.

    Training batches come from ``augmenter`` (fainter stars, dropped arms); ``val`` are fixed inputs.
    """
    import torch

    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    opt = torch.optim.Adagrad(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    val_t = [torch.from_numpy(a) for a in val]
    yv = torch.from_numpy(y_val)
    y_all = augmenter.data["label"]
    best, best_state, waited, history = np.inf, None, 0, []
    start = time.time()
    n = tr_idx.size
    for epoch in range(params.epochs):
        model.train()
        order = tr_idx[rng.permutation(n)]
        total = 0.0
        for s in range(0, n, params.batch):
            idx = order[s:s + params.batch]
            inputs = augmenter.batch(idx, rng)[kind]
            if idx.size < 2:
                continue
            opt.zero_grad()
            loss = loss_fn(model(*[torch.from_numpy(b) for b in inputs]), torch.from_numpy(y_all[idx]))
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.size
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(*[v[i:i + 256] for v in val_t]) for i in range(0, len(yv), 256)])
            vloss = float(loss_fn(logits, yv))
            vacc = float((logits.argmax(1) == yv).float().mean())
        history.append({"epoch": epoch + 1, "train_loss": total / n, "val_loss": vloss, "val_accuracy": vacc})
        log(f"{kind} epoch {epoch + 1}: train loss {total / n:.4f}, validation loss {vloss:.4f}, accuracy {vacc:.3f}"
            f" ({time.time() - start:.0f} s)")
        if vloss < best - 1e-4:
            best, waited = vloss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
        if waited >= params.patience:
            log(f"{kind}: early stop (no better validation loss for {params.patience} epochs)")
            break
        if time.time() - start > 60.0 * params.max_minutes:
            log(f"{kind}: time budget of {params.max_minutes} min reached")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"epochs": len(history), "best_val_loss": best, "seconds": round(time.time() - start, 1),
            "history": history}


def template_predictions(held: dict[str, np.ndarray], data_model: str, cache, key: str,
                         n_stars: int | None = TEMPLATE_STARS) -> tuple[np.ndarray, np.ndarray, str]:
    """Template-fit predictions on a fixed subset of a held-out set (cached by the set's key).

    Returns
    -------
    idx : ndarray
        The subset's sample indices.
    predicted : ndarray of int
    source : str
        The templates' star model.
    """
    from fiberlake.jobs.classify_templates import other_model, template_grid
    from fiberlake.processors.template_fit import fit_spectra

    n = held["label"].size
    idx = np.arange(n) if n_stars is None else np.sort(np.random.default_rng(0).permutation(n)[:min(n_stars, n)])
    grid = template_grid(other_model(data_model))
    path = None if cache is None else Path(cache) / f"template-{key}-{grid.source.split()[0]}-{idx.size}.npy"
    if path is not None and path.exists():
        return idx, np.load(path), grid.source
    probs, _ = fit_spectra(held["wave_b"][idx], held["flux_b"][idx], held["ivar_b"][idx], held["wave_r"][idx],
                           held["flux_r"][idx], held["ivar_r"][idx], grid, CLASSES,
                           velocities=np.arange(-120.0, 121.0, 40.0))
    pred = np.where(np.isfinite(probs).all(axis=1), np.nanargmax(np.nan_to_num(probs, nan=-1.0), axis=1), -1)
    if path is not None:
        np.save(path, pred)
    return idx, pred, grid.source


def evaluate(nets: dict, held: dict[str, np.ndarray], data_model: str, cache, key: str,
             with_template: bool = True) -> dict:
    """Scores of the networks (all held-out stars and the template subset) and of the template fit."""
    from fiberlake.processors.drcnet import predict

    out = {"n_stars": int(held["label"].size), "classes": list(CLASSES)}
    preds = {}
    for kind, model in nets.items():
        probs = predict(model, network_inputs(kind, held))
        preds[kind] = probs.argmax(axis=1)
        out[kind] = scores(held["label"], preds[kind], held["snr_r"], CLASSES)
        out[f"{kind}_confusion"] = confusion(held["label"], preds[kind], len(CLASSES)).tolist()
    if "drcnet" in nets:
        zb, zr = network_inputs("drcnet", held)
        for arm, inputs in (("red_only", (np.zeros_like(zb), zr)), ("blue_only", (zb, np.zeros_like(zr)))):
            pred = predict(nets["drcnet"], inputs).argmax(axis=1)
            out[f"drcnet_{arm}"] = scores(held["label"], pred, held["snr_r"], CLASSES)
    if with_template:
        idx, pred, source = template_predictions(held, data_model, cache, key)
        out["template_source"] = source
        out["template_subset"] = int(idx.size)
        out["template"] = scores(held["label"][idx], pred, held["snr_r"][idx], CLASSES)
        out["template_confusion"] = confusion(held["label"][idx], pred, len(CLASSES)).tolist()
        for kind in nets:
            out[f"{kind}_on_template_subset"] = scores(held["label"][idx], preds[kind][idx], held["snr_r"][idx],
                                                       CLASSES)
    return out


def report_text(figures: dict) -> str:
    """Markdown tables of an evaluation (:func:`evaluate`)."""
    parts = []
    methods = {k: figures[k] for k in ("drcnet", "rcnet") if k in figures}
    every = "template" in figures and figures["template_subset"] == figures["n_stars"]
    if every:
        methods["template"] = figures["template"]
    methods |= {f"drcnet ({k.split('_')[1]} arm only)": figures[k] for k in ("drcnet_red_only", "drcnet_blue_only")
                if k in figures}
    title = f"All {figures['n_stars']} held-out stars"
    title += f" (templates: {figures['template_source']})" if every else ""
    parts.append(f"{title}:\n\n" + format_table(methods, CLASSES))
    if "template" in figures and not every:
        sub = {f"{k} (subset)": figures[f"{k}_on_template_subset"] for k in ("drcnet", "rcnet")
               if f"{k}_on_template_subset" in figures}
        sub["template"] = figures["template"]
        parts.append(f"Template subset ({figures['template_subset']} stars; templates: {figures['template_source']}):"
                     f"\n\n" + format_table(sub, CLASSES))
    for k in ("drcnet", "rcnet", "template"):
        if f"{k}_confusion" in figures:
            parts.append(f"Confusion, {k}:\n\n" + format_confusion(np.array(figures[f"{k}_confusion"]), CLASSES))
    return "\n\n".join(parts)


def train_classify(params: ClassifyTrainParams | None = None, *, out: str | Path | None = None, command: str = "",
                   cache: str | Path | None = None, progress: bool = False,
                   log: Callable[[str], None] = print) -> tuple[dict, Path | None]:
    """Simulate, train DRC-Net and RC-Net, score them beside the template fit, write the artifact.

    Returns
    -------
    card : dict
    path : Path or None
        The artifact folder (None when ``out`` is None).
    """
    import torch

    from fiberlake.jobs.classify_data import dataset_key
    from fiberlake.jobs.demo import NIGHT as DEMO_NIGHT
    from fiberlake.jobs.provenance import code_version
    from fiberlake.processors.drcnet import state_arrays

    params = params or ClassifyTrainParams()
    torch.set_num_threads(params.cpu_threads)
    sets = data_sets(params, cache, progress, log)
    train = sets["train"]
    bright = train["snr_r"] > params.snr_min
    design_of = {s.expid: s.seed for s in sets["train_specs"]}
    designs = np.unique(list(design_of.values()))
    rng = np.random.default_rng(params.seed)
    if designs.size > 1:      # validation: whole designs (PSFs the training never saw)
        val_designs = rng.permutation(designs)[:max(1, designs.size // 10)]
        val_exp = np.array([e for e, d in design_of.items() if d in set(val_designs.tolist())])
    else:                     # one design: whole exposures
        expids = np.unique(train["expid"])
        val_exp = rng.permutation(expids)[:max(1, expids.size // 10)]
    in_val = np.isin(train["expid"], val_exp)
    val_idx, tr_idx = np.flatnonzero(bright & in_val), np.flatnonzero(bright & ~in_val)
    log(f"training on {tr_idx.size} stars of S/N_r > {params.snr_min:g} ({designs.size} designs), validating on "
        f"{val_idx.size} (stars of {val_exp.size} other exposures); classes in training: "
        f"{np.bincount(train['label'][tr_idx], minlength=len(CLASSES)).tolist()}")
    shapes = {"rows": int(train["stripes_b"].shape[1]), "width_b": int(train["stripes_b"].shape[2]),
              "width_r": int(train["stripes_r"].shape[2])}
    augmenter = Augmenter(train, params)
    val_inputs = augmenter.batch(val_idx, np.random.default_rng(params.seed + 1))
    nets, training = {}, {}
    for kind in ("drcnet", "rcnet"):
        torch.manual_seed(params.seed)
        model = build_network(kind, shapes, len(CLASSES))
        training[kind] = fit_network(kind, model, augmenter, tr_idx, val_inputs[kind], train["label"][val_idx],
                                     params, log)
        nets[kind] = model
    heldout = {}
    for name in ("heldout_analytic", "heldout_cannon", "heldout_demo"):
        if name in sets:
            model_name = name.split("_", 1)[1]
            data_model = "analytic" if model_name == "demo" else model_name
            heldout[model_name] = evaluate(nets, sets[name], data_model, cache, dataset_key(sets[f"{name}_specs"]))
            log(f"held-out ({model_name}):\n" + report_text(heldout[model_name]))
    tensors = state_arrays(nets["drcnet"], "drcnet.") | state_arrays(nets["rcnet"], "rcnet.")
    card = {
        "stage": STAGE,
        "architecture": "drcnet+rcnet",
        "arch_params": {"drcnet": nets["drcnet"].config, "rcnet": nets["rcnet"].config},
        "classes": list(CLASSES),
        "input_shape": [shapes["rows"], shapes["width_b"], shapes["width_r"]],
        "prep": {"stripe": "11 px around the trace, rows 500/4096-3500/4096 of the frame, z-scored per stripe, "
                 "sky-subtracted (SKY fibers' median aperture spectrum x the fiber's profile), masked pixels 0",
                 "spectrum": "aperture sum of the sky-subtracted stripe, z-scored per arm, arms concatenated",
                 "augmentation": "training stars made fainter (target S/N_r log-uniform from augment_snr_min to "
                 "their own) with noise from the frame's variance model; arm dropout; stripes mirrored across the "
                 "trace (mirror_fraction); nights over many instrument designs (designs)"},
        "n_parameters": {k: int(sum(p.numel() for p in m.parameters())) for k, m in nets.items()},
        "training": {**{k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in training.items()},
                     "history": {k: v["history"] for k, v in training.items()},
                     "params": params.to_dict(), "optimizer": "AdaGrad", "loss": "cross-entropy",
                     "train_stars": int(tr_idx.size), "val_stars": int(val_idx.size),
                     "val_expids": sorted(int(e) for e in val_exp)},
        "data": {"train_specs": [s.to_dict() for s in sets["train_specs"]][:3] + ["..."],
                 "train_exposures": len(sets["train_specs"]), "train_seed": params.seed,
                 "train_designs": int(designs.size), "heldout_seeds": HELDOUT_SEEDS,
                 "heldout_designs": params.heldout_designs, "demo": {"seed": DEMO_SEED, "night": DEMO_NIGHT,
                                                                     "exposures": DEMO_EXPOSURES}},
        "heldout": heldout,
        "command": command,
        "code_version": code_version(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = None
    if out is not None:
        card, path = store.write_artifact_named(out, tensors, card, STAGE)
    return card, path


def load_classify_models(source: str = "default", lake_root=None, device: str = "cpu") -> tuple[dict, dict]:
    """The DRC-Net and RC-Net of an artifact (``default``: shipped), on ``device``, and its card.

    Raises
    ------
    fiberlake.storage.models.ArtifactError
        Missing, truncated, corrupt or mismatched files.
    """
    from fiberlake.processors.drcnet import DRCNet, RCNet, load_state

    directory = store.locate(source, STAGE, lake_root)
    tensors, card = store.read_artifact(directory)
    try:
        nets = {"drcnet": load_state(DRCNet(**card["arch_params"]["drcnet"]), tensors, "drcnet."),
                "rcnet": load_state(RCNet(**card["arch_params"]["rcnet"]), tensors, "rcnet.")}
    except (KeyError, TypeError, ValueError) as err:
        raise store.ArtifactError(f"classify model {directory}: weights do not fit the card ({err})") from None
    return {k: m.to(device) for k, m in nets.items()}, card


def add_train_flags(parser) -> None:
    """One flag per :class:`ClassifyTrainParams` field (``--train-epochs``, ...)."""
    from fiberlake.jobs.cli_params import add_parset_flags

    add_parset_flags(parser, ClassifyTrainParams, TRAIN_PREFIX, "training parameters")


def train_params_from_args(args) -> ClassifyTrainParams:
    """The training parameters of the parsed flags."""
    from fiberlake.jobs.cli_params import parset_from_args

    return parset_from_args(args, ClassifyTrainParams, TRAIN_PREFIX)
