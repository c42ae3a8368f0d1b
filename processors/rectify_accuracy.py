"""Before/after figures of the aberration correction against the simulator's truth (pure).

Used by ``bench/evaluate_rectify.py``: the map against the true distortion, the arc-line
spot moments and their spread over the CCD, and flux residuals binned so that the resampling's
pixel correlations cannot make them look better.
"""

from __future__ import annotations

import numpy as np

from fiberlake.processors import accuracy, rectify, wavecal
from fiberlake.processors.tls import fit_lines, perpendicular_distance, perpendicular_feet


def iso_column_residual(rmap, distortion: dict, x0: np.ndarray, ny: int, nx: int) -> tuple[float, float]:
    """How far the distortion followed by the map (``rmap`` None: the distortion alone) is from
    an affine map across the slit, on the undistorted columns ``x0``.

    Returns
    -------
    straight : float
        RMS deviation (px) of the images of the columns from straight lines.
    spacing : float
        RMS deviation (px) of those lines' columns at the middle row from a linear function of
        ``x0`` (0 when the columns stay equally spaced).
    """
    k, cx, cy, R = (distortion[n] for n in ("k", "cx", "cy", "R"))
    y0 = np.arange(-60.0, ny + 60.0)
    dx, dy = x0[:, None] - cx, y0[None, :] - cy
    s = 1.0 + k * (dx**2 + dy**2) / R**2
    X, Y = cx + dx * s, cy + dy * s
    inside = (Y >= 0) & (Y <= ny - 1) & (X >= 0) & (X <= nx - 1)
    if rmap is not None:
        X, Y = rmap.forward(X, Y)
    lines = fit_lines(Y, X, inside)
    d = perpendicular_distance(Y, X, lines.slope[:, None], lines.intercept[:, None])
    mid = lines.slope * (ny - 1) / 2.0 + lines.intercept
    resid = mid - np.polyval(np.polyfit(x0, mid, 1), x0)
    return float(np.sqrt(np.mean(d[inside] ** 2))), float(np.sqrt(np.mean(resid**2)))


def true_label_error(rmap, true_x: np.ndarray, live: np.ndarray) -> float:
    """RMS distance (px) of the mapped true traces from their feet on the true traces' TLS lines."""
    ny = true_x.shape[1]
    rows = np.broadcast_to(np.arange(ny, dtype=float), true_x.shape)
    lines = fit_lines(rows[0], true_x, np.broadcast_to(live[:, None], true_x.shape))
    rt, ct = perpendicular_feet(rows, true_x, lines.slope[:, None], lines.intercept[:, None])
    fc, fr = rmap.forward(true_x, rows)
    d = np.hypot(fc - ct, fr - rt)[live]
    return float(np.sqrt(np.mean(d**2)))


def arc_spots(arc, traces, lsf_sigma: float):
    """Isolated arc lines (fiber, row) and their adaptive moments on a master arc."""
    flux, fivar = wavecal.extract_boxcar(arc.image, arc.ivar, traces)
    lines = wavecal.detect_lines(flux, fivar, lsf_sigma=lsf_sigma)
    keep = np.zeros(lines.fiber.size, bool)
    for f in np.unique(lines.fiber):
        sel = np.flatnonzero(lines.fiber == f)
        r = lines.row[sel]
        gap = np.abs(r[:, None] - r[None, :]) + np.eye(r.size) * 1e9
        keep[sel] = gap.min(axis=1) > 12 if r.size > 1 else True
    keep &= ~traces.dead[lines.fiber]
    fib, row = lines.fiber[keep], lines.row[keep]
    col = np.array([traces.x(np.array([r]))[f, 0] for f, r in zip(fib, row)])
    mom = rectify.spot_moments(arc.image, arc.ivar, col, row)
    ok = mom["ok"] & (mom["flux"] > 2000)
    return {"fiber": fib[ok], "row": row[ok]} | {k: v[ok] for k, v in mom.items() if k != "ok"}


def spot_spread(m: dict) -> dict[str, float]:
    """Mean widths and their spread (std/mean), and the std of ellipticities and skewnesses."""
    sx, sy = np.sqrt(m["mxx"]), np.sqrt(m["myy"])
    t = m["mxx"] + m["myy"]
    return {"n_spots": int(sx.size), "sx_mean": float(sx.mean()), "sx_spread": float(sx.std() / sx.mean()),
            "sy_mean": float(sy.mean()), "sy_spread": float(sy.std() / sy.mean()),
            "e1_std": float(np.std((m["mxx"] - m["myy"]) / t)), "e2_std": float(np.std(2 * m["mxy"] / t)),
            "skew_x_std": float(np.std(m["skew_x"])), "skew_y_std": float(np.std(m["skew_y"]))}


def match_spots(a: dict, b: dict) -> tuple[dict, dict]:
    """The spots of ``a`` and ``b`` that are the same arc line (same fiber, rows within 1.5)."""
    ia, ib = [], []
    for i, (f, r) in enumerate(zip(a["fiber"], a["row"])):
        j = np.flatnonzero((b["fiber"] == f) & (np.abs(b["row"] - r) < 1.5))
        if j.size == 1:
            ia.append(i)
            ib.append(int(j[0]))
    take = lambda d, idx: {k: np.asarray(v)[idx] for k, v in d.items()}  # noqa: E731
    return take(a, np.array(ia, int)), take(b, np.array(ib, int))


def binned_residual(spectra, truth: np.ndarray, fibers: np.ndarray, nbin: int = 8) -> np.ndarray:
    """Robust std of (flux - truth) / mean truth per fiber, after averaging ``nbin`` bins."""
    out = np.full(fibers.size, np.nan)
    for i, f in enumerate(fibers):
        good = (spectra.ivar[f] > 0) & np.isfinite(truth[f]) & (truth[f] > 0)
        n = good.size // nbin * nbin
        g = good[:n].reshape(-1, nbin).all(axis=1)
        if g.sum() < 20:
            continue
        fb = spectra.flux[f][:n].reshape(-1, nbin).mean(axis=1)[g]
        tb = truth[f][:n].reshape(-1, nbin).mean(axis=1)[g]
        out[i] = accuracy.robust_std(fb - tb) / np.mean(tb)
    return out
