"""Training samples of the aberration map: points on the traces and their TLS labels.

Seed 000, sections 3.1-3.3 and 4.1. The inputs are points of the fiber traces measured on the
master flat; the target of each point is its foot of perpendicular on the trace's Total Least
Squares line (:mod:`fiberlake.processors.tls`). Samples are not taken at every row:

* ``semicircle`` (the paper's scheme, eq. 13): along each trace, ``n`` points of equal arc
  length on a semicircle of radius ``R`` spanning the rows are projected onto the row axis,
  ``x_i = R - R cos(pi (i - 1) / (n - 1))``, and rounded to rows, so samples are dense at both
  ends of the CCD (where the pincushion bends the traces most) and sparse in the middle; and
  fibers near the edges of the slit get more points than those in the middle (their ``n``
  grows quadratically with the distance from the slit centre, ``edge_ratio`` times more at the
  ends). ``R = (ny - 1) / 2``: the paper's "half the CCD size" (2048 for 4096 rows), taken
  between the first and last pixel centres so that the end points are rows of the CCD.
* ``uniform`` (the baseline the issue asks for): the same number of points on every live
  fiber, equally spaced in rows.

Labels: ``tls`` (the paper) puts each trace on its own TLS line, so the rectified fibers keep the
spacing they had on the distorted frame (wider toward the edges of a pincushion). ``slit``
(beyond the paper: "parallel to each other and neatly aligned" taken literally) puts them on
parallel, equally spaced lines: the common direction is the median TLS direction, and the
position of fiber ``f`` at the middle row is ``s * x0_f + o``, a least-squares line through the
TLS positions against the nominal slit positions ``x0_f``. The spacing, and with it the local
scale of the frame across the slit, is then the same everywhere.

Rounding keeps repeated rows (near the ends of a dense semicircle): a repeated sample weighs
more in the mean squared error, which is what the scheme intends. Dead fibers (their traces are
interpolated, not measured) give no samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fiberlake.processors.tls import Lines, fit_lines, perpendicular_feet
from fiberlake.schemas.containers import TraceSet

SAMPLINGS = ("semicircle", "uniform")
LABELS = ("tls", "slit")


def semicircle_positions(n: int, radius: float) -> np.ndarray:
    """Eq. 13: projections of ``n`` equal-arc points of a semicircle on its diameter.

    Parameters
    ----------
    n : int
        Number of points (>= 2).
    radius : float
        Radius ``R``; the positions span ``[0, 2R]``.

    Returns
    -------
    ndarray, shape (n,)
        ``R - R cos(pi (i - 1) / (n - 1))`` for ``i = 1..n`` (increasing; dense at both ends).
    """
    if n < 2:
        raise ValueError("semicircle sampling needs n >= 2")
    i = np.arange(n, dtype=float)
    return radius - radius * np.cos(np.pi * i / (n - 1))


def points_per_fiber(n_total: int, live: np.ndarray, scheme: str, edge_ratio: float = 3.0,
                     max_per_fiber: int | None = None) -> np.ndarray:
    """How many samples each fiber gets.

    Parameters
    ----------
    n_total : int
        Total samples wanted.
    live : ndarray of bool, shape (n_fibers,)
        Fibers with a measured trace.
    scheme : str
        ``semicircle``: the count grows as ``1 + (edge_ratio - 1) u^2`` with ``u`` the fiber's
        position on the slit in ``[-1, 1]``; ``uniform``: equal counts.
    edge_ratio : float
        Ratio of the counts of the end fibers to the centre fiber (``semicircle``).
    max_per_fiber : int, optional
        Cap per fiber (e.g. the number of rows).

    Returns
    -------
    ndarray of int, shape (n_fibers,)
        0 for dead fibers, at least 2 for live ones.
    """
    if scheme not in SAMPLINGS:
        raise ValueError(f"sampling {scheme!r} not one of {SAMPLINGS}")
    live = np.asarray(live, bool)
    nf = live.size
    u = np.linspace(-1.0, 1.0, nf) if nf > 1 else np.zeros(1)
    weight = 1.0 + (edge_ratio - 1.0) * u**2 if scheme == "semicircle" else np.ones(nf)
    weight = np.where(live, weight, 0.0)
    if weight.sum() == 0:
        return np.zeros(nf, int)
    counts = np.floor(n_total * weight / weight.sum()).astype(int)
    if max_per_fiber is not None:
        counts = np.minimum(counts, max_per_fiber)
    return np.where(live, np.maximum(counts, 2), 0)


def sample_rows(n: int, ny: int, scheme: str) -> np.ndarray:
    """Rows (integers in ``[0, ny - 1]``) of ``n`` samples along one trace."""
    if scheme == "semicircle":
        pos = semicircle_positions(n, (ny - 1) / 2.0)
    elif scheme == "uniform":
        pos = np.linspace(0.0, ny - 1.0, n)
    else:
        raise ValueError(f"sampling {scheme!r} not one of {SAMPLINGS}")
    return np.clip(np.rint(pos), 0, ny - 1).astype(np.int64)


@dataclass
class TrainingSet:
    """Samples of the map: trace points and their feet on the TLS lines.

    Attributes
    ----------
    fiber : ndarray of int, shape (n,)
    col, row : ndarray, shape (n,)
        Input: the traced point (column, row) on the distorted frame.
    col_target, row_target : ndarray, shape (n,)
        Label: the foot of the perpendicular from the point on its fiber's TLS line.
    lines : Lines
        TLS line of every fiber (``y`` = column, ``x`` = row), fitted to the whole trace.
    """

    fiber: np.ndarray
    col: np.ndarray
    row: np.ndarray
    col_target: np.ndarray
    row_target: np.ndarray
    lines: Lines

    @property
    def n(self) -> int:
        """Number of samples."""
        return int(self.col.size)

    def inputs(self) -> np.ndarray:
        """``(n, 2)`` array of (column, row)."""
        return np.column_stack([self.col, self.row])

    def targets(self) -> np.ndarray:
        """``(n, 2)`` array of (target column, target row)."""
        return np.column_stack([self.col_target, self.row_target])


def trace_lines(traces: TraceSet, rows: np.ndarray | None = None) -> Lines:
    """TLS line of every fiber trace, fitted to the trace evaluated on ``rows`` (default all).

    Dead fibers get NaN lines.
    """
    rows = np.arange(traces.ny, dtype=float) if rows is None else np.asarray(rows, float)
    x = traces.x(rows)
    use = np.broadcast_to(~traces.dead[:, None], x.shape)
    return fit_lines(rows, x, use)


def slit_lines(lines: Lines, nominal_x: np.ndarray, live: np.ndarray, row_mid: float) -> Lines:
    """Parallel, equally spaced lines replacing per-trace TLS lines (``slit`` labels, module notes)."""
    nominal_x = np.asarray(nominal_x, float)
    if nominal_x.shape != lines.slope.shape:
        raise ValueError("slit labels need one nominal column per fiber")
    slope = float(np.median(lines.slope[live]))
    pos = lines.slope * row_mid + lines.intercept  # column of each TLS line at the middle row
    s, o = np.polyfit(nominal_x[live], pos[live], 1)
    n = lines.slope.size
    new_pos = s * nominal_x + o
    return Lines(slope=np.full(n, slope), intercept=new_pos - slope * row_mid, s2=np.full(n, np.nan),
                 rms=np.full(n, np.nan), n_points=lines.n_points)


def build_training_set(traces: TraceSet, n_samples: int = 30000, scheme: str = "semicircle", *,
                       edge_ratio: float = 3.0, labels: str = "tls",
                       nominal_x: np.ndarray | None = None) -> TrainingSet:
    """Sample the live traces and label every sample by its foot on the trace's target line.

    Parameters
    ----------
    traces : TraceSet
        Traces measured on the (distorted) master flat.
    n_samples : int
        Total number of samples (the paper: ~30,000 on a 250-fiber 4096-row frame).
    scheme : str
        ``semicircle`` (eq. 13, edge-weighted fibers) or ``uniform``.
    edge_ratio : float
        End-to-centre ratio of the per-fiber counts (``semicircle``).
    labels : str
        ``tls``: each trace's own TLS line (the paper); ``slit``: parallel, equally spaced lines
        (module notes; needs ``nominal_x``).
    nominal_x : ndarray, shape (n_fibers,), optional
        Nominal (undistorted) slit columns of the fibers, for ``slit`` labels.

    Returns
    -------
    TrainingSet
        ``lines`` are the target lines (per-trace TLS lines, or the slit lines).

    Raises
    ------
    ValueError
        If fewer than two fibers are live, or ``slit`` labels lack ``nominal_x``.
    """
    if labels not in LABELS:
        raise ValueError(f"labels {labels!r} not one of {LABELS}")
    live = ~np.asarray(traces.dead, bool)
    if live.sum() < 2:
        raise ValueError("the map needs at least two live traces")
    lines = trace_lines(traces)
    live &= np.isfinite(lines.slope)
    if labels == "slit":
        if nominal_x is None:
            raise ValueError("slit labels need the nominal fiber columns")
        lines = slit_lines(lines, nominal_x, live, (traces.ny - 1) / 2.0)
    counts = points_per_fiber(n_samples, live, scheme, edge_ratio, max_per_fiber=traces.ny)
    fib, rows = [], []
    for f in np.flatnonzero(counts):
        r = sample_rows(int(counts[f]), traces.ny, scheme)
        fib.append(np.full(r.size, f))
        rows.append(r)
    fiber = np.concatenate(fib)
    row = np.concatenate(rows).astype(float)
    xall = traces.x(np.arange(traces.ny))
    col = xall[fiber, row.astype(np.int64)]
    # the paper's line is y = a x + b with x = row (wavelength) and y = column (spatial)
    row_t, col_t = perpendicular_feet(row, col, lines.slope[fiber], lines.intercept[fiber])
    return TrainingSet(fiber=fiber, col=col, row=row, col_target=col_t, row_target=row_t, lines=lines)
