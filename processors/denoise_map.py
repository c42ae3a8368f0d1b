"""MAP denoising over (z, C) (seed 004, eq. 7), batched over spectra and subclasses.

The hierarchical model: a subclass ``C`` (uniform prior over the trained subclasses), a latent
``z ~ p(z | C)`` (Gaussian KDE of the training latents of ``C``, Scott's bandwidth like
``scipy.stats.gaussian_kde``), the signal ``s = G(z)`` (the isometric generator) and, for every
exposure ``y_n``, ``p(y_n | s)`` from NoiseFlow with the masked likelihood of eq. (16). For every
spectrum and every subclass at once, ``z`` starts at the subclass's training latent whose spectrum
fits best; for the ``refine_classes`` best subclasses a few Gauss-Newton iterations (a weighted
least-squares stand-in of ``J``) and then Adam steps optimise it; the MAP is the subclass with the
lowest objective

    J_C = - sum_n log p(y_n | G(z_C)) - log p(z_C | C) - log p(C),

the paper's denoised spectrum is ``G(z)`` on the whole grid (missing bins imputed, no retraining), and
the class posterior is ``softmax(-J_C)`` (the MAP approximation of ``p(C | y)``).

With a model that stores the generator's discrepancy ``S_C`` (:mod:`fiberlake.processors.denoise_discrepancy`)
and ``MapSettings.posterior_mean`` (the default), the returned flux is the posterior mean of the signal
``E[s | y, z, C] = G(z) + S_C (S_C + N)^-1 (y - G(z))`` at the MAP (``G(z)`` on unobserved bins);
``G(z)`` itself is returned beside it (``DenoiseResult.generator_flux``).

Flux scale: inputs and outputs have unit absolute sum over the grid (the paper's normalisation).
A spectrum with missing bins cannot be normalised over bins it does not have, so each exposure is
compared with ``G(z)`` scaled to the exposure's own flux over its observed bins (a closed-form
amplitude; 1 for a complete spectrum normalised like the training data).

Bad input never raises and never produces a NaN: rows get a ``status`` other than ``ok``
(:data:`STATUSES`) and zeros where there is nothing to report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fiberlake.processors.denoise_discrepancy import noise_variance, posterior_mean
from fiberlake.processors.denoise_generator import Decoder
from fiberlake.processors.noiseflow import NoiseFlow, window_mask

STATUSES = ("ok", "no_data", "few_bins", "nonpositive", "out_of_prior", "poor_fit")
"""``ok``; ``no_data`` (no observed finite bin); ``few_bins`` (fewer observed bins than the
minimum); ``nonpositive`` (observed flux sums to <= 0: cannot be normalised); ``out_of_prior`` (the
MAP latent lies where no trained subclass has density: a star of a kind the prior has not seen);
``poor_fit`` (the whitened residuals of the MAP are far from unit variance)."""


@dataclass(frozen=True)
class MapSettings:
    """Settings of the MAP (science: they change the result)."""

    steps: int = 20
    """Adam steps after the Gauss-Newton start (60 from the template start before: 2.1x slower, the same
    median posterior-mean MSE on the tuning seeds 1710-1711, ``bench/denoise.py`` compares both)."""
    lr: float = 0.1
    refine_classes: int = 3
    """Subclasses whose ``z`` is optimised per spectrum: those with the lowest objective at their
    initial latent (the others keep that objective, an upper bound of their MAP's)."""
    min_observed_fraction: float = 0.05
    prior_margin: float = 6.5
    """``out_of_prior`` when ``log p(z|C)`` of the MAP is this far (nats) below the lowest of the
    subclass's own training latents (tuned for the shipped model on seeds 1710-1713,
    ``bench/denoise.py --tune-flags``: the middle of the margins flagging every unseen hot OB star,
    2-11 nats)."""
    max_residual_rms: float = 2.13
    """``poor_fit`` when the rms of the flow's whitened residuals exceeds this (the 97.5 % quantile
    of seen-class stars' on the tuning set)."""
    start_iterations: int = 3
    """Gauss-Newton iterations from each refined subclass's initial latent before the Adam steps (the
    cheap first pass: a weighted least-squares fit of ``G(z)`` under NoiseFlow's per-bin scale and the
    KDE's curvature; 0 starts Adam at the training latent)."""
    posterior_mean: bool = True
    """Return the posterior mean ``E[s | y, z, C]`` under the discrepancy term (when the model has
    one) instead of ``G(z)``; ``G(z)`` is returned beside it either way."""


@dataclass
class KDEPrior:
    """Gaussian KDEs of the training latents, one per subclass, padded to one tensor."""

    points: torch.Tensor
    """(n_classes, n_max, L) latents (padding repeats a point; see ``valid``)."""
    valid: torch.Tensor
    """(n_classes, n_max) bool."""
    whiten: torch.Tensor
    """(n_classes, L, L): inverse Cholesky factor of each class's kernel covariance."""
    log_norm: torch.Tensor
    """(n_classes,) ``-log n_c - 0.5 log det(2 pi H_c)``."""
    floor: torch.Tensor
    """(n_classes,) lowest leave-in log density of the class's own training latents."""

    @classmethod
    def fit(cls, latents: np.ndarray, labels: np.ndarray, n_classes: int) -> "KDEPrior":
        """KDEs of ``latents`` (n, L) per class index in ``labels`` (Scott's factor ``n^(-1/(L+4))``)."""
        dim = latents.shape[1]
        counts = np.bincount(labels, minlength=n_classes)
        if counts.min() < dim + 2:
            raise ValueError(f"every subclass needs at least {dim + 2} training latents (counts {counts.tolist()})")
        n_max = int(counts.max())
        points = np.zeros((n_classes, n_max, dim), np.float32)
        valid = np.zeros((n_classes, n_max), bool)
        whiten = np.zeros((n_classes, dim, dim), np.float32)
        log_norm = np.zeros(n_classes, np.float32)
        for c in range(n_classes):
            z = latents[labels == c].astype(np.float64)
            points[c, :len(z)] = z
            points[c, len(z):] = z[0]
            valid[c, :len(z)] = True
            factor = len(z) ** (-1.0 / (dim + 4))
            cov = np.cov(z.T) * factor ** 2 + np.eye(dim) * 1e-6
            chol = np.linalg.cholesky(cov)
            whiten[c] = np.linalg.inv(chol)
            log_norm[c] = -math.log(len(z)) - 0.5 * (dim * math.log(2 * math.pi) + 2 * np.log(np.diag(chol)).sum())
        prior = cls(torch.as_tensor(points), torch.as_tensor(valid), torch.as_tensor(whiten),
                    torch.as_tensor(log_norm), torch.zeros(n_classes))
        own = prior.log_prob(torch.as_tensor(points)).numpy()   # (n_classes, n_max, n_classes)
        floor = [own[c, valid[c], c].min() for c in range(n_classes)]
        prior.floor = torch.as_tensor(np.asarray(floor, np.float32))
        return prior

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``log p(z | C)`` for every class: ``z`` (..., L) gives (..., n_classes)."""
        diff = z[..., None, None, :] - self.points                            # (..., C, N, L)
        w = torch.einsum("cij,...cnj->...cni", self.whiten, diff)
        q = -0.5 * (w ** 2).sum(-1)
        q = torch.where(self.valid, q, torch.full_like(q, -1e30))
        return torch.logsumexp(q, dim=-1) + self.log_norm

    def log_prob_own(self, z: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(z_k | C_k)`` for ``z`` of shape (B, k, L), each at its own class ``classes[b, k]``
        (``None``: k = n_classes, every class in order)."""
        if classes is None:
            classes = torch.arange(self.points.shape[0], device=z.device).expand(z.shape[0], -1)
        diff = z[:, :, None, :] - self.points[classes]                        # (B, k, N, L)
        w = torch.einsum("bkij,bknj->bkni", self.whiten[classes], diff)
        q = -0.5 * (w ** 2).sum(-1)
        q = torch.where(self.valid[classes], q, torch.full_like(q, -1e30))
        return torch.logsumexp(q, dim=-1) + self.log_norm[classes]

    def tensors(self) -> dict[str, np.ndarray]:
        return {"kde_points": self.points.numpy(), "kde_valid": self.valid.numpy().astype(np.uint8),
                "kde_whiten": self.whiten.numpy(), "kde_log_norm": self.log_norm.numpy(),
                "kde_floor": self.floor.numpy()}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray]) -> "KDEPrior":
        return cls(torch.as_tensor(t["kde_points"]), torch.as_tensor(t["kde_valid"].astype(bool)),
                   torch.as_tensor(t["kde_whiten"]), torch.as_tensor(t["kde_log_norm"]),
                   torch.as_tensor(t["kde_floor"]))


@dataclass
class DenoiseResult:
    """MAP results for a batch of spectra (every array finite)."""

    flux: np.ndarray
    """(B, n_wave) denoised spectra (zeros for flagged rows without a fit): the posterior mean (scaled like
    ``generator_flux``, sum within ~1e-3 of 1) or ``G(z)`` with unit absolute sum."""
    latent: np.ndarray
    """(B, L) MAP latent of the MAP subclass."""
    class_index: np.ndarray
    """(B,) MAP subclass (-1 without a fit)."""
    posterior: np.ndarray
    """(B, n_classes) class posterior (zeros without a fit)."""
    objective: np.ndarray
    """(B,) MAP objective ``J`` of the MAP subclass (0 without a fit)."""
    log_prior: np.ndarray
    """(B,) ``log p(z | C)`` at the MAP."""
    residual_rms: np.ndarray
    """(B,) rms of the whitened residuals over the counted bins."""
    imputed: np.ndarray
    """(B, n_wave) bool: bins with no observation in any exposure (filled by the generator)."""
    status: list[str]
    generator_flux: np.ndarray | None = None
    """(B, n_wave) ``G(z)`` at the MAP, unit absolute sum (the paper's denoised spectrum; equal to
    ``flux`` without the posterior mean)."""

    def __post_init__(self) -> None:
        if self.generator_flux is None:
            self.generator_flux = self.flux.copy()


def normalise(flux: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spectra scaled to unit flux sum over their observed bins; masked/non-finite bins set to 0.

    Returns
    -------
    normalised : ndarray
    observed : ndarray of bool
        ``observed`` and finite.
    total : ndarray
        The sum each spectrum was divided by (0 where it could not be).
    """
    flux = np.asarray(flux, np.float64)
    obs = np.asarray(observed, bool) & np.isfinite(flux)
    clean = np.where(obs, flux, 0.0)
    total = clean.sum(axis=-1)
    ok = np.isfinite(total) & (total > 0)
    out = np.where(ok[..., None], clean / np.where(ok, total, 1.0)[..., None], 0.0)
    return out, obs, np.where(ok, total, 0.0)


class BayesianDenoiser:
    """The trained model (generator, KDE prior, NoiseFlow) and the batched MAP.

    Parameters
    ----------
    decoder : Decoder
    flow : NoiseFlow
    prior : KDEPrior
    classes : list of str
        Subclass names, in the prior's order.
    model_id : str
    device : torch.device, optional
    discrepancy : ndarray, shape (n_classes, n_wave), optional
        ``S_C``, the generator's per-bin error variance per subclass (scaled units); ``None``: the
        paper's model (the denoised flux is ``G(z)``).
    """

    def __init__(self, decoder: Decoder, flow: NoiseFlow, prior: KDEPrior, classes: list[str], model_id: str = "",
                 device: torch.device | None = None, discrepancy: np.ndarray | None = None):
        self.device = device or torch.device("cpu")
        self.decoder = decoder.to(self.device).eval()
        self.flow = flow.to(self.device).eval()
        for p in list(self.decoder.parameters()) + list(self.flow.parameters()):
            p.requires_grad_(False)
        self.prior = KDEPrior(*(getattr(prior, k).to(self.device) for k in ("points", "valid", "whiten", "log_norm",
                                                                           "floor")))
        self.classes = list(classes)
        self.model_id = model_id
        self.n_wave = flow.arch.n_wave
        if discrepancy is not None:
            discrepancy = np.asarray(discrepancy, np.float64)
            if discrepancy.shape != (len(self.classes), self.n_wave) or not np.isfinite(discrepancy).all():
                raise ValueError(f"discrepancy must be finite, shape {(len(self.classes), self.n_wave)}, "
                                 f"not {discrepancy.shape}")
        self.discrepancy = discrepancy
        with torch.no_grad():
            flat = self.prior.points.reshape(-1, self.prior.points.shape[-1])
            self.templates = self.decoder(flat).reshape(len(classes), -1, self.n_wave)   # scaled units
            self.init_weight = torch.exp(-2.0 * self.flow.alpha_bias)
            self.noise_shape = (self.flow.noise_scale ** 2 / self.init_weight).cpu().numpy().astype(np.float64)

    # ------------------------------------------------------------------ pieces
    def _amplitude(self, model: torch.Tensor, y: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """Scale of ``model`` (..., D) matching the observed flux of ``y`` (..., D)."""
        num = (y * obs).sum(-1, keepdim=True)
        den = (model * obs).sum(-1, keepdim=True)
        return num / torch.where(den.abs() > 1e-6, den, torch.full_like(den, 1e-6))

    def _initial(self, y: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """(B, C, L): per class, the training latent whose spectrum fits the exposures best."""
        w = obs.float() * self.init_weight                                       # (B, E, D)
        bsz, n_exp, d = y.shape
        t = self.templates.reshape(-1, d)                                         # (C*N, D)
        of = obs.float().reshape(-1, d)
        yw = (y * w).reshape(-1, d)
        num = (y * obs).sum(-1).reshape(-1, 1)                                    # (B*E, 1)
        den = of @ t.T                                                            # (B*E, C*N)
        amp = num / torch.where(den.abs() > 1e-6, den, torch.full_like(den, 1e-6))
        cross = yw @ t.T
        tt = w.reshape(-1, d) @ (t ** 2).T
        yy = (yw * y.reshape(-1, d)).sum(-1, keepdim=True)
        sse = (yy - 2 * amp * cross + amp ** 2 * tt).reshape(bsz, n_exp, -1).sum(1)
        sse = sse.reshape(bsz, len(self.classes), -1)
        sse = torch.where(self.prior.valid[None], sse, torch.full_like(sse, float("inf")))
        best = sse.argmin(-1)                                                      # (B, C)
        pts = self.prior.points[None].expand(y.shape[0], -1, -1, -1)
        return torch.gather(pts, 2, best[..., None, None].expand(-1, -1, 1, pts.shape[-1])).squeeze(2)

    def _objective(self, z: torch.Tensor, y: torch.Tensor, obs: torch.Tensor, counted: torch.Tensor,
                   classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``J`` (B, k) of latents ``z`` (B, k, L) under ``classes`` (B, k); its log likelihood and log prior."""
        s = self.decoder(z)                                                        # (B, k, D)
        yy = y[:, None]                                                            # (B, 1, E, D)
        oo = obs[:, None]
        model = s[:, :, None] * self._amplitude(s[:, :, None], yy, oo)            # (B, k, E, D)
        loglik = self.flow.log_prob(yy - model, oo, counted[:, None]).sum(-1)      # (B, k)
        logprior = self.prior.log_prob_own(z, classes)
        return -(loglik + logprior) + math.log(len(self.classes)), loglik, logprior

    def _residual_rms(self, z: torch.Tensor, y: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        s = self.decoder(z)[:, None]                                              # (B, 1, D)
        model = s * self._amplitude(s, y, obs)
        eps = torch.where(obs, (y - model) / self.flow.noise_scale, torch.zeros_like(y))
        mu, alpha = self.flow.conditionals(eps)
        xi = (eps - mu) * torch.exp(-alpha)
        counted = window_mask(obs, self.flow.arch.window)
        n = counted.sum((-1, -2)).clamp_min(1)
        return torch.sqrt(torch.where(counted, xi ** 2, torch.zeros_like(xi)).sum((-1, -2)) / n)

    def _posterior_mean(self, g: torch.Tensor, amp: torch.Tensor, y: torch.Tensor, obs: torch.Tensor,
                        cls: torch.Tensor) -> np.ndarray:
        """``E[s | y, z, C]`` (B, D) from ``G(z)`` (B, D) and the exposures (B, E, D), scaled like the
        unit-sum ``G(z)`` (exactly ``G(z)`` on unobserved bins; its sum differs from 1 by the data's pull)."""
        g_np = g.double().cpu().numpy()
        amp_np = amp[..., 0].double().cpu().numpy()
        y_np = y.double().cpu().numpy()
        obs_np = obs.cpu().numpy()
        model = g_np[:, None] * amp_np[..., None]
        noise = noise_variance(y_np - model, model, obs_np, self.noise_shape)
        post = posterior_mean(g_np, y_np, amp_np, obs_np, self.discrepancy[cls.cpu().numpy()], noise)
        post = post / np.maximum(np.abs(g_np).sum(-1, keepdims=True), 1e-12)
        return np.where(np.isfinite(post), post, 0.0).astype(np.float32)

    def _gauss_newton(self, z: torch.Tensor, y: torch.Tensor, obs: torch.Tensor, classes: torch.Tensor,
                      iterations: int, damping: float = 1e-2, step: float = 1e-2) -> torch.Tensor:
        """A few Levenberg-Marquardt steps on ``z`` (B, k, L) per subclass ``classes`` (B, k).

        The objective is a Gaussian stand-in for ``J``: weighted least squares with NoiseFlow's per-bin
        precision without context (``exp(-2 alpha_bias)``) times one level per spectrum (the median of
        the weighted squared residuals at the start, as chi-square with one degree of freedom), plus
        ``-log p(z | C)`` with the kernel's curvature. The Jacobian of ``G`` is a forward difference
        (``L`` extra decoder passes, batched with ``G(z)``); the amplitude is held at its value.
        """
        dim = z.shape[-1]
        eye = torch.eye(dim, device=z.device, dtype=z.dtype)
        w = (obs.float() * self.init_weight)[:, None]                                # (B, 1, E, D)
        wh = self.prior.whiten[classes]                                              # (B, k, L, L)
        prec_prior = wh.transpose(-1, -2) @ wh
        level = None
        for _ in range(iterations):
            zz = torch.cat([z[..., None, :], z[..., None, :] + step * eye], dim=-2)   # (B, k, L+1, L)
            gz = self.decoder(zz)
            g = gz[..., 0, :]
            jac = (gz[..., 1:, :] - g[..., None, :]) / step                             # (B, k, L, D)
            amp = self._amplitude(g[:, :, None], y[:, None], obs[:, None])             # (B, k, E, 1)
            r = y[:, None] - amp * g[:, :, None]                                        # (B, k, E, D)
            if level is None:
                q = torch.where(obs[:, None], r ** 2 * w, torch.full_like(r, float("nan")))
                level = torch.nanmedian(q.flatten(-2), dim=-1).values / 0.4549364231195724
                level = torch.nan_to_num(level, nan=1.0).clamp_min(1e-12)[..., None, None]   # (B, k, 1, 1)
            ja = amp[..., None, :] * jac[:, :, None]                                    # (B, k, E, L, D)
            wl = w / level                                                               # (B, k, E, D)
            hess = torch.einsum("bkeld,bkemd->bklm", ja * wl[..., None, :], ja)
            zg = z.detach().requires_grad_(True)
            with torch.enable_grad():
                (g_prior,) = torch.autograd.grad(self.prior.log_prob_own(zg, classes).sum(), zg)
            rhs = torch.einsum("bkeld,bked->bkl", ja, wl * r) + g_prior
            hess = hess + prec_prior
            hess = hess + damping * torch.diag_embed(torch.diagonal(hess, dim1=-2, dim2=-1))
            dz = torch.linalg.solve(hess, rhs[..., None])[..., 0]
            z = z + torch.nan_to_num(dz, nan=0.0, posinf=0.0, neginf=0.0)
        return z

    # ------------------------------------------------------------------ MAP
    def denoise(self, flux: np.ndarray, observed: np.ndarray | None = None, settings: MapSettings = MapSettings(),
                batch: int = 64) -> DenoiseResult:
        """MAP-denoise spectra on the model's grid.

        Parameters
        ----------
        flux : ndarray, shape (B, D) or (B, E, D)
            One spectrum per row, or ``E`` exposures of each (any flux scale: each is normalised).
        observed : ndarray of bool, same shape, optional
            Observed bins (``ivar > 0`` and not masked); ``None``: the finite bins.
        settings : MapSettings
        batch : int
            Spectra per optimisation batch (every subclass of each is optimised together).
        """
        flux = np.asarray(flux, np.float64)
        if flux.ndim == 2:
            flux = flux[:, None]
            observed = None if observed is None else np.asarray(observed)[:, None]
        if flux.shape[-1] != self.n_wave:
            raise ValueError(f"spectra have {flux.shape[-1]} bins, the model {self.n_wave}")
        if observed is None:
            observed = np.isfinite(flux)
        y, obs, total = normalise(flux, observed)
        n_obs = obs.sum(-1)
        status = []
        for b in range(flux.shape[0]):
            if n_obs[b].sum() == 0:
                status.append("no_data")
            elif n_obs[b].max() < settings.min_observed_fraction * self.n_wave:
                status.append("few_bins")
            elif np.any((n_obs[b] > 0) & (total[b] <= 0)):
                status.append("nonpositive")
            else:
                status.append("ok")
        # exposures with no usable bins are dropped from the likelihood (their mask is all False)
        obs = obs & (total[..., None] > 0)
        bsz = flux.shape[0]
        n_cls, dim = len(self.classes), self.prior.points.shape[-1]
        res = DenoiseResult(np.zeros((bsz, self.n_wave), np.float32), np.zeros((bsz, dim), np.float32),
                            np.full(bsz, -1, np.int32), np.zeros((bsz, n_cls), np.float32), np.zeros(bsz, np.float32),
                            np.zeros(bsz, np.float32), np.zeros(bsz, np.float32), ~obs.any(axis=1), status,
                            np.zeros((bsz, self.n_wave), np.float32))
        todo = np.flatnonzero(np.array(status) == "ok")
        for start in range(0, todo.size, batch):
            idx = todo[start:start + batch]
            self._map_batch(idx, y[idx] * self.n_wave, obs[idx], settings, res)
        return res

    def _map_batch(self, idx: np.ndarray, y_np: np.ndarray, obs_np: np.ndarray, settings: MapSettings,
                   res: DenoiseResult) -> None:
        y = torch.as_tensor(y_np, dtype=torch.float32, device=self.device)
        obs = torch.as_tensor(obs_np, device=self.device)
        counted = window_mask(obs, self.flow.arch.window)
        n_cls = len(self.classes)
        with torch.no_grad():
            z_all = self._initial(y, obs)                                          # (B, C, L)
            j_all, _, _ = self._objective(z_all, y, obs, counted)
            j_all = torch.where(torch.isfinite(j_all), j_all, torch.full_like(j_all, 1e30))
        k = max(1, min(settings.refine_classes, n_cls))
        top = j_all.topk(k, dim=-1, largest=False).indices                          # (B, k)
        z0 = torch.gather(z_all, 1, top[..., None].expand(-1, -1, z_all.shape[-1]))
        best_j = torch.gather(j_all, 1, top)
        best_z = z0.clone()
        if settings.start_iterations > 0:   # Adam starts at the Gauss-Newton fit; the best of both is kept
            with torch.no_grad():
                z0 = self._gauss_newton(z0, y, obs, top, settings.start_iterations)
        z = z0.clone().requires_grad_(True)
        m1 = torch.zeros_like(z0)
        m2 = torch.zeros_like(z0)
        for step in range(settings.steps + 1):
            j, _, _ = self._objective(z, y, obs, counted, top)
            with torch.no_grad():
                better = torch.isfinite(j) & (j < best_j)
                best_j = torch.where(better, j, best_j)
                best_z = torch.where(better[..., None], z, best_z)
            if step == settings.steps:
                break
            (grad,) = torch.autograd.grad(j.sum(), z)
            with torch.no_grad():   # Adam (beta 0.9, 0.999) with a cosine-decayed step
                grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
                m1.mul_(0.9).add_(0.1 * grad)
                m2.mul_(0.999).add_(0.001 * grad * grad)
                lr = settings.lr * 0.5 * (1.0 + math.cos(math.pi * step / settings.steps))
                hat1 = m1 / (1.0 - 0.9 ** (step + 1))
                hat2 = m2 / (1.0 - 0.999 ** (step + 1))
                z -= lr * hat1 / (hat2.sqrt() + 1e-8)
        with torch.no_grad():
            j_all = j_all.scatter(1, top, best_j)
            z_all = z_all.scatter(1, top[..., None].expand(-1, -1, z_all.shape[-1]), best_z)
            jj = j_all
            finite = jj < 1e29
            post = torch.softmax(-(jj - jj.min(-1, keepdim=True).values), dim=-1)
            cls = jj.argmin(-1)
            ar = torch.arange(len(idx), device=self.device)
            z_best = z_all[ar, cls]
            lp = self.prior.log_prob_own(z_best[:, None], cls[:, None])[:, 0]
            g = self.decoder(z_best)
            s = g / g.abs().sum(-1, keepdim=True).clamp_min(1e-12)
            if settings.posterior_mean and self.discrepancy is not None:
                amp = self._amplitude(g[:, None], y, obs)                            # (B, E, 1)
                post_flux = self._posterior_mean(g, amp, y, obs, cls)
            else:
                post_flux = s.cpu().numpy()
            rms = self._residual_rms(z_best, y, obs)
            out_of_prior = (lp < self.prior.floor[cls] - settings.prior_margin).cpu().numpy()
            poor = (rms > settings.max_residual_rms).cpu().numpy()
        ok_fit = finite[ar, cls].cpu().numpy() & np.isfinite(s.cpu().numpy()).all(-1)
        for k, b in enumerate(idx):
            if not ok_fit[k]:
                res.status[b] = "poor_fit"
                continue
            res.flux[b] = post_flux[k]
            res.generator_flux[b] = s[k].cpu().numpy()
            res.latent[b] = z_best[k].cpu().numpy()
            res.class_index[b] = int(cls[k])
            res.posterior[b] = post[k].cpu().numpy()
            res.objective[b] = float(jj[k, cls[k]])
            res.log_prior[b] = float(lp[k])
            res.residual_rms[b] = float(rms[k])
            if out_of_prior[k]:
                res.status[b] = "out_of_prior"
            elif poor[k]:
                res.status[b] = "poor_fit"
