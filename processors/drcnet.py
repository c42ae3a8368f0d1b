"""DRC-Net (2D stripes of both arms) and RC-Net (1D spectra) classifiers of seed 003.

* :class:`RCBackbone`: RC-Net's backbone (Zou et al. 2020): 8 modules, each a residual block
  (a 1x1 skip convolution beside three 1x3 convolutions) followed by a max pooling, then a global
  average over the remaining length -> ``features`` (128) values.
* :class:`DRCNet`: per arm, the dimension-reduction module (three convolutions of kernel 5, 5, 3
  across the 11 stripe pixels, no padding: 11 -> 7 -> 3 -> 1) turns an ``11 x W`` stripe into a
  ``1 x W`` sequence, then a backbone per arm (the two branches) -> 128 features each; fusion:
  the two feature vectors stacked as 2 channels, two 1x3 convolutions; classifier: three fully
  connected layers (softmax in :meth:`DRCNet.probabilities`).
* :class:`RCNet`: the same backbone on the 1D spectra of both arms (concatenated along
  wavelength), then the same three fully connected layers.

Layer sizes derive from the input (stripe width, number of rows, number of classes), so the
``mini`` and ``lamost`` instruments use the same classes. Tensors in, tensors out.
"""

from __future__ import annotations

import torch
from torch import nn

N_MODULES = 8
"""RC-Net modules (residual block + max pool)."""


class ResidualBlock(nn.Module):
    """Three 1x3 convolutions (batch norm, ReLU) beside a 1x1 skip convolution, summed."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.skip = nn.Conv1d(c_in, c_out, 1)
        self.body = nn.Sequential(
            nn.Conv1d(c_in, c_out, 3, padding=1), nn.BatchNorm1d(c_out), nn.ReLU(inplace=True),
            nn.Conv1d(c_out, c_out, 3, padding=1), nn.BatchNorm1d(c_out), nn.ReLU(inplace=True),
            nn.Conv1d(c_out, c_out, 3, padding=1), nn.BatchNorm1d(c_out))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


def backbone_channels(width: int, features: int = 128, n_modules: int = N_MODULES) -> list[int]:
    """Channels of the backbone's modules: doubling every second module from ``features / 16`` up to ``features``."""
    base = max(features // 16, 4)
    return [min(base * 2 ** (i // 2), features) for i in range(n_modules - 1)] + [features]


class RCBackbone(nn.Module):
    """RC-Net's feature extractor: 8 x (residual block, max pool 2), global average -> ``features``.

    Parameters
    ----------
    c_in : int
        Input channels.
    width : int
        Input length (any length >= 1: the poolings use ``ceil_mode``).
    features : int
        Output size (the paper: 128).
    """

    def __init__(self, c_in: int, width: int, features: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = c_in
        for c_out in backbone_channels(width, features):
            layers += [ResidualBlock(c, c_out), nn.MaxPool1d(2, ceil_mode=True)]
            c = c_out
        self.body = nn.Sequential(*layers)
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=-1)


def _classifier(n_in: int, n_classes: int) -> nn.Sequential:
    hidden = max(4 * n_classes, 64)
    return nn.Sequential(nn.Linear(n_in, 2 * hidden), nn.ReLU(inplace=True), nn.Dropout(0.2),
                         nn.Linear(2 * hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, n_classes))


class DimensionReduction(nn.Module):
    """Three convolutions (kernels 5, 5, 3 across the stripe, 1 along wavelength) -> one row.

    The kernels shrink ``rows`` (11 in the paper) by 4 + 4 + 2; a stripe of other height ends with
    an average over what remains, so the output is always ``(batch, 1, width)``.
    """

    def __init__(self, rows: int, channels: int = 8) -> None:
        super().__init__()
        if rows < 11:
            raise ValueError(f"a stripe needs at least 11 rows across the trace, got {rows}")
        self.body = nn.Sequential(
            nn.Conv2d(1, channels, (5, 1)), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, (5, 1)), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, 1, (3, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.unsqueeze(1)).mean(dim=2)          # (batch, 1, width)


class DRCNet(nn.Module):
    """Double-branch residual classification network on the blue and red stripes.

    Parameters
    ----------
    rows : int
        Pixels across the trace (11).
    width_b, width_r : int
        Wavelength rows of the blue and red stripes.
    n_classes : int
    features : int
        Backbone output per arm (the paper: 128).
    fusion_channels : int
        Channels of the two fusion convolutions.
    """

    def __init__(self, rows: int, width_b: int, width_r: int, n_classes: int, features: int = 128,
                 fusion_channels: int = 8) -> None:
        super().__init__()
        self.config = {"rows": rows, "width_b": width_b, "width_r": width_r, "n_classes": n_classes,
                       "features": features, "fusion_channels": fusion_channels}
        self.reduce_b = DimensionReduction(rows)
        self.reduce_r = DimensionReduction(rows)
        self.branch_b = RCBackbone(1, width_b, features)
        self.branch_r = RCBackbone(1, width_r, features)
        self.fusion = nn.Sequential(
            nn.Conv1d(2, fusion_channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv1d(fusion_channels, fusion_channels, 3, padding=1), nn.ReLU(inplace=True))
        self.classifier = _classifier(fusion_channels * features, n_classes)

    def forward(self, stripe_b: torch.Tensor, stripe_r: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, n_classes)`` of stripes ``(batch, rows, width_b)`` and ``(batch, rows, width_r)``."""
        fb = self.branch_b(self.reduce_b(stripe_b))
        fr = self.branch_r(self.reduce_r(stripe_r))
        fused = self.fusion(torch.stack([fb, fr], dim=1))
        return self.classifier(fused.flatten(1))

    @torch.no_grad()
    def probabilities(self, stripe_b: torch.Tensor, stripe_r: torch.Tensor) -> torch.Tensor:
        """Softmax of :meth:`forward`."""
        return torch.softmax(self.forward(stripe_b, stripe_r), dim=1)


class RCNet(nn.Module):
    """RC-Net on 1D spectra: both arms concatenated along wavelength, one backbone, the classifier.

    Parameters
    ----------
    width : int
        Length of the concatenated spectrum (blue rows + red rows).
    n_classes : int
    features : int
    """

    def __init__(self, width: int, n_classes: int, features: int = 128) -> None:
        super().__init__()
        self.config = {"width": width, "n_classes": n_classes, "features": features}
        self.backbone = RCBackbone(1, width, features)
        self.classifier = _classifier(features, n_classes)

    def forward(self, spectrum: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, n_classes)`` of spectra ``(batch, width)``."""
        return self.classifier(self.backbone(spectrum.unsqueeze(1)))

    @torch.no_grad()
    def probabilities(self, spectrum: torch.Tensor) -> torch.Tensor:
        """Softmax of :meth:`forward`."""
        return torch.softmax(self.forward(spectrum), dim=1)


def spectrum_input(flux_b, ivar_b, flux_r, ivar_r):
    """RC-Net's input: each arm's aperture spectrum z-scored over its good rows, arms concatenated.

    A missing arm (``ivar`` all 0) stays 0, as a masked pixel does. Arrays ``(n, w)`` in,
    float32 ``(n, w_b + w_r)`` out.
    """
    import numpy as np

    from fiberlake.processors.stripes import zscore_spectra

    zb, _ = zscore_spectra(np.asarray(flux_b), np.asarray(ivar_b))
    zr, _ = zscore_spectra(np.asarray(flux_r), np.asarray(ivar_r))
    return np.concatenate([zb, zr], axis=1).astype(np.float32)


def state_arrays(model: nn.Module, prefix: str = "", half: bool = True) -> dict:
    """A network's parameters and buffers as named numpy arrays (for safetensors).

    ``half``: floating-point tensors stored as float16 (the shipped model stays small; loading
    converts back to float32, a relative change of ~5e-4 per weight).
    """
    out = {}
    for k, v in model.state_dict().items():
        a = v.detach().cpu().numpy().copy()
        out[prefix + k] = a.astype("float16") if half and a.dtype.kind == "f" else a
    return out


def load_state(model: nn.Module, tensors: dict, prefix: str = "") -> nn.Module:
    """Load :func:`state_arrays` output (keys under ``prefix``) into ``model``; mismatches are an error."""
    import numpy as np

    state = {k[len(prefix):]: torch.from_numpy(np.asarray(v)) for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not fit {type(model).__name__}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return model.eval()


def predict(model: nn.Module, inputs: tuple, batch: int = 256, device: str | torch.device = "cpu"):
    """Softmax probabilities of ``model`` on numpy inputs (each ``(n, ...)``), in batches; numpy out."""
    import numpy as np

    model = model.to(device).eval()
    n = inputs[0].shape[0]
    out = []
    with torch.no_grad():
        for start in range(0, n, batch):
            parts = [torch.as_tensor(np.asarray(a[start:start + batch], dtype=np.float32), device=device)
                     for a in inputs]
            out.append(torch.softmax(model(*parts), dim=1).cpu().numpy())
    n_classes = model.config["n_classes"]
    return np.concatenate(out) if out else np.zeros((0, n_classes), dtype=np.float32)
