"""Extraction through the PSF-conditioned CAE (seed 002): deconvolve the chunk, then read each
fiber off the deconvolved image.

Steps for one rectified chunk (a fiber-bundle slab with its margins):

1. bad pixels (ivar 0, NaN, masked: saturated, cosmic, ...) are filled along their column from
   the nearest good rows, and remembered;
2. the PSF, iPSF and iPSF1 channels are computed over the whole chunk
   (:mod:`~fiberlake.processors.cae_inputs`), the chunk is cut into overlapping square tiles
   (padded at the CCD edges), each tile's channels min-max scaled;
3. the CAE deconvolves each tile; the afterburner (:mod:`~fiberlake.processors.cae_afterburner`)
   fits each tile's amplitude against the noisy tile (paper eq. 2) and applies the quadratic
   flux-bias correction; tiles are blended with tent weights;
4. each fiber's flux in each row is the sum of the deconvolved image over ``+-aperture`` columns
   around its trace (the target PSF is a Gaussian of ``target_sigma`` px, so the light of a fiber
   sits within a few columns: the spectrum's line-spread function becomes the target's).

Uncertainty. The network is non-linear, so no variance propagates through it exactly. The
variance given is that of the box sum of the *noisy* pixels over the instrument PSF's
cross-dispersion support (read noise + counts: what the data hold about the row), times the
square of a ``pull_scale`` measured at training on simulated calibration chunks (never the test
seeds) so that ``(flux - truth) / sigma`` has unit robust scatter against the target-PSF truth.
It is therefore an empirical, calibrated error: right on average for chunks like the training
ones, not per pixel; the pulls in the issue's note say how well it holds on held-out seeds.

Flags (ivar 0 plus a :class:`~fiberlake.schemas.maskbits.Mask` bit, never a NaN): a row whose
aperture or PSF support touches a bad pixel carries that pixel's bits (``SOMEBADPIX`` when none
is set) and ivar 0; a fiber whose aperture leaves the chunk is ``OFFCCD``; a chunk where the
network produced a non-finite value is ``BAD2DFIT`` everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fiberlake.processors.cae_afterburner import flux_bias_factor, ml_amplitude
from fiberlake.processors.cae_inputs import COMBINATIONS, input_channels, minmax_scale, psf_kernel, tile_starts
from fiberlake.schemas.containers import PSFModel, Spectra1D, TraceSet
from fiberlake.schemas.maskbits import FATAL, Mask

STAGE = "deconvolve"


class ModelError(ValueError):
    """Weights that do not fit the card's architecture."""


@dataclass
class Deconvolver:
    """A trained CAE with the settings it was trained with (from its model card).

    Attributes
    ----------
    network : DeconvCAE
        In eval mode, on ``device``.
    combination : str
        Input combination (a key of :data:`~fiberlake.processors.cae_inputs.COMBINATIONS`).
    tile, stride : int
        Tile size and step (px).
    reg, sigma1 : float
        Inverse regularisation and iPSF1 Gaussian (see :func:`input_channels`).
    target_sigma : float
        Sigma (px) of the truth's Gaussian PSF.
    bias_coeffs : ndarray, shape (3,)
        Quadratic flux-bias correction (:func:`~fiberlake.processors.cae_afterburner.fit_flux_bias`).
    bias_range : tuple of float
        ``log10`` flux range the correction was fitted on.
    pull_scale : float
        Error scale of the extracted flux (see the module notes).
    model_id : str
    """

    network: object
    combination: str
    tile: int = 64
    stride: int = 48
    reg: float = 1e-3
    sigma1: float = 1.0
    target_sigma: float = 0.8
    bias_coeffs: np.ndarray = field(default_factory=lambda: np.zeros(3))
    bias_range: tuple[float, float] = (0.0, 9.0)
    pull_scale: float = 1.0
    pull_scale_fibers: float = 1.0
    model_id: str = ""
    device: str = "cpu"
    batch: int = 32

    @property
    def channels(self) -> tuple[str, ...]:
        return COMBINATIONS[self.combination]

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """Network output ``(n, T, T)`` for scaled inputs ``(n, c, T, T)`` (batched, no grad)."""
        import torch

        out = np.empty((tiles.shape[0],) + tiles.shape[2:], dtype=np.float32)
        with torch.no_grad():
            for s in range(0, tiles.shape[0], self.batch):
                x = torch.from_numpy(np.ascontiguousarray(tiles[s:s + self.batch])).to(self.device)
                out[s:s + self.batch] = self.network(x)[:, 0].float().cpu().numpy()
        return out


def deconvolver_from_artifact(tensors: dict[str, np.ndarray], card: dict, device: str = "auto") -> Deconvolver:
    """Build a :class:`Deconvolver` from an artifact's tensors and card (no I/O here).

    Raises
    ------
    ModelError
        If the tensors do not fit the card's architecture.
    """
    import torch

    from fiberlake.processors.cae import DeconvCAE

    arch = card["arch_params"]
    prep = card["prep"]
    net = DeconvCAE(int(arch["in_channels"]), tuple(arch["filters"]), float(arch["negative_slope"]),
                    int(arch["kernel"]))
    state = net.state_dict()
    try:
        loaded = {k: torch.from_numpy(np.asarray(tensors[k], dtype=np.float32)).reshape(v.shape).to(v.dtype)
                  for k, v in state.items()}
    except (KeyError, RuntimeError, ValueError) as err:
        raise ModelError(f"deconvolve model {card.get('model_id')}: weights do not fit its architecture ({err})") \
            from None
    net.load_state_dict(loaded)
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    net.eval().to(dev)
    return Deconvolver(network=net, combination=prep["combination"], tile=int(prep["tile"]),
                       stride=int(prep["stride"]), reg=float(prep["reg"]), sigma1=float(prep["sigma1"]),
                       target_sigma=float(prep["target_sigma"]), bias_coeffs=np.asarray(prep["bias_coeffs"], float),
                       bias_range=tuple(prep["bias_range"]), pull_scale=float(prep["pull_scale"]),
                       pull_scale_fibers=float(prep.get("pull_scale_fibers", prep["pull_scale"])),
                       model_id=card.get("model_id", ""), device=dev)


def network_tensors(network, dtype=np.float16) -> dict[str, np.ndarray]:
    """The network's state as named arrays for safetensors (float weights in ``dtype`` to keep the
    shipped file small; batch-norm counters as int64)."""
    out = {}
    for k, v in network.state_dict().items():
        a = v.detach().cpu().numpy()
        out[k] = a.astype(dtype) if a.dtype.kind == "f" else a
    return out


def fill_bad(image: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Bad pixels replaced by linear interpolation along their column (0 where a column has none)."""
    out = np.where(good, image, 0.0).astype(np.float64)
    rows = np.arange(image.shape[0])
    for c in np.flatnonzero(~good.all(axis=0)):
        g = good[:, c]
        if g.any():
            out[~g, c] = np.interp(rows[~g], rows[g], image[g, c])
    return out


def _tent(n: int) -> np.ndarray:
    t = np.minimum(np.arange(n) + 1.0, n - np.arange(n) + 0.0)
    return t / t.max()


def fiber_amplitudes(out: np.ndarray, data: np.ndarray, weight: np.ndarray, kernel: np.ndarray, col0: int,
                     fiber_x: np.ndarray) -> np.ndarray:
    """Per-fiber amplitudes of one output tile: eq. 2 with one component per fiber.

    The paper notes that its amplitude fit extends to several components (deblending). Here each
    column of the output tile belongs to the nearest fiber; each fiber's part is re-convolved with
    the PSF and all amplitudes are fitted at once to the noisy tile (weighted least squares,
    negative amplitudes set to 0). Returns the tile rescaled, in electrons.
    """
    from fiberlake.processors.cae_afterburner import reconvolve

    T = out.shape[-1]
    xs = np.sort(np.asarray(fiber_x, float))
    owner = np.searchsorted((xs[1:] + xs[:-1]) / 2, col0 + np.arange(T)) if xs.size > 1 else np.zeros(T, int)
    ids = np.unique(owner)
    comps = np.stack([out * (owner == k)[None, :] for k in ids])
    model = reconvolve(comps, kernel)
    M = model.reshape(len(ids), -1)
    w = weight.ravel()
    A = (M * w) @ M.T
    b = (M * w) @ data.ravel()
    keep = np.diag(A) > 0
    amp = np.zeros(len(ids))
    if keep.any():
        amp[keep] = np.linalg.lstsq(A[np.ix_(keep, keep)], b[keep], rcond=None)[0]
    amp = np.clip(amp, 0.0, None)
    return np.tensordot(amp, comps, axes=1)


def deconvolve_chunk(image: np.ndarray, ivar: np.ndarray, mask: np.ndarray | None, kernel: np.ndarray,
                     model: Deconvolver, *, fiber_x: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Deconvolve a chunk with the CAE and its afterburner.

    Parameters
    ----------
    image, ivar : ndarray, shape (H, W)
        Electrons and inverse variance (0: bad).
    mask : ndarray of uint32, or None
    kernel : ndarray
        The chunk's PSF (unit sum, centred).
    model : Deconvolver
    fiber_x : ndarray, optional
        Trace columns of the chunk's fibers: amplitudes per fiber and tile
        (:func:`fiber_amplitudes`, no quadratic correction) instead of the paper's one amplitude
        per tile with its quadratic flux-bias correction.

    Returns
    -------
    deconvolved : ndarray, shape (H, W), float32
        Electrons per pixel at the target PSF (never NaN).
    bad : ndarray of bool, shape (H, W)
        Pixels that were bad in the input.
    """
    image = np.asarray(image, dtype=np.float64)
    H, W = image.shape
    good = np.isfinite(image) & (np.asarray(ivar) > 0)
    if mask is not None:
        good &= (np.asarray(mask) & np.uint32(FATAL)) == 0
    filled = fill_bad(np.where(np.isfinite(image), image, 0.0), good)
    w = np.where(good, np.asarray(ivar, dtype=np.float64), 0.0)
    T, S = model.tile, model.stride
    ph, pw = max(0, T - H), max(0, T - W)
    if ph or pw:  # a chunk smaller than a tile (CCD edge): pad, weight 0
        filled = np.pad(filled, ((0, ph), (0, pw)), mode="reflect" if min(H, W) > 1 else "edge")
        w = np.pad(w, ((0, ph), (0, pw)))
    Hp, Wp = filled.shape
    chans = input_channels(filled, kernel, model.channels, reg=model.reg, sigma1=model.sigma1)
    r0s, c0s = tile_starts(Hp, T, S), tile_starts(Wp, T, S)
    starts = [(r, c) for r in r0s for c in c0s]
    tiles = np.stack([chans[:, r:r + T, c:c + T] for r, c in starts])
    scaled, _, _ = minmax_scale(tiles)
    out = model.predict(scaled).astype(np.float64)
    data = np.stack([filled[r:r + T, c:c + T] for r, c in starts])
    wt = np.stack([w[r:r + T, c:c + T] for r, c in starts])
    amp = ml_amplitude(out, data, kernel, wt)
    amp = np.clip(amp, 0.0, None)
    flux = amp * out.sum(axis=(1, 2))
    factor = flux_bias_factor(flux, model.bias_coeffs, model.bias_range)
    tiles_e = out * (amp * factor)[:, None, None]
    if fiber_x is not None and len(fiber_x):
        tiles_e = np.stack([fiber_amplitudes(o, d, ww, kernel, c, fiber_x)
                            for o, d, ww, (_, c) in zip(out, data, wt, starts)])
    tent = np.outer(_tent(T), _tent(T))
    acc = np.zeros((Hp, Wp))
    norm = np.zeros((Hp, Wp))
    for (r, c), t in zip(starts, tiles_e):
        acc[r:r + T, c:c + T] += t * tent
        norm[r:r + T, c:c + T] += tent
    result = (acc / np.where(norm > 0, norm, 1.0))[:H, :W]
    if not np.isfinite(result).all():
        result = np.full((H, W), np.nan)
    return result.astype(np.float32), ~good


def cae_extract(image: np.ndarray, ivar: np.ndarray, mask: np.ndarray | None, traces: TraceSet, psf: PSFModel,
                model: Deconvolver, *, aperture: int | None = None, read_noise: float | None = None,
                amplitude: str = "tile") -> Spectra1D:
    """Extract every fiber of a rectified chunk through the CAE (see the module notes).

    Parameters
    ----------
    image, ivar : ndarray, shape (ny, nx)
        CCD-corrected (rectified) chunk in electrons and its inverse variance.
    mask : ndarray of uint32, or None
    traces : TraceSet
        Traces in the chunk's columns.
    psf : PSFModel
        The calibration's PSF (invariant for a rectified frame), in the chunk's columns.
    model : Deconvolver
    aperture : int, optional
        Half width (columns) of the sum on the deconvolved image; default ``ceil(3 target_sigma)``.
    read_noise : float, optional
        Unused (the variance comes from ``ivar``); accepted for the pipeline's common call.
    amplitude : str
        ``tile``: the paper's afterburner (one eq. 2 amplitude per tile, then the quadratic);
        ``fibers``: one amplitude per fiber and tile (:func:`fiber_amplitudes`).

    Returns
    -------
    Spectra1D
        Electrons per row, ``(n_fibers, ny)``.
    """
    image = np.asarray(image)
    ny, nx = image.shape
    nf = traces.n_fibers
    rows = np.arange(ny)
    x = traces.x(rows)  # (nf, ny)
    live = ~np.asarray(traces.dead, bool)
    centre = int(np.flatnonzero(live)[len(np.flatnonzero(live)) // 2]) if live.any() else nf // 2
    kernel = psf_kernel(psf, float(np.clip(np.median(x[centre]), 0, nx - 1)), ny / 2.0, fiber=centre)
    if amplitude not in ("tile", "fibers"):
        raise ValueError(f"amplitude must be 'tile' or 'fibers', not {amplitude!r}")
    fx = np.median(x[live], axis=1) if amplitude == "fibers" and live.any() else None
    decon, bad = deconvolve_chunk(image, ivar, mask, kernel, model, fiber_x=fx)
    flux = np.zeros((nf, ny), np.float32)
    fl_ivar = np.zeros((nf, ny), np.float32)
    fl_mask = np.zeros((nf, ny), np.uint32)
    npix = np.zeros((nf, ny), np.float32)
    if not np.isfinite(decon).all():
        fl_mask |= np.uint32(Mask.BAD2DFIT)
        return Spectra1D(flux, fl_ivar, fl_mask, npix=npix)
    h = int(np.ceil(3 * model.target_sigma)) if aperture is None else int(aperture)
    prof = kernel.sum(axis=0)
    support = np.flatnonzero(prof > 1e-3 * prof.max()) - kernel.shape[1] // 2  # instrument cross profile
    var_pix = np.where(bad, 0.0, 1.0 / np.where(np.asarray(ivar) > 0, ivar, 1.0))
    pix_mask = np.zeros((ny, nx), np.uint32) if mask is None else np.asarray(mask, np.uint32)
    pix_mask = pix_mask | np.where(bad & (pix_mask == 0), np.uint32(Mask.SOMEBADPIX), np.uint32(0))
    pix_mask = pix_mask | np.where(~np.isfinite(image), np.uint32(Mask.NONFINITE), np.uint32(0))
    lsf_h = kernel.shape[0] // 2
    scale = model.pull_scale_fibers if fx is not None else model.pull_scale
    from scipy.ndimage import maximum_filter1d
    for f in range(nf):
        xc = np.rint(x[f]).astype(int)
        cols = xc[:, None] + np.arange(-h, h + 1)[None, :]
        inside = (cols >= 0) & (cols < nx)
        cc = np.clip(cols, 0, nx - 1)
        flux[f] = np.where(inside, decon[rows[:, None], cc], 0.0).sum(axis=1)
        npix[f] = inside.sum(axis=1)
        scols = xc[:, None] + support[None, :]
        sin = (scols >= 0) & (scols < nx)
        sc = np.clip(scols, 0, nx - 1)
        var = np.where(sin, var_pix[rows[:, None], sc], 0.0).sum(axis=1)
        bits = np.bitwise_or.reduce(np.where(sin, pix_mask[rows[:, None], sc], 0), axis=1).astype(np.uint32)
        # a bad pixel spoils the rows its light reaches through the LSF
        spoiled = maximum_filter1d((bits != 0).astype(np.uint8), size=2 * lsf_h + 1) > 0
        bits = np.bitwise_or(bits, np.where(spoiled & (bits == 0), np.uint32(Mask.SOMEBADPIX), np.uint32(0)))
        off = ~inside.all(axis=1) | ~sin.all(axis=1)
        bits = bits | np.where(off, np.uint32(Mask.OFFCCD), np.uint32(0))
        ok = (bits & np.uint32(FATAL | Mask.SOMEBADPIX)) == 0
        ok &= var > 0
        fl_ivar[f] = np.where(ok, 1.0 / (scale**2 * np.where(var > 0, var, 1.0)), 0.0)
        fl_mask[f] = bits
        if not live[f]:
            fl_mask[f] |= np.uint32(Mask.DEADFIBER)
            fl_ivar[f] = 0
    flux = np.nan_to_num(flux, nan=0.0, posinf=0.0, neginf=0.0)
    return Spectra1D(flux, fl_ivar, fl_mask, npix=npix)


# ----------------------------------------------------------------------------- the pipeline's model

_INSTALLED: dict[str, Deconvolver] = {}


def install(model: Deconvolver, source: str = "default") -> None:
    """Make a loaded model the one the pipeline's ``cae`` extraction uses for ``source`` (the
    jobs load artifacts, this module never opens a file)."""
    _INSTALLED[source] = model


def installed(source: str = "default") -> Deconvolver:
    """The model installed for ``source``.

    Raises
    ------
    LookupError
        When none is installed (the job did not load one).
    """
    try:
        return _INSTALLED[source]
    except KeyError:
        raise LookupError(f"the cae extraction has no deconvolve model {source!r} loaded in this process "
                          "(fiberlake.jobs.cae_stage.ensure_model loads it)") from None
