"""Pre-processing of raw frames for the frame typer (seed 001, SPIT, section 2.2).

A raw frame becomes a small uint8 image the network reads, in four steps, each a pure function
on arrays:

1. :func:`orient` - the spectral axis along the image's columns, the longer axis of the result
   (the paper's NAXIS1 > NAXIS2). Our instruments disperse along rows (``schemas.instrument``),
   so raw frames are transposed: the result is ``image[spatial, spectral]``.
2. :func:`trim_region` - the data region along the spatial axis: ``astropy.stats.sigma_clip`` down
   each column (the paper's "zero axis"), the maximum of each row, and the 10 % rule from both
   ends: the first row whose maximum exceeds the previous one by more than 10 % starts the data,
   and likewise from the back. Blank rows beyond the slit and the overscan columns of the raw
   frame are left out; a frame with no such jump (a bias, a dark) is kept whole.
3. :func:`resize` - to 210 x 650 (spatial, spectral). The paper interpolates linearly
   (``congrid``); frames much larger than that (LAMOST, 4096 x 4136) are first averaged over
   integer blocks, so a cosmic ray or a fiber is averaged into its output pixel instead of being
   hit or missed by the interpolation (aliasing).
4. :func:`zscale_uint8` - ZSCALE limits (``astropy.visualization.ZScaleInterval``, contrast 0.25),
   scaled to 0-255 and cast to uint8.

:func:`prepare_frame` runs all four; :func:`frame_defect` says when a frame holds nothing a model
could type (blank, saturated, not finite), which the typer reports as ``UNKNOWN``.

Beyond the paper, :func:`prepare_channels` stacks further input channels computed from the same
oriented, trimmed frame (:data:`CHANNELS`): ``asinh`` (:func:`asinh_uint8`, the whole dynamic
range of the resized frame, which ZSCALE clips) and ``cosmics`` (:func:`cosmics_uint8`, cosmic-ray
hits found at full resolution, before the block means average them away, counted on the output
grid). A model's card names the channels it reads; the paper's one channel is the default.
"""

from __future__ import annotations

import numpy as np
from astropy.stats import sigma_clip
from astropy.visualization import ZScaleInterval
from skimage.transform import resize as sk_resize

from fiberlake.processors.typing_kernels import (block_mean_uint, cosmic_hit_coords_uint, pixel_noise_mad_uint,
                                                 row_max_profile_uint)
from fiberlake.processors.warnings_guard import catch_warnings

TARGET_SHAPE: tuple[int, int] = (210, 650)
"""Shape (spatial, spectral) of the network's input (the paper's)."""
ZSCALE_CONTRAST = 0.25
"""Contrast of the ZSCALE interval (the paper's)."""
TRIM_JUMP = 0.10
"""Relative increase of the row maximum that marks the edge of the data region (the paper's 10 %)."""
TRIM_SIGMA = 3.0
"""Threshold (sigma) of the clipping down each column before the row maxima are taken."""
TRIM_MIN_ROWS = 16
"""A data region narrower than this (rows) is not believed: the frame is kept whole."""
SATURATED_FRACTION = 0.5
"""A frame with more than this fraction of its pixels at the saturation level is not typed."""


def prep_config(channels: tuple[str, ...] | list[str] | None = None) -> dict:
    """The pre-processing constants as a dict (recorded in every model card).

    Without ``channels``, the paper's one-channel input (the dict of the first models, which
    carries no ``channels`` entry); with them, the channels in order and their constants.
    """
    config = {"target_shape": list(TARGET_SHAPE), "zscale_contrast": ZSCALE_CONTRAST, "trim_jump": TRIM_JUMP,
              "trim_sigma": TRIM_SIGMA, "trim_min_rows": TRIM_MIN_ROWS, "resize": "block mean then linear",
              "orientation": "image[spatial, spectral]"}
    if channels is not None:
        channels = check_channels(channels)
        config["channels"] = list(channels)
        if "asinh" in channels:
            config["asinh"] = {"softening_adu": ASINH_SOFTENING_ADU, "full_scale_adu": ASINH_FULL_SCALE_ADU,
                               "pedestal": "1st percentile"}
        if "cosmics" in channels:
            config["cosmics"] = {"sigma": COSMIC_SIGMA, "contrast": COSMIC_CONTRAST, "count_scale": COSMIC_COUNT_SCALE,
                                 "neighbours": "along the spectral axis"}
    return config


def orient(image: np.ndarray, dispersion_axis: int | None = 0) -> np.ndarray:
    """Return the frame as ``image[spatial, spectral]``.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
    dispersion_axis : {0, 1, None}
        Axis along which wavelength runs in ``image``: 0 for rows (every instrument of
        :mod:`fiberlake.schemas.instrument`), 1 for columns, ``None`` to assume it runs along
        the longer axis (the paper's rule for Kast, where the axis was not recorded).

    Examples
    --------
    >>> orient(np.zeros((1024, 640))).shape
    (640, 1024)
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"a frame is a 2-D array, not an array of shape {image.shape}")
    if dispersion_axis is None:
        dispersion_axis = 0 if image.shape[0] > image.shape[1] else 1
    if dispersion_axis not in (0, 1):
        raise ValueError(f"dispersion_axis must be 0, 1 or None, not {dispersion_axis!r}")
    return image.T if dispersion_axis == 0 else image


def row_max_profile(image: np.ndarray, sigma: float = TRIM_SIGMA) -> np.ndarray:
    """Maximum of each row after sigma-clipping down each column (the paper's Fig. 2 profile).

    Clipping down the columns (astropy's ``axis=0``, one iteration) drops cosmic rays and other
    outliers before the maxima are taken. A row whose pixels were all clipped gets its unclipped
    maximum.

    The clipping runs without a masked array: ``sigma_clip(masked=False)`` writes NaN into a
    float32 copy where it clips, and ``np.fmax.reduce`` takes each row's maximum ignoring them.
    The result is the one of the masked-array path (clip, fill with -inf in float64, maximum),
    which cost twice as much on a LAMOST frame (tests/test_typing.py checks they are equal).

    Parameters
    ----------
    image : ndarray, shape (n_spatial, n_spectral)
        Oriented frame (:func:`orient`).

    Returns
    -------
    ndarray of float64, shape (n_spatial,)

    Notes
    -----
    uint8 and uint16 frames (raw frames) take an exact integer path,
    :func:`~fiberlake.processors.typing_kernels.row_max_profile_uint`: the same result, ~4x faster.
    """
    exact = row_max_profile_uint(image, sigma)
    if exact is not None:
        return exact
    data = np.asarray(image, dtype=np.float32)
    with catch_warnings():  # all-equal or all-NaN columns, non-finite pixels
        clipped = sigma_clip(data.copy(order="K"), sigma=sigma, maxiters=1, axis=0, masked=False, copy=False)
        prof = np.fmax.reduce(clipped, axis=1).astype(np.float64)
    bad = ~np.isfinite(prof)
    if bad.any():
        prof[bad] = data[bad].max(axis=1)
    return prof


def row_max_profile_masked(image: np.ndarray, sigma: float = TRIM_SIGMA) -> np.ndarray:
    """:func:`row_max_profile` the former way, through a masked array: the reference path.

    Clip down each column, fill the clipped pixels with -inf in float64, take each row's maximum;
    a row whose pixels were all clipped gets its unclipped maximum. ``tests/test_typing.py`` checks
    the two are equal and ``bench/typing.py --prep-only`` times them against each other.
    """
    data = np.asarray(image, dtype=np.float32)
    with catch_warnings():
        clipped = sigma_clip(data, sigma=sigma, maxiters=1, axis=0, masked=True, copy=False)
    prof = np.ma.filled(clipped.astype(np.float64), -np.inf).max(axis=1)
    bad = ~np.isfinite(prof)
    if bad.any():
        prof[bad] = data[bad].max(axis=1)
    return prof


def trim_region(profile: np.ndarray, jump: float = TRIM_JUMP, min_rows: int = TRIM_MIN_ROWS) -> slice:
    """Data region of a row-maximum profile by the 10 % rule, read from both ends.

    From the front, the first row whose value exceeds the previous row's by more than ``jump``
    (relative) starts the region; from the back, the last row that exceeds the row after it by
    more than ``jump`` is the region's last but one: the region keeps one row past the drop (as
    every shipped typing model was trained). Without a jump on either side, or when the region
    would be narrower than ``min_rows``, the whole range is returned.

    Examples
    --------
    >>> trim_region(np.array([10.0] * 20 + [30.0] * 40 + [10.0] * 20))
    slice(20, 61, None)
    >>> trim_region(np.full(50, 10.0))
    slice(0, 50, None)
    """
    v = np.asarray(profile, dtype=np.float64)
    n = v.size
    whole = slice(0, n)
    if n < 2:
        return whole
    up = v[1:] > (1.0 + jump) * v[:-1]          # row i+1 jumps above row i
    down = v[:-1] > (1.0 + jump) * v[1:]        # row i jumps above row i+1
    if not up.any() and not down.any():
        return whole
    start = int(np.argmax(up)) + 1 if up.any() else 0
    stop = int(n - 1 - np.argmax(down[::-1])) + 1 if down.any() else n
    if stop - start < min_rows:
        return whole
    return slice(start, stop)


def _block_mean(image: np.ndarray, fy: int, fx: int) -> np.ndarray:
    ny, nx = image.shape[0] // fy * fy, image.shape[1] // fx * fx
    view = image[:ny, :nx].reshape(ny // fy, fy, nx // fx, fx)
    return view.mean(axis=(1, 3), dtype=np.float64)


def resize(image: np.ndarray, shape: tuple[int, int] = TARGET_SHAPE) -> np.ndarray:
    """Resize to ``shape``: integer block means while the frame is at least twice as large, then linear.

    Returns
    -------
    ndarray of float32, shape ``shape``
    """
    image = np.asarray(image)
    fy, fx = max(1, image.shape[0] // shape[0]), max(1, image.shape[1] // shape[1])
    means = block_mean_uint(image, fy, fx) if fy > 1 or fx > 1 else None   # uint8/16: exact integer sums
    data = means if means is not None else np.asarray(image, dtype=np.float32)
    if means is None and (fy > 1 or fx > 1):
        data = _block_mean(data, fy, fx)
    if data.shape == tuple(shape):
        return data.astype(np.float32)
    out = sk_resize(data, shape, order=1, mode="edge", anti_aliasing=False, preserve_range=True)
    return out.astype(np.float32)


def zscale_uint8(image: np.ndarray, contrast: float = ZSCALE_CONTRAST) -> np.ndarray:
    """ZSCALE display limits (IRAF's algorithm, astropy's implementation) mapped to 0-255 uint8.

    A constant image maps to zeros.
    """
    data = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(data.shape, dtype=np.uint8)
    if not finite.all():
        data = np.where(finite, data, np.median(data[finite]))
    with catch_warnings():
        z1, z2 = ZScaleInterval(contrast=contrast).get_limits(data)
    if not np.isfinite(z1) or not np.isfinite(z2) or z2 <= z1:
        return np.zeros(data.shape, dtype=np.uint8)
    scaled = np.clip((data - z1) / (z2 - z1), 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------
# extra input channels, computed before the resize (beyond the paper)
# --------------------------------------------------------------------------------------
CHANNELS: tuple[str, ...] = ("zscale", "asinh", "cosmics")
"""Input channels a typing network can read, in the order a data set stores them:

``zscale``
    The paper's image (:func:`zscale_uint8` of the resized frame).
``asinh``
    :func:`asinh_uint8` of the resized frame: the whole dynamic range above the frame's
    pedestal, so the brightness of every fiber and the frame's level survive (ZSCALE clips them).
``cosmics``
    :func:`cosmics_uint8`: pixels of the full-resolution frame that stand sharply above all
    their neighbours (cosmic-ray hits), counted in each output pixel; resizing by block means
    averages them away.
"""
PAPER_CHANNELS: tuple[str, ...] = ("zscale",)
"""The paper's input: one ZSCALE channel."""
ASINH_SOFTENING_ADU = 10.0
"""Softening of the asinh stretch (ADU above the pedestal where it turns from linear to logarithmic)."""
ASINH_FULL_SCALE_ADU = 65535.0
"""Level above the pedestal that maps to 255 in the asinh channel (the 16-bit range)."""
COSMIC_SIGMA = 10.0
"""A cosmic-ray pixel exceeds its neighbours by more than this many times the frame's pixel noise."""
COSMIC_CONTRAST = 0.5
"""... and by more than this fraction of its own level above the pedestal (PSF-wide lines and fibers do not)."""
HIT_BLOCK_ROWS = 128
"""Rows :func:`cosmic_hits` processes at a time (speed only)."""
COSMIC_COUNT_SCALE = 32
"""uint8 value of one cosmic-ray pixel in an output pixel of the cosmics channel (8 or more saturate)."""


def check_channels(channels: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate channel names (:data:`CHANNELS`), returning them as a tuple."""
    channels = tuple(str(c) for c in channels)
    unknown = [c for c in channels if c not in CHANNELS]
    if not channels or unknown or len(set(channels)) != len(channels):
        raise ValueError(f"input channels must be distinct names among {CHANNELS}, not {channels}")
    return channels


def asinh_uint8(image: np.ndarray, softening: float = ASINH_SOFTENING_ADU,
                full_scale: float = ASINH_FULL_SCALE_ADU) -> np.ndarray:
    """asinh stretch of a (resized) frame above its pedestal, to 0-255 uint8.

    The pedestal is the 1st percentile (bias level plus the darkest background); the stretch is
    ``asinh((x - pedestal) / softening) / asinh(full_scale / softening)``, clipped to [0, 1]. It is
    absolute (ADU), not relative to the frame: a 10 s standard and a 2,700 s science frame keep
    their levels, and fibers 1,000 times apart in brightness stay apart.

    Examples
    --------
    >>> asinh_uint8(np.array([[100.0, 110.0, 65635.0]])).tolist()
    [[0, 23, 255]]
    """
    data = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(data.shape, dtype=np.uint8)
    data = np.where(finite, data, np.nan)
    pedestal = np.nanpercentile(data, 1.0)
    above = np.clip(np.nan_to_num(data - pedestal, nan=0.0), 0.0, None)
    scaled = np.arcsinh(above / softening) / np.arcsinh(full_scale / softening)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def pixel_noise(image: np.ndarray, step: int = 8) -> float:
    """Robust pixel noise (ADU) of a frame: the MAD of differences of neighbouring pixels along rows.

    Every ``step``-th row is used; the differences of two pixels carry twice a pixel's variance.
    """
    mad = pixel_noise_mad_uint(image, step)        # raw integers: exact histogram medians, same value
    if mad is not None:
        return max(1.4826 * mad / np.sqrt(2.0), 1e-3)
    rows = np.asarray(image, dtype=np.float32)[::max(1, int(step))]
    diff = np.diff(rows, axis=1).ravel()
    if diff.size == 0:
        return 1.0
    mad = float(np.median(np.abs(diff - np.median(diff))))
    return max(1.4826 * mad / np.sqrt(2.0), 1e-3)


def cosmic_hits(image: np.ndarray, sigma: float = COSMIC_SIGMA, contrast: float = COSMIC_CONTRAST) -> np.ndarray:
    """Pixels that stand sharply above both their neighbours along the spectral axis (cosmic-ray hits).

    ``image`` is oriented (``image[spatial, spectral]``, :func:`orient`), so its rows run along
    the fibers: a fiber's neighbours along a row are as bright as itself, and an arc or sky
    line, a line-spread function wide, falls off by a fraction of its peak. A pixel is a hit
    when it exceeds the brighter of its two row neighbours by more than ``sigma`` times
    :func:`pixel_noise` and by more than ``contrast`` times its own level above the pedestal
    (the frame's 1st percentile, the bias level). Cosmic-ray spots and tracks are one or two
    pixels wide and pass (tracks lying within a pixel of a row are missed); edge columns are
    never hits. One pass over the frame finds the candidates; the contrast is tested on them only.

    Returns
    -------
    ndarray of bool, same shape as ``image``
    """
    image = np.asarray(image)
    hits = np.zeros(image.shape, dtype=bool)
    if image.ndim == 2:
        rows, cols = cosmic_hit_coords(image, sigma, contrast)
        hits[rows, cols] = True
    return hits


def cosmic_hit_coords(image: np.ndarray, sigma: float = COSMIC_SIGMA,
                      contrast: float = COSMIC_CONTRAST) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of :func:`cosmic_hits` (the same pixels, without the full-size mask).

    Raw 8/16-bit frames take :func:`~fiberlake.processors.typing_kernels.cosmic_hit_coords_uint`
    (the same pixels, bit for bit); other dtypes the float32 path below.
    """
    image = np.asarray(image)
    if image.ndim != 2 or image.shape[1] < 3 or image.shape[0] == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    floor = np.float32(sigma * pixel_noise(image))
    pedestal = np.float32(np.percentile(image[::8, ::8].astype(np.float32), 1.0))
    coords = cosmic_hit_coords_uint(image, floor, contrast, pedestal)
    if coords is not None:
        return coords
    x = np.asarray(image, dtype=np.float32)
    hits = np.zeros(x.shape, dtype=bool)
    rise = np.empty((min(HIT_BLOCK_ROWS, x.shape[0]), x.shape[1] - 2), dtype=np.float32)
    for start in range(0, x.shape[0], HIT_BLOCK_ROWS):   # blocks of rows: the temporaries stay in cache
        block = x[start:start + HIT_BLOCK_ROWS]
        r = rise[:block.shape[0]]
        np.maximum(block[:, :-2], block[:, 2:], out=r)
        np.subtract(block[:, 1:-1], r, out=r)
        iy, ix = np.nonzero(r > floor)
        if iy.size:
            keep = r[iy, ix] > np.float32(contrast) * (block[iy, ix + 1] - pedestal)
            hits[start + iy[keep], ix[keep] + 1] = True
    return np.nonzero(hits)


def count_map(mask: np.ndarray, shape: tuple[int, int] = TARGET_SHAPE) -> np.ndarray:
    """Number of true pixels of ``mask`` falling in each pixel of a ``shape`` grid laid over it."""
    return count_coords(np.nonzero(mask), np.shape(mask), shape)


def count_coords(coords: tuple[np.ndarray, np.ndarray], image_shape: tuple[int, int],
                 shape: tuple[int, int] = TARGET_SHAPE) -> np.ndarray:
    """Number of the pixels ``coords`` (rows, columns of an ``image_shape`` frame) in each cell of a ``shape`` grid."""
    ys, xs = coords
    ny, nx = image_shape
    iy = (ys.astype(np.int64) * shape[0]) // max(ny, 1)
    ix = (xs.astype(np.int64) * shape[1]) // max(nx, 1)
    counts = np.bincount(iy * shape[1] + ix, minlength=shape[0] * shape[1])
    return counts.reshape(shape)


def cosmics_uint8(image: np.ndarray, shape: tuple[int, int] = TARGET_SHAPE, scale: int = COSMIC_COUNT_SCALE) -> np.ndarray:
    """The cosmics channel: :func:`cosmic_hits` of the full-resolution frame counted on the output grid."""
    counts = count_coords(cosmic_hit_coords(image), np.shape(image), shape)
    return np.minimum(counts * int(scale), 255).astype(np.uint8)


def frame_defect(raw: np.ndarray, saturation: float | None = 65535) -> str | None:
    """Why a frame cannot be typed from its pixels, or None when it can.

    Returns
    -------
    str or None
        ``"empty"`` (no pixels), ``"not finite"`` (no finite pixel), ``"blank"`` (every pixel the
        same value), ``"saturated"`` (more than :data:`SATURATED_FRACTION` of the pixels at
        ``saturation``), or None.
    """
    data = np.asarray(raw)
    if data.ndim != 2 or data.size == 0:
        return "empty"
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.any():
            return "not finite"
        values = data[finite]
    else:
        values = data.ravel()
    if values.min() == values.max():
        return "blank"
    if saturation is not None and np.count_nonzero(values >= saturation) > SATURATED_FRACTION * values.size:
        return "saturated"
    return None


def prepare_frame(raw: np.ndarray, dispersion_axis: int | None = 0) -> np.ndarray:
    """Raw frame to the network's input: orient, trim, resize, ZSCALE (the paper's pre-processing).

    Never raises on pixel values: a blank, saturated or non-finite frame gives a valid (if
    meaningless) image; :func:`frame_defect` tells such frames apart.

    Parameters
    ----------
    raw : ndarray, shape (ny, nx)
        Raw frame (any numeric dtype), overscan included.
    dispersion_axis : {0, 1, None}
        See :func:`orient`.

    Returns
    -------
    ndarray of uint8, shape :data:`TARGET_SHAPE`
    """
    image = orient(raw, dispersion_axis)
    if image.dtype in (np.uint8, np.uint16):  # finite and exact in float32: the integer paths, same result
        return zscale_uint8(resize(image[trim_region(row_max_profile(image))]))
    data = np.asarray(image, dtype=np.float32)
    if not np.isfinite(data).all():
        finite = np.isfinite(data)
        data = np.where(finite, data, np.median(data[finite]) if finite.any() else 0.0).astype(np.float32)
    region = trim_region(row_max_profile(data))
    return zscale_uint8(resize(data[region]))


def prepare_channels(raw: np.ndarray, channels: tuple[str, ...] | list[str] = PAPER_CHANNELS,
                     dispersion_axis: int | None = 0) -> np.ndarray:
    """Raw frame to a multi-channel network input: orient and trim as the paper, then each channel.

    ``zscale`` is :func:`prepare_frame`'s image exactly; ``asinh`` stretches the same resized
    frame; ``cosmics`` counts :func:`cosmic_hits` of the trimmed frame at full resolution.

    Returns
    -------
    ndarray of uint8, shape ``(len(channels),) + TARGET_SHAPE``
    """
    channels = check_channels(channels)
    image = orient(raw, dispersion_axis)
    if image.dtype in (np.uint8, np.uint16):  # finite and exact in float32: the integer paths, same result
        trimmed = image[trim_region(row_max_profile(image))]
    else:
        data = np.asarray(image, dtype=np.float32)
        if not np.isfinite(data).all():
            finite = np.isfinite(data)
            data = np.where(finite, data, np.median(data[finite]) if finite.any() else 0.0).astype(np.float32)
        trimmed = data[trim_region(row_max_profile(data))]
    out = np.empty((len(channels),) + TARGET_SHAPE, dtype=np.uint8)
    resized = resize(trimmed) if {"zscale", "asinh"} & set(channels) else None
    for i, name in enumerate(channels):
        if name == "zscale":
            out[i] = zscale_uint8(resized)
        elif name == "asinh":
            out[i] = asinh_uint8(resized)
        else:
            out[i] = cosmics_uint8(trimmed)
    return out


def flips(image: np.ndarray) -> np.ndarray:
    """The image and its three flips (the paper's augmentation and final scheme).

    Parameters
    ----------
    image : ndarray, shape (H, W) or (C, H, W)
        Flipped along its last two axes.

    Returns
    -------
    ndarray, shape (4,) + image.shape
        Original, flipped left-right, flipped up-down, flipped both ways.
    """
    image = np.asarray(image)
    return np.stack([image, image[..., ::-1], image[..., ::-1, :], image[..., ::-1, ::-1]])


# --------------------------------------------------------------------------------------
# per-frame scalars (beyond the paper): what a frame's counts and levels say, read by the dense layer
# --------------------------------------------------------------------------------------
SCALARS: tuple[str, ...] = ("hit_rate", "level_p50", "level_p90", "level_p99")
"""Per-frame scalars a model can read beside its image (:func:`frame_scalars`)."""
SCALAR_CHANNELS: tuple[str, ...] = ("asinh", "cosmics")
"""The channels the scalars are computed from (whether or not the network's convolutions read them)."""
SCALAR_LEVEL_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)
"""Percentiles of the resized frame's level above its pedestal (``level_p50`` ...)."""


def check_scalars(scalars: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate scalar names (:data:`SCALARS`, any subset in that order), returning them as a tuple."""
    scalars = tuple(str(s) for s in scalars)
    if any(s not in SCALARS for s in scalars) or len(set(scalars)) != len(scalars):
        raise ValueError(f"frame scalars must be distinct names among {SCALARS}, not {scalars}")
    return scalars


def asinh_level(stretched: np.ndarray, softening: float = ASINH_SOFTENING_ADU,
                full_scale: float = ASINH_FULL_SCALE_ADU) -> np.ndarray:
    """ADU above the pedestal of :func:`asinh_uint8` values (its inverse, to the uint8 step).

    Examples
    --------
    >>> np.round(asinh_level(np.array([0, 24, 255])), 1).tolist()
    [0.0, 10.2, 65535.0]
    """
    v = np.asarray(stretched, dtype=np.float64) / 255.0
    return softening * np.sinh(v * np.arcsinh(full_scale / softening))


def frame_scalars(asinh: np.ndarray, cosmics: np.ndarray, raw_pixels: int,
                  scalars: tuple[str, ...] | list[str] = SCALARS) -> np.ndarray:
    """Per-frame scalars from a frame's ``asinh`` and ``cosmics`` channels (:func:`prepare_channels`).

    - ``hit_rate``: ``log10(1 + hits per million raw pixels)``, the hits being those the cosmics
      channel counts (its value / :data:`COSMIC_COUNT_SCALE`, a saturated cell counting 255/32).
      Cosmic rays arrive at a rate per pixel and second, so this is a clock the pixels carry: a
      10-600 s standard has a few, a 300-2700 s science plate or dark tens to hundreds, a bias none;
      per raw pixel, it is the same for a mini and a LAMOST frame.
    - ``level_p50``, ``level_p90``, ``level_p99``: ``log10(1 + ADU)`` of those percentiles of the
      resized frame above its pedestal (:func:`asinh_level` of the asinh channel): absolute
      levels, which ZSCALE removes.

    All are invariant under the four flips.

    Parameters
    ----------
    asinh, cosmics : ndarray of uint8, shape ``TARGET_SHAPE``
    raw_pixels : int
        Pixels of the raw frame (overscan included), ``raw.size``.
    scalars : sequence of str
        Which scalars, in order (:data:`SCALARS`).

    Returns
    -------
    ndarray of float32, shape ``(len(scalars),)``
    """
    scalars = check_scalars(scalars)
    values = {}
    if "hit_rate" in scalars:
        hits = float(np.asarray(cosmics, dtype=np.float64).sum()) / COSMIC_COUNT_SCALE
        values["hit_rate"] = np.log10(1.0 + 1e6 * hits / max(int(raw_pixels), 1))
    levels = [s for s in scalars if s.startswith("level_")]
    if levels:
        pct = np.percentile(np.asarray(asinh), SCALAR_LEVEL_PERCENTILES)
        for q, p in zip(SCALAR_LEVEL_PERCENTILES, asinh_level(pct)):
            values[f"level_p{int(q)}"] = np.log10(1.0 + p)
    return np.array([values[s] for s in scalars], dtype=np.float32)


def prepare_with_scalars(raw: np.ndarray, channels: tuple[str, ...] | list[str] = PAPER_CHANNELS,
                         scalars: tuple[str, ...] | list[str] = SCALARS,
                         dispersion_axis: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """A model's input channels and its per-frame scalars, from one pass of :func:`prepare_channels`.

    Returns
    -------
    image : ndarray of uint8, shape ``(len(channels),) + TARGET_SHAPE``
    values : ndarray of float32, shape ``(len(scalars),)`` (:func:`frame_scalars`)
    """
    channels, scalars = check_channels(channels), check_scalars(scalars)
    needed = channels + tuple(c for c in SCALAR_CHANNELS if c not in channels)
    stack = prepare_channels(raw, needed, dispersion_axis)
    values = frame_scalars(stack[needed.index("asinh")], stack[needed.index("cosmics")], np.asarray(raw).size, scalars)
    return stack[:len(channels)], values
