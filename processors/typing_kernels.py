"""Exact fast paths of the frame typer's pre-processing (:mod:`fiberlake.processors.typing_prep`).

Raw frames are unsigned 16-bit integers. On such pixels the trimming profile and the block means
of the resize can be computed with integer arithmetic and fewer passes over the frame, with
results equal, bit for bit, to the float paths that the shipped typing model and the cached
training sets were made with (``tests/test_ingest_speed.py`` compares them on simulated mini and
LAMOST frames and on adversarial arrays).

:func:`row_max_profile_uint` reproduces ``astropy.stats.sigma_clip(axis=0, maxiters=1)`` (median
centre, population standard deviation, astropy's C implementation) followed by each row's
maximum over the pixels kept:

- the median of each column from an exact selection on the integers (``np.partition`` on int32,
  where numpy's selection is vectorised);
- the standard deviation from exact integer sums: ``n sum(x^2) - (sum x)^2`` is an integer,
  so the only rounding is the final ``sqrt``. astropy sums ``(x - mean)^2`` in float64 one term at
  a time, which differs from the exact value by far less than :func:`_guard` (a bound on the
  accumulated rounding of that loop). A pixel is clipped when it lies outside
  ``median -/+ sigma std``; for integer pixels that is decided by the integers ``ceil(lower)`` and
  ``floor(upper)``, which both computations share unless a bound lies within the guard of an
  integer. Such columns (a constant column, whose bounds equal its value; otherwise about one in
  10^6) get astropy's own bounds, from ``sigma_clip`` on those columns alone.
"""

from __future__ import annotations

import numpy as np
from astropy.stats import sigma_clip

from fiberlake.processors.warnings_guard import catch_warnings

PROFILE_BLOCK = 64
"""Columns of the oriented frame (rows of the raw frame) processed at a time (cache-sized)."""
_EXACT_INT64_ROWS = 46_000
"""Longest column whose ``n * sum(x^2)`` fits int64 for 16-bit pixels (n^2 65535^2 < 2^63)."""


def _guard(n: int, centre: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """A bound on how far astropy's float64 bounds can lie from the exact ones (with a wide margin).

    astropy's C loop sums ``n`` non-negative terms ``(x - mean)^2`` in float64, in whatever order
    its compiler chose (relative error below ``n eps`` of the sum in any order), each from a rounded
    ``x - mean`` (``eps`` of ``|mean| + |x - mean|``); carried through ``sqrt`` that is below
    ``n eps std + eps |centre|`` on each bound. The guard is 16 times that, plus 1e-7.
    """
    eps = np.finfo(np.float64).eps
    return 1e-7 + 16.0 * eps * (n * spread + np.abs(centre) + spread)


def _astropy_bounds(columns: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """astropy's own clipping bounds of each column (axis 0), from the float32 pixels it is given."""
    with catch_warnings():
        _, lower, upper = sigma_clip(np.asarray(columns, dtype=np.float32), sigma=sigma, maxiters=1, axis=0,
                                     masked=False, return_bounds=True)
    return np.ravel(lower).astype(np.float64), np.ravel(upper).astype(np.float64)


def row_max_profile_uint(image: np.ndarray, sigma: float) -> np.ndarray | None:
    """Maximum of each row over the pixels that one sigma-clipping pass down each column keeps.

    Equal to ``typing_prep.row_max_profile`` on ``image.astype(np.float32)``; a row whose
    pixels are all clipped gets its unclipped maximum.

    Parameters
    ----------
    image : ndarray of uint8 or uint16, shape (n_spatial, n_spectral)
        Oriented frame (any memory layout; the raw frame's transpose is the fast one).
    sigma : float
        Clipping threshold.

    Returns
    -------
    ndarray of float64, shape (n_spatial,), or None
        None when the exact path does not apply (another dtype, an empty frame, or columns
        longer than :data:`_EXACT_INT64_ROWS`): the caller takes the general path.
    """
    x = np.asarray(image)
    if x.ndim != 2 or x.dtype not in (np.uint8, np.uint16) or 0 in x.shape or x.shape[0] > _EXACT_INT64_ROWS:
        return None
    n, m = x.shape
    k = n // 2
    top = np.iinfo(x.dtype).max
    columns = x.T                                   # row j: column j of the oriented frame
    best = np.zeros(n, dtype=x.dtype)               # maximum kept pixel of each row so far
    kept_any = np.zeros(n, dtype=bool)
    for j0 in range(0, m, PROFILE_BLOCK):
        block = np.ascontiguousarray(columns[j0:j0 + PROFILE_BLOCK])
        values = block.astype(np.float64)
        total = values.sum(axis=1)                  # exact: integers below 2^53
        squares = np.einsum("ij,ij->i", values, values)   # exact: each term below 2^32, the sum below 2^53
        spread2 = n * squares.astype(np.int64) - total.astype(np.int64) ** 2   # n^2 var, exact
        std = np.sqrt(spread2 / n / n)
        part = block.astype(np.int32)               # numpy's SIMD selection covers 32-bit integers (~3x uint16's)
        if n % 2 == 0:
            part.partition(k - 1, axis=1)
            median = 0.5 * (part[:, k - 1].astype(np.float64) + part[:, k:].min(axis=1))
        else:
            part.partition(k, axis=1)
            median = part[:, k].astype(np.float64)
        lower, upper = median - sigma * std, median + sigma * std
        guard = _guard(n, median, sigma * std)
        near = (np.abs(lower - np.rint(lower)) <= guard) | (np.abs(upper - np.rint(upper)) <= guard)
        if near.any():                              # astropy's own arithmetic for these columns
            idx = np.flatnonzero(near)
            lower[idx], upper[idx] = _astropy_bounds(block[idx].T, sigma)
        low = np.clip(np.ceil(lower), 0, top).astype(x.dtype)[:, None]
        high = np.clip(np.floor(upper), 0, top).astype(x.dtype)[:, None]
        keep = block >= low
        keep &= block <= high
        inside = (lower <= top) & (upper >= 0)
        if not inside.all():                        # bounds beyond the dtype's range keep nothing
            keep &= inside[:, None]
        np.maximum(best, (block * keep).max(axis=0), out=best)
        kept_any |= keep.any(axis=0)
    profile = best.astype(np.float64)
    if not kept_any.all():
        rows = ~kept_any
        profile[rows] = x[rows].max(axis=1)
    return profile


def block_mean_uint(image: np.ndarray, fy: int, fx: int) -> np.ndarray | None:
    """Means of ``fy x fx`` blocks of an unsigned 8/16-bit image (edge remainders dropped), float64.

    Equal to ``view.mean(axis=(1, 3), dtype=np.float64)`` of the float32 image: its float64 sum
    of integers is exact in any order, as is the integer sum here, and both divide it by the
    block size once. None for other dtypes or blocks whose sum could exceed 2^32.
    """
    x = np.asarray(image)
    if x.ndim != 2 or x.dtype not in (np.uint8, np.uint16) or fy * fx * int(np.iinfo(x.dtype).max) >= 2**32:
        return None
    if x.strides[0] == x.itemsize and x.strides[1] != x.itemsize:   # a transposed (trimmed) frame: sum its rows
        means = block_mean_uint(x.T, fx, fy)
        return None if means is None else np.ascontiguousarray(means.T)
    ny, nx = x.shape[0] // fy * fy, x.shape[1] // fx * fx
    rows = x[:ny, :nx].reshape(ny // fy, fy, nx).sum(axis=1, dtype=np.uint32)   # fy rows at a time
    sums = rows.reshape(ny // fy, nx // fx, fx).sum(axis=2, dtype=np.uint32)
    return sums / float(fy * fx)


# --------------------------------------------------------------------------------------
# the cosmics channel and the frame's pixel noise, on the raw integers
# --------------------------------------------------------------------------------------
HIT_BLOCK_RAW_ROWS = 64
"""Rows of the raw frame (spectral positions) :func:`cosmic_hit_coords_uint` processes at a time."""
_DIFF_SPAN = 65535
"""Largest magnitude of a difference of two 16-bit pixels."""


def _median_from_counts(counts: np.ndarray, offset: int) -> float:
    """``np.median`` of the integers whose histogram is ``counts`` (value ``i - offset`` at ``counts[i]``).

    For an even count numpy averages the two middle values: for integers below 2^20 their sum is
    exact in float32 and float64 alike, so the result equals ``np.median`` of those integers as
    float32.
    """
    cumulative = np.cumsum(counts)                  # integer-valued (float64 weights stay exact below 2^53)
    n = int(cumulative[-1])
    upper = int(np.searchsorted(cumulative, n // 2, side="right")) - offset
    if n % 2:
        return float(upper)
    lower = int(np.searchsorted(cumulative, n // 2 - 1, side="right")) - offset
    return (lower + upper) / 2.0


def pixel_noise_mad_uint(image: np.ndarray, step: int) -> float | None:
    """The MAD of the differences of neighbouring pixels along every ``step``-th row, exactly.

    Equal to ``median(|d - median(d)|)`` of ``d = np.diff(rows.astype(np.float32), axis=1)``
    (``typing_prep.pixel_noise``), from two histograms of the integer differences instead of two
    selections over floats.

    Parameters
    ----------
    image : ndarray of uint8 or uint16, shape (n_spatial, n_spectral)
        Oriented frame (any memory layout).
    step : int
        Every ``step``-th row is used.

    Returns
    -------
    float or None
        None when the exact path does not apply (another dtype, or fewer than two columns).
    """
    x = np.asarray(image)
    if x.ndim != 2 or x.dtype not in (np.uint8, np.uint16) or x.shape[1] < 2 or x.shape[0] == 0:
        return None
    rows = x[::max(1, int(step))].astype(np.int32)
    diff = np.diff(rows, axis=1).ravel()
    counts = np.bincount(diff + _DIFF_SPAN, minlength=2 * _DIFF_SPAN + 1)
    centre = _median_from_counts(counts, _DIFF_SPAN)
    present = np.flatnonzero(counts)                # the deviations' histogram from the differences' one
    twice_deviation = np.abs(2 * (present - _DIFF_SPAN) - int(round(2 * centre)))   # 2 |d - median|: integers
    return _median_from_counts(np.bincount(twice_deviation, weights=counts[present]), 0) / 2.0


def cosmic_hit_coords_uint(image: np.ndarray, floor: float, contrast: float,
                           pedestal: np.float32) -> tuple[np.ndarray, np.ndarray] | None:
    """Pixels standing above both spectral neighbours by more than ``floor`` and the contrast, exactly.

    Equal to ``typing_prep.cosmic_hits`` on ``image.astype(np.float32)`` given the same ``floor``
    (``sigma`` times the pixel noise, float32) and ``pedestal`` (float32): the rise over the
    brighter neighbour is an integer, so ``rise > floor`` is ``rise > floor(floor)``, decided on
    the 16-bit pixels with a saturating subtraction; the contrast test runs on the candidates in
    float32, as the general path does. The raw frame's rows are the spectral positions, so the
    neighbours are whole neighbouring rows in memory.

    Parameters
    ----------
    image : ndarray of uint8 or uint16, shape (n_spatial, n_spectral)
        Oriented frame; fastest as the transpose of a C-ordered raw frame.
    floor : float
        Minimum rise over the brighter neighbour (ADU).
    contrast : float
        Minimum rise as a fraction of the pixel's level above ``pedestal``.
    pedestal : numpy.float32

    Returns
    -------
    (rows, cols) : tuple of ndarray of int64, or None
        Oriented coordinates of the hits (ordered by spectral position, not row-major); None
        when the exact path does not apply (another dtype).
    """
    x = np.asarray(image)
    if x.ndim != 2 or x.dtype not in (np.uint8, np.uint16):
        return None
    raw = x.T                                       # raw[spectral, spatial]
    n = raw.shape[0]
    empty = np.zeros(0, dtype=np.int64)
    threshold = int(np.floor(np.float32(floor)))
    if n < 3 or threshold >= int(np.iinfo(x.dtype).max):
        return empty, empty
    gain = np.float32(contrast)
    rows_found, cols_found = [], []
    for start in range(1, n - 1, HIT_BLOCK_RAW_ROWS):
        stop = min(start + HIT_BLOCK_RAW_ROWS, n - 1)
        centre = raw[start:stop]
        brighter = np.maximum(raw[start - 1:stop - 1], raw[start + 1:stop + 1])
        rise = np.maximum(centre, brighter)
        rise -= brighter                            # centre - brighter where positive, else 0: no wrap
        flat = np.flatnonzero(rise > threshold)    # 1-D: numpy's fast path (2-D nonzero is ~10x slower)
        if flat.size:
            spectral, spatial = np.divmod(flat, rise.shape[1])
            level = centre[spectral, spatial].astype(np.float32)
            keep = rise[spectral, spatial].astype(np.float32) > gain * (level - pedestal)
            rows_found.append(spatial[keep])
            cols_found.append(spectral[keep] + start)
    if not rows_found:
        return empty, empty
    return np.concatenate(rows_found).astype(np.int64), np.concatenate(cols_found).astype(np.int64)
