"""``fiberlake train typing``: simulate labelled frames, train SPIT, evaluate on held-out nights, write an artifact.

Steps (each a function, so :mod:`bench.typing` and the tests reuse them):

1. :func:`prepare_dataset` - simulate the typing nights of :mod:`fiberlake.ingest.typing_dataset`
   (training seeds, or held-out seeds no training run uses) and pre-process every frame
   (:func:`~fiberlake.processors.typing_prep.prepare_frame`); optionally cached as ``.npz``.
2. :func:`fit` - Adam on the class-balanced (oversampled) frames times their 4 flips, within a
   time budget.
3. :func:`evaluate` - the paper's figures on the held-out frames and the wrong-header audit.
4. :func:`train_typing` - all of it, and the artifact (:mod:`fiberlake.storage.models`):
   safetensors weights, model card, ``model_id``; :func:`register_model` adds it to a lake.

:func:`load_typing_model` is what ingest calls at start: the shipped default, a folder or a
model id of the lake, checked (missing, truncated or mis-shaped weights are one clear error).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fiberlake.jobs.cli_params import add_parset_flags, parset_from_args
from fiberlake.processors.params import TypingParams, TypingTrainParams
from fiberlake.schemas.header import OBSTYPES as CLASSES
from fiberlake.storage import models as store

# The simulator, the pre-processing and torch are imported where they are used, so that building
# the command line (``fiberlake --help``) stays light.

STAGE = "typing"
TRAIN_PREFIX = "train"


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
@dataclass
class TypingData:
    """Pre-processed labelled frames.

    Attributes
    ----------
    images : ndarray of uint8, shape (N, C, 210, 650)
        Input channels of each frame (:func:`prepare_dataset` stores every one of
        :data:`~fiberlake.processors.typing_prep.CHANNELS`).
    labels : ndarray of int, shape (N,)
        Index into :data:`~fiberlake.ingest.typing_dataset.CLASSES`.
    meta : list of dict
        ``instrument seed night camera expid exptime kind`` of each frame.
    specs : list of NightSpec
        The nights simulated (:class:`fiberlake.ingest.typing_dataset.NightSpec`).
    seconds : float
        Time spent simulating and pre-processing (0 when read from the cache).
    cached : bool
        Read from a cache file made by an earlier run.
    """

    images: np.ndarray
    labels: np.ndarray
    meta: list[dict]
    specs: list
    seconds: float = 0.0
    cached: bool = False
    scalars: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.size)

    def select_channels(self, names: tuple[str, ...] | list[str], stored: tuple[str, ...] | list[str]) -> "TypingData":
        """The same frames with only the input channels ``names`` (images ``(N, C, H, W)``), in that order.

        ``stored`` names the channels of :attr:`images` (axis 1), e.g.
        :data:`~fiberlake.processors.typing_prep.CHANNELS` for a data set of :func:`prepare_dataset`.
        """
        stored = list(stored)
        index = [stored.index(n) for n in names]
        return TypingData(np.ascontiguousarray(self.images[:, index]), self.labels, self.meta, self.specs,
                          self.seconds, self.cached, self.scalars)

    def with_scalars(self, names: tuple[str, ...] | list[str], stored: tuple[str, ...] | list[str]) -> "TypingData":
        """The same frames with :attr:`scalars` ``(N, len(names))`` computed from their stored ``asinh`` and
        ``cosmics`` channels (:func:`~fiberlake.processors.typing_prep.frame_scalars`; the raw frame's size is
        its instrument's :attr:`~fiberlake.schemas.instrument.Instrument.raw_shape`, as the simulator makes
        it). Call before :meth:`select_channels` drops those channels; no names: no scalars."""
        from fiberlake.processors.typing_prep import check_scalars, frame_scalars
        from fiberlake.schemas.instrument import get_instrument

        names = check_scalars(names)
        if not names:
            return TypingData(self.images, self.labels, self.meta, self.specs, self.seconds, self.cached, None)
        stored = list(stored)
        ia, ic = stored.index("asinh"), stored.index("cosmics")
        pixels = {m["instrument"]: int(np.prod(get_instrument(m["instrument"]).raw_shape)) for m in self.meta}
        values = np.stack([frame_scalars(self.images[i, ia], self.images[i, ic], pixels[m["instrument"]], names)
                           for i, m in enumerate(self.meta)]) if len(self) else np.zeros((0, len(names)), np.float32)
        return TypingData(self.images, self.labels, self.meta, self.specs, self.seconds, self.cached, values)

    def without_scalars(self) -> "TypingData":
        """The same frames without :attr:`scalars` (what an image network alone is trained on)."""
        return TypingData(self.images, self.labels, self.meta, self.specs, self.seconds, self.cached, None)

    def subset(self, keep: np.ndarray) -> "TypingData":
        """The frames where ``keep`` is true."""
        keep = np.asarray(keep, dtype=bool)
        return TypingData(self.images[keep], self.labels[keep], [m for m, k in zip(self.meta, keep) if k],
                          self.specs, self.seconds, self.cached,
                          None if self.scalars is None else self.scalars[keep])

    def groups(self) -> np.ndarray:
        """One integer per (instrument, seed, camera): the frames of one night and camera."""
        keys = [f"{m['instrument']}/{m['seed']}/{m['camera']}" for m in self.meta]
        _, inverse = np.unique(keys, return_inverse=True)
        return inverse

    def summary(self) -> dict:
        """Sizes for a model card: frames per class and per instrument, nights, seeds."""
        instruments: dict[str, int] = {}
        for m in self.meta:
            instruments[m["instrument"]] = instruments.get(m["instrument"], 0) + 1
        return {"frames": len(self), "per_class": {c: int((self.labels == i).sum()) for i, c in enumerate(CLASSES)},
                "per_instrument": instruments, "nights": len(self.specs),
                "seeds": sorted({s.seed for s in self.specs}), "cameras": sorted({s.camera for s in self.specs}),
                "bytes_preprocessed": int(self.images.nbytes)}


def night_specs(params: TypingTrainParams, heldout: bool) -> list:
    """The typing nights of a training run (training seeds) or of its evaluation (held-out seeds).

    Mini nights take the first seeds of their pool, lamost nights the last ones, so the two
    never share a seed and adding nights of one instrument does not change the other's.
    """
    from fiberlake.ingest.typing_dataset import HELDOUT_SEEDS, TRAIN_SEEDS, plan_nights

    pool = HELDOUT_SEEDS if heldout else TRAIN_SEEDS
    n_mini = params.heldout_mini_nights if heldout else params.mini_nights
    n_lamost = params.heldout_lamost_nights if heldout else params.lamost_nights
    per_class = params.heldout_per_class if heldout else params.per_class
    if n_mini + n_lamost > len(pool):
        raise ValueError(f"{n_mini + n_lamost} nights asked for, {len(pool)} seeds in the pool")
    specs = plan_nights("mini", pool[:n_mini], per_class)
    if n_lamost:
        specs += plan_nights("lamost", pool[len(pool) - n_lamost:], params.lamost_per_class)
    return specs


def _cache_key(specs: list) -> str:
    from fiberlake.ingest.typing_dataset import simulator_settings
    from fiberlake.processors.typing_prep import CHANNELS, prep_config

    text = json.dumps({"specs": [s.to_dict() for s in specs], "sim": simulator_settings(),
                       "prep": prep_config(CHANNELS)},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def prepare_dataset(specs: list, cache: str | Path | None = None, progress: bool = False,
                    label: str = "simulate") -> TypingData:
    """Simulate and pre-process the frames of ``specs`` (or read them from ``cache``).

    The cache file's name hashes the nights, the simulator's settings and the pre-processing,
    so a changed simulator never reads stale frames.
    """
    from fiberlake.ingest.typing_dataset import iter_frames
    from fiberlake.processors.typing_prep import CHANNELS, TARGET_SHAPE, prepare_channels

    path = Path(cache) / f"typing-{_cache_key(specs)}.npz" if cache else None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            return TypingData(z["images"], z["labels"], json.loads(str(z["meta"])), specs, 0.0, cached=True)
    t0 = time.perf_counter()
    total = sum(s.per_class for s in specs) * len(CLASSES)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=label, unit="frame")
    images = np.empty((total, len(CHANNELS)) + TARGET_SHAPE, dtype=np.uint8)
    labels = np.empty(total, dtype=np.int64)
    meta = []
    for i, frame in enumerate(iter_frames(specs)):
        images[i] = prepare_channels(frame.raw, CHANNELS)
        labels[i] = CLASSES.index(frame.label)
        meta.append({"instrument": frame.instrument, "seed": frame.seed, "night": frame.night, "camera": frame.camera,
                     "expid": frame.expid, "exptime": round(frame.exptime, 2), "kind": frame.kind})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    data = TypingData(images, labels, meta, specs, time.perf_counter() - t0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, images=images, labels=labels, meta=np.array(json.dumps(meta)))
        tmp.replace(path)
    return data


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------
def balanced_indices(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices with every class oversampled to the largest class's count (the paper's 2.3).

    Each frame of a smaller class is repeated as many whole times as fit, and the remainder is
    drawn at random without repetition.

    Examples
    --------
    >>> idx = balanced_indices(np.array([0, 0, 0, 0, 1]), np.random.default_rng(0))
    >>> np.bincount(np.array([0, 0, 0, 0, 1])[idx]).tolist()
    [4, 4]
    """
    labels = np.asarray(labels)
    present = np.unique(labels)
    target = max(int((labels == c).sum()) for c in present)
    out = []
    for c in present:
        members = np.flatnonzero(labels == c)
        whole, rest = divmod(target, members.size)
        out.append(np.concatenate([np.tile(members, whole), rng.choice(members, rest, replace=False)]))
    return np.concatenate(out)


def flip_image(image: np.ndarray, flip: int) -> np.ndarray:
    """Flip 0: none, 1: left-right, 2: up-down, 3: both (the order of :func:`typing_prep.flips`)."""
    if flip & 1:
        image = image[..., :, ::-1]
    if flip & 2:
        image = image[..., ::-1, :]
    return image


def fit(model, data: TypingData, params: TypingTrainParams, log: Callable[[str], None] = print) -> dict:
    """Train ``model`` in place with Adam on the balanced frames times their 4 flips.

    One epoch is one pass, in random order, over every (oversampled frame, flip) pair: the
    paper's expanded training set. Training stops after ``params.epochs`` epochs or
    ``params.max_minutes``, whichever comes first; the learning rate decays from ``params.lr``
    to 0 along a half cosine over that budget (the paper kept 1e-4 constant over ~1,000 GPU
    updates; on two CPU cores the budget is a few hundred updates, and a larger rate that
    decays converges within it).

    Returns
    -------
    dict
        ``epochs`` run, ``updates``, ``seconds``, ``stopped_by`` (epochs or time) and a per-epoch
        ``history`` of mean loss and accuracy on the training pairs.
    """
    import torch
    from torch import nn

    from fiberlake.processors.spit import resolve_device, to_input

    torch.manual_seed(params.seed)
    torch.set_num_threads(params.cpu_threads)
    rng = np.random.default_rng(params.seed)
    device = resolve_device(params.device)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    loss_fn = nn.CrossEntropyLoss()
    balanced = balanced_indices(data.labels, rng)
    pairs = np.stack([np.repeat(balanced, 4), np.tile(np.arange(4), balanced.size)], axis=1)
    t0 = time.perf_counter()
    deadline = t0 + 60.0 * params.max_minutes
    history, updates, stopped_by = [], 0, "epochs"
    per_epoch = -(-len(pairs) // params.batch)
    for epoch in range(params.epochs):
        order = pairs[rng.permutation(len(pairs))]
        total_loss = correct = seen = 0.0
        for start in range(0, len(order), params.batch):
            chunk = order[start:start + params.batch]
            batch = np.stack([flip_image(data.images[i], f) for i, f in chunk])
            x = to_input(batch).to(device)
            y = torch.as_tensor(data.labels[chunk[:, 0]], device=device)
            extra = () if data.scalars is None else (torch.from_numpy(data.scalars[chunk[:, 0]]).to(device),)
            progress = max(updates / (per_epoch * params.epochs), (time.perf_counter() - t0) / (deadline - t0))
            for group in optimizer.param_groups:
                group["lr"] = params.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
            optimizer.zero_grad()
            logits = model(x, *extra)
            loss = loss_fn(logits, y)
            loss.backward()
            optimizer.step()
            updates += 1
            total_loss += float(loss.detach()) * len(chunk)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(chunk)
            if time.perf_counter() > deadline:
                stopped_by = "time"
                break
        history.append({"epoch": epoch + 1, "loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1),
                        "pairs": int(seen), "seconds": round(time.perf_counter() - t0, 1)})
        log(f"epoch {epoch + 1}: loss {history[-1]['loss']:.4f}, train accuracy {history[-1]['accuracy']:.4f} "
            f"({history[-1]['seconds']:.0f} s)")
        if stopped_by == "time":
            break
    model.eval()
    return {"epochs": len(history), "updates": updates, "seconds": round(time.perf_counter() - t0, 1),
            "stopped_by": stopped_by, "balanced_frames": int(balanced.size), "pairs_per_epoch": int(len(pairs)),
            "history": history}


# --------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------
def evaluate(typer, data: TypingData, typing: TypingParams | None = None) -> dict:
    """Held-out figures: the paper's normalized and final-scheme accuracy, per instrument, and the
    wrong-header audit (5 % of the headers wrong or missing, routed with ``typing``'s rule).

    Returns
    -------
    dict
        :func:`~fiberlake.processors.spit.evaluate_votes` of all frames plus ``per_instrument``,
        ``errors`` (each frame the final scheme got wrong or left UNKNOWN), ``wrong_headers``
        (:func:`~fiberlake.processors.typing_route.header_audit`) and ``inference_s``.
    """
    from fiberlake.processors.spit import evaluate_votes, vote
    from fiberlake.processors.typing_route import header_audit

    typing = typing or TypingParams()
    t0 = time.perf_counter()
    probs = typer.flip_probabilities(data.images, data.scalars if typer.scalars else None)
    seconds = time.perf_counter() - t0
    figures = evaluate_votes(probs, data.labels, CLASSES, typing.super_majority)
    instruments = np.array([m["instrument"] for m in data.meta])
    figures["per_instrument"] = {name: evaluate_votes(probs[instruments == name], data.labels[instruments == name],
                                                      CLASSES, typing.super_majority)
                                 for name in sorted(set(instruments))}
    votes = vote(probs, typing.super_majority)
    figures["errors"] = [
        {**data.meta[i], "true": CLASSES[data.labels[i]],
         "typed": CLASSES[votes.index[i]] if votes.index[i] >= 0 else "UNKNOWN",
         "flips_agreeing": int(votes.flips_agreeing[i]), "confidence": round(float(votes.confidence[i]), 3)}
        for i in np.flatnonzero(votes.index != data.labels)]
    figures["wrong_headers"] = header_audit(probs, data.labels, CLASSES, data.groups(), routing=typing.routing,
                                            min_flips=typing.min_flips, min_confidence=typing.min_confidence,
                                            super_majority=typing.super_majority)
    figures["inference_s"] = round(seconds, 2)
    return figures


# --------------------------------------------------------------------------------------
# artifacts
# --------------------------------------------------------------------------------------
def arch_params(model) -> dict:
    """The constructor arguments of a typing network (recorded in the model card)."""
    from torch import nn

    from fiberlake.processors.spit import SPITCompact, SPITEnsemble, SPITFused, SPITNet

    if isinstance(model, SPITEnsemble):
        return {"members": [_member_spec(m) for m in model.members]}
    if isinstance(model, SPITFused):
        return {"image": _member_spec(model.image), "n_scalars": model.n_scalars,
                "scalar_hidden": model.head.net[0].out_features}
    if isinstance(model, SPITCompact):
        convs = [m.out_channels for m in model.features if hasattr(m, "out_channels")]
        dense = [m for m in model.classifier if isinstance(m, nn.Linear)][0]
        return {"channels": convs, "hidden": dense.out_features,
                "batchnorm": any(isinstance(m, nn.BatchNorm2d) for m in model.features),
                **({"in_channels": model.in_channels} if model.in_channels != 1 else {}),
                **({"n_scalars": model.n_scalars} if model.n_scalars else {})}
    if isinstance(model, SPITNet):
        convs = [m for m in model.features if hasattr(m, "out_channels")]
        return {"conv1": convs[0].out_channels, "conv2": convs[1].out_channels, "kernel": convs[0].kernel_size[0],
                "hidden": model.classifier[1].out_features,
                **({"in_channels": model.in_channels} if model.in_channels != 1 else {})}
    raise TypeError(f"not a typing network: {type(model).__name__}")


def _arch_name(model) -> str:
    """The card's ``architecture`` of a typing network (:data:`~fiberlake.processors.spit.ARCHITECTURES`)."""
    from fiberlake.processors.spit import ARCHITECTURES

    return next(name for name, cls in ARCHITECTURES.items() if type(model) is cls)


def fit_scalar_head(scalars: np.ndarray, labels: np.ndarray, n_classes: int, params: TypingTrainParams,
                    log: Callable[[str], None] = print):
    """Train a :class:`~fiberlake.processors.spit.ScalarHead` on the training frames' scalars (full batch).

    The inputs are standardised by their mean and spread over the training frames (stored in the
    head); cross-entropy, Adam at 1e-2 for ``params.scalar_steps`` steps, seeded by ``params.seed``.

    Returns
    -------
    head : ScalarHead
    training : dict
        ``steps``, ``seconds``, final ``loss`` and ``accuracy`` on the training frames.
    """
    import torch

    from fiberlake.processors.spit import ScalarHead

    t0 = time.perf_counter()
    torch.manual_seed(params.seed)
    x = torch.as_tensor(np.asarray(scalars, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    head = ScalarHead(x.shape[1], n_classes, params.scalar_hidden)
    head.mean.copy_(x.mean(dim=0))
    head.scale.copy_(x.std(dim=0).clamp_min(1e-6))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(params.scalar_steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y)
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        accuracy = float((head(x).argmax(1) == y).float().mean())
    out = {"steps": params.scalar_steps, "seconds": round(time.perf_counter() - t0, 1), "loss": float(loss.detach()),
           "accuracy": accuracy, "optimizer": "Adam 1e-2, full batch", "hidden": params.scalar_hidden}
    log(f"scalars' classifier: training accuracy {accuracy:.4f} ({out['seconds']:.0f} s)")
    return head, out


def fuse(network, head, architecture: str):
    """A :class:`~fiberlake.processors.spit.SPITFused` holding a trained image network and scalar head."""
    from fiberlake.processors.spit import SPITFused
    from fiberlake.processors.typing_prep import TARGET_SHAPE

    model = SPITFused(len(CLASSES), TARGET_SHAPE, {"architecture": architecture, "arch_params": arch_params(network)},
                      n_scalars=head.n_scalars, scalar_hidden=head.net[0].out_features)
    model.image.load_state_dict(network.state_dict())
    model.head.load_state_dict(head.state_dict())
    return model.eval()


def _reused_image_model(source: str, channels: tuple[str, ...], log: Callable[[str], None]):
    """A trained single image network named by ``image_model`` (its card's training recorded as the training)."""
    from fiberlake.processors.spit import ModelError

    directory = store.locate(source, STAGE)
    tensors, card = store.read_artifact(directory)
    if card["architecture"] not in ("compact", "paper") or card_scalars(card):
        raise ModelError(f"image_model {source}: a single image network is needed, not {card['architecture']}")
    if card_channels(card) != tuple(channels):
        raise ModelError(f"image_model {source} reads {card_channels(card)}, the training asks for {channels}")
    log(f"image network: {card['model_id']} (trained before; not trained again)")
    training = {k: card["training"].get(k) for k in ("epochs", "updates", "seconds", "stopped_by", "history")}
    return _network(tensors, card, directory), {**training, "image_model": card["model_id"],
                                                "image_model_command": card.get("command", ""),
                                                "image_model_heldout_final_accuracy": card["heldout"]["final_accuracy"],
                                                "image_model_heldout_unknown_rate": card["heldout"]["unknown_rate"]}


def train_typing(params: TypingTrainParams | None = None, *, out: str | Path | None = None, command: str = "",
                 cache: str | Path | None = None, progress: bool = False,
                 log: Callable[[str], None] = print) -> tuple[dict, Path | None]:
    """Simulate, train, evaluate and write one typing model artifact.

    Parameters
    ----------
    params : TypingTrainParams
    out : path, optional
        Folder under which the artifact folder ``<model_id>/`` is written (nothing is written
        when None: the card is returned alone).
    command : str
        The command line, for the card.
    cache : path, optional
        Folder of pre-processed data sets (:func:`prepare_dataset`).

    Returns
    -------
    card : dict
    path : Path or None
        The artifact folder.
    """
    from fiberlake.ingest.typing_dataset import simulator_settings
    from fiberlake.jobs.provenance import code_version
    import torch

    from fiberlake.processors.spit import FrameTyper, build_model, format_confusion, n_parameters, state_arrays
    from fiberlake.processors.typing_prep import CHANNELS, TARGET_SHAPE, prep_config

    params = params or TypingTrainParams()
    channels, scalars = input_channels(params), input_scalars(params)
    fused = bool(scalars) and params.scalar_fusion == "product"
    if scalars and not fused and params.arch != "compact":
        raise ValueError("per-frame scalars read by the dense layer (scalar_fusion dense) need the compact network")
    if params.image_model and not fused:
        raise ValueError("image_model is fused with the scalars' classifier: it needs scalars and scalar_fusion product")
    train_specs, held_specs = night_specs(params, heldout=False), night_specs(params, heldout=True)
    train = prepare_dataset(train_specs, cache, progress, "simulate training nights")
    train = train.with_scalars(scalars, CHANNELS).select_channels(channels, CHANNELS)
    log(f"training frames: {len(train)} ({train.seconds:.0f} s to simulate and pre-process), "
        f"input channels {', '.join(channels)}" + (f", scalars {', '.join(scalars)}" if scalars else ""))
    members, trainings = [], []
    for k in range(params.members):  # member k: the same training with seed + k
        if params.members > 1:
            log(f"member {k + 1} of {params.members} (seed {params.seed + k})")
        seeded = params.updated({"seed": params.seed + k})
        if params.image_model:
            network, training = _reused_image_model(params.image_model, channels, log)
        else:
            torch.manual_seed(seeded.seed)   # the initial weights too: the same command gives the same model
            network = build_model(params.arch, len(CLASSES), TARGET_SHAPE, **_in_channels_arg(channels),
                                  **({"n_scalars": len(scalars)} if scalars and not fused else {}))
            image_data = train.without_scalars() if fused else train
            training = fit(network, image_data, seeded, log)
        if fused:
            head, head_training = fit_scalar_head(train.scalars, train.labels, len(CLASSES), seeded, log)
            network = fuse(network, head, params.arch if not params.image_model else _arch_name(network))
            training = {**training, "scalar_head": head_training}
        members.append(network)
        trainings.append(training)
    model = members[0] if len(members) == 1 else ensemble_of(members)
    training = trainings[0] if len(trainings) == 1 else {
        "members": trainings, "seconds": round(sum(t["seconds"] for t in trainings), 1),
        "updates": sum(t["updates"] for t in trainings), "epochs": trainings[0]["epochs"]}
    held = prepare_dataset(held_specs, cache, progress, "simulate held-out nights")
    held = held.with_scalars(scalars, CHANNELS).select_channels(channels, CHANNELS)
    log(f"held-out frames: {len(held)} ({held.seconds:.0f} s)")
    typer = FrameTyper(model, CLASSES, device=params.device, batch=16, channels=channels, scalars=scalars)
    figures = evaluate(typer, held)
    log(f"held-out: normalized accuracy {figures['normalized_accuracy']:.4f}, final {figures['final_accuracy']:.4f}, "
        f"unknown {figures['unknown_rate']:.4f}")
    log(format_confusion(figures, CLASSES))
    card = {
        "stage": STAGE,
        "architecture": _arch_name(model),
        "arch_params": arch_params(model),
        "classes": list(CLASSES),
        "input_shape": list(TARGET_SHAPE),
        "prep": {**prep_config(channels), **(scalar_config(scalars) if scalars else {})},
        "n_parameters": n_parameters(model),
        "training": {**training, "params": params.to_dict(), "optimizer": "Adam, half-cosine decay of the rate",
                     "loss": "cross-entropy on softmax", "oversampling": "every class to the largest",
                     "augmentation": "the 4 flips of every frame, every epoch"},
        "data": {"train": {**train.summary(), "specs": [s.to_dict() for s in train_specs],
                           "simulate_s": None if train.cached else round(train.seconds, 1), "from_cache": train.cached},
                 "heldout": {**held.summary(), "specs": [s.to_dict() for s in held_specs],
                             "simulate_s": None if held.cached else round(held.seconds, 1),
                             "from_cache": held.cached}},
        "simulator": simulator_settings(),
        "heldout": figures,
        "command": command,
        "code_version": code_version(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = None
    if out is not None:
        card, path = store.write_artifact_named(out, state_arrays(model), card, STAGE)
    return card, path


def input_channels(params: TypingTrainParams) -> tuple[str, ...]:
    """The input channels a training run's ``channels`` setting names (comma-separated), validated."""
    from fiberlake.processors.typing_prep import check_channels

    return check_channels([c.strip() for c in params.channels.split(",") if c.strip()])


def input_scalars(params: TypingTrainParams) -> tuple[str, ...]:
    """The per-frame scalars a training run's ``scalars`` setting names (comma-separated; empty: none), validated."""
    from fiberlake.processors.typing_prep import check_scalars

    return check_scalars([c.strip() for c in params.scalars.split(",") if c.strip()])


def scalar_config(scalars: tuple[str, ...]) -> dict:
    """The model card's record of the per-frame scalars (``prep.scalars`` and how they are computed)."""
    from fiberlake.processors.typing_prep import (COSMIC_CONTRAST, COSMIC_COUNT_SCALE, COSMIC_SIGMA,
                                                  SCALAR_CHANNELS, SCALAR_LEVEL_PERCENTILES)

    return {"scalars": list(scalars), "scalar_channels": list(SCALAR_CHANNELS),
            "scalar_definition": {"hit_rate": "log10(1 + cosmics-channel hits per million raw pixels)",
                                  "level_pXX": "log10(1 + ADU above the pedestal) of that percentile of the "
                                               "asinh channel", "percentiles": list(SCALAR_LEVEL_PERCENTILES),
                                  "cosmics": {"sigma": COSMIC_SIGMA, "contrast": COSMIC_CONTRAST,
                                              "count_scale": COSMIC_COUNT_SCALE}}}


def card_scalars(card: dict) -> tuple[str, ...]:
    """The per-frame scalars a model card names (none on a card without ``prep.scalars``)."""
    return tuple(card.get("prep", {}).get("scalars", ()))


def _in_channels_arg(channels: tuple[str, ...]) -> dict:
    """``in_channels`` for :func:`~fiberlake.processors.spit.build_model` (nothing for the paper's one channel)."""
    return {"in_channels": len(channels)} if len(channels) != 1 else {}


def _member_spec(model) -> dict:
    """A single network's ``architecture`` and ``arch_params``: one member of an ensemble's card."""
    from fiberlake.processors.spit import ModelError, SPITCompact, SPITFused, SPITNet

    if not isinstance(model, (SPITCompact, SPITNet, SPITFused)):
        raise ModelError("an ensemble's members are single networks")
    return {"architecture": _arch_name(model), "arch_params": arch_params(model)}


def ensemble_of(members: list):
    """One :class:`~fiberlake.processors.spit.SPITEnsemble` holding trained networks (their weights copied)."""
    from fiberlake.processors.spit import build_model
    from fiberlake.processors.typing_prep import TARGET_SHAPE

    ensemble = build_model("ensemble", len(CLASSES), TARGET_SHAPE, members=[_member_spec(m) for m in members])
    for target, member in zip(ensemble.members, members):
        target.load_state_dict(member.state_dict())
    return ensemble.eval()


def assemble_typing_ensemble(sources: list[str], *, out: str | Path | None = None, command: str = "",
                             cache: str | Path | None = None, lake_root=None,
                             log: Callable[[str], None] = print) -> tuple[dict, Path | None]:
    """Join trained typing artifacts into one ensemble artifact (no training) and evaluate it.

    The members must be single networks trained on the same data with the same held-out nights
    (their cards' training parameters equal but for the seed); the ensemble is evaluated on those
    held-out nights. Its card lists every member's id, command, seed and held-out figures.

    Parameters
    ----------
    sources : list of str
        Artifact folders or model ids (see :func:`load_typing_model`).
    out, command, cache
        As :func:`train_typing`.

    Raises
    ------
    fiberlake.processors.spit.ModelError
        Fewer than two members, or members trained on different data or held-out nights.
    """
    from fiberlake.ingest.typing_dataset import simulator_settings
    from fiberlake.jobs.provenance import code_version
    from fiberlake.processors.spit import FrameTyper, ModelError, format_confusion, n_parameters, state_arrays
    from fiberlake.processors.typing_prep import CHANNELS

    if len(sources) < 2:
        raise ModelError("an ensemble needs at least two member models")
    networks, cards = [], []
    for source in sources:
        directory = store.locate(source, STAGE, lake_root)
        tensors, card = store.read_artifact(directory)
        networks.append(_network(tensors, card, directory))
        cards.append(card)
    same = [{k: v for k, v in TypingTrainParams.from_dict(c["training"]["params"]).to_dict().items()
             if k not in ("seed", "cpu_threads", "device", "members")} for c in cards]   # old cards: defaults filled
    if any(s != same[0] for s in same) or any(list(c["classes"]) != list(CLASSES) for c in cards):
        raise ModelError("the members were trained with different data, classes or held-out nights")
    model = ensemble_of(networks)
    params = TypingTrainParams.from_dict(cards[0]["training"]["params"])
    channels, scalars = card_channels(cards[0]), card_scalars(cards[0])
    if any(card_channels(c) != channels for c in cards):
        raise ModelError("the members read different input channels")
    if any(card_scalars(c) != scalars for c in cards):
        raise ModelError("the members read different per-frame scalars")
    held = prepare_dataset(night_specs(params, heldout=True), cache, False, "simulate held-out nights")
    held = held.with_scalars(scalars, CHANNELS).select_channels(channels, CHANNELS)
    figures = evaluate(FrameTyper(model, CLASSES, device=params.device, batch=16, channels=channels,
                                  scalars=scalars), held)
    log(f"held-out: normalized accuracy {figures['normalized_accuracy']:.4f}, final {figures['final_accuracy']:.4f}, "
        f"unknown {figures['unknown_rate']:.4f}")
    log(format_confusion(figures, CLASSES))
    card = {
        "stage": STAGE, "architecture": "ensemble", "arch_params": arch_params(model), "classes": list(CLASSES),
        "input_shape": list(cards[0]["input_shape"]), "prep": cards[0]["prep"], "n_parameters": n_parameters(model),
        "training": {"params": cards[0]["training"]["params"], "members": [
            {"model_id": c["model_id"], "seed": c["training"]["params"]["seed"], "command": c.get("command", ""),
             "epochs": c["training"].get("epochs"), "updates": c["training"].get("updates"),
             "seconds": c["training"].get("seconds"), "heldout_final_accuracy": c["heldout"]["final_accuracy"],
             "heldout_unknown_rate": c["heldout"]["unknown_rate"]} for c in cards],
            "combination": "mean of the members' softmax probabilities, then the final scheme's vote"},
        "data": {"train": cards[0]["data"]["train"], "heldout": {**held.summary(), "from_cache": held.cached}},
        "simulator": simulator_settings(), "heldout": figures, "command": command, "code_version": code_version(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = None
    if out is not None:
        card, path = store.write_artifact_named(out, state_arrays(model), card, STAGE)
    return card, path


def load_typing_model(source: str = "default", lake_root=None, device: str = "auto", batch: int = 16,
                      cpu_threads: int | None = None):
    """The typing model a setting names, ready to type (:class:`~fiberlake.processors.spit.FrameTyper`).

    Parameters
    ----------
    source : str
        ``default`` (shipped), a folder, or a model id of the lake's ``models/typing/``.
    lake_root : Path or ObjectPath, optional
        The lake, to find model ids.

    Raises
    ------
    fiberlake.storage.models.ArtifactError
        Missing, truncated or corrupt files.
    fiberlake.processors.spit.ModelError
        Weights that do not fit the card's architecture.
    """
    import torch

    from fiberlake.processors.spit import FrameTyper

    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    directory = store.locate(source, STAGE, lake_root)
    tensors, card = store.read_artifact(directory)
    return FrameTyper(_network(tensors, card, directory), card["classes"], card["model_id"], device=device, batch=batch,
                      channels=card_channels(card), scalars=card_scalars(card))


def card_channels(card: dict) -> tuple[str, ...]:
    """The input channels a model card names (a card without ``prep.channels``: the paper's one channel)."""
    from fiberlake.processors.typing_prep import PAPER_CHANNELS

    return tuple(card.get("prep", {}).get("channels", PAPER_CHANNELS))


def _network(tensors: dict, card: dict, directory):
    """The network an artifact's card describes, with its weights (:func:`load_typing_model`)."""
    from fiberlake.processors.spit import ModelError, build_model, load_state

    try:
        model = build_model(card["architecture"], len(card["classes"]), tuple(card["input_shape"]),
                            **card.get("arch_params", {}))
    except TypeError as err:
        raise ModelError(f"model card {directory}: architecture parameters do not fit ({err})") from None
    return load_state(model, tensors)


def register_model(lake, directory: str | Path, source: str = "trained") -> dict:
    """Copy an artifact into ``<lake>/models/typing/<model_id>/`` and add its ``models`` row (idempotent).

    Returns
    -------
    dict
        The card.
    """
    from fiberlake.storage.tables import TableStore

    tensors, card = store.read_artifact(Path(directory))
    target = store.artifact_dir(lake.root, card["stage"], card["model_id"])
    if not (target / store.CARD).exists():
        card = store.write_artifact(target, tensors, {k: v for k, v in card.items()
                                                      if k not in ("model_id", "weights_sha256", "size_bytes")})
    now = dt.datetime.now(dt.timezone.utc)
    rel = f"models/{card['stage']}/{card['model_id']}"
    tables = TableStore(lake.root / "tables")
    tables.create_missing()
    tables.replace_keys("models", [store.models_row(card, rel, source, now)],
                        {"stage": card["stage"], "model_id": card["model_id"]})
    return card


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TypingTrainParams` field (``--train-epochs``, ...), from the declarations."""
    add_parset_flags(parser, TypingTrainParams, TRAIN_PREFIX, "training parameters")


def train_params_from_args(args: argparse.Namespace) -> TypingTrainParams:
    """The training parameters of the parsed flags (declared defaults for the flags not given)."""
    return parset_from_args(args, TypingTrainParams, TRAIN_PREFIX)
