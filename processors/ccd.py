"""CCD correction: overscan, master bias, gain, inverse variance, masks and cosmic rays.

Pure array processing: a raw frame (ADU, data section plus serial overscan) in, a
:class:`CCDImage` (electrons, inverse variance, :class:`~fiberlake.schemas.maskbits.Mask` bits)
out. No file I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import warnings
from dataclasses import dataclass

import numpy as np
from astropy.stats import sigma_clip
from scipy.ndimage import binary_dilation

from fiberlake.processors import cosmics
from fiberlake.schemas.header import format_section, parse_section
from fiberlake.schemas.instrument import Instrument
from fiberlake.schemas.maskbits import FATAL, MASK_DTYPE, Mask

Section = tuple[slice, slice]


@dataclass(frozen=True, kw_only=True)
class CCDParams:
    """Parameters of the CCD correction of one camera.

    Parameters
    ----------
    gain : float
        Gain (electrons per ADU).
    read_noise : float
        Read noise (electrons).
    saturation : float
        ADC saturation level (ADU); raw values at or above it are flagged ``SATURATED``.
    datasec, biassec : tuple of slice
        ``(row_slice, col_slice)`` of the data section and of the serial overscan in the raw
        frame (see :func:`fiberlake.schemas.header.parse_section`). Both must span the same rows.
    overscan_sigma : float
        Sigma-clipping threshold for the per-row overscan level.
    overscan_smooth : int
        Window (rows) of the Savitzky-Golay smoothing of the per-row overscan level; 1 disables it.
    cr_sigclip : float
        L.A.Cosmic Laplacian-to-noise detection limit (astroscrappy ``sigclip``).
    cr_sigfrac : float
        Fractional detection limit for neighbouring pixels (astroscrappy ``sigfrac``).
    cr_objlim : float
        Minimum contrast between the Laplacian and fine-structure images (astroscrappy
        ``objlim``); raise it if sharp arc lines or fiber cores are flagged.
    cr_niter : int
        Number of L.A.Cosmic iterations (astroscrappy ``niter``).
    cr_grow : int
        Dilate the cosmic-ray mask by this many pixels (0: no growth).
    """

    gain: float
    read_noise: float
    saturation: float = 65535.0
    datasec: Section
    biassec: Section
    overscan_sigma: float = 3.0
    overscan_smooth: int = 31
    cr_sigclip: float = 5.0
    cr_sigfrac: float = 0.3
    cr_objlim: float = 5.0
    cr_niter: int = 4
    cr_grow: int = 0

    @classmethod
    def from_instrument(cls, instrument: Instrument, **overrides) -> "CCDParams":
        """Nominal parameters of an instrument's cameras (data section then overscan)."""
        rows = slice(0, instrument.ny)
        kw = dict(
            gain=instrument.gain,
            read_noise=instrument.read_noise,
            saturation=float(instrument.saturation),
            datasec=(rows, slice(0, instrument.nx)),
            biassec=(rows, slice(instrument.nx, instrument.nx + instrument.n_overscan)),
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_header(cls, header: Mapping, saturation: float = 65535.0, **overrides) -> "CCDParams":
        """Parameters from a raw header (``GAIN``, ``RDNOISE``, ``DATASEC``, ``BIASSEC``)."""
        kw = dict(
            gain=float(header["GAIN"]),
            read_noise=float(header["RDNOISE"]),
            saturation=float(saturation),
            datasec=parse_section(str(header["DATASEC"])),
            biassec=parse_section(str(header["BIASSEC"])),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict:
        """JSON-serialisable parameters (sections as FITS strings), for the ``runs`` table."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["datasec"] = format_section(*self.datasec)
        out["biassec"] = format_section(*self.biassec)
        return out


@dataclass
class CCDImage:
    """A corrected frame: flux, inverse variance and mask travel together.

    Attributes
    ----------
    image : ndarray of float32, shape (ny, nx)
        Data section in electrons (bias removed); 0 where the value was not finite.
    ivar : ndarray of float32, shape (ny, nx)
        Inverse variance (1/electrons^2); 0 wherever a fatal mask bit is set.
    mask : ndarray of uint32, shape (ny, nx)
        :class:`~fiberlake.schemas.maskbits.Mask` bits.
    """

    image: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray


def overscan_level(raw: np.ndarray, biassec: Section, *, sigma: float = 3.0, smooth: int = 31) -> np.ndarray:
    """Per-row bias level (ADU) measured in the serial overscan.

    Parameters
    ----------
    raw : ndarray, shape (rows, cols)
        Raw frame in ADU.
    biassec : tuple of slice
        ``(row_slice, col_slice)`` of the overscan.
    sigma : float
        Sigma-clipping threshold (median centre, standard deviation) across each row.
    smooth : int
        Window (rows, made odd) of a quadratic Savitzky-Golay smoothing along rows, which
        follows slow drifts without biasing the first and last rows; ``<= 3`` keeps the
        per-row levels.

    Returns
    -------
    ndarray of float64, shape (n_overscan_rows,)
    """
    over = np.asarray(raw[biassec], dtype=np.float64)
    clipped = sigma_clip(over, sigma=sigma, maxiters=5, axis=1, masked=True, cenfunc="median", stdfunc="std")
    level = np.ma.mean(clipped, axis=1)
    good = ~np.ma.getmaskarray(level)
    level = np.ma.getdata(level).astype(np.float64)
    good &= np.isfinite(level)
    if not good.any():
        raise ValueError("overscan has no finite values")
    if not good.all():
        idx = np.arange(level.size)
        level = np.interp(idx, idx[good], level[good])
    window = min(int(smooth) | 1, level.size if level.size % 2 else level.size - 1)
    if window > 3:
        from scipy.signal import savgol_filter  # lazy: importing scipy.signal costs ~1 s of CLI start-up
        level = savgol_filter(level, window, polyorder=2, mode="interp")
    return level


def overscan_subtract(raw: np.ndarray, datasec: Section, biassec: Section, *,
                      sigma: float = 3.0, smooth: int = 31) -> np.ndarray:
    """Subtract the per-row overscan level and return the data section.

    Parameters
    ----------
    raw : ndarray, shape (rows, cols)
        Raw frame in ADU (any numeric dtype).
    datasec, biassec : tuple of slice
        ``(row_slice, col_slice)`` of the data section and of the overscan; they must span the
        same number of rows (row ``i`` of one is row ``i`` of the other).
    sigma, smooth
        See :func:`overscan_level`.

    Returns
    -------
    ndarray of float32, shape of ``raw[datasec]``
        Bias-subtracted data section (ADU).

    Examples
    --------
    >>> raw = np.full((4, 6), 100.0); raw[:, :4] += 5
    >>> overscan_subtract(raw, (slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 6)))[0]
    array([5., 5., 5., 5.], dtype=float32)
    """
    data = np.asarray(raw[datasec], dtype=np.float32)
    level = overscan_level(raw, biassec, sigma=sigma, smooth=smooth)
    if level.size != data.shape[0]:
        raise ValueError(f"overscan spans {level.size} rows but the data section {data.shape[0]}")
    return data - level.astype(np.float32)[:, None]


def combine_frames(frames: Sequence[np.ndarray], sigma: float = 3.0, *, block_rows: int = 256) -> np.ndarray:
    """Sigma-clipped mean of a stack of frames (e.g. a master bias or flat).

    Parameters
    ----------
    frames : sequence of ndarray, each shape (ny, nx)
        Frames to combine (already overscan-subtracted and, for flats, normalised if wanted).
    sigma : float
        Clipping threshold about the median, in standard deviations (astropy ``sigma_clip``).
    block_rows : int
        Rows processed at once, to bound memory on large frames.

    Returns
    -------
    ndarray of float32, shape (ny, nx)
        Clipped mean; where every value of a pixel is clipped or not finite, the median of the
        finite values (or 0 if there are none).
    """
    if len(frames) == 0:
        raise ValueError("no frames to combine")
    shape = np.shape(frames[0])
    if any(np.shape(f) != shape for f in frames):
        raise ValueError("frames differ in shape")
    out = np.empty(shape, dtype=np.float32)
    for r0 in range(0, shape[0], block_rows):
        cube = np.stack([np.asarray(f[r0:r0 + block_rows], dtype=np.float32) for f in frames])
        if cube.shape[0] < 3:
            mean = np.nanmean(np.where(np.isfinite(cube), cube, np.nan), axis=0)
        else:
            clipped = sigma_clip(np.ma.masked_invalid(cube), sigma=sigma, maxiters=5, axis=0, masked=True,
                                 cenfunc="median", stdfunc="std")
            mean = np.ma.mean(clipped, axis=0).filled(np.nan)
        bad = ~np.isfinite(mean)
        if bad.any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                med = np.nanmedian(np.where(np.isfinite(cube), cube, np.nan), axis=0)
            mean = np.where(bad, np.nan_to_num(med, nan=0.0), mean)
        out[r0:r0 + block_rows] = mean
    return out


def _grow(mask: np.ndarray, npix: int) -> np.ndarray:
    return binary_dilation(mask, iterations=int(npix)) if npix > 0 else mask


def preprocess(raw: np.ndarray, params: CCDParams, master_bias: np.ndarray | None = None, *,
               cosmics: bool = False) -> CCDImage:
    """Correct a raw frame: overscan, master bias, gain, inverse variance, masks, cosmics.

    Parameters
    ----------
    raw : ndarray, shape (rows, cols)
        Raw frame in ADU including the overscan (``uint16`` or float; NaNs allowed).
    params : CCDParams
        Gain, read noise, saturation, sections and cosmic-ray settings.
    master_bias : ndarray, shape of the data section, optional
        Master bias in ADU, itself already overscan-subtracted (e.g. :func:`combine_frames` of
        :func:`overscan_subtract` outputs); removes the 2D bias structure.
    cosmics : bool
        Detect cosmic rays with ``astroscrappy.detect_cosmics`` (gain and read noise set from
        ``params``); flagged pixels get ``Mask.COSMIC`` and ``ivar = 0``. Meant for science and
        standard exposures: on bright flats and arcs L.A.Cosmic takes some sharp fiber peaks
        and line cores for hits (its noise model comes from a median-filtered image), so
        calibration frames should instead be combined with :func:`combine_frames`, whose
        clipping removes their (few) hits.

    Returns
    -------
    CCDImage
        ``image`` in electrons; ``ivar = 1 / (read_noise^2 + max(image, 0))`` (a Poisson +
        read-noise model, robust to negative noise), 0 where a fatal bit is set; ``mask`` with
        ``SATURATED`` (raw at or above ``params.saturation``), ``NONFINITE`` and ``COSMIC``.
    """
    adu, mask = correct_counts(raw, params, master_bias)
    if cosmics:
        mask[cosmic_mask(adu, mask, params)] |= MASK_DTYPE(Mask.COSMIC)
    return to_electrons(adu, mask, params)


def correct_counts(raw: np.ndarray, params: CCDParams,
                   master_bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first steps of :func:`preprocess`: overscan, master bias, saturated and non-finite flags.

    Returns
    -------
    adu : ndarray of float32, shape of the data section
        Bias-subtracted counts (ADU), 0 where not finite.
    mask : ndarray of uint32
        ``SATURATED`` and ``NONFINITE`` bits (the only bits set so far).
    """
    raw_data = np.asarray(raw[params.datasec])
    finite_raw = np.isfinite(raw_data) if raw_data.dtype.kind == "f" else np.ones(raw_data.shape, bool)
    adu = overscan_subtract(raw, params.datasec, params.biassec,
                            sigma=params.overscan_sigma, smooth=params.overscan_smooth)
    if master_bias is not None:
        if master_bias.shape != adu.shape:
            raise ValueError(f"master bias shape {master_bias.shape} != data section {adu.shape}")
        adu -= np.asarray(master_bias, dtype=np.float32)

    mask = np.zeros(adu.shape, dtype=MASK_DTYPE)
    with np.errstate(invalid="ignore"):
        saturated = finite_raw & (raw_data >= params.saturation)
    nonfinite = ~finite_raw | ~np.isfinite(adu)
    mask[saturated] |= MASK_DTYPE(Mask.SATURATED)
    mask[nonfinite] |= MASK_DTYPE(Mask.NONFINITE)
    adu[nonfinite] = 0.0
    return adu, mask


def cosmic_mask(adu: np.ndarray, mask: np.ndarray, params: CCDParams) -> np.ndarray:
    """L.A.Cosmic on counts from :func:`correct_counts`: the flags of ``astroscrappy.detect_cosmics``
    (``sepmed=True``, ``cleantype='meanmask'``), with its iterations after the first recomputed only
    around the newly flagged pixels (:func:`fiberlake.processors.cosmics.detect_cosmics`).

    Every step of the detection is local (the largest window is 7 x 7, a few times over
    ``cr_niter`` iterations), so a column slab with a margin of
    :data:`COSMIC_MARGIN` columns on each side flags its inner columns as the whole frame does.

    Parameters
    ----------
    adu : ndarray of float32, shape (ny, nx)
        Counts (ADU).
    mask : ndarray of uint32
        Bits from :func:`correct_counts` (flagged pixels are ignored by the detection).
    params : CCDParams

    Returns
    -------
    ndarray of bool
        Cosmic-ray pixels (grown by ``cr_grow``), never a non-finite one.
    """
    nonfinite = (mask & MASK_DTYPE(Mask.NONFINITE)) != 0
    crmask = cosmics.detect_cosmics(
        adu, mask != 0, sigclip=params.cr_sigclip, sigfrac=params.cr_sigfrac, objlim=params.cr_objlim,
        gain=params.gain, readnoise=params.read_noise, satlevel=np.inf, niter=params.cr_niter)
    return _grow(crmask, params.cr_grow) & ~nonfinite


COSMIC_MARGIN = 48
"""Columns on each side of a slab whose cosmic-ray flags are discarded: beyond the reach of
every L.A.Cosmic step over its iterations plus ``cr_grow`` (tests/test_chunks.py checks that
slabs flag exactly as the whole frame)."""


def to_electrons(adu: np.ndarray, mask: np.ndarray, params: CCDParams) -> CCDImage:
    """The last step of :func:`preprocess`: electrons, inverse variance, fatal bits to ``ivar = 0``."""
    image = adu * np.float32(params.gain)
    variance = np.float32(params.read_noise) ** 2 + np.maximum(image, 0.0)
    ivar = (1.0 / np.maximum(variance, np.float32(1e-6))).astype(np.float32)
    ivar[(mask & MASK_DTYPE(FATAL)) != 0] = 0.0
    return CCDImage(image=image, ivar=ivar, mask=mask)
