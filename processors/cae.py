"""The convolutional autoencoder (CAE) of PSF-conditioned deconvolution (seed 002).

Encoder: three blocks ``Conv2d(3x3, same) -> LeakyReLU -> MaxPool2d(2) -> BatchNorm2d`` with
64, 128 and 256 filters. Decoder, symmetric: ``ConvTranspose2d(3x3, same) -> LeakyReLU ->
Upsample(2) -> BatchNorm2d`` with 256, 128 and 64 filters (batch normalisation after every
pooling and upsampling layer, as the paper places it). Output: ``Conv2d(3x3, same)`` to one
channel with a softplus. The number of input channels is the input combination's (PSF,
iPSF, iPSF1 in any subset, :mod:`fiberlake.processors.cae_inputs`); the spatial size is any
multiple of ``2 ** depth``. Tensors in, tensors out, no I/O.
"""

from __future__ import annotations

import torch
from torch import nn


class DeconvCAE(nn.Module):
    """Convolutional autoencoder mapping preprocessed chunk channels to a deconvolved image.

    Parameters
    ----------
    in_channels : int
        Channels of the input (length of the input combination).
    filters : tuple of int
        Filters of the encoder's convolutions (the decoder mirrors them).
    negative_slope : float
        Leaky ReLU slope (the paper's alpha).
    kernel : int
        Convolution kernel size (odd; 'same' padding).
    """

    def __init__(self, in_channels: int, filters: tuple[int, ...] = (64, 128, 256), negative_slope: float = 0.2,
                 kernel: int = 3):
        super().__init__()
        if in_channels < 1 or not filters or kernel % 2 == 0:
            raise ValueError("DeconvCAE needs >= 1 input channel, >= 1 filter size and an odd kernel")
        self.in_channels = int(in_channels)
        self.filters = tuple(int(f) for f in filters)
        self.negative_slope = float(negative_slope)
        self.kernel = int(kernel)
        pad = kernel // 2
        enc, c = [], in_channels
        for f in self.filters:
            enc += [nn.Conv2d(c, f, kernel, padding=pad), nn.LeakyReLU(negative_slope), nn.MaxPool2d(2),
                    nn.BatchNorm2d(f)]
            c = f
        dec = []
        for f in reversed(self.filters):
            dec += [nn.ConvTranspose2d(c, f, kernel, padding=pad), nn.LeakyReLU(negative_slope),
                    nn.Upsample(scale_factor=2, mode="nearest"), nn.BatchNorm2d(f)]
            c = f
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)
        self.head = nn.Sequential(nn.Conv2d(c, 1, kernel, padding=pad), nn.Softplus())

    @property
    def multiple(self) -> int:
        """Spatial sizes must be multiples of this (one halving per encoder block)."""
        return 2 ** len(self.filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, in_channels, H, W)`` -> ``(batch, 1, H, W)``, non-negative."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (batch, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-1] % self.multiple or x.shape[-2] % self.multiple:
            raise ValueError(f"H and W must be multiples of {self.multiple}, got {tuple(x.shape[-2:])}")
        return self.head(self.decoder(self.encoder(x)))

    def arch(self) -> dict:
        """Architecture keys of the model card (enough to rebuild the module)."""
        return {"in_channels": self.in_channels, "filters": list(self.filters),
                "negative_slope": self.negative_slope, "kernel": self.kernel}


def bce_loss(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Binary cross-entropy of a softplus output against a [0, 1] target (Keras clips the
    prediction to ``[eps, 1 - eps]`` the same way)."""
    p = prediction.clamp(eps, 1.0 - eps)
    return -(target * torch.log(p) + (1.0 - target) * torch.log1p(-p)).mean()
