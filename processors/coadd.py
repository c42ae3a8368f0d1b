"""Arms joined on one grid, and exposures of a target combined (pure: arrays in, arrays out).

desispec's ``coadd`` and PypeIt's ``coadd1d`` are the anchors.

* :func:`joined_grid` is one log-linear grid over every arm of an instrument (constant velocity
  step, by default the arms' own sampling).
* :func:`rebin` moves spectra from a camera's linear grid onto it, conserving flux. Each input
  bin's variance is shared among the output bins in proportion to the overlap, the same weights
  as its flux (``var_k = sum_j u_kj var_j``), not their squares: the sum of any run of output
  bins then has the variance of the flux it holds, and the inverse variance does not ripple with
  the beat between the two grids (the squared weights give each single bin its own variance but
  an ivar that rises and falls by tens of per cent with the bins' phase, because neighbours are
  then correlated; :func:`ripple` measures it).
* :func:`join_arms` puts a spectrograph's cameras on the joined grid and combines the overlap of
  the dichroic by inverse variance (nothing is cut); bins no camera covers get ``NODATA``.
* :func:`coadd` combines exposures of one target by inverse variance with iterative rejection of
  outlying bins (per exposure and bin, against the mean of the other exposures), and combines
  the resolution data the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fiberlake.schemas.containers import Spectra1D
from fiberlake.schemas.maskbits import FATAL, MASK_DTYPE, Mask

C_KMS = 299792.458
INFO_BITS = MASK_DTYPE(Mask.FLUXFALLBACK | Mask.TELLURIC | Mask.SOMEBADPIX | Mask.EXTRAPWAVE | Mask.BAD2DFIT
                       | Mask.LOWFLAT | Mask.BADSKY)
"""Bits carried from the inputs into joined and coadded bins that used them (informational)."""


@dataclass(frozen=True)
class LogGrid:
    """Log-linear wavelength grid: ``wave = 10 ** (loglam_min + dloglam * arange(nwave))`` (A, air)."""

    loglam_min: float
    dloglam: float
    nwave: int

    @property
    def wave(self) -> np.ndarray:
        """Bin centres (A)."""
        return 10.0 ** (self.loglam_min + self.dloglam * np.arange(self.nwave))

    @property
    def edges(self) -> np.ndarray:
        """Bin edges (A), ``nwave + 1`` of them."""
        return 10.0 ** (self.loglam_min + self.dloglam * (np.arange(self.nwave + 1) - 0.5))


def joined_grid(arm_grids: list[tuple[float, float, int]], pixel_kms: float | None = None) -> LogGrid:
    """The log-linear grid covering every arm.

    Parameters
    ----------
    arm_grids : list of (wave_min, dwave, nwave)
        Each arm's linear grid.
    pixel_kms : float, optional
        Velocity step of a bin; by default the finest of the arms' own sampling at their centres.
    """
    lo = min(w0 for w0, _, _ in arm_grids)
    hi = max(w0 + dw * (n - 1) for w0, dw, n in arm_grids)
    if pixel_kms is None:
        pixel_kms = min(C_KMS * dw / (w0 + 0.5 * dw * (n - 1)) for w0, dw, n in arm_grids)
    dlog = float(np.log10(1.0 + pixel_kms / C_KMS))
    n = int(np.ceil((np.log10(hi) - np.log10(lo)) / dlog)) + 1
    return LogGrid(float(np.log10(lo)), dlog, n)


def overlap_matrix(in_edges: np.ndarray, out_edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse overlaps of input bins with output bins: ``(out index, in index, fraction of the input bin)``."""
    # searchsorted keeps this sparse: each input bin meets the few output bins around it
    first = np.clip(np.searchsorted(out_edges, in_edges[:-1], side="right") - 1, 0, out_edges.size - 2)
    last = np.clip(np.searchsorted(out_edges, in_edges[1:], side="left") - 1, 0, out_edges.size - 2)
    span = int(np.max(last - first)) + 1 if in_edges.size > 1 else 0
    rows, cols, fracs = [], [], []
    width = np.diff(in_edges)
    for d in range(span):
        k = first + d
        use = k <= last
        j = np.flatnonzero(use)
        k = k[use]
        ov = np.minimum(in_edges[j + 1], out_edges[k + 1]) - np.maximum(in_edges[j], out_edges[k])
        keep = ov > 0
        rows.append(k[keep])
        cols.append(j[keep])
        fracs.append(ov[keep] / width[j[keep]])
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(fracs)


def _linear_edges(wave: np.ndarray) -> np.ndarray:
    mid = 0.5 * (wave[1:] + wave[:-1])
    return np.concatenate([[wave[0] - (mid[0] - wave[0])], mid, [wave[-1] + (wave[-1] - mid[-1])]])


def rebin(wave: np.ndarray, spectra: Spectra1D, grid: LogGrid, *, squared_weights: bool = False) -> Spectra1D:
    """Flux-conserving rebinning of flux densities from bins centred on ``wave`` onto ``grid``.

    Parameters
    ----------
    wave : ndarray, shape (nwave_in,)
        Increasing input bin centres (edges are the midpoints).
    spectra : Spectra1D
        Flux densities (per Angstrom), shape ``(n, nwave_in)``.
    grid : LogGrid
    squared_weights : bool
        Propagate ``var_k = sum_j u_kj^2 var_j`` (each bin's own variance, rippling) instead of
        the default ``sum_j u_kj var_j`` (see the module's description).

    Returns
    -------
    Spectra1D
        Shape ``(n, grid.nwave)``. A bin that any fatally masked input overlaps gets ivar 0 and
        its bits; a bin the input does not fully cover gets ``NODATA`` and ivar 0.
    """
    in_edges = _linear_edges(np.asarray(wave, dtype=float))
    out_edges = grid.edges
    k, j, frac = overlap_matrix(in_edges, out_edges)
    in_w = np.diff(in_edges)
    out_w = np.diff(out_edges)
    n = spectra.flux.shape[0]
    flux = spectra.flux.astype(float)
    ivar = spectra.ivar.astype(float)
    bad = (ivar <= 0) | ~np.isfinite(flux) | ((spectra.mask & MASK_DTYPE(FATAL)) != 0)
    var = np.where(bad, 0.0, 1.0 / np.where(bad, 1.0, ivar))
    counts = np.where(bad, 0.0, flux) * in_w[None, :]          # flux per input bin
    out_counts = np.zeros((n, grid.nwave))
    out_var = np.zeros((n, grid.nwave))
    covered = np.zeros(grid.nwave)
    out_bad = np.zeros((n, grid.nwave), bool)
    out_mask = np.zeros((n, grid.nwave), MASK_DTYPE)
    wvar = frac**2 if squared_weights else frac
    np.add.at(covered, k, frac * in_w[j])
    for f in range(n):
        np.add.at(out_counts[f], k, frac * counts[f, j])
        np.add.at(out_var[f], k, wvar * var[f, j] * in_w[j] ** 2)
        np.logical_or.at(out_bad[f], k, bad[f, j] & (frac > 1e-3))
        np.bitwise_or.at(out_mask[f], k, spectra.mask[f, j])
    full = covered >= out_w * (1.0 - 1e-6)
    good = full[None, :] & ~out_bad & (out_var > 0)
    out_flux = np.where(full[None, :], out_counts / out_w[None, :], 0.0)
    out_ivar = np.where(good, out_w[None, :] ** 2 / np.where(good, out_var, 1.0), 0.0)
    out_mask |= np.where(full[None, :], MASK_DTYPE(0), MASK_DTYPE(Mask.NODATA))
    out_flux = np.where(full[None, :] & ~out_bad, out_flux, 0.0)
    return Spectra1D(out_flux.astype(np.float32), out_ivar.astype(np.float32), out_mask)


def join_arms(arms: list[tuple[np.ndarray, Spectra1D]], grid: LogGrid) -> Spectra1D:
    """Join the cameras of one spectrograph on ``grid``, the overlap combined by inverse variance.

    Parameters
    ----------
    arms : list of (wave, Spectra1D)
        Each present camera's grid and calibrated spectra (same fibers, same order). A missing
        camera is simply absent; its range then carries ``NODATA``.
    grid : LogGrid

    Returns
    -------
    Spectra1D
        Shape ``(n, grid.nwave)``; a bin no camera measured has flux 0, ivar 0 and ``NODATA``.
    """
    if not arms:
        raise ValueError("join_arms needs at least one camera")
    on_grid = [rebin(w, s, grid) for w, s in arms]
    flux = np.stack([s.flux.astype(float) for s in on_grid])
    ivar = np.stack([s.ivar.astype(float) for s in on_grid])
    wsum = ivar.sum(axis=0)
    joined = np.where(wsum > 0, (flux * ivar).sum(axis=0) / np.where(wsum > 0, wsum, 1.0), 0.0)
    mask = np.zeros(joined.shape, MASK_DTYPE)
    for s, iv in zip(on_grid, ivar):
        mask |= np.where(iv > 0, s.mask & INFO_BITS, MASK_DTYPE(0))
    nodata = wsum <= 0
    union = np.bitwise_or.reduce(np.stack([s.mask for s in on_grid]), axis=0)
    mask |= np.where(nodata, (union & ~MASK_DTYPE(Mask.NODATA)) | MASK_DTYPE(Mask.NODATA), MASK_DTYPE(0))
    return Spectra1D(joined.astype(np.float32), np.where(nodata, 0.0, wsum).astype(np.float32), mask)


@dataclass
class Coadd:
    """One target's exposures combined.

    Attributes
    ----------
    flux, ivar : ndarray, shape (nwave,)
    mask : ndarray of uint32, shape (nwave,)
    n_used : ndarray of int16, shape (nwave,)
        Exposures that contributed to each bin.
    n_rejected : int
        Bins rejected as outliers over all exposures.
    resolution : ndarray or None
        ``(ndiag, nwave)`` ivar-weighted mean of the exposures' resolution bands.
    """

    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    n_used: np.ndarray
    n_rejected: int
    resolution: np.ndarray | None = None


def grey_levels(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """Each exposure's flux level relative to the exposures' inverse-variance mean (1 when unmeasurable).

    The level is the ratio of the exposure's summed flux to the mean's over the bins every exposure
    measured; levels are normalised to a mean of 1, so rescaling by them keeps the absolute scale.
    """
    good = np.all(ivar > 0, axis=0)
    wsum = ivar.sum(axis=0)
    mean = np.where(wsum > 0, (flux * ivar).sum(axis=0) / np.where(wsum > 0, wsum, 1.0), 0.0)
    denom = float(np.sum(mean[good]))
    if good.sum() < 10 or denom <= 0:
        return np.ones(flux.shape[0])
    levels = np.array([float(np.sum(f[good])) / denom for f in flux])
    if np.any(levels <= 0.2) or not np.all(np.isfinite(levels)):
        return np.ones(flux.shape[0])
    return levels / levels.mean()


def coadd(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray, *, clip_sigma: float = 4.0, max_iter: int = 3,
          resolution: np.ndarray | None = None, rescale: bool = False, rel_floor: float = 0.0) -> Coadd:
    """Inverse-variance mean of a target's exposures with iterative outlier rejection.

    A bin of exposure ``i`` is rejected when ``|f_i - m_(-i)| / sqrt(var_i + var(m_(-i)))`` exceeds
    ``clip_sigma``, ``m_(-i)`` being the mean of the other exposures (so one bad exposure cannot hide
    in the mean it spoils); with two exposures a disagreement cannot say which is wrong, and both
    stay. Iterated up to ``max_iter`` times.

    Parameters
    ----------
    flux, ivar, mask : ndarray, shape (n_exp, nwave)
    clip_sigma : float
    max_iter : int
    resolution : ndarray, optional
        ``(n_exp, ndiag, nwave)``: each exposure's resolution band on the grid.
    rescale : bool
        Divide each exposure by its :func:`grey_levels` first (PypeIt's coadd1d scales exposures to
        one level too): exposures of one target differ by their aperture losses.
    rel_floor : float
        Fractional difference never rejected: ``rel_floor * |mean|`` is added in quadrature to the
        noise of the rejection test (bright targets' exposures differ by their calibrations).

    Returns
    -------
    Coadd
        A bin no exposure measured has flux 0, ivar 0 and ``NODATA``.
    """
    flux = np.asarray(flux, dtype=float)
    ivar = np.where(np.isfinite(flux), np.asarray(ivar, dtype=float), 0.0)
    flux = np.where(np.isfinite(flux), flux, 0.0)
    w = np.where(ivar > 0, ivar, 0.0)
    n_exp = flux.shape[0]
    if rescale and n_exp >= 2:
        levels = grey_levels(flux, w)
        flux = flux / levels[:, None]
        w = w * levels[:, None] ** 2
    rejected = np.zeros(flux.shape, bool)
    if n_exp >= 3:
        for _ in range(max_iter):
            wsum = w.sum(axis=0)
            fsum = (w * flux).sum(axis=0)
            w_other = wsum[None, :] - w
            m_other = np.where(w_other > 0, (fsum[None, :] - w * flux) / np.where(w_other > 0, w_other, 1.0), 0.0)
            var = (np.where(w > 0, 1.0 / np.where(w > 0, w, 1.0), np.inf)
                   + np.where(w_other > 0, 1.0 / np.where(w_other > 0, w_other, 1.0), np.inf)
                   + (rel_floor * m_other) ** 2)
            chi = np.where((w > 0) & (w_other > 0), np.abs(flux - m_other) / np.sqrt(var), 0.0)
            worst = np.argmax(chi, axis=0)
            # reject at most one exposure per bin per iteration: the most deviant
            new = np.zeros_like(rejected)
            cols = np.arange(flux.shape[1])
            new[worst, cols] = chi[worst, cols] > clip_sigma
            if not new.any():
                break
            rejected |= new
            w = np.where(new, 0.0, w)
    wsum = w.sum(axis=0)
    good = wsum > 0
    out_flux = np.where(good, (w * flux).sum(axis=0) / np.where(good, wsum, 1.0), 0.0)
    out_mask = np.zeros(flux.shape[1], MASK_DTYPE)
    for i in range(n_exp):
        out_mask |= np.where(w[i] > 0, np.asarray(mask[i], MASK_DTYPE) & INFO_BITS, MASK_DTYPE(0))
    out_mask |= np.where(good, MASK_DTYPE(0), MASK_DTYPE(Mask.NODATA))
    res = None
    if resolution is not None:
        res_arr = np.asarray(resolution, dtype=float)
        res = np.where(good[None, :], (res_arr * w[:, None, :]).sum(axis=0) / np.where(good, wsum, 1.0)[None, :], 0.0)
        centre = res.shape[0] // 2
        res[centre, ~good] = 1.0  # a bin with no data: the identity
    return Coadd(out_flux.astype(np.float32), wsum.astype(np.float32), out_mask, (w > 0).sum(axis=0).astype(np.int16),
                 int(rejected.sum()), None if res is None else res.astype(np.float32))


def ripple(ivar: np.ndarray, window: int = 101) -> float:
    """Rms of ``ivar`` about its running median (fractional): the beat pattern's amplitude.

    Parameters
    ----------
    ivar : ndarray, shape (n, nwave) or (nwave,)
        Inverse variances of smooth-noise spectra (bins with ivar 0 are ignored).
    window : int
        Running-median width (bins): longer than the beat period, shorter than real changes.
    """
    from scipy.ndimage import median_filter

    ivar = np.atleast_2d(np.asarray(ivar, dtype=float))
    out = []
    for row in ivar:
        good = row > 0
        if good.sum() < window:
            continue
        smooth = median_filter(row[good], size=window, mode="nearest")
        rel = row[good] / smooth - 1.0
        cut = window // 2
        out.append(rel[cut:-cut])
    return float(np.sqrt(np.mean(np.concatenate(out) ** 2))) if out else float("nan")


def healpix_nested(ra: np.ndarray, dec: np.ndarray, nside: int) -> np.ndarray:
    """HEALPix pixel (nested ordering) of each position (degrees)."""
    import astropy.units as u
    from astropy_healpix import HEALPix

    hp = HEALPix(nside=nside, order="nested")
    ra = np.asarray(ra, dtype=float)
    dec = np.asarray(dec, dtype=float)
    ok = np.isfinite(ra) & np.isfinite(dec)
    out = np.full(ra.shape, -1, np.int64)
    if ok.any():
        out[ok] = hp.lonlat_to_healpix(ra[ok] * u.deg, dec[ok] * u.deg)
    return out


def decorrelate_ivar(spectra: Spectra1D, q: np.ndarray) -> Spectra1D:
    """Inverse variance without the resampling ripple: ``ivar * q`` (``q`` from
    :func:`fiberlake.processors.resample.ripple_factor` for the grid the spectra were resampled to)."""
    q = np.asarray(q, dtype=np.float32)
    if q.shape != spectra.ivar.shape:
        raise ValueError(f"ripple factor of shape {q.shape} for spectra of shape {spectra.ivar.shape}")
    return Spectra1D(spectra.flux, spectra.ivar * q, spectra.mask)


def join_resolution(bands: list[np.ndarray], ivars: list[np.ndarray]) -> np.ndarray:
    """Arms' resolution bands on the joined grid combined like their flux (inverse-variance weights).

    Parameters
    ----------
    bands : list of ndarray, shape (n, ndiag, nwave)
        Each camera's bands already on the joined grid.
    ivars : list of ndarray, shape (n, nwave)
        Each camera's inverse variance on the joined grid.

    Returns
    -------
    ndarray, shape (n, ndiag, nwave)
        The identity where no camera has data.
    """
    w = np.stack([np.asarray(v, float) for v in ivars])          # (n_cam, n, nwave)
    b = np.stack([np.asarray(v, float) for v in bands])          # (n_cam, n, ndiag, nwave)
    wsum = w.sum(axis=0)
    out = (b * w[:, :, None, :]).sum(axis=0) / np.where(wsum > 0, wsum, 1.0)[:, None, :]
    centre = out.shape[1] // 2
    empty = wsum <= 0
    out[:, :, :][np.broadcast_to(empty[:, None, :], out.shape)] = 0.0
    out[:, centre, :][empty] = 1.0
    return out.astype(np.float32)
