"""Aberration correction (seed 000): fit the map from the traces, resample frames into it.

:func:`fit_rectification` samples the traces measured on the master flat, labels each sample
with its foot on the trace's Total Least Squares line (:mod:`~fiberlake.processors.rectify_sampling`)
and fits a coordinate map (:mod:`~fiberlake.processors.rectify_map`). :func:`rectify_image`
resamples a CCD-corrected frame (image, inverse variance, mask) into the rectified frame, where
the traces are straight; the same map serves every frame of the night and camera.

Resampling (how flux, variance and mask are carried)
----------------------------------------------------
The 2D map is applied as two exact 1D rebinnings (a two-pass separable warp):

1. along each input row, every input pixel ``[c - 1/2, c + 1/2]`` goes to the rectified
   columns ``[F_x(c - 1/2, r), F_x(c + 1/2, r)]``, and the row is rebinned onto the integer
   output columns;
2. along each of those output columns, every input row ``[r - 1/2, r + 1/2]`` goes to the
   rectified rows of its edges on that column (``F_y`` where ``F_x`` equals the column), and the
   column is rebinned onto the integer output rows.

Each 1D rebinning takes the cumulative flux ``Q`` through the input pixel edges (exact), and
gives an output pixel ``Q(b) - Q(a)`` between its edges ``a, b`` mapped back to the input axis.
``Q`` between edges is interpolated with Keys' cubic convolution (``order=3``, the default) or
linearly (``order=1``: uniform flux within each input pixel, i.e. exact area overlap). Either
way the flux is conserved exactly (the differences telescope: the total is ``Q`` at the ends),
an identity or integer-shift map reproduces the input exactly, and the first moment moves with
the map. The cubic form reproduces a locally quadratic ``Q`` (linear flux density), so it does
not broaden the profiles at second order; the linear form adds up to ``s (1 - s) <= 1/4`` px^2
to the variance of a profile shifted by a fraction ``s`` of a pixel, which then varies across
the CCD with the phase of the shift (measured in ``bench/evaluate_rectify.py``).

Variance is resampled like flux with the positive overlap weights (``order=1``): an output
pixel gets ``sum_j w_j var_j``, so the variance of a sum over several output pixels (a box
aperture, a profile fit) equals that of the input pixels it came from; the per-pixel variance
is then an upper bound (the output pixels are correlated; the covariance is not stored).

Masks: input pixels with ``ivar = 0`` or a fatal bit are *bad*. Their flux and variance are
replaced by linear interpolation along the pass axis from the good neighbours before the
rebinning (so no garbage value leaks into good outputs through the cubic weights), and an output
pixel whose input span is more than ``bad_tolerance`` bad takes the bits of its bad inputs and
``ivar = 0``. Good inputs pass their (non-fatal) bits to every output receiving more than
``min_weight`` of them. An output pixel more than ``bad_tolerance`` outside the input CCD gets
``OFFCCD`` and ``ivar = 0``; a smaller uncovered part is compensated (flux divided by the
covered fraction).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from fiberlake.processors.ccd import CCDImage
from fiberlake.processors.content_cache import ContentCache, content_key
from fiberlake.processors.rectify_map import CoordinateMap, Frame, MapConfig, fit_map
from fiberlake.processors.rectify_sampling import LABELS, SAMPLINGS, build_training_set, trace_lines
from fiberlake.processors.tls import Lines, perpendicular_distance, perpendicular_feet
from fiberlake.schemas.containers import ArrayContainer, TraceSet
from fiberlake.schemas.maskbits import FATAL, MASK_DTYPE, Mask

BAD_TOLERANCE = 0.02
"""Largest fraction of an output pixel's input span that may be bad or off the CCD."""
MIN_WEIGHT = 1e-3
"""Good input pixels pass their mask bits to outputs receiving more than this of them."""
_FATAL = MASK_DTYPE(FATAL)
_BLOCK = 256  # lines per block of the map's evaluation (bounds memory on 4096 x 4096 frames)
_REBIN_ELEMENTS = 1 << 17  # output pixels per block of the 1D rebinning passes (fits the cache)


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class RectifyConfig:
    """How the aberration map is built and applied.

    Attributes
    ----------
    sampling : str
        ``semicircle`` (eq. 13, edge-weighted fibers) or ``uniform``.
    n_samples : int
        Training samples (the paper: ~30,000).
    edge_ratio : float
        End-to-centre ratio of samples per fiber (``semicircle``).
    map : MapConfig
        Map kind and training parameters.
    order : int
        Interpolation of the cumulative flux in the resampling: 3 (cubic) or 1 (linear).
    labels : str
        Target lines of the traces: ``tls`` (each trace's own TLS line, the paper) or ``slit``
        (parallel and equally spaced, :mod:`~fiberlake.processors.rectify_sampling`).
    """

    sampling: str = "semicircle"
    n_samples: int = 30000
    edge_ratio: float = 3.0
    map: MapConfig = field(default_factory=MapConfig)
    order: int = 3
    labels: str = "slit"

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling {self.sampling!r} not one of {SAMPLINGS}")
        if self.labels not in LABELS:
            raise ValueError(f"labels {self.labels!r} not one of {LABELS}")
        if self.order not in (1, 3):
            raise ValueError("order must be 1 or 3")

    def to_dict(self) -> dict:
        """JSON-serialisable fields."""
        return asdict(self)


@dataclass(eq=False)
class Rectification(ArrayContainer):
    """The aberration correction of one camera and night (a calibration product).

    Stored by :class:`~fiberlake.schemas.containers.ArrayContainer` (``map/``, ``config/``,
    ``traces_raw/``, ``samples``, ``residual``, ``straightness_raw``, ``info``).

    Attributes
    ----------
    map : CoordinateMap
        Distorted -> rectified coordinate map (and its inverse).
    config : RectifyConfig
        How it was built.
    traces_raw : TraceSet
        Traces measured on the distorted master flat (the map's inputs).
    samples : ndarray, shape (n, 5)
        Training samples: fiber, column, row, target column, target row.
    residual : ndarray, shape (n_fibers,)
        RMS distance (px) of each fiber's mapped trace (every row) from its label line; NaN for
        dead fibers.
    straightness_raw : ndarray, shape (n_fibers,)
        RMS perpendicular distance (px) of each raw trace from its TLS line.
    info : dict
        Training figures (see :class:`CoordinateMap`) and ``fit_seconds``.
    """

    map: CoordinateMap
    config: RectifyConfig
    traces_raw: TraceSet
    samples: np.ndarray
    residual: np.ndarray
    straightness_raw: np.ndarray
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ fitting
def fit_rectification(traces: TraceSet, nx: int, config: RectifyConfig | None = None,
                      nominal_x: np.ndarray | None = None) -> Rectification:
    """Fit the aberration map of a camera from the traces of its master flat.

    Parameters
    ----------
    traces : TraceSet
        Traces measured on the distorted master flat.
    nx : int
        Columns of the CCD data section.
    config : RectifyConfig, optional
    nominal_x : ndarray, shape (n_fibers,), optional
        Nominal slit columns of the fibers (needed by ``slit`` labels).

    Returns
    -------
    Rectification
    """
    config = config or RectifyConfig()
    t0 = time.perf_counter()
    ts = build_training_set(traces, config.n_samples, config.sampling, edge_ratio=config.edge_ratio,
                            labels=config.labels, nominal_x=nominal_x)
    rmap = fit_map(ts.inputs(), ts.targets(), Frame(traces.ny, nx), config.map)
    residual = label_residual(rmap, traces, ts.lines)
    samples = np.column_stack([ts.fiber, ts.col, ts.row, ts.col_target, ts.row_target])
    info = dict(rmap.info) | {"fit_seconds": time.perf_counter() - t0,
                              "label_rms": float(np.sqrt(np.nanmean(residual**2)))}
    return Rectification(map=rmap, config=config, traces_raw=traces, samples=samples, residual=residual,
                         straightness_raw=trace_straightness(traces), info=info)


def trace_straightness(traces: TraceSet, lines: Lines | None = None) -> np.ndarray:
    """RMS perpendicular distance (px) of each trace (every row) from its TLS line; NaN if dead."""
    rows = np.arange(traces.ny, dtype=float)
    lines = lines or trace_lines(traces, rows)
    d = perpendicular_distance(rows[None, :], traces.x(rows), lines.slope[:, None], lines.intercept[:, None])
    out = np.sqrt(np.mean(d**2, axis=1))
    return np.where(traces.dead | ~np.isfinite(out), np.nan, out)


def label_residual(rmap: CoordinateMap, traces: TraceSet, lines: Lines) -> np.ndarray:
    """RMS distance (px) of each mapped trace (every row) from its foot on the TLS line."""
    rows = np.arange(traces.ny, dtype=float)
    x = traces.x(rows)
    rr = np.broadcast_to(rows, x.shape)
    rt, ct = perpendicular_feet(rr, x, lines.slope[:, None], lines.intercept[:, None])
    fc, fr = rmap.forward(x, rr)
    out = np.sqrt(np.mean((fc - ct) ** 2 + (fr - rt) ** 2, axis=1))
    return np.where(traces.dead | ~np.isfinite(out), np.nan, out)


def map_traces(rmap: CoordinateMap, x: np.ndarray, ny: int) -> tuple[np.ndarray, np.ndarray]:
    """Where points given per distorted row land in the rectified frame, resampled to its rows.

    Parameters
    ----------
    rmap : CoordinateMap
    x : ndarray, shape (n, ny)
        Columns of ``n`` curves at every distorted row (e.g. true traces).
    ny : int

    Returns
    -------
    col, row_src : ndarray, shape (n, ny)
        Rectified column of each curve at every rectified row, and the distorted row that maps
        there (fractional; for resampling per-row quantities such as wavelengths).
    """
    rows = np.arange(ny, dtype=float)
    fc, fr = rmap.forward(x, np.broadcast_to(rows, x.shape))
    col = np.empty_like(fc)
    src = np.empty_like(fc)
    for i in range(x.shape[0]):
        order = np.argsort(fr[i])
        col[i] = np.interp(rows, fr[i][order], fc[i][order])
        src[i] = np.interp(rows, fr[i][order], rows[order])
    return col, src


def truth_in_frame(rmap: CoordinateMap, true_x: np.ndarray, true_wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row truths of the distorted frame (trace columns, wavelengths) moved to the rectified frame.

    Parameters
    ----------
    rmap : CoordinateMap
    true_x, true_wave : ndarray, shape (n_fibers, ny)
        True trace column and wavelength at every distorted row.

    Returns
    -------
    x, wave : ndarray, shape (n_fibers, ny)
        Trace column and wavelength at every rectified row (the image of the true trace; the
        wavelength of the distorted row that lands there, interpolated).
    """
    ny = true_x.shape[1]
    x, src = map_traces(rmap, true_x, ny)
    rows = np.arange(ny, dtype=float)
    wave = np.stack([np.interp(s, rows, w) for s, w in zip(src, true_wave)])
    return x, wave


# --------------------------------------------------------------------------- resampling
def _locate(breaks: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Fractional index where each line's increasing breakpoints reach each query.

    ``breaks`` (L, n + 1) increasing along axis 1; ``queries`` (m,) or (L, m). Returns
    ``tau`` (L, m) with ``breaks[l](tau) = query`` for piecewise-linear ``breaks(tau)``
    through ``(k, breaks[l, k])``, extended linearly beyond both ends.
    """
    L, n1 = breaks.shape
    q = np.broadcast_to(np.asarray(queries, float), (L, np.shape(queries)[-1]))
    flat = breaks.ravel()
    base = (np.arange(L, dtype=np.int64) * n1)[:, None]
    # maps here are close to linear along a line: start from the linear guess, step by one
    first, last = breaks[:, :1], breaks[:, -1:]
    k = np.clip(np.floor((q - first) * ((n1 - 1) / (last - first))), 0, n1 - 2).astype(np.int64)
    for _ in range(12):
        b0 = flat[k + base]
        b1 = flat[k + 1 + base]
        up = (q >= b1) & (k < n1 - 2)
        down = (q < b0) & (k > 0)
        if not (up.any() or down.any()):
            break
        k += up
        k -= down
    else:  # far from linear: exact search
        off = (np.arange(L, dtype=float) * (float(np.ptp(breaks)) + float(np.ptp(q)) + 1.0)
               - min(float(breaks.min()), float(q.min())))[:, None]
        k = np.searchsorted((breaks + off).ravel(), (q + off).ravel(), side="right").reshape(q.shape) - 1
        k = np.clip(k - base, 0, n1 - 2)
        b0, b1 = flat[k + base], flat[k + 1 + base]
    return k + (q - b0) / (b1 - b0)


def _lerp(values: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``values`` (L, n + 1) at fractional indices ``tau`` (L, m), extended."""
    L, n1 = values.shape
    k = np.clip(np.floor(tau).astype(np.int64), 0, n1 - 2)
    f = tau - k
    flat = values.ravel()
    idx = k + (np.arange(L, dtype=np.int64) * n1)[:, None]
    v0 = flat[idx]
    return v0 + f * (flat[idx + 1] - v0)


def _fill_bad(arrays: list[np.ndarray], bad: np.ndarray) -> None:
    """In place: replace bad samples along axis 1 by linear interpolation between the nearest
    good samples of the same line (the nearest one past a line end; 0 if the line has none)."""
    badpos = np.flatnonzero(bad)
    if badpos.size == 0:
        return
    n = bad.shape[1]
    goodpos = np.flatnonzero(~bad)
    line = badpos // n
    if goodpos.size == 0:
        for a in arrays:
            a.ravel()[badpos] = 0.0
        return
    j = np.searchsorted(goodpos, badpos)
    left = goodpos[np.clip(j - 1, 0, goodpos.size - 1)]
    right = goodpos[np.clip(j, 0, goodpos.size - 1)]
    has_l = (j > 0) & (left // n == line)
    has_r = (j < goodpos.size) & (right // n == line)
    t = np.where(has_l & has_r, (badpos - left) / np.maximum(right - left, 1), 0.0)
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError("_fill_bad works in place on C-contiguous arrays")
        flat = a.reshape(-1)
        vl, vr = flat[left], flat[right]
        flat[badpos] = np.where(has_l & has_r, vl + t * (vr - vl), np.where(has_l, vl, np.where(has_r, vr, 0.0)))


def _keys_weights(f: np.ndarray, a: float = -0.5) -> tuple[np.ndarray, ...]:
    """Keys cubic-convolution weights of the samples at offsets -1, 0, 1, 2 for fraction ``f``."""
    g = f - 1.0
    wm = (a * f) * g * g
    w2 = (-a * f) * f * g
    w0 = ((a + 2.0) * f - (a + 3.0)) * f * f + 1.0
    return wm, w0, 1.0 - wm - w0 - w2, w2


def _padded_cumsum(q: np.ndarray) -> np.ndarray:
    """``Q`` (L, n + 1): cumulative sums through the pixel edges 0..n."""
    L, n = q.shape
    Q = np.empty((L, n + 1))
    Q[:, 0] = 0.0
    np.cumsum(q, axis=1, out=Q[:, 1:])
    return Q


def _rebin_lines(q, var, bad, bits, tau, n_out, order, bad_tol, min_weight):
    """One pass: rebin each line (axis 1) of ``q``, ``var``, bad flags and mask bits.

    ``tau`` (L, n_out + 1): input coordinate (fractional pixel-edge index) of every output pixel
    edge along each line (:func:`_locate` of the output edges ``m - 1/2`` in the lines'
    breakpoints). Returns the rebinned flux, variance, bad flags and bits (``OFFCCD`` added where
    uncovered), each (L, n_out).
    """
    L, n = q.shape
    tc = np.clip(tau, 0.0, float(n))
    span = tau[:, 1:] - tau[:, :-1]
    cspan = tc[:, 1:] - tc[:, :-1]
    cover = np.where(span > 0, cspan / np.where(span > 0, span, 1.0), 0.0)
    k = np.minimum(tc.astype(np.int64), n - 1)  # tc >= 0: truncation is floor
    f = tc - k
    bad = np.ascontiguousarray(bad)
    any_bad = bool(bad.any())
    # values padded by one pixel at each end (the end pixel repeated): qp[:, j + 1] = q[:, j]
    vf = np.array(var, dtype=float, order="C")
    qp = np.empty((L, n + 2))
    if any_bad:
        qf = np.array(q, dtype=float, order="C")
        _fill_bad([qf, vf], bad)
        qp[:, 1:-1] = qf
    else:
        qp[:, 1:-1] = q
    qp[:, 0], qp[:, -1] = qp[:, 1], qp[:, -2]
    rows = np.arange(L, dtype=np.int64)[:, None]
    iq = rows * (n + 2) + k + 1  # q[k] in qp
    iQ = rows * (n + 1) + k  # Q(k)
    qflat = qp.ravel()
    Qk = _padded_cumsum(qp[:, 1:-1]).ravel()[iQ]
    qk = qflat[iq]
    if order == 3:
        # Q(k + f) by Keys' cubic through Q(k - 1..k + 2), written with the pixel values:
        # Q(k - 1) = Q(k) - q[k - 1], Q(k + 1) = Q(k) + q[k], Q(k + 2) = Q(k) + q[k] + q[k + 1]
        wm, _, w1, w2 = _keys_weights(f)
        c = Qk - wm * qflat[iq - 1] + (w1 + w2) * qk + w2 * qflat[iq + 1]
    else:
        c = Qk + f * qk
    flux = c[:, 1:] - c[:, :-1]
    c = _padded_cumsum(vf).ravel()[iQ] + f * vf.ravel()[rows * n + k]
    v = c[:, 1:] - c[:, :-1]
    off = cover < 1.0 - bad_tol
    ok = (cover > 0) & ~off & (cover < 1.0)
    if ok.any():
        flux = np.where(ok, flux / np.where(ok, cover, 1.0), flux)
        v = np.where(ok, v / np.where(ok, cover, 1.0), v)
    # bad fractions and mask bits, only at outputs overlapping a bad or flagged input pixel
    worse = np.zeros((L, n_out), bool)
    out_bits = np.zeros((L, n_out), MASK_DTYPE)
    flagged = (bits != 0) | bad
    if flagged.any():
        cnt = np.zeros((L, n + 1), np.int32)
        np.cumsum(flagged, axis=1, out=cnt[:, 1:])
        lo = k[:, :-1]
        hi = np.clip(np.ceil(tc[:, 1:]).astype(np.int64) - 1, 0, n - 1)
        touch = np.take_along_axis(cnt, hi + 1, axis=1) - np.take_along_axis(cnt, lo, axis=1) > 0
        li, mi = np.nonzero(touch)
        lo_s, hi_s = lo[li, mi], hi[li, mi]
        a, b = tc[li, mi], tc[li, mi + 1]
        good_bits = np.zeros(li.size, MASK_DTYPE)
        bad_bits = np.zeros(li.size, MASK_DTYPE)
        bad_w = np.zeros(li.size)
        for kk in range(int((hi_s - lo_s).max(initial=0)) + 1):
            j = np.minimum(lo_s + kk, n - 1)
            w = np.where(lo_s + kk <= hi_s, np.minimum(b, j + 1.0) - np.maximum(a, j.astype(float)), 0.0)
            jb = bad[li, j]
            bad_w += np.where(jb, w, 0.0)
            jbits = np.where(w > min_weight, bits[li, j], MASK_DTYPE(0))
            good_bits |= np.where(jb, MASK_DTYPE(0), jbits)
            bad_bits |= np.where(jb, jbits, MASK_DTYPE(0))
        cs = cspan[li, mi]
        wr = bad_w > bad_tol * np.where(cs > 0, cs, 0.0)
        worse[li, mi] = wr
        out_bits[li, mi] = good_bits | np.where(wr, bad_bits, MASK_DTYPE(0))
    if off.any():
        out_bits |= np.where(off, MASK_DTYPE(Mask.OFFCCD), MASK_DTYPE(0))
    return flux, v, worse | off | ~(cover > 0), out_bits


def _pass(q, var, bad, bits, tau_fn, n_lines, n_out, order, bad_tol, min_weight, transpose=False):
    """Rebin ``n_lines`` lines in blocks; outputs (n_lines, n_out), or their transposes."""
    shape = (n_out, n_lines) if transpose else (n_lines, n_out)
    outs = [np.empty(shape, np.float32), np.empty(shape), np.empty(shape, bool), np.empty(shape, MASK_DTYPE)]
    step = max(8, _REBIN_ELEMENTS // (n_out + 1))  # lines whose arrays stay in the CPU's cache
    for s in range(0, n_lines, step):
        e = min(n_lines, s + step)
        res = _rebin_lines(q(s, e), var(s, e), bad(s, e), bits(s, e), tau_fn(s, e), n_out, order,
                           bad_tol, min_weight)
        for o, r in zip(outs, res):
            if transpose:
                o[:, s:e] = r.T
            else:
                o[s:e] = r
    return outs


def rectify_image(image: np.ndarray, ivar: np.ndarray, mask: np.ndarray | None, rmap: CoordinateMap, *,
                  order: int = 3, bad_tolerance: float = BAD_TOLERANCE, min_weight: float = MIN_WEIGHT,
                  ) -> CCDImage:
    """Resample a CCD-corrected frame into the rectified frame of ``rmap`` (module notes).

    Parameters
    ----------
    image, ivar : ndarray, shape (ny, nx)
        Frame (electrons) and inverse variance (0 = bad).
    mask : ndarray of uint32, shape (ny, nx), or None
        2D mask bits.
    rmap : CoordinateMap
        Map fitted on a frame of this shape.
    order : int
        3: cubic interpolation of the cumulative flux; 1: linear (exact area overlap).
    bad_tolerance : float
        Largest bad or off-CCD fraction of an output pixel's input span that is compensated
        rather than flagged.
    min_weight : float
        Smallest fraction of a good input pixel that passes its mask bits on.

    Returns
    -------
    CCDImage
        Rectified image, inverse variance (0 where flagged) and mask; never NaN.

    Raises
    ------
    ValueError
        If the shapes disagree or the map folds (is not monotonic along a pass).
    """
    ny, nx = np.shape(image)
    if (rmap.frame.ny, rmap.frame.nx) != (ny, nx):
        raise ValueError(f"map fitted on {rmap.frame.ny}x{rmap.frame.nx}, frame is {ny}x{nx}")
    return rectify_columns(image, ivar, mask, rmap, col0=0, out=(0, nx), order=order,
                           bad_tolerance=bad_tolerance, min_weight=min_weight)


def source_columns(rmap: CoordinateMap, out: tuple[int, int], pad: int = 4) -> tuple[int, int]:
    """CCD columns ``[a, b)`` that the rectified columns ``out = [c0, c1)`` are resampled from.

    The inverse map of the two outer column edges over every row, widened by ``pad`` columns
    (the cubic interpolation reaches one pixel beyond an output pixel's span) and clipped to the CCD.
    """
    ny, nx = rmap.frame.ny, rmap.frame.nx
    rows = np.arange(ny + 1, dtype=float) - 0.5
    src, _ = rmap.inverse_grid(np.array([out[0] - 0.5, out[1] - 0.5]), rows)
    return max(0, int(np.floor(src[:, 0].min())) - pad), min(nx, int(np.ceil(src[:, 1].max())) + pad + 1)


def rectify_columns(image: np.ndarray, ivar: np.ndarray, mask: np.ndarray | None, rmap: CoordinateMap, *,
                    col0: int, out: tuple[int, int], order: int = 3, bad_tolerance: float = BAD_TOLERANCE,
                    min_weight: float = MIN_WEIGHT, plan: ResamplePlan | None = None) -> CCDImage:
    """:func:`rectify_image` of a column slab: the rectified columns ``out = [c0, c1)`` from the CCD
    columns ``[col0, col0 + width)`` held in ``image``, ``ivar`` and ``mask`` (every row).

    The slab must hold every column the outputs are resampled from (:func:`source_columns`);
    then the output equals those columns of :func:`rectify_image` of the whole frame, up to the
    rounding of the cumulative sums (they start at the slab's first column). Raises ValueError
    when an inner edge of the slab is too close to the columns it must deliver.

    ``plan`` (:func:`resample_plan` of the same map and columns) holds the resampling's geometry,
    which is the same for every frame of a calibration set; without it the geometry is computed
    here, in float64 (the plan keeps the fractional input positions in float32: the outputs then
    agree to ~1e-6 of a pixel's value, ``tests/test_rectify_plan.py``).
    """
    img = np.asarray(image, np.float32)
    iv = np.asarray(ivar, np.float32)
    ny, nx = img.shape
    o0, o1 = int(out[0]), int(out[1])
    if iv.shape != img.shape or (mask is not None and np.shape(mask) != img.shape):
        raise ValueError("image, ivar and mask must have one shape")
    if rmap.frame.ny != ny or col0 < 0 or col0 + nx > rmap.frame.nx or not 0 <= o0 < o1 <= rmap.frame.nx:
        raise ValueError(f"map fitted on {rmap.frame.ny}x{rmap.frame.nx}: columns {col0}+{nx} x {ny} rows "
                         f"to {o0}..{o1} do not fit")
    n_out = o1 - o0
    msk = np.zeros((ny, nx), MASK_DTYPE) if mask is None else np.asarray(mask, MASK_DTYPE)
    finite = np.isfinite(img) & np.isfinite(iv)
    bad = ~finite | ~(iv > 0) | ((msk & _FATAL) != 0)
    if (~finite).any():
        msk = msk | np.where(~finite, MASK_DTYPE(Mask.NONFINITE), MASK_DTYPE(0))
    img = np.where(bad, np.float32(0), img)
    with np.errstate(divide="ignore"):
        var = np.where(bad, np.float32(0), np.float32(1) / np.where(bad, np.float32(1), iv))

    geometry = plan if plan is not None else _Geometry(rmap, col0, nx, ny, o0, o1)
    if plan is not None and (plan.col0, plan.nx, plan.ny, plan.out) != (col0, nx, ny, (o0, o1)):
        raise ValueError(f"plan for columns {plan.col0}+{plan.nx} -> {plan.out}, slab {col0}+{nx} -> {(o0, o1)}")
    p1 = _pass(lambda s, e: img[s:e], lambda s, e: var[s:e], lambda s, e: bad[s:e], lambda s, e: msk[s:e],
               geometry.tau1, ny, n_out, order, bad_tolerance, min_weight)
    t_flux, t_var, t_bad, t_bits = p1
    p2 = _pass(lambda s, e: t_flux[:, s:e].T, lambda s, e: t_var[:, s:e].T, lambda s, e: t_bad[:, s:e].T,
               lambda s, e: t_bits[:, s:e].T, geometry.tau2, n_out, ny, order, bad_tolerance, min_weight, transpose=True)
    flux, v, obad, obits = p2
    fatal = obad | ((obits & _FATAL) != 0)
    good = ~fatal & (v > 0)
    out_ivar = np.zeros((ny, n_out), np.float32)
    np.divide(1.0, v, out=out_ivar, where=good, casting="unsafe")
    flux[~np.isfinite(flux)] = 0.0
    return CCDImage(image=flux, ivar=out_ivar, mask=obits)


class _Geometry:
    """Where the output pixel edges of both passes of :func:`rectify_columns` fall on the input
    lines, computed block by block from the map (float64)."""

    def __init__(self, rmap: CoordinateMap, col0: int, nx: int, ny: int, o0: int, o1: int) -> None:
        # map at every pixel corner, stored as displacements (float32: ~1e-6 px, half the memory)
        col_edges = np.arange(nx + 1, dtype=float) - 0.5
        if col0:
            col_edges += col0
        row_edges = np.arange(ny + 1, dtype=float) - 0.5
        dfx = np.empty((ny + 1, nx + 1), np.float32)
        dfy = np.empty((ny + 1, nx + 1), np.float32)
        for s in range(0, ny + 1, _BLOCK):
            e = min(ny + 1, s + _BLOCK)
            fx, fy = rmap.forward_grid(col_edges, row_edges[s:e])
            dfx[s:e] = fx - col_edges[None, :]
            dfy[s:e] = fy - row_edges[s:e, None]
        # rectified row of every row edge along each output column (where F_x = column)
        cols_out = np.arange(o0, o1, dtype=float)
        dyb = np.empty((o1 - o0, ny + 1), np.float32)
        for s in range(0, ny + 1, _BLOCK):
            e = min(ny + 1, s + _BLOCK)
            fx = col_edges[None, :] + dfx[s:e]
            _check_monotonic(fx, "columns")
            tau = _locate(fx, cols_out)
            dyb[:, s:e] = _lerp(dfy[s:e].astype(float), tau).T
        self.col_edges, self.row_edges, self.dfx, self.dyb = col_edges, row_edges, dfx, dyb
        self.inner = (col0 > 0, col0 + nx < rmap.frame.nx)  # slab edges that are not the CCD's
        self.col0, self.nx, self.o0, self.o1, self.ny = col0, nx, o0, o1, ny

    def tau1(self, s: int, e: int) -> np.ndarray:
        """Pass 1, input rows ``s..e``: input column edge index of every output column edge."""
        dfx, o0, o1 = self.dfx, self.o0, self.o1
        b = self.col_edges[None, :] + 0.5 * (dfx[s:e].astype(float) + dfx[s + 1:e + 1])
        _check_monotonic(b, "columns")
        if (self.inner[0] and float(b[:, 2].max()) > o0 - 0.5) or (self.inner[1] and float(b[:, -3].min()) < o1 - 0.5):
            raise ValueError(f"columns {self.col0}..{self.col0 + self.nx} do not cover the rectified columns "
                             f"{o0}..{o1}")
        if o0:
            b -= o0
        return _locate(b, np.arange(o1 - o0 + 1, dtype=float) - 0.5)

    def tau2(self, s: int, e: int) -> np.ndarray:
        """Pass 2, output columns ``s..e``: input row edge index of every output row edge."""
        b = self.row_edges[None, :] + self.dyb[s:e].astype(float)
        _check_monotonic(b, "rows")
        return _locate(b, np.arange(self.ny + 1, dtype=float) - 0.5)


@dataclass(frozen=True, eq=False)
class ResamplePlan:
    """The geometry of :func:`rectify_columns` for one slab of one map: the input position of every
    output pixel edge in both passes, as an integer pixel (int16) and a fraction (float32).

    The same for every frame of a calibration set: :func:`resample_plan` keeps the last ones.
    About 12 bytes per output pixel (200 MB for a 4096 x 4096 frame).
    """

    col0: int
    nx: int
    ny: int
    out: tuple[int, int]
    k1: np.ndarray
    f1: np.ndarray
    k2: np.ndarray
    f2: np.ndarray

    @classmethod
    def build(cls, rmap: CoordinateMap, col0: int, nx: int, ny: int, out: tuple[int, int]) -> ResamplePlan:
        o0, o1 = int(out[0]), int(out[1])
        geometry = _Geometry(rmap, col0, nx, ny, o0, o1)
        parts = {}
        for name, tau_fn, n_lines, n_edges in (("1", geometry.tau1, ny, o1 - o0 + 1), ("2", geometry.tau2, o1 - o0, ny + 1)):
            k = np.empty((n_lines, n_edges), np.int16)
            f = np.empty((n_lines, n_edges), np.float32)
            for s in range(0, n_lines, _BLOCK):
                e = min(n_lines, s + _BLOCK)
                tau = tau_fn(s, e)
                if not np.all(np.abs(tau) < np.iinfo(np.int16).max - 1):
                    raise ValueError("the rectification map moves pixels beyond the plan's range")
                whole = np.floor(tau)
                k[s:e] = whole
                f[s:e] = tau - whole
            for a in (k, f):
                a.setflags(write=False)  # shared between frames and threads: never changed in place
            parts["k" + name], parts["f" + name] = k, f
        return cls(col0=int(col0), nx=int(nx), ny=int(ny), out=(o0, o1), **parts)

    def tau1(self, s: int, e: int) -> np.ndarray:
        return self.k1[s:e] + self.f1[s:e].astype(float)

    def tau2(self, s: int, e: int) -> np.ndarray:
        return self.k2[s:e] + self.f2[s:e].astype(float)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.k1, self.f1, self.k2, self.f2))


RESAMPLE_PLAN_BYTES = 512 << 20
"""Bytes of :class:`ResamplePlan` that :func:`resample_plan` keeps (the least recently used go
first): two LAMOST calibration sets, whole or in tiles."""
_plans: ContentCache[ResamplePlan] = ContentCache(lambda plan: plan.nbytes, max_bytes=RESAMPLE_PLAN_BYTES)


def resample_plan(rmap: CoordinateMap, col0: int, nx: int, out: tuple[int, int]) -> ResamplePlan:
    """:meth:`ResamplePlan.build`, kept for the next frames (keyed by the map's content, so a
    calibration set loaded again hits)."""
    key = content_key(rmap.to_arrays(), int(col0), int(nx), int(rmap.frame.ny), int(out[0]), int(out[1]))
    return _plans.get(key, lambda: ResamplePlan.build(rmap, col0, nx, rmap.frame.ny, out))


def _check_monotonic(b: np.ndarray, what: str) -> None:
    if not np.all(np.diff(b, axis=1) > 0):
        raise ValueError(f"the rectification map folds along the {what} (not monotonic); refit it")


# ------------------------------------------------------------------------------ PSF shape
def spot_moments(image: np.ndarray, ivar: np.ndarray, cols: np.ndarray, rows: np.ndarray, *,
                 half_x: int = 7, half_y: int = 7, sigma0: float = 2.0, n_iter: int = 30) -> dict[str, np.ndarray]:
    """Adaptive (Gaussian-weighted) second moments and weighted skewness of point-like spots.

    The weight is an elliptical Gaussian iterated to the spot's own moments (Bernstein &
    Jarvis 2002): ``W = exp(-x^T M^-1 x / 2)`` and ``M <- 2 sum(I W x x^T) / sum(I W)``, which
    for a Gaussian spot converges to its covariance; the weight makes the figures insensitive
    to the window edges and to the neighbouring fibers (16 px away) that a plain moment would
    add. The background is the median of the window's border pixels.

    Parameters
    ----------
    image, ivar : ndarray, shape (ny, nx)
    cols, rows : ndarray, shape (n,)
        Approximate spot centres (column, row).
    half_x, half_y : int
        Half sizes of the window (pixels).
    sigma0 : float
        Starting Gaussian sigma of the weight (pixels).
    n_iter : int
        Iterations.

    Returns
    -------
    dict of ndarray, shape (n,)
        ``x``, ``y`` (weighted centroid), ``mxx``, ``myy``, ``mxy`` (px^2, including the
        pixel's own 1/12), ``skew_x``, ``skew_y`` (weighted third moment over ``m^1.5``),
        ``flux`` (background-subtracted window sum) and ``ok`` (inside the CCD, no bad pixel
        in the window, converged).
    """
    img = np.asarray(image, float)
    iv = np.asarray(ivar, float)
    ny, nx = img.shape
    cols = np.asarray(cols, float)
    rows = np.asarray(rows, float)
    ci = np.rint(cols).astype(np.int64)
    ri = np.rint(rows).astype(np.int64)
    inside = (ci - half_x >= 0) & (ci + half_x < nx) & (ri - half_y >= 0) & (ri + half_y < ny)
    ci, ri = np.where(inside, ci, half_x), np.where(inside, ri, half_y)
    ox = np.arange(-half_x, half_x + 1)
    oy = np.arange(-half_y, half_y + 1)
    rr = ri[:, None, None] + oy[None, :, None]
    cc = ci[:, None, None] + ox[None, None, :]
    win = img[rr, cc]
    good = np.all(iv[rr, cc] > 0, axis=(1, 2)) & inside
    border = np.concatenate([win[:, 0, :], win[:, -1, :], win[:, :, 0], win[:, :, -1]], axis=1)
    win = win - np.median(border, axis=1)[:, None, None]
    gx = (cc - cols[:, None, None]).astype(float)
    gy = (rr - rows[:, None, None]).astype(float)
    xc, yc = cols.copy(), rows.copy()
    mxx = np.full(cols.size, sigma0**2)
    myy = mxx.copy()
    mxy = np.zeros(cols.size)
    converged = np.zeros(cols.size, bool)
    for _ in range(n_iter):
        dx = gx + (cols - xc)[:, None, None]
        dy = gy + (rows - yc)[:, None, None]
        det = mxx * myy - mxy**2
        with np.errstate(all="ignore"):
            q = (myy[:, None, None] * dx**2 - 2 * mxy[:, None, None] * dx * dy + mxx[:, None, None] * dy**2) / det[:, None, None]
            w = win * np.exp(-0.5 * q)
            s0 = w.sum(axis=(1, 2))
            ex = (w * dx).sum(axis=(1, 2)) / s0
            ey = (w * dy).sum(axis=(1, 2)) / s0
            nxx = 2 * (w * (dx - ex[:, None, None]) ** 2).sum(axis=(1, 2)) / s0
            nyy = 2 * (w * (dy - ey[:, None, None]) ** 2).sum(axis=(1, 2)) / s0
            nxy = 2 * (w * (dx - ex[:, None, None]) * (dy - ey[:, None, None])).sum(axis=(1, 2)) / s0
        xc, yc = xc + ex, yc + ey
        change = np.abs(nxx - mxx) + np.abs(nyy - myy) + np.abs(ex) + np.abs(ey)
        converged = np.isfinite(change) & (change < 1e-6)
        mxx = np.where(np.isfinite(nxx) & (nxx > 0.05), nxx, mxx)
        myy = np.where(np.isfinite(nyy) & (nyy > 0.05), nyy, myy)
        mxy = np.where(np.isfinite(nxy), np.clip(nxy, -0.95 * np.sqrt(mxx * myy), 0.95 * np.sqrt(mxx * myy)), mxy)
    dx = gx + (cols - xc)[:, None, None]
    dy = gy + (rows - yc)[:, None, None]
    with np.errstate(all="ignore"):
        q = (myy[:, None, None] * dx**2 - 2 * mxy[:, None, None] * dx * dy + mxx[:, None, None] * dy**2) / (
            mxx * myy - mxy**2)[:, None, None]
        w = win * np.exp(-0.5 * q)
        s0 = w.sum(axis=(1, 2))
        skew_x = (w * dx**3).sum(axis=(1, 2)) / s0 / (mxx / 2) ** 1.5
        skew_y = (w * dy**3).sum(axis=(1, 2)) / s0 / (myy / 2) ** 1.5
    ok = good & converged & (s0 > 0) & np.isfinite(skew_x) & np.isfinite(skew_y)
    return {"x": xc, "y": yc, "mxx": mxx, "myy": myy, "mxy": mxy, "skew_x": skew_x, "skew_y": skew_y,
            "flux": win.sum(axis=(1, 2)), "ok": ok}
