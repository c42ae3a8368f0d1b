"""NoiseFlow, the observation model of the Bayesian denoiser (seed 004, 3.4, eqs. 11-16).

The noise ``eps = y - s`` of one exposure is an autoregressive flow with a local window: for
``d >= K`` each bin is Gaussian given its ``K`` predecessors,

    p(eps_d | eps_{d-K:d-1}) = N(mu_d, exp(alpha_d)^2),  (mu_d, alpha_d) = f(eps_{d-K:d-1}),

``f`` being a 1D convolution (1 -> C channels, kernel K) followed by linear layers with ReLU
(C -> C' ...) and two linear heads (mu, alpha), shared by every bin (Fig. 2). The first ``K``
bins have their own fixed mean and log scale. The log density is eq. (15); with a mask of observed
bins it is eq. (16): a bin counts only when it and its ``K`` predecessors are observed (Fig. 3).

One addition to the paper: a learned per-bin offset of ``alpha`` (``alpha_bias``, one number per
bin). The paper's network is the same at every wavelength; our flux-calibrated noise is not (the
arms' efficiency falls by ~10x towards 4000 and 9000 A, sky lines sit at fixed wavelengths), and
the offset lets the scale follow the wavelength while the network keeps the local correlations.

Noise enters in the generator's scaled units, divided by a fixed ``noise_scale`` (the training
noise's robust rms) so that the network sees numbers of order one; the density includes the
Jacobian of that division.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class FlowArch:
    """Architecture of NoiseFlow (recorded in the model card)."""

    n_wave: int = 2048
    window: int = 5
    """K: predecessors each bin depends on (the paper's Fig. 2 shows five)."""
    channels: int = 8
    """C: output channels of the convolution."""
    hidden: tuple[int, ...] = (8,)
    """Widths of the linear layers with ReLU after it (C')."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FlowArch":
        d = dict(d)
        d["hidden"] = tuple(d["hidden"])
        return cls(**d)


class NoiseFlow(nn.Module):
    """Local autoregressive Gaussian flow over the noise of one spectrum."""

    def __init__(self, arch: FlowArch = FlowArch()):
        super().__init__()
        self.arch = arch
        k = arch.window
        self.conv = nn.Conv1d(1, arch.channels, kernel_size=k)
        # the per-bin linear layers as 1x1 convolutions (the same map at every bin, no transposes)
        layers: list[nn.Module] = [nn.ReLU()]
        c = arch.channels
        for h in arch.hidden:
            layers += [nn.Conv1d(c, h, kernel_size=1), nn.ReLU()]
            c = h
        self.mlp = nn.Sequential(*layers)
        self.heads = nn.Conv1d(c, 2, kernel_size=1)
        """Row 0: mu; row 1: alpha."""
        self.mu_first = nn.Parameter(torch.zeros(k))
        self.alpha_first = nn.Parameter(torch.zeros(k))
        self.alpha_bias = nn.Parameter(torch.zeros(arch.n_wave))
        self.register_buffer("noise_scale", torch.ones(()))

    def conditionals(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log scale of every bin given its predecessors (standardised units).

        Parameters
        ----------
        eps : Tensor, shape (..., n_wave)
            Standardised noise (masked bins must hold finite values, e.g. 0).
        """
        k = self.arch.window
        shape = eps.shape
        x = eps.reshape(-1, 1, shape[-1])
        h = self.mlp(self.conv(x)[:, :, :-1])   # column j sees bins j..j+K-1: it predicts bin j+K
        heads = self.heads(h)                    # (n, 2, D-K)
        mu_rest, alpha_rest = heads[:, 0], heads[:, 1]
        n = x.shape[0]
        mu = torch.cat([self.mu_first.expand(n, k), mu_rest], dim=1)
        alpha = torch.cat([self.alpha_first.expand(n, k), alpha_rest], dim=1) + self.alpha_bias
        alpha = alpha.clamp(-7.0, 7.0)
        return mu.reshape(shape), alpha.reshape(shape)

    def log_prob(self, noise: torch.Tensor, observed: torch.Tensor | None = None,
                 counted: torch.Tensor | None = None) -> torch.Tensor:
        """Masked log density of noise vectors (eq. 16), in scaled (not standardised) units.

        Parameters
        ----------
        noise : Tensor, shape (..., n_wave)
            ``y - s`` in the generator's scaled units.
        observed : Tensor of bool, shape broadcastable to ``noise``, optional
            Observed bins; ``None``: all.
        counted : Tensor of bool, optional
            ``window_mask(observed)`` when the caller has it already (the MAP's loop).

        Returns
        -------
        Tensor, shape (...)
        """
        eps = noise / self.noise_scale
        if observed is None:
            counted = torch.ones_like(eps, dtype=torch.bool)
        else:
            observed = torch.broadcast_to(observed, eps.shape)
            eps = torch.where(observed, eps, torch.zeros_like(eps))
            if counted is None:
                counted = window_mask(observed, self.arch.window)
            counted = torch.broadcast_to(counted, eps.shape)
        mu, alpha = self.conditionals(eps)
        term = -0.5 * torch.exp(-2.0 * alpha) * (eps - mu) ** 2 - alpha - 0.5 * LOG_2PI - torch.log(self.noise_scale)
        return torch.where(counted, term, torch.zeros_like(term)).sum(dim=-1)


def window_mask(observed: torch.Tensor, window: int) -> torch.Tensor:
    """Bins counted by eq. (16): the bin and its ``window`` predecessors (those that exist) observed."""
    bad = (~observed).to(torch.float32).reshape(-1, 1, observed.shape[-1])
    padded = torch.nn.functional.pad(bad, (window, 0))
    kernel = torch.ones(1, 1, window + 1, dtype=bad.dtype, device=bad.device)
    hits = torch.nn.functional.conv1d(padded, kernel)
    return (hits.reshape(observed.shape) == 0)


@dataclass(frozen=True)
class FlowFitSettings:
    """Training settings of NoiseFlow."""

    steps: int = 1500
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0


def robust_scale(noise: np.ndarray) -> float:
    """Robust rms (1.4826 x median absolute value) of training noise."""
    return float(1.4826 * np.median(np.abs(noise)))


def fit_noiseflow(flow: NoiseFlow, noise: np.ndarray, settings: FlowFitSettings,
                  log: Callable[[str], None] = print) -> dict:
    """Maximum likelihood on noise vectors ``(n, n_wave)`` in scaled units; returns the final mean
    negative log likelihood per bin (standardised units)."""
    flow.noise_scale.fill_(robust_scale(noise))
    flow.train()
    opt = torch.optim.Adam(flow.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.steps)
    rng = np.random.default_rng(settings.seed)
    data = torch.as_tensor(noise, dtype=torch.float32)
    hist = []
    n_wave = noise.shape[1]
    for step in range(settings.steps):
        idx = torch.as_tensor(rng.integers(0, noise.shape[0], settings.batch))
        nll = -flow.log_prob(data[idx]).mean() / n_wave - float(torch.log(flow.noise_scale))
        opt.zero_grad()
        nll.backward()
        opt.step()
        sched.step()
        hist.append(float(nll))
        if (step + 1) % max(1, settings.steps // 5) == 0:
            log(f"  noiseflow step {step + 1}/{settings.steps}: nll {np.mean(hist[-100:]):.4f} per bin")
    flow.eval()
    return {"nll_per_bin": float(np.mean(hist[-100:]))}
