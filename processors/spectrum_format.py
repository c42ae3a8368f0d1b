"""Array conventions of the files other tools read: bands cut from a joined grid, resolution
matrices in DESI's storage order, uncertainties from inverse variances, S/N summaries.

Pure functions (arrays in, arrays out); the files themselves are written by
:mod:`fiberlake.storage.export_fits`.

Resolution conventions
----------------------
The lake stores a resolution band ``O`` of shape ``(ndiag, nwave)`` indexed by the *observed* bin:
``O[k, i]`` is the weight of the true flux of bin ``i + k - h`` in observed bin ``i``
(``h = (ndiag - 1) // 2``), i.e. ``R[i, i + k - h] = O[k, i]`` for the matrix ``observed = R @ true``.

DESI (``desispec.resolution.Resolution``, the ``*_RESOLUTION`` HDUs) stores the same matrix as
``scipy.sparse.dia_matrix`` data with offsets ``h, h-1, ..., -h``: ``D[k, j]`` sits at
``R[j - (h - k), j]``, indexed by the *true* bin ``j``. Hence ``D[k, j] = O[2h - k, j + k - h]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fiberlake.schemas.maskbits import Mask


def log_wavelengths(loglam_min: float, dloglam: float, nwave: int) -> np.ndarray:
    """Bin centres of a log-linear grid, ``10 ** (loglam_min + dloglam * arange(nwave))`` (float64)."""
    return 10.0 ** (float(loglam_min) + float(dloglam) * np.arange(int(nwave)))


def linear_wavelengths(wave_min: float, dwave: float, nwave: int) -> np.ndarray:
    """Bin centres of a linear grid, ``wave_min + dwave * arange(nwave)`` (float64)."""
    return float(wave_min) + float(dwave) * np.arange(int(nwave))


@dataclass(frozen=True)
class BandCut:
    """One band cut from a joined grid: its name and the bins ``start:stop`` it holds."""

    name: str
    start: int
    stop: int

    @property
    def slice(self) -> slice:
        """The bins as a slice."""
        return slice(self.start, self.stop)


def cut_bands(wave: np.ndarray, arms: list[tuple[str, float, float]]) -> list[BandCut]:
    """Cut a joined grid into contiguous, non-overlapping bands, one per arm.

    Consecutive arms are separated at the middle of their overlap (or of the gap between them),
    so the bands put end to end give back the joined grid bin for bin: nothing is resampled and
    no bin is counted twice.

    Parameters
    ----------
    wave : ndarray, shape (nwave,)
        Increasing bin centres of the joined grid.
    arms : list of (name, wave_lo, wave_hi)
        The arms' wavelength ranges, in increasing order of ``wave_lo``.

    Returns
    -------
    list of BandCut
        One per arm that keeps at least one bin, covering ``0 .. nwave`` together.

    Examples
    --------
    >>> [(b.name, b.start, b.stop) for b in cut_bands(np.arange(10.0), [("b", 0, 6), ("r", 4, 9)])]
    [('b', 0, 5), ('r', 5, 10)]
    """
    arms = sorted(arms, key=lambda a: a[1])
    edges = [0]
    for (_, _, hi), (_, lo, _) in zip(arms[:-1], arms[1:]):
        edges.append(int(np.searchsorted(wave, 0.5 * (hi + lo))))
    edges.append(int(wave.size))
    cuts = [BandCut(name, a, b) for (name, _, _), a, b in zip(arms, edges[:-1], edges[1:])]
    return [c for c in cuts if c.stop > c.start]


def resolution_to_desi(band: np.ndarray) -> np.ndarray:
    """The lake's resolution band (indexed by observed bin) in DESI's order (indexed by true bin).

    Parameters
    ----------
    band : ndarray, shape (..., ndiag, nwave)
        ``O[k, i]``: weight of true bin ``i + k - h`` in observed bin ``i``.

    Returns
    -------
    ndarray, same shape
        ``D[k, j] = O[2h - k, j + k - h]`` (0 where ``j + k - h`` is off the grid), the data of
        ``scipy.sparse.dia_matrix((D, arange(h, -h - 1, -1)))``.
    """
    band = np.asarray(band)
    ndiag, nwave = band.shape[-2:]
    h = (ndiag - 1) // 2
    out = np.zeros_like(band)
    for k in range(ndiag):
        shift = k - h                      # D[k, j] = O[2h - k, j + shift]
        src = band[..., 2 * h - k, :]
        if shift >= 0:
            out[..., k, : nwave - shift] = src[..., shift:]
        else:
            out[..., k, -shift:] = src[..., : nwave + shift]
    return out


def resolution_from_desi(band: np.ndarray) -> np.ndarray:
    """Inverse of :func:`resolution_to_desi` (DESI's order back to the lake's).

    The reordering is its own inverse: ``O[k, i] = D[2h - k, i + k - h]`` has the same form.
    """
    return resolution_to_desi(band)


def resolution_cut(band: np.ndarray, cut: BandCut) -> np.ndarray:
    """The lake's resolution band restricted to the bins of ``cut``.

    Weights of true bins outside the cut are dropped (as at the end of any grid), so the result
    describes the band's own bins only.

    Parameters
    ----------
    band : ndarray, shape (..., ndiag, nwave)
    cut : BandCut

    Returns
    -------
    ndarray, shape (..., ndiag, cut.stop - cut.start)
    """
    band = np.asarray(band)
    ndiag = band.shape[-2]
    h = (ndiag - 1) // 2
    out = np.array(band[..., cut.slice], copy=True)
    n = cut.stop - cut.start
    i = np.arange(n)
    for k in range(ndiag):
        off = (i + k - h < 0) | (i + k - h >= n)
        out[..., k, off] = 0
    return out


def uncertainty(ivar: np.ndarray) -> np.ndarray:
    """Standard deviation ``1 / sqrt(ivar)``; ``inf`` where ``ivar`` is 0 (a masked bin)."""
    ivar = np.asarray(ivar)
    out = np.full(ivar.shape, np.inf, dtype=ivar.dtype if ivar.dtype.kind == "f" else np.float64)
    good = ivar > 0
    out[good] = 1.0 / np.sqrt(ivar[good])
    return out


def median_snr(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """Median of ``flux * sqrt(ivar)`` over the bins with ``ivar > 0``, along the last axis (0 when none)."""
    flux, ivar = np.atleast_2d(flux), np.atleast_2d(ivar)
    snr = np.where(ivar > 0, flux * np.sqrt(np.clip(ivar, 0, None)), np.nan)
    with np.errstate(all="ignore"):
        out = np.nanmedian(np.where(np.isnan(snr).all(axis=-1, keepdims=True), 0.0, snr), axis=-1)
    return out


def mask_bit_names() -> dict[int, str]:
    """Bit number to name of every mask bit (for the files' headers)."""
    return {int(m).bit_length() - 1: m.name for m in Mask}
