"""SPIT, the Spectral Image Typer (seed 001, Jankov & Prochaska 2018): networks and the final scheme.

Two ``nn.Module`` classes read a pre-processed frame (:mod:`fiberlake.processors.typing_prep`,
uint8 210 x 650 scaled to [0, 1]) and return one logit per frame type:

* :class:`SPITNet` - the paper's network exactly: conv 5x5 depth 36, max-pool 2, conv 5x5
  depth 64, max-pool 2, fully connected 128, softmax. Its dense layer reads every feature of the
  last pooled map: 52 x 162 x 64 = 539,136 inputs for 210 x 650, so 69 M weights (276 MB in
  float32), too large to ship.
* :class:`SPITCompact` - the shipped variant: a 5x5 stride-2 convolution, three 3x3
  convolutions with max-pools, then the global average *and* maximum of each feature map
  (the maximum keeps sparse evidence such as cosmic rays, the average the texture) before the
  dense layer of 128. 33 k weights (130 kB), ~20 times cheaper to run.
* :class:`SPITEnsemble` - several trained networks (seeds) whose softmax probabilities are
  averaged before the vote.

Layer sizes derive from the input shape (:func:`conv_output_shape`), never from constants.

The final scheme (the paper's section 4.2): the frame and its three flips are classified; the
type that wins 3 or 4 of the 4 is adopted, anything less is ``UNKNOWN`` (:func:`vote`).
:class:`FrameTyper` holds a model on a device (CUDA when available and asked, CPU always) and
types batches of pre-processed frames with its evaluation form
(:func:`~fiberlake.processors.spit_inference.inference_form`: batch normalisation folded in).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fiberlake.processors.spit_inference import channels_last_input, inference_form
from fiberlake.processors.typing_prep import PAPER_CHANNELS, TARGET_SHAPE, check_channels, check_scalars, flips

UNKNOWN = "UNKNOWN"
"""Pixel type of a frame the final scheme does not decide (no 3-of-4 super-majority, or untypable)."""


class ModelError(ValueError):
    """A model whose weights do not fit its declared architecture (one readable sentence)."""


def conv_output_shape(shape: tuple[int, int], kernel: int, stride: int = 1, padding: int = 0) -> tuple[int, int]:
    """Spatial shape after a convolution or pooling (PyTorch's floor rule).

    Examples
    --------
    >>> conv_output_shape((210, 650), 2, 2)
    (105, 325)
    """
    return tuple((n + 2 * padding - kernel) // stride + 1 for n in shape)


class SPITNet(nn.Module):
    """The paper's network: two 5x5 convolutions (36, 64) with 2x2 max-pools, FC 128, one logit per class.

    Parameters
    ----------
    n_classes : int
    input_shape : (int, int)
        (spatial, spectral) size of the input; the dense layer's width follows from it.
    conv1, conv2, kernel, hidden : int
        Depths of the convolutions, their kernel size and the dense layer's width (the paper's
        36, 64, 5 and 128). Convolutions keep the size ("same" padding, stride 1).
    in_channels : int
        Input channels (the paper's 1; :data:`~fiberlake.processors.typing_prep.CHANNELS`).
    """

    def __init__(self, n_classes: int = 6, input_shape: tuple[int, int] = TARGET_SHAPE, conv1: int = 36,
                 conv2: int = 64, kernel: int = 5, hidden: int = 128, in_channels: int = 1):
        super().__init__()
        pad = kernel // 2
        self.in_channels = int(in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(self.in_channels, conv1, kernel, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(conv1, conv2, kernel, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        )
        shape = tuple(input_shape)
        for _ in range(2):
            shape = conv_output_shape(conv_output_shape(shape, kernel, 1, pad), 2, 2)
        self.feature_shape = (conv2,) + shape
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(self.feature_shape)), hidden), nn.ReLU(),
                                        nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, n_classes)`` of images ``(N, in_channels, H, W)`` scaled to [0, 1]."""
        return self.classifier(self.features(x))


class GlobalPool(nn.Module):
    """Global average and global maximum of each feature map, concatenated: ``(N, C, H, W) -> (N, 2C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features."""
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


class SPITCompact(nn.Module):
    """The shippable variant: strided 5x5 convolution, three 3x3 convolutions, global pooling, FC.

    Parameters
    ----------
    n_classes : int
    input_shape : (int, int)
        Recorded and checked (the input must be at least 32 pixels on each side); the dense
        layer's width does not depend on it (global pooling).
    channels : tuple of int
        Depths of the four convolutions.
    hidden : int
        Width of the dense layer (the paper's 128).
    batchnorm : bool
        Batch normalisation after each convolution (faster training on a CPU budget).
    in_channels : int
        Input channels (the paper's 1; :data:`~fiberlake.processors.typing_prep.CHANNELS`).
    n_scalars : int
        Per-frame scalars (:func:`~fiberlake.processors.typing_prep.frame_scalars`) read beside the
        image: batch-normalised and concatenated to the pooled features before the dense layer
        (0: none, the paper's image alone).
    """

    def __init__(self, n_classes: int = 6, input_shape: tuple[int, int] = TARGET_SHAPE,
                 channels: tuple[int, ...] = (8, 16, 32, 64), hidden: int = 128, batchnorm: bool = True,
                 in_channels: int = 1, n_scalars: int = 0):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        self.in_channels = int(in_channels)
        self.n_scalars = int(n_scalars)

        def block(c_in: int, c_out: int, kernel: int, stride: int) -> list[nn.Module]:
            conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=not batchnorm)
            return [conv] + ([nn.BatchNorm2d(c_out)] if batchnorm else []) + [nn.ReLU()]

        layers: list[nn.Module] = block(self.in_channels, channels[0], 5, 2)
        shape = conv_output_shape(tuple(input_shape), 5, 2, 2)
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.MaxPool2d(2)] + block(c_in, c_out, 3, 1)
            shape = conv_output_shape(shape, 2, 2)
        if min(shape) < 1:
            raise ModelError(f"input shape {tuple(input_shape)} is too small for {len(channels)} convolutions")
        self.feature_shape = (channels[-1],) + shape
        self.features = nn.Sequential(*layers)
        if self.n_scalars:
            self.pool = GlobalPool()
            self.scalar_norm = nn.BatchNorm1d(self.n_scalars)
            self.classifier = nn.Sequential(nn.Linear(2 * channels[-1] + self.n_scalars, hidden), nn.ReLU(),
                                            nn.Linear(hidden, n_classes))
        else:   # the first models' layout (their state dicts load unchanged)
            self.classifier = nn.Sequential(GlobalPool(), nn.Linear(2 * channels[-1], hidden), nn.ReLU(),
                                            nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor, scalars: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(N, n_classes)`` of images ``(N, in_channels, H, W)`` scaled to [0, 1] (and
        ``scalars`` ``(N, n_scalars)`` when the network reads them)."""
        if not self.n_scalars:
            return self.classifier(self.features(x))
        if scalars is None or scalars.shape != (x.shape[0], self.n_scalars):
            raise ModelError(f"the network reads {self.n_scalars} per-frame scalars beside its images; "
                             f"got {None if scalars is None else tuple(scalars.shape)}")
        pooled = self.pool(self.features(x))
        return self.classifier(torch.cat([pooled, self.scalar_norm(scalars.to(pooled.dtype))], dim=1))


class SPITEnsemble(nn.Module):
    """Several trained typing networks voting as one: the mean of their softmax probabilities.

    The members are trained alone (different seeds of the same training); averaging their
    probabilities before the final scheme's vote removes the errors of one member that the
    others do not share. ``forward`` returns ``log(mean softmax)``, so the softmax of its output is the
    mean of the members' probabilities and :class:`FrameTyper` types with it unchanged.

    Parameters
    ----------
    n_classes : int
    input_shape : (int, int)
    members : list of dict
        Each ``{"architecture": name, "arch_params": {...}}`` (a member's model card entries).
    """

    def __init__(self, n_classes: int = 6, input_shape: tuple[int, int] = TARGET_SHAPE, members: list | None = None):
        super().__init__()
        if not members:
            raise ModelError("an ensemble needs at least one member")
        if any(m.get("architecture") == "ensemble" for m in members):
            raise ModelError("an ensemble's members are single networks")
        self.members = nn.ModuleList(build_model(m["architecture"], n_classes, input_shape, **dict(m.get("arch_params", {})))
                                     for m in members)

    def forward(self, x: torch.Tensor, scalars: torch.Tensor | None = None) -> torch.Tensor:
        """``log`` of the members' mean softmax, ``(N, n_classes)``."""
        probs = torch.stack([torch.softmax((m(x, scalars) if getattr(m, "n_scalars", 0) else m(x)).float(), dim=1)
                             for m in self.members]).mean(dim=0)
        return torch.log(probs.clamp_min(1e-30))


class ScalarHead(nn.Module):
    """A small classifier of per-frame scalars alone: standardised inputs, one hidden layer, logits.

    The standardisation (mean and spread of each scalar over the training frames) is part of the
    weights (buffers), so an artifact carries it.

    Parameters
    ----------
    n_scalars : int
    n_classes : int
    hidden : int
    """

    def __init__(self, n_scalars: int, n_classes: int = 6, hidden: int = 32):
        super().__init__()
        self.n_scalars = int(n_scalars)
        self.register_buffer("mean", torch.zeros(self.n_scalars))
        self.register_buffer("scale", torch.ones(self.n_scalars))
        self.net = nn.Sequential(nn.Linear(self.n_scalars, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, scalars: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, n_classes)`` of scalars ``(N, n_scalars)``."""
        return self.net((scalars.to(self.mean.dtype) - self.mean) / self.scale)


class SPITFused(nn.Module):
    """An image network and a :class:`ScalarHead` whose class probabilities are multiplied (beyond the paper).

    The image network (the paper's input, e.g. :class:`SPITCompact`) and the head are trained apart;
    ``forward`` returns the sum of their log-softmax outputs, so the softmax of it is their normalised
    product: a class must be likely from the pixels' pattern *and* from the frame's counts and
    levels. The scalars are the same for the four flips, so the final scheme still votes over what
    the image network sees in each flip.

    Parameters
    ----------
    n_classes : int
    input_shape : (int, int)
    image : dict
        ``{"architecture": name, "arch_params": {...}}`` of the image network.
    n_scalars : int
    scalar_hidden : int
        Width of the head's hidden layer.
    """

    def __init__(self, n_classes: int = 6, input_shape: tuple[int, int] = TARGET_SHAPE, image: dict | None = None,
                 n_scalars: int = 4, scalar_hidden: int = 32):
        super().__init__()
        image = image or {"architecture": "compact", "arch_params": {}}
        if image.get("architecture") not in ("compact", "paper"):
            raise ModelError("the image network of a fused model is a single compact or paper network")
        self.image = build_model(image["architecture"], n_classes, input_shape, **dict(image.get("arch_params", {})))
        self.head = ScalarHead(n_scalars, n_classes, scalar_hidden)
        self.n_scalars = self.head.n_scalars
        self.in_channels = getattr(self.image, "in_channels", 1)

    def forward(self, x: torch.Tensor, scalars: torch.Tensor | None = None) -> torch.Tensor:
        """``log`` of the normalised product of the two softmax outputs (up to a constant), ``(N, n_classes)``."""
        if scalars is None or scalars.shape != (x.shape[0], self.n_scalars):
            raise ModelError(f"the fused model reads {self.n_scalars} per-frame scalars beside its images; "
                             f"got {None if scalars is None else tuple(scalars.shape)}")
        return torch.log_softmax(self.image(x).float(), dim=1) + torch.log_softmax(self.head(scalars).float(), dim=1)


ARCHITECTURES: dict[str, type[nn.Module]] = {"paper": SPITNet, "compact": SPITCompact, "ensemble": SPITEnsemble,
                                             "fused": SPITFused}
"""Architectures by name (the ``architecture`` of a model card)."""


def build_model(architecture: str, n_classes: int, input_shape: tuple[int, int] = TARGET_SHAPE,
                **arch_params) -> nn.Module:
    """A fresh network of a named architecture (:data:`ARCHITECTURES`)."""
    if architecture not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    if "channels" in arch_params:
        arch_params["channels"] = tuple(arch_params["channels"])
    return ARCHITECTURES[architecture](n_classes=n_classes, input_shape=tuple(input_shape), **arch_params)


def load_state(model: nn.Module, tensors: dict[str, np.ndarray | torch.Tensor]) -> nn.Module:
    """Load weights into ``model``, refusing missing, unexpected or mis-shaped tensors with one sentence.

    Raises
    ------
    ModelError
        Naming the first tensor that does not fit.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ModelError(f"weights do not match the architecture: missing {missing[:3]}, unexpected {extra[:3]}")
    state = {}
    for name, ref in expected.items():
        value = torch.as_tensor(np.asarray(tensors[name]) if not isinstance(tensors[name], torch.Tensor) else tensors[name])
        if tuple(value.shape) != tuple(ref.shape):
            raise ModelError(f"weight {name} has shape {tuple(value.shape)}, the architecture needs {tuple(ref.shape)}")
        state[name] = value.to(ref.dtype)
    model.load_state_dict(state)
    return model


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's weights as contiguous float32 numpy arrays (what an artifact stores)."""
    return {name: np.array(t.detach().cpu().numpy(), order="C", copy=True) for name, t in model.state_dict().items()}


def n_parameters(model: nn.Module) -> int:
    """Number of trainable weights."""
    return int(sum(p.numel() for p in model.parameters()))


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without CUDA is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 images ``(N, H, W)`` or ``(N, C, H, W)`` to float tensors ``(N, C, H, W)`` in [0, 1] (C = 1 for 3-D)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) / 255.0)
    return x.unsqueeze(1) if x.ndim == 3 else x


@dataclass
class Votes:
    """The final scheme's decision for a batch of frames.

    Attributes
    ----------
    index : ndarray of int, shape (N,)
        Class index adopted, -1 for ``UNKNOWN``.
    flips_agreeing : ndarray of int, shape (N,)
        How many of the 4 flips voted for the most voted class (0 for a frame not classified).
    probabilities : ndarray of float, shape (N, n_classes)
        Softmax probabilities averaged over the 4 flips.
    confidence : ndarray of float, shape (N,)
        Mean probability of the adopted class (of the most voted class when ``UNKNOWN``).
    """

    index: np.ndarray
    flips_agreeing: np.ndarray
    probabilities: np.ndarray
    confidence: np.ndarray


def vote(flip_probabilities: np.ndarray, super_majority: int = 3) -> Votes:
    """The paper's final scheme over the 4 flips of each frame.

    Parameters
    ----------
    flip_probabilities : ndarray, shape (N, 4, n_classes)
        Softmax output for the frame and its three flips.
    super_majority : int
        Votes the winning class needs (the paper's 3 of 4).

    Examples
    --------
    >>> p = np.zeros((2, 4, 3)); p[0, :, 1] = 1; p[1, :2, 0] = 1; p[1, 2:, 2] = 1
    >>> v = vote(p)
    >>> v.index.tolist(), v.flips_agreeing.tolist()
    ([1, -1], [4, 2])
    """
    probs = np.asarray(flip_probabilities, dtype=np.float64)
    n, n_flips, k = probs.shape
    votes = probs.argmax(axis=2)
    counts = np.stack([(votes == c).sum(axis=1) for c in range(k)], axis=1)
    best = counts.argmax(axis=1)
    agreeing = counts.max(axis=1)
    mean = probs.mean(axis=1)
    index = np.where(agreeing >= super_majority, best, -1)
    return Votes(index=index.astype(np.int64), flips_agreeing=agreeing.astype(np.int64), probabilities=mean,
                 confidence=mean[np.arange(n), best])


class FrameTyper:
    """A trained network ready to type pre-processed frames.

    Parameters
    ----------
    model : nn.Module
        :class:`SPITNet` or :class:`SPITCompact` with its weights.
    classes : sequence of str
        Type of each output, in order.
    model_id : str
        Content hash of the model (its artifact's id).
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    batch : int
        Frames per forward pass (each frame is 4 images: its flips).
    channels : sequence of str
        Input channels the model reads, in order
        (:func:`~fiberlake.processors.typing_prep.prepare_channels`); the paper's ``("zscale",)``.
    scalars : sequence of str
        Per-frame scalars the model reads beside its images
        (:func:`~fiberlake.processors.typing_prep.frame_scalars`); none for the paper's network.
    """

    def __init__(self, model: nn.Module, classes: tuple[str, ...] | list[str], model_id: str = "",
                 device: str = "auto", batch: int = 16, channels: tuple[str, ...] | list[str] = PAPER_CHANNELS,
                 scalars: tuple[str, ...] | list[str] = ()):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.runner = inference_form(self.model)   # what types: same outputs, fused layers (spit_inference)
        self.classes = tuple(classes)
        self.model_id = model_id
        self.batch = max(1, int(batch))
        self.channels = check_channels(channels)
        self.scalars = check_scalars(scalars)

    @torch.no_grad()
    def flip_probabilities(self, images: np.ndarray, scalars: np.ndarray | None = None) -> np.ndarray:
        """Softmax probabilities of every frame and its flips, ``(N, 4, n_classes)``.

        Parameters
        ----------
        images : ndarray of uint8, shape (N, H, W) or (N, C, H, W)
            Pre-processed frames (:func:`~fiberlake.processors.typing_prep.prepare_channels` with
            :attr:`channels`; 3-D for one channel).
        scalars : ndarray of float, shape (N, len(:attr:`scalars`)), optional
            The frames' scalars (:func:`~fiberlake.processors.typing_prep.prepare_with_scalars`),
            required when :attr:`scalars` names any; the same for all four flips of a frame.
        """
        images = np.asarray(images)
        n_channels = 1 if images.ndim == 3 else images.shape[1]
        if images.ndim not in (3, 4) or n_channels != len(self.channels):
            raise ModelError(f"the model reads {len(self.channels)} channel(s) {self.channels}; "
                             f"images of shape {images.shape} were given")
        if self.scalars:
            scalars = None if scalars is None else np.asarray(scalars, dtype=np.float32)
            if scalars is None or scalars.shape != (len(images), len(self.scalars)):
                raise ModelError(f"the model reads the scalars {self.scalars} of every frame; "
                                 f"{'none' if scalars is None else 'shape ' + str(scalars.shape)} given "
                                 f"for {len(images)} frames")
        out = np.empty((len(images), 4, len(self.classes)), dtype=np.float32)
        for start in range(0, len(images), self.batch):
            chunk = images[start:start + self.batch]
            stacked = np.concatenate([flips(im) for im in chunk])
            batch = channels_last_input(to_input(stacked).to(self.device))
            if self.scalars:
                values = torch.from_numpy(np.repeat(scalars[start:start + self.batch], 4, axis=0)).to(self.device)
                logits = self.runner(batch, values)
            else:
                logits = self.runner(batch)
            out[start:start + len(chunk)] = torch.softmax(logits.float(), dim=1).cpu().numpy().reshape(len(chunk), 4, -1)
        return out

    def type_images(self, images: np.ndarray, super_majority: int = 3,
                    scalars: np.ndarray | None = None) -> tuple[list[str], Votes]:
        """Pixel type of each frame by the final scheme, and the votes behind it (``scalars``: as
        :meth:`flip_probabilities`)."""
        if len(images) == 0:
            empty = np.zeros((0, len(self.classes)))
            return [], Votes(np.zeros(0, np.int64), np.zeros(0, np.int64), empty, np.zeros(0))
        votes = vote(self.flip_probabilities(images, scalars), super_majority)
        return [self.classes[i] if i >= 0 else UNKNOWN for i in votes.index], votes


# --------------------------------------------------------------------------------------
# held-out figures (the paper's section 4)
# --------------------------------------------------------------------------------------
def evaluate_votes(flip_probabilities: np.ndarray, labels: np.ndarray, classes: tuple[str, ...] | list[str],
                   super_majority: int = 3) -> dict:
    """Held-out figures of a model's outputs on labelled frames.

    Parameters
    ----------
    flip_probabilities : ndarray, shape (N, 4, n_classes)
        :meth:`FrameTyper.flip_probabilities` of the frames.
    labels : ndarray of int, shape (N,)
        True class index of each frame.
    classes : sequence of str

    Returns
    -------
    dict
        ``normalized_accuracy`` (the paper's 4.1: every flip classified alone, classes weighted
        equally), ``final_accuracy``, ``misclassified_rate`` and ``unknown_rate`` (4.2: the final
        scheme on the frames as they come), ``confusion`` (rows: true class; columns: classes
        then ``UNKNOWN``; final scheme), ``confusion_flips`` (rows: true; columns: class of each
        flip alone), ``frames``, ``per_class`` frame counts.
    """
    probs = np.asarray(flip_probabilities)
    labels = np.asarray(labels, dtype=np.int64)
    k = len(classes)
    per_flip = probs.argmax(axis=2)
    confusion_flips = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion_flips, (np.repeat(labels, probs.shape[1]), per_flip.ravel()), 1)
    present = confusion_flips.sum(axis=1) > 0
    normalized = float(np.mean(np.diag(confusion_flips)[present] / confusion_flips.sum(axis=1)[present])) \
        if present.any() else float("nan")
    votes = vote(probs, super_majority)
    predicted = np.where(votes.index >= 0, votes.index, k)
    confusion = np.zeros((k, k + 1), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    n = max(1, labels.size)
    return {
        "frames": int(labels.size),
        "per_class": {c: int((labels == i).sum()) for i, c in enumerate(classes)},
        "normalized_accuracy": normalized,
        "final_accuracy": float(np.mean(predicted == labels)) if labels.size else float("nan"),
        "misclassified_rate": float(np.sum((predicted != labels) & (predicted != k)) / n),
        "unknown_rate": float(np.sum(predicted == k) / n),
        "confusion_columns": list(classes) + [UNKNOWN],
        "confusion": confusion.tolist(),
        "confusion_flips": confusion_flips.tolist(),
    }


def format_confusion(figures: dict, classes: tuple[str, ...] | list[str]) -> str:
    """The final-scheme confusion matrix as aligned text (rows: true type)."""
    cols = [c[:8] for c in figures["confusion_columns"]]
    lines = ["true \\ typed " + " ".join(f"{c:>8s}" for c in cols)]
    for name, row in zip(classes, figures["confusion"]):
        lines.append(f"{name:12s} " + " ".join(f"{v:8d}" for v in row))
    return "\n".join(lines)
