"""The spectrum generator of the Bayesian denoiser (seed 004, 3.3): an isometric autoencoder.

A convolutional encoder maps a spectrum (2048 bins) to a latent ``z`` of dimension ``L`` (3, the
paper's); the decoder ``G`` maps it back. Training minimises eq. (10),

    E_y,delta { [ ||G(z) - G(z + delta)|| - |delta| ]^2 + ||y - G(E(y))||^2 },

with ``delta`` uniform on the sphere of radius ``delta`` in R^L, so that ``G`` is locally
isometric and a density over ``z`` is (approximately) a density over spectra. The decoder alone is
the generator of the MAP; the same architecture trained on noisy/clean pairs is the DAE baseline
(:mod:`fiberlake.processors.denoise_baselines`).

Spectra enter in *scaled* units: a unit-absolute-sum spectrum times its number of bins (mean
absolute value 1), so layer scales do not depend on the grid length. Layer sizes derive from the
input length (a power of two times the decoder's seed length).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class AEArch:
    """Architecture of the autoencoder (recorded in the model card)."""

    n_wave: int = 2048
    latent_dim: int = 3
    channels: tuple[int, ...] = (8, 16, 32, 64)
    """Channels of the encoder's strided convolutions (the decoder mirrors them)."""
    hidden: int = 256
    """Width of the linear layers between the latent and the convolutions. The decoder's capacity
    sets the generator's reconstruction floor: at 1000 steps, held-out median MSE / mean(s^2) 0.0036
    with (4, 8, 16, 32) channels and 64 hidden, 0.0014 with these (``bench/denoise_floor.py``); the
    isometry penalty costs little (0.0033 without it)."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AEArch":
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        return cls(**d)


def _check(arch: AEArch) -> int:
    factor = 2 ** (len(arch.channels) + 1)
    if arch.n_wave % factor:
        raise ValueError(f"n_wave {arch.n_wave} is not a multiple of {factor} (2 ** (layers + 1))")
    return arch.n_wave // factor


class Encoder(nn.Module):
    """Strided 1D convolutions, then two linear layers to ``latent_dim``."""

    def __init__(self, arch: AEArch):
        super().__init__()
        length = _check(arch)
        layers: list[nn.Module] = []
        c_in = 1
        for c in arch.channels:
            layers += [nn.Conv1d(c_in, c, kernel_size=5, stride=2, padding=2), nn.LeakyReLU(0.1)]
            c_in = c
        layers += [nn.Conv1d(c_in, c_in, kernel_size=5, stride=2, padding=2), nn.LeakyReLU(0.1)]
        self.conv = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * length, arch.hidden), nn.LeakyReLU(0.1),
                                  nn.Linear(arch.hidden, arch.latent_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, n_wave)`` scaled spectra to ``(n, latent_dim)``."""
        return self.head(self.conv(x.unsqueeze(1)))


class Decoder(nn.Module):
    """The generator ``G``: two linear layers, then transposed convolutions doubling the length."""

    def __init__(self, arch: AEArch):
        super().__init__()
        self.length = _check(arch)
        chans = list(arch.channels[::-1])
        self.c0 = chans[0]
        self.head = nn.Sequential(nn.Linear(arch.latent_dim, arch.hidden), nn.LeakyReLU(0.1),
                                  nn.Linear(arch.hidden, self.c0 * self.length), nn.LeakyReLU(0.1))
        layers: list[nn.Module] = []
        c_in = self.c0
        for c in chans[1:] + [chans[-1]]:
            layers += [nn.ConvTranspose1d(c_in, c, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.1)]
            c_in = c
        layers += [nn.ConvTranspose1d(c_in, 1, kernel_size=4, stride=2, padding=1)]
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(..., latent_dim)`` to ``(..., n_wave)`` scaled spectra."""
        shape = z.shape[:-1]
        h = self.head(z.reshape(-1, z.shape[-1])).reshape(-1, self.c0, self.length)
        out = self.deconv(h).squeeze(1)
        return out.reshape(*shape, out.shape[-1])


class IsometricAE(nn.Module):
    """Encoder plus generator."""

    def __init__(self, arch: AEArch = AEArch()):
        super().__init__()
        self.arch = arch
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def isometry_loss(decoder: nn.Module, z: torch.Tensor, delta: float, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Mean of ``(||G(z) - G(z + d)|| - delta)^2`` with ``d`` uniform on the sphere of radius ``delta``."""
    d = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    d = delta * d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = (decoder(z) - decoder(z + d)).norm(dim=-1)
    return ((dist - delta) ** 2).mean()


@dataclass(frozen=True)
class FitSettings:
    """Training settings of an autoencoder (recorded in the model card)."""

    steps: int = 3000
    batch: int = 64
    lr: float = 2e-3
    delta: float = 1.0
    """Radius of the isometry perturbation (scaled units; 0 switches the penalty off: the DAE)."""
    isometry_weight: float = 1.0
    seed: int = 0


def fit_autoencoder(model: IsometricAE, inputs: Callable[[np.ndarray, np.random.Generator], np.ndarray],
                    targets: np.ndarray, settings: FitSettings, log: Callable[[str], None] = print,
                    device: torch.device | None = None) -> dict:
    """Train on ``(inputs(idx, rng), targets[idx])`` batches: eq. (10) when ``settings.delta > 0``.

    Parameters
    ----------
    model : IsometricAE
    inputs : callable
        ``inputs(indices, rng)`` gives the scaled input spectra of those training rows (the targets
        themselves for the generator; noisy versions for the DAE).
    targets : ndarray, shape (n, n_wave)
        Scaled clean spectra.

    Returns
    -------
    dict
        Final mean losses (reconstruction per bin, isometry).
    """
    device = device or torch.device("cpu")
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.steps)
    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    tgt_all = torch.as_tensor(targets, dtype=torch.float32)
    rec_hist, iso_hist = [], []
    for step in range(settings.steps):
        idx = rng.integers(0, targets.shape[0], settings.batch)
        x = torch.as_tensor(inputs(idx, rng), dtype=torch.float32, device=device)
        y = tgt_all[idx].to(device)
        z = model.encoder(x)
        rec = ((model.decoder(z) - y) ** 2).sum(dim=-1).mean()
        loss = rec
        iso = torch.zeros(())
        if settings.delta > 0:
            iso = isometry_loss(model.decoder, z, settings.delta, gen.manual_seed(settings.seed + step))
            loss = loss + settings.isometry_weight * iso
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        rec_hist.append(float(rec.detach()) / targets.shape[1])
        iso_hist.append(float(iso.detach()))
        if (step + 1) % max(1, settings.steps // 10) == 0:
            log(f"  step {step + 1}/{settings.steps}: reconstruction {np.mean(rec_hist[-100:]):.4g} per bin, "
                f"isometry {np.mean(iso_hist[-100:]):.4g}")
    model.eval()
    return {"reconstruction_per_bin": float(np.mean(rec_hist[-100:])), "isometry": float(np.mean(iso_hist[-100:]))}


@torch.no_grad()
def encode(model: IsometricAE, scaled: np.ndarray, batch: int = 512) -> np.ndarray:
    """Latents of scaled spectra."""
    out = [model.encoder(torch.as_tensor(scaled[i:i + batch], dtype=torch.float32)).numpy()
           for i in range(0, scaled.shape[0], batch)]
    return np.concatenate(out) if out else np.zeros((0, model.arch.latent_dim), np.float32)


@torch.no_grad()
def forward(model: nn.Module, scaled: np.ndarray, batch: int = 512) -> np.ndarray:
    """A model's output on scaled spectra, batched."""
    out = [model(torch.as_tensor(scaled[i:i + batch], dtype=torch.float32)).numpy()
           for i in range(0, scaled.shape[0], batch)]
    return np.concatenate(out) if out else np.zeros((0, scaled.shape[1]), np.float32)
