"""Reference implementation of the optimal extraction's fit / reject iterations, as they were
before issue 19: one pass per 2M-element row block, the model of the coupled fit scattered to
the pixels with ``numpy.bincount`` and gathered back, float64 throughout.

:func:`fiberlake.processors.extract.optimal_extract` takes the block function as ``_block``;
``optimal_extract(..., _block=optimal_block_reference)`` is the old extraction. The tests and
``bench/prepare.py`` compare the two (same spectra to float64 rounding).
"""

from __future__ import annotations

import numpy as np

from fiberlake.processors.extract import (MASK_DTYPE, SIGNIFICANT_WEIGHT, _pixel_profile, _window_start,
                                          solve_tridiagonal)


def optimal_block_reference(img, good, var, msk, xc, par, r0, r1, hw, coupled, rn2, reject_sigma,
                   max_iter, profile_error, residuals=False):
    """Fit / reject iterations on rows ``r0:r1`` for all fibers (sorted by column).

    With ``residuals`` (and ``max_iter=0``: a single fit with the input variance) return only
    the normalised residuals ``(D - model) / sqrt(V_in)`` on each fiber's window (0 off the
    support or where masked), shape ``(n_fibers, n_rows, n_window)``.
    """
    ny, nx = img.shape
    nf, nr = xc.shape
    start, nw = _window_start(xc, hw)
    cols = start[..., None] + np.arange(nw)
    on = (cols >= 0) & (cols < nx)
    lidx = np.arange(nr)[None, :, None] * nx + np.clip(cols, 0, nx - 1)  # block's 2D arrays
    gidx = lidx + r0 * nx                                              # full frame
    wings = bool(np.any(par[..., 1] > 0))
    P = _pixel_profile(start, nw, xc, par, hw, wings)
    norm = P.sum(axis=-1)
    inside = P > 0
    P /= np.maximum(norm, 1e-300)[..., None]
    D = img.ravel()[gidx]
    G0 = good.ravel()[gidx] & on & inside
    Vin = var.ravel()[gidx]
    Q = None
    if coupled:
        # profile of fiber f + 1 on fiber f's window (zero outside f + 1's support)
        Q = np.zeros_like(P)
        Q[:-1] = (_pixel_profile(start[:-1], nw, xc[1:], par[1:], hw, wings)
                  / np.maximum(norm[1:], 1e-300)[..., None])

    rejected = np.zeros(nr * nx, bool)
    thr2 = float(reject_sigma) ** 2

    def solve(M, V):
        W = np.where(M, 1.0 / V, 0.0)
        WP = W * P
        d = np.sum(WP * P, axis=-1)
        b = np.sum(WP * D, axis=-1)
        tiny = d <= 1e-12 * max(float(np.max(d)), 1e-300)
        d = np.where(tiny, 1.0, d)
        b = np.where(tiny, 0.0, b)
        if coupled:
            e = np.sum(WP[:-1] * Q[:-1], axis=-1)
            e = np.where(tiny[:-1] | tiny[1:], 0.0, e)
            a, va = solve_tridiagonal(d, e, b)
        else:
            a, va = b / d, 1.0 / d
        va = np.where(tiny, np.inf, va)
        return a, va

    def model_of(a):
        contrib = a[..., None] * P
        if not coupled:
            return contrib
        flat = np.bincount(lidx[on], weights=contrib[on], minlength=nr * nx)
        return np.where(on, flat[lidx], 0.0)

    M = G0
    V = np.where(G0, Vin, np.inf)
    a, va = solve(M, V)
    for it in range(max_iter):
        model = model_of(a)
        Vm = rn2 + np.maximum(model, 0.0)
        V = np.where(G0, Vm, np.inf)
        z2 = np.where(M, (D - model) ** 2 / (Vm + (profile_error * model) ** 2), 0.0)
        worst = np.argmax(z2, axis=-1)
        zmax = np.take_along_axis(z2, worst[..., None], axis=-1)[..., 0]
        new = zmax > thr2
        if new.any():
            rejected[np.take_along_axis(lidx, worst[..., None], axis=-1)[..., 0][new]] = True
            M = G0 & ~rejected[lidx]
        a, va = solve(M, V)
        if not new.any() and it > 0:
            break

    model = model_of(a)
    if residuals:
        return np.where(M, (D - model) / np.sqrt(np.where(M, Vin, 1.0)), 0.0)
    Vm = rn2 + np.maximum(model, 0.0)
    npix = np.sum(M, axis=-1)
    chi2 = np.sum(np.where(M, (D - model) ** 2 / Vm, 0.0), axis=-1) / np.maximum(npix - 1, 1)
    gfrac = np.sum(np.where(M, P, 0.0), axis=-1)
    ofrac = np.sum(np.where(on, 0.0, P), axis=-1)
    sig_pix = on & (P > SIGNIFICANT_WEIGHT)
    pixbits = np.bitwise_or.reduce(np.where(sig_pix, msk.ravel()[gidx], MASK_DTYPE(0)), axis=-1)
    return {"flux": a, "var": va, "gfrac": gfrac, "ofrac": ofrac, "chi2": chi2,
            "npix": npix.astype(float), "pixbits": pixbits}
