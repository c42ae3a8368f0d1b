"""Total least squares straight lines and the feet of perpendiculars (seed 000, eqs. 3-12).

The labels of the aberration map are built here. A fiber trace on the flat is a set of points
``(x_i, y_i)``, with ``x`` the row (wavelength direction) and ``y`` the column (spatial
direction), as in the paper; ideally it is a straight line ``y = a x + b``. Both coordinates of
a traced point carry error, so the line is fitted by Total Least Squares rather than by
ordinary least squares (which attributes every error to ``y`` and so biases the slope toward
zero when ``x`` is noisy, eqs. 3-7). Following eqs. 8-12 (the mixed LS-TLS solution of
de Groen 1998 / Golub & Van Loan, where the column of ones is exact):

1. ``A = [1, x]`` (``A1`` the exact column of ones, ``A2 = x``), ``L = y``, augmented
   ``C = [A1 A2 L]``;
2. ``C = Q R`` (eq. 10); the lower-right 2x2 block ``C_R = [R22 R2l]`` of ``R`` holds the
   data with the intercept eliminated (the centred ``[x, y]``);
3. ``C_R = U diag(s1, s2) N^T`` (eq. 11);
4. ``[b, a] = (A^T A - s2^2 diag(0, 1))^-1 A^T L`` (eq. 12).

This equals orthogonal regression (the line minimising the sum of squared perpendicular
distances), which the tests check against an independent eigen-decomposition. The target of a
traced point is its foot of perpendicular on the fitted line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Lines:
    """Straight lines ``y = slope * x + intercept`` (one per fiber).

    Attributes
    ----------
    slope, intercept : ndarray, shape (n,)
        Line parameters (NaN where a line could not be fitted).
    s2 : ndarray, shape (n,)
        Smallest singular value of ``C_R`` (eq. 11): the root of the sum of squared
        perpendicular distances of the points from the line (scaled by ``sqrt(1 + slope^2)``).
    rms : ndarray, shape (n,)
        RMS perpendicular distance of the fitted points from their line.
    n_points : ndarray of int, shape (n,)
        Points used per line.
    """

    slope: np.ndarray
    intercept: np.ndarray
    s2: np.ndarray
    rms: np.ndarray
    n_points: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``y`` of every line at ``x``: scalar -> ``(n,)``; ``(m,)`` or ``(n, m)`` -> ``(n, m)``."""
        x = np.asarray(x, float)
        if x.ndim == 0:
            return self.slope * x + self.intercept
        return self.slope[:, None] * x + self.intercept[:, None]


def tls_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Fit one straight line ``y = a x + b`` by Total Least Squares (eqs. 8-12).

    Parameters
    ----------
    x, y : ndarray, shape (m,)
        Points (m >= 2, not all at the same ``x`` and ``y``).

    Returns
    -------
    a, b, s2 : float
        Slope, intercept and the smallest singular value of ``C_R`` (eq. 11).

    Raises
    ------
    ValueError
        With fewer than two distinct points, or when the TLS normal matrix is singular (a
        vertical line ``x = const``, which ``y = a x + b`` cannot represent).
    """
    x = np.asarray(x, float).ravel()
    y = np.asarray(y, float).ravel()
    if x.size != y.size or x.size < 2:
        raise ValueError("tls_line needs two arrays of equal length >= 2")
    # centring shifts only the intercept; it keeps the QR well conditioned for x ~ 4000
    x0, y0 = float(np.mean(x)), float(np.mean(y))
    xc, yc = x - x0, y - y0
    A = np.column_stack([np.ones_like(xc), xc])
    C = np.column_stack([A, yc])  # [A1 A2 L]
    R = np.linalg.qr(C, mode="r")  # eq. 10
    CR = R[1:3, 1:3]  # [R22 R2l] with the intercept eliminated
    s = np.linalg.svd(CR, compute_uv=False)  # eq. 11, s[0] >= s[1]
    s2 = float(s[-1])
    normal = A.T @ A - s2**2 * np.diag([0.0, 1.0])  # eq. 12
    if abs(np.linalg.det(normal)) < 1e-12 * max(1.0, np.abs(normal).max() ** 2):
        raise ValueError("degenerate TLS problem (points on a line x = const, or all equal)")
    b, a = np.linalg.solve(normal, A.T @ yc)
    return float(a), float(b + y0 - a * x0), s2


def fit_lines(x: np.ndarray, y: np.ndarray, use: np.ndarray | None = None) -> Lines:
    """TLS lines of many point sets (e.g. every fiber trace), eqs. 8-12 per set.

    Parameters
    ----------
    x, y : ndarray, shape (n, m)
        Points of each set (``x`` may also be shape ``(m,)``, shared).
    use : ndarray of bool, shape (n, m), optional
        Points to fit (default all finite points).

    Returns
    -------
    Lines
        NaN parameters for sets with fewer than 3 usable points or a degenerate fit.
    """
    y = np.atleast_2d(np.asarray(y, float))
    x = np.broadcast_to(np.asarray(x, float), y.shape)
    ok = np.isfinite(x) & np.isfinite(y)
    if use is not None:
        ok &= np.asarray(use, bool)
    n = y.shape[0]
    out = {k: np.full(n, np.nan) for k in ("slope", "intercept", "s2", "rms")}
    npts = ok.sum(axis=1)
    for i in range(n):
        if npts[i] < 3:
            continue
        try:
            a, b, s2 = tls_line(x[i, ok[i]], y[i, ok[i]])
        except (ValueError, np.linalg.LinAlgError):
            continue
        d = perpendicular_distance(x[i, ok[i]], y[i, ok[i]], a, b)
        out["slope"][i], out["intercept"][i], out["s2"][i] = a, b, s2
        out["rms"][i] = float(np.sqrt(np.mean(d**2)))
    return Lines(out["slope"], out["intercept"], out["s2"], out["rms"], npts.astype(int))


def perpendicular_distance(x: np.ndarray, y: np.ndarray, a, b) -> np.ndarray:
    """Signed perpendicular distance of ``(x, y)`` from ``y = a x + b`` (positive above)."""
    a = np.asarray(a, float)
    return (np.asarray(y, float) - a * np.asarray(x, float) - b) / np.sqrt(1.0 + a * a)


def perpendicular_feet(x: np.ndarray, y: np.ndarray, a, b) -> tuple[np.ndarray, np.ndarray]:
    """Feet of the perpendiculars from ``(x, y)`` on the lines ``y = a x + b``.

    The foot is the point of the line closest to ``(x, y)``:
    ``x_f = (x + a (y - b)) / (1 + a^2)``, ``y_f = a x_f + b``.

    Parameters
    ----------
    x, y : ndarray
        Points (any shape broadcasting with ``a`` and ``b``).
    a, b : float or ndarray
        Line slopes and intercepts.

    Returns
    -------
    x_f, y_f : ndarray
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    xf = (x + a * (y - b)) / (1.0 + a * a)
    return xf, a * xf + b


def ols_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Ordinary least squares ``y = a x + b`` (eq. 7), for comparison with :func:`tls_line`."""
    x = np.asarray(x, float).ravel()
    y = np.asarray(y, float).ravel()
    A = np.column_stack([x, np.ones_like(x)])
    a, b = np.linalg.lstsq(A, y, rcond=None)[0]
    return float(a), float(b)
