"""Inputs of the PSF-conditioned CAE (seed 002, section III): the noisy chunk filtered by its PSF.

A convolutional network is local, so a PSF image fed beside the data cannot tell it how to
deconvolve. The paper instead feeds the data after the operations of classical deconvolution:

* ``psf``   -- the chunk convolved with the (flipped) PSF: the matched filter;
* ``ipsf``  -- the chunk convolved with the regularised inverse of the PSF (Tikhonov:
  ``conj(K) / (|K|^2 + reg max|K|^2)`` in Fourier space), the naive deconvolution;
* ``ipsf1`` -- ``ipsf`` convolved with a small Gaussian (``sigma1``): the inverse regularised
  again, Wiener-like.

Each channel of each tile is rescaled to [0, 1] by its own minimum and maximum (the paper's
maximum-value scaling: "the minimum and maximum values of all data sets fall between 0 and 1");
the truth is divided by its maximum. The amplitude lost by this scaling is recovered afterwards
by the maximum-likelihood afterburner (:mod:`fiberlake.processors.cae_afterburner`), the paper's
answer to the network's limited dynamic range.

The filtering is done by FFT over the whole chunk (reflect-padded by the kernel's reach), then
the chunk is cut into tiles, so a tile's inputs do not wrap around its own edges.
"""

from __future__ import annotations

import numpy as np

from fiberlake.schemas.containers import PSFModel

CHANNELS = ("psf", "ipsf", "ipsf1")
COMBINATIONS: dict[str, tuple[str, ...]] = {
    "PSF-iPSF-iPSF1": ("psf", "ipsf", "ipsf1"),
    "PSF-iPSF1": ("psf", "ipsf1"),
    "PSF-iPSF": ("psf", "ipsf"),
    "iPSF-iPSF1": ("ipsf", "ipsf1"),
    "PSF": ("psf",),
    "iPSF": ("ipsf",),
    "iPSF1": ("ipsf1",),
}
"""The paper's input combinations (Table 1), by name."""


def psf_kernel(psf: PSFModel, x: float, row: float, fiber: int = 0) -> np.ndarray:
    """The 2D PSF at a point of an invariant (rectified) frame: LSF (rows) x cross profile (columns).

    Parameters
    ----------
    psf : PSFModel
    x, row : float
        Column and row where the PSF is evaluated (rounded: the kernel is centred on a pixel).
    fiber : int
        Fiber index (only a varying model uses it).

    Returns
    -------
    ndarray, shape (2 W_lsf + 1, 2 W_xsf + 1)
        Unit-sum kernel, centred.
    """
    f = np.array([fiber])
    _, lw = psf.lsf_weights(f, np.array([float(np.rint(x))]), np.array([float(np.rint(row))]))
    _, xw = psf.xsf_weights(f, np.array([float(np.rint(x))]), np.array([float(np.rint(row))]))
    k = np.outer(lw[0], xw[0])
    return (k / k.sum()).astype(np.float64)


def gaussian_kernel(sigma_rows: float, sigma_cols: float | None = None, half: int | None = None) -> np.ndarray:
    """Pixel-integrated 2D Gaussian, unit sum, ``(2 h + 1, 2 h + 1)``."""
    from scipy.special import erf

    sigma_cols = sigma_rows if sigma_cols is None else sigma_cols
    half = int(np.ceil(4 * max(sigma_rows, sigma_cols))) if half is None else half
    e = np.arange(-half, half + 2) - 0.5

    def prof(s):
        w = np.diff(erf(e / (np.sqrt(2) * s)))
        return w / w.sum()
    return np.outer(prof(sigma_rows), prof(sigma_cols))


def _transfer(kernel: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Fourier transform of a centred kernel embedded in an array of ``shape`` (origin at 0, 0)."""
    kh, kw = kernel.shape
    big = np.zeros(shape)
    big[:kh, :kw] = kernel
    big = np.roll(big, (-(kh // 2), -(kw // 2)), axis=(0, 1))
    return np.fft.rfft2(big)


def input_channels(image: np.ndarray, kernel: np.ndarray, channels: tuple[str, ...] = CHANNELS, *,
                   reg: float = 1e-3, sigma1: float = 1.0) -> np.ndarray:
    """The requested filtered versions of a chunk.

    Parameters
    ----------
    image : ndarray, shape (H, W) or (n, H, W)
        Chunk(s) in electrons (bad pixels already filled: no NaN).
    kernel : ndarray
        The chunk's 2D PSF (unit sum, centred).
    channels : tuple of str
        Names among ``psf``, ``ipsf``, ``ipsf1``, in the order wanted.
    reg : float
        Tikhonov regularisation of the inverse, relative to ``max |K|^2``.
    sigma1 : float
        Sigma (px) of the Gaussian of ``ipsf1``.

    Returns
    -------
    ndarray, shape (len(channels), H, W) or (n, len(channels), H, W)
    """
    img = np.asarray(image, dtype=np.float64)
    single = img.ndim == 2
    if single:
        img = img[None]
    unknown = set(channels) - set(CHANNELS)
    if unknown:
        raise ValueError(f"unknown input channels {sorted(unknown)}; known: {CHANNELS}")
    n, H, W = img.shape
    g = gaussian_kernel(sigma1)
    py = max(kernel.shape[0], g.shape[0])
    px = max(kernel.shape[1], g.shape[1])
    padded = np.pad(img, ((0, 0), (py, py), (px, px)), mode="reflect")
    shape = padded.shape[1:]
    K = _transfer(kernel, shape)
    F = np.fft.rfft2(padded)
    k2 = np.abs(K) ** 2
    inv = np.conj(K) / (k2 + reg * k2.max())
    filters = {"psf": np.conj(K), "ipsf": inv, "ipsf1": inv * _transfer(g, shape)}
    out = np.empty((n, len(channels), H, W), dtype=np.float32)
    for i, name in enumerate(channels):
        full = np.fft.irfft2(F * filters[name], s=shape)
        out[:, i] = full[:, py:py + H, px:px + W]
    return out[0] if single else out


def minmax_scale(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rescale each channel of each tile to [0, 1] (the paper's maximum-value scaling).

    Parameters
    ----------
    tiles : ndarray, shape (n, c, h, w)

    Returns
    -------
    scaled : ndarray, shape (n, c, h, w), float32
    lo, hi : ndarray, shape (n, c)
        The minimum and maximum of each channel (a flat channel maps to 0).
    """
    lo = tiles.min(axis=(2, 3))
    hi = tiles.max(axis=(2, 3))
    span = np.where(hi > lo, hi - lo, 1.0)
    scaled = (tiles - lo[..., None, None]) / span[..., None, None]
    return scaled.astype(np.float32), lo, hi


def max_scale(truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Divide each truth tile ``(n, h, w)`` by its maximum (a blank tile stays 0)."""
    hi = truth.max(axis=(1, 2))
    scale = np.where(hi > 0, hi, 1.0)
    return (truth / scale[:, None, None]).astype(np.float32), hi


def tile_starts(length: int, tile: int, stride: int) -> np.ndarray:
    """Starts of tiles of ``tile`` covering ``[0, length)`` with at most ``stride`` between them
    (the last one flush with the end; one tile at 0 when ``length <= tile``)."""
    if length <= tile:
        return np.array([0])
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return np.unique(np.array(starts))
