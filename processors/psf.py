"""Point-spread function (PSF) model for deconvolution extraction, fitted on arcs and flats.

Model
-----
The light of fiber ``f`` whose line-spread function (LSF) is centred on row ``s`` lands on
pixel ``(r, c)`` with weight ::

    A[(r, c), (f, s)] = L_{f,s}(r - s) * P_{f,r}(c - x_f(r))

``L`` is the LSF along the rows (the wavelength axis) and ``P`` the cross-dispersion profile
across the columns at the destination row ``r``, centred on the trace ``x_f(r)`` (a
:class:`~fiberlake.schemas.containers.TraceSet`). Spots therefore follow curved traces. Both 1D
profiles are Gauss-Hermite (GH) series, integrated exactly over each pixel::

    p(t) = sum_{k=0..K} c_k He_k(z) phi(z) / sigma,   z = (t - mu) / sigma,   c_0 = 1,

(``He_k`` probabilists' Hermite polynomials, ``phi`` the unit Gaussian). Its cumulative is
``Phi(z) - phi(z) sum_{k>=1} c_k He_{k-1}(z)``, so a pixel's weight is a difference of two
cumulatives. Each profile is evaluated on a window of ``2 W + 1`` pixels, normalised to unit
sum there, and shifted (``mu``) so that its flux centroid is exactly the requested position:
the trace (a flux centroid on the flat) and the wavelength solution's rows (flux centroids of
arc lines) use the same convention.

``sigma`` and ``c_1..c_K`` vary over the CCD as 2D Legendre series in the normalised column
and row of the trace point; ``sigma`` also carries a per-fiber focus factor ``1 + e_f`` (the
focus of neighbouring fibers need not be smooth). With ``invariant=True`` every series has
degree 0 and there is no focus term: one PSF for the whole frame (rectified frames).

Fitting
-------
* Cross-dispersion profile (:func:`measure_xsf_samples`): on the master flat, at
  ``n_rows`` sample rows, every live fiber's profile is fitted (Gaussian by
  Levenberg-Marquardt for ``mu`` and ``sigma``, then the GH coefficients linearly at that
  ``sigma``), first on the central part of its window, then twice more on the full window
  after subtracting the neighbours' fitted profiles.
* LSF (:func:`measure_lsf_samples`): the master arc is box-extracted; isolated, unmasked,
  unsaturated lines with a peak S/N above ``min_snr`` are fitted the same way (plus a linear
  background) over ``2 W + 1`` rows.
* :func:`fit_field` turns the samples into the smooth series with 3-sigma clipping.

:func:`arc_line_residuals` measures how well a PSF predicts arc lines in 2D (used to report
the residual / noise on held-out arcs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.polynomial import legendre
from scipy.ndimage import maximum_filter1d, median_filter
from scipy.special import ndtr

from fiberlake.processors.extract import solve_tridiagonal
# The model's containers and its evaluation (gh_cdf, gh_weights) live with the data; psf.gh_weights,
# psf.GHField and psf.PSFModel stay reachable from here for the fit's callers.
from fiberlake.schemas.containers import GHField, PSFModel, TraceSet, gaussian_pdf, gh_cdf, gh_weights  # noqa: F401

DEFAULT_ORDER = 8
"""Gauss-Hermite order of both profiles (orders 6 / 8 / 10 leave ~0.5 / 0.2 / 0.07 % of the
peak on the simulator's corner LSF)."""


# ----------------------------------------------------------------------------- Gauss-Hermite


def gh_basis(edges: np.ndarray, order: int) -> np.ndarray:
    """Pixel integrals of the GH basis functions ``He_k(z) phi(z)``, ``k = 0..order``.

    Parameters
    ----------
    edges : ndarray, shape (..., m + 1)
        Standardised pixel edges ``(edge - mu) / sigma``.
    order : int

    Returns
    -------
    ndarray, shape (..., m, order + 1)
    """
    z = np.asarray(edges, dtype=float)
    cols = [np.diff(ndtr(z), axis=-1)]
    ph = gaussian_pdf(z)
    he_prev, he = np.zeros_like(z), np.ones_like(z)
    for k in range(1, order + 1):
        cols.append(-np.diff(he * ph, axis=-1))            # int He_k phi = -He_{k-1} phi
        he_prev, he = he, z * he - (k - 1) * he_prev if k > 1 else z * he
    return np.stack(cols, axis=-1)


# ----------------------------------------------------------------------------- smooth fields


def _legfit2d(u: np.ndarray, v: np.ndarray, y: np.ndarray, deg: tuple[int, int],
              clip: float = 3.0, iters: int = 5, weights: np.ndarray | None = None):
    """Clipped, weighted least-squares 2D Legendre fit; returns coefficients and the kept mask.

    Clipping acts on the weighted residuals ``r sqrt(w)`` (MAD scale).
    """
    A = legendre.legvander2d(u, v, list(deg))
    sw = np.sqrt(np.ones_like(y) if weights is None else np.asarray(weights, float))
    keep = np.isfinite(y) & (sw > 0)
    coef = np.zeros(A.shape[1])
    for _ in range(iters):
        if keep.sum() < A.shape[1]:
            if keep.any():
                coef = np.zeros(A.shape[1])
                coef[0] = float(np.median(y[keep]))
            break
        coef, *_ = np.linalg.lstsq(A[keep] * sw[keep, None], y[keep] * sw[keep], rcond=None)
        z = (y - A @ coef) * sw
        s = 1.4826 * np.median(np.abs(z[keep])) + 1e-300
        new = np.isfinite(y) & (sw > 0) & (np.abs(z) <= clip * s)
        if np.array_equal(new, keep):
            break
        keep = new
    return coef.reshape(deg[0] + 1, deg[1] + 1), keep


# ----------------------------------------------------------------------------- profile fits


@dataclass
class ProfileSamples:
    """Fitted 1D profiles: where they are and their GH shape.

    Attributes
    ----------
    fiber : int array (n,)
    x, row : float arrays (n,)
        Trace column and row of the profile's centre.
    sigma : float array (n,)
    c : float array (n, K + 1)
        Coefficients relative to ``c_0``.
    chi2 : float array (n,)
        Reduced chi^2 of the GH fit.
    snr : float array (n,)
        Peak signal-to-noise.
    """

    fiber: np.ndarray
    x: np.ndarray
    row: np.ndarray
    sigma: np.ndarray
    c: np.ndarray
    chi2: np.ndarray
    snr: np.ndarray


def fit_profiles(y: np.ndarray, ivar: np.ndarray, rel: np.ndarray, sigma0: np.ndarray, order: int, *,
                 background: bool = False, iters: int = 20, ridge: float = 1e-8):
    """Fit many 1D pixel-integrated profiles: a Gaussian (amplitude, centre, sigma, optional
    linear background) by Levenberg-Marquardt, then a GH series of ``order`` at that centre
    and sigma (linear least squares).

    Parameters
    ----------
    y, ivar : ndarray, shape (n, m)
        Data and inverse variance (0 = unused pixel).
    rel : ndarray, shape (n, m) or (m,)
        Pixel centres relative to the first-guess centre.
    sigma0 : ndarray, shape (n,)
        First-guess sigma.
    order : int
    background : bool
        Fit a linear background (arcs).

    Returns
    -------
    mu, sigma : ndarray (n,)
        Gaussian centre (relative) and sigma.
    c : ndarray (n, order + 1)
        GH coefficients relative to ``c_0``.
    chi2 : ndarray (n,)
        Reduced chi^2 of the GH fit.
    amp : ndarray (n,)
        GH ``c_0`` (total flux of the profile).
    model : ndarray (n, m)
        The GH model (without background).
    """
    y = np.asarray(y, float)
    w = np.asarray(ivar, float)
    n, m = y.shape
    rel = np.broadcast_to(np.asarray(rel, float), (n, m))
    edges = np.concatenate([rel - 0.5, rel[:, -1:] + 0.5], axis=1)
    t = rel / max(1.0, float(m) / 2)
    tot = np.sum(np.where(w > 0, y, 0.0), axis=1)
    npar = 5 if background else 3
    p = np.zeros((n, npar))
    p[:, 0] = np.maximum(tot, 1e-3)
    p[:, 2] = np.asarray(sigma0, float)
    lam = np.full(n, 1e-3)

    def evaluate(p):
        a = (edges - p[:, 1:2]) / p[:, 2:3]
        cdf = ndtr(a)
        g = np.diff(cdf, axis=1)
        model = p[:, 0:1] * g
        if background:
            model = model + p[:, 3:4] + p[:, 4:5] * t
        return model, a, g

    model, a, g = evaluate(p)
    chi = np.sum(w * (y - model) ** 2, axis=1)
    for _ in range(iters):
        ph = gaussian_pdf(a)
        J = [g, p[:, 0:1] * (ph[:, :-1] - ph[:, 1:]) / p[:, 2:3],
             p[:, 0:1] * (a[:, :-1] * ph[:, :-1] - a[:, 1:] * ph[:, 1:]) / p[:, 2:3]]
        if background:
            J += [np.ones_like(y), np.broadcast_to(t, y.shape)]
        J = np.stack(J, axis=-1)                                     # (n, m, npar)
        JtW = J * w[..., None]
        A = np.einsum("nmi,nmj->nij", JtW, J)
        r = np.einsum("nmi,nm->ni", JtW, y - model)
        d = np.diagonal(A, axis1=1, axis2=2) + 1e-30
        Ad = A + lam[:, None, None] * np.eye(npar) * d[:, None, :]
        try:
            step = np.linalg.solve(Ad, r[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.stack([np.linalg.lstsq(Ai, ri, rcond=None)[0] for Ai, ri in zip(Ad, r)])
        step = np.where(np.isfinite(step), step, 0.0)
        step[:, 1] = np.clip(step[:, 1], -1.0, 1.0)
        step[:, 2] = np.clip(step[:, 2], -0.3 * p[:, 2], 0.3 * p[:, 2])
        trial = p + step
        trial[:, 2] = np.clip(trial[:, 2], 0.3, 20.0)
        trial[:, 1] = np.clip(trial[:, 1], -3.0, 3.0)
        tm, ta, tg = evaluate(trial)
        tchi = np.sum(w * (y - tm) ** 2, axis=1)
        better = tchi <= chi
        p = np.where(better[:, None], trial, p)
        model = np.where(better[:, None], tm, model)
        a = np.where(better[:, None], ta, a)
        g = np.where(better[:, None], tg, g)
        chi = np.where(better, tchi, chi)
        lam = np.clip(np.where(better, lam * 0.3, lam * 10.0), 1e-7, 1e7)

    mu, sigma = p[:, 1], p[:, 2]
    B = gh_basis((edges - mu[:, None]) / sigma[:, None], order)     # (n, m, K+1)
    if background:
        B = np.concatenate([B, np.ones((n, m, 1)), t[..., None]], axis=-1)
    BtW = B * w[..., None]
    A = np.einsum("nmi,nmj->nij", BtW, B)
    rhs = np.einsum("nmi,nm->ni", BtW, y)
    scale = np.maximum(np.diagonal(A, axis1=1, axis2=2).max(axis=1), 1e-300)
    A = A + ridge * scale[:, None, None] * np.eye(A.shape[-1])
    coef = np.linalg.solve(A, rhs[..., None])[..., 0]
    gh = coef[:, :order + 1]
    full = np.einsum("nmi,ni->nm", B, coef)
    model = np.einsum("nmi,ni->nm", B[..., :order + 1], gh)
    dof = np.maximum((w > 0).sum(axis=1) - B.shape[-1] - 2, 1)
    chi2 = np.sum(w * (y - full) ** 2, axis=1) / dof
    amp = gh[:, 0]
    c = gh / np.where(np.abs(amp) > 0, amp, 1.0)[:, None]
    return mu, sigma, c, chi2, amp, model


def _sorted(traces: TraceSet):
    order = np.argsort(np.median(traces.x(), axis=1), kind="stable")
    return order


def _good(image, ivar, mask):
    img = np.asarray(image, float)
    iv = np.asarray(ivar, float)
    good = np.isfinite(img) & np.isfinite(iv) & (iv > 0)
    if mask is not None:
        good &= np.asarray(mask) == 0
    return np.where(good, img, 0.0), np.where(good, iv, 0.0), good


@dataclass
class _FlatBand:
    """Windows of every (sorted) fiber at the sampled rows of a flat."""

    rows: np.ndarray      # (nr,)
    order: np.ndarray     # (nf,) sorted fiber -> fiber index
    xs: np.ndarray        # (nf, nr) trace column
    cols: np.ndarray      # (nf, nr, m) window columns
    on: np.ndarray        # (nf, nr, m) column on the CCD
    D: np.ndarray         # (nf, nr, m) data
    V: np.ndarray         # (nf, nr, m) inverse variance (0 = unused)
    img: np.ndarray       # (nr, nx) data rows
    iv: np.ndarray        # (nr, nx) inverse variance rows
    live: np.ndarray      # (nf,)


def _flat_band(flat, flat_ivar, flat_mask, traces: TraceSet, halfwidth: int, n_rows: int) -> _FlatBand:
    img, iv, _ = _good(flat, flat_ivar, flat_mask)
    ny, nx = img.shape
    order_f = _sorted(traces)
    dead = np.asarray(traces.dead, bool)[order_f] if np.size(traces.dead) == traces.n_fibers \
        else np.zeros(traces.n_fibers, bool)
    rows = np.unique(np.round(np.linspace(0, ny - 1, n_rows + 2)[1:-1]).astype(int))
    xs = traces.x(rows)[order_f]
    W = int(halfwidth)
    first = np.rint(xs).astype(np.int64) - W
    cols = first[..., None] + np.arange(2 * W + 1)
    on = (cols >= 0) & (cols < nx)
    cc = np.clip(cols, 0, nx - 1)
    rr = np.arange(rows.size)[None, :, None]
    D = img[rows][rr, cc]
    V = np.where(on, iv[rows][rr, cc], 0.0)
    return _FlatBand(rows, order_f, xs, cols, on, D, V, img[rows], iv[rows], ~dead)


def measure_xsf_samples(flat: np.ndarray, flat_ivar: np.ndarray, flat_mask: np.ndarray | None,
                        traces: TraceSet, *, halfwidth: int = 12, order: int = DEFAULT_ORDER,
                        n_rows: int = 48, min_snr: float = 20.0, band: _FlatBand | None = None,
                        full: bool = False):
    """Fit the cross-dispersion profile of every live fiber, one at a time, at ``n_rows`` rows.

    Neighbours' light is removed iteratively: a first fit on the central ``+-(pitch / 2 - 1)``
    columns, then two fits on the full ``+-halfwidth`` window after subtracting the
    neighbours' fitted profiles. Masked and off-CCD pixels get no weight. These individual
    fits give each profile's centre, sigma and flux; their GH shapes are not separable from
    the neighbours' (light can move from one fiber's wing to its neighbour's), which is why
    :func:`fit_xsf_field` fits the shapes jointly.
    """
    b = band or _flat_band(flat, flat_ivar, flat_mask, traces, halfwidth, n_rows)
    xs, cols, on, D, V, live = b.xs, b.cols, b.on, b.D, b.V, b.live
    nf, nr = xs.shape
    W = int(halfwidth)
    rel = cols - xs[..., None]
    pitch = float(np.median(np.diff(xs, axis=0))) if nf > 1 else 4.0 * W
    sigma0 = np.asarray(traces.sigma, float)[b.order] if np.size(traces.sigma) == nf else np.full(nf, 2.4)
    sigma0 = np.where(sigma0 > 0, sigma0, 2.4)
    sig0 = np.broadcast_to(sigma0[:, None], (nf, nr)).ravel()

    def neighbour_light(mu, sg, c, amp):
        out = np.zeros_like(D)
        for step in (-1, 1):
            src = np.arange(nf) + step
            okf = (src >= 0) & (src < nf)
            s = np.clip(src, 0, nf - 1)
            relp = cols - (xs[s] + mu[s])[..., None]
            edges = np.concatenate([relp - 0.5, relp[..., -1:] + 0.5], axis=-1) / sg[s][..., None]
            prof = np.diff(gh_cdf(edges, c[s]), axis=-1) * amp[s][..., None]
            out += np.where((okf & live[s])[:, None, None], prof, 0.0)
        return out

    core = np.abs(rel) <= max(2.0, 0.5 * pitch - 1.0)
    Wt = np.where(core, V, 0.0)
    mu = sg = c = amp = chi2 = None
    for it in range(3):
        data = D if it == 0 else D - neighbour_light(mu, sg, c, amp)
        m, s, cf, chi2, a, _ = fit_profiles(data.reshape(nf * nr, -1), Wt.reshape(nf * nr, -1),
                                            rel.reshape(nf * nr, -1), sig0, order)
        mu, sg = m.reshape(nf, nr), s.reshape(nf, nr)
        c, amp = cf.reshape(nf, nr, -1), a.reshape(nf, nr)
        sig0 = s
        Wt = V
    peak = np.max(np.where(on, D, 0.0), axis=-1)
    noise = 1.0 / np.sqrt(np.maximum(np.max(V, axis=-1), 1e-300))
    snr = peak / noise
    keep = live[:, None] & (snr > min_snr) & (on.sum(-1) > W) & np.isfinite(chi2.reshape(nf, nr))
    fib = np.broadcast_to(b.order[:, None], (nf, nr))
    rows_b = np.broadcast_to(b.rows[None, :], (nf, nr)).astype(float)
    sel = keep.ravel()
    samples = ProfileSamples(fiber=fib.ravel()[sel], x=xs.ravel()[sel], row=rows_b.ravel()[sel],
                             sigma=sg.ravel()[sel], c=c.reshape(nf * nr, -1)[sel], chi2=chi2[sel],
                             snr=snr.ravel()[sel])
    if full:
        return samples, {"mu": mu, "sigma": sg, "amp": amp, "keep": keep}
    return samples


def fit_xsf_field(flat: np.ndarray, flat_ivar: np.ndarray, flat_mask: np.ndarray | None,
                  traces: TraceSet, *, halfwidth: int = 12, order: int = DEFAULT_ORDER, n_rows: int = 48,
                  deg: tuple[int, int] = (2, 2), invariant: bool = False, iters: int = 3,
                  min_snr: float = 20.0) -> GHField:
    """Cross-dispersion profile field from a flat, with the shapes fitted jointly.

    1. Individual fits (:func:`measure_xsf_samples`) give each profile's centre, sigma and
       flux; sigma is smoothed into ``S(u, v) (1 + e_f)`` (:func:`fit_field`).
    2. The GH coefficients ``c_1..c_K`` are 2D Legendre series fitted jointly to every pixel
       of the sampled rows, with all fibers' light modelled at once (linear least squares at
       fixed centres, sigmas and fluxes), so the light between two fibers is split by the
       smooth shape shared by neighbours, their flux differences and the unpaired wings of
       the slit's end fibers (and dead fibers), not by the order of the fits.
    3. The fluxes are re-solved with the new shapes (tridiagonal per row) and step 2 repeated
       (``iters`` times).
    """
    ny, nx = np.shape(flat)
    band = _flat_band(flat, flat_ivar, flat_mask, traces, halfwidth, n_rows)
    samples, ind = measure_xsf_samples(flat, flat_ivar, flat_mask, traces, halfwidth=halfwidth, order=order,
                                       min_snr=min_snr, band=band, full=True)
    field0 = fit_field(samples, traces.n_fibers, nx, ny, halfwidth=halfwidth, deg=deg, invariant=invariant)
    if order == 0:
        return field0
    deg_ = (0, 0) if invariant else tuple(int(d) for d in deg)
    xs, cols, on, V, live = band.xs, band.cols, band.on, band.V, band.live
    nf, nr, m = cols.shape
    use = live[:, None] & ind["keep"]                                  # profiles in the model
    mu = np.where(use, ind["mu"], 0.0)
    amp = np.where(use, ind["amp"], 0.0)
    u = 2.0 * xs / (nx - 1) - 1.0
    v = np.broadcast_to(2.0 * band.rows / (ny - 1) - 1.0, (nf, nr))
    sigma, _ = field0.params(u, v, band.order[:, None])
    rel = cols - (xs + mu)[..., None]
    edges = np.concatenate([rel - 0.5, rel[..., -1:] + 0.5], axis=-1) / sigma[..., None]
    B = gh_basis(edges, order)                                        # (nf, nr, m, K+1)
    B = np.where(on[..., None], B, 0.0)
    LL = legendre.legvander2d(np.clip(u, -1, 1), np.clip(v, -1, 1), list(deg_))   # (nf, nr, nij)
    nij = LL.shape[-1]
    ntheta = order * nij
    groups = [np.arange(g, nf, 2) for g in range(2)]                   # windows of one group never overlap
    coef = np.zeros((order, nij))
    for _ in range(max(1, iters)):
        N = np.zeros((ntheta, ntheta))
        rhs = np.zeros(ntheta)
        for j in range(nr):
            G = np.zeros((nx, ntheta))
            model0 = np.zeros(nx)
            for sel in groups:
                a = amp[sel, j]
                cj = np.clip(cols[sel, j], 0, nx - 1)
                ok = on[sel, j] & use[sel, j][:, None]
                vals = (a[:, None, None, None] * B[sel, j][..., 1:, None]
                        * LL[sel, j][:, None, None, :]).reshape(sel.size, m, ntheta)
                G[cj[ok]] += vals[ok]
                model0[cj[ok]] += (a[:, None] * B[sel, j][..., 0])[ok]
            w = band.iv[j]
            t = band.img[j] - model0
            Gw = G * w[:, None]
            N += G.T @ Gw
            rhs += Gw.T @ t
        scale = max(float(np.max(np.diag(N))), 1e-300)
        theta = np.linalg.solve(N + 1e-10 * scale * np.eye(ntheta), rhs)
        coef = theta.reshape(order, nij)
        # re-solve the fluxes with the new shapes
        cfull = np.concatenate([np.ones((nf, nr, 1)), np.einsum("fri,ki->frk", LL, coef)], axis=-1)
        prof = np.einsum("frmk,frk->frm", B, cfull)
        d = np.sum(V * prof**2, axis=-1)
        bb = np.sum(V * prof * band.D, axis=-1)
        e = np.zeros((max(nf - 1, 0), nr))
        for f in range(nf - 1):
            shift = cols[f + 1, :, 0] - cols[f, :, 0]                  # (nr,)
            idx = np.arange(m)[None, :] - shift[:, None]
            okn = (idx >= 0) & (idx < m)
            pn = np.take_along_axis(prof[f + 1], np.clip(idx, 0, m - 1), axis=-1) * okn
            e[f] = np.sum(V[f] * prof[f] * pn, axis=-1)
        tiny = ~use | (d <= 0)
        d = np.where(tiny, 1.0, d)
        bb = np.where(tiny, 0.0, bb)
        if nf > 1:
            e = np.where(tiny[:-1] | tiny[1:], 0.0, e)
        amp = np.where(use, solve_tridiagonal(d, e, bb)[0] if nf > 1 else bb / d, 0.0)
    coef_out = coef.reshape(order, deg_[0] + 1, deg_[1] + 1)
    return GHField(halfwidth=int(halfwidth), sigma_coef=field0.sigma_coef, coef=coef_out, focus=field0.focus,
                   rms=field0.rms, n_samples=field0.n_samples)


def find_arc_lines(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray, halfwidth: int, *,
                   min_snr: float = 30.0, detect_snr: float = 5.0):
    """Isolated, clean emission lines in 1D arc spectra.

    A line is a local maximum (+-2 rows) whose peak is ``min_snr`` sigma above a running
    median; it is kept when no other peak above ``detect_snr`` lies within ``2 * halfwidth``
    rows, its ``2 * halfwidth + 1``-row window is on the CCD and has no masked value.

    Returns
    -------
    fiber, row : int arrays
        Fiber index (row of ``flux``) and peak row of each line.
    """
    flux = np.asarray(flux, float)
    nf, ny = flux.shape
    W = int(halfwidth)
    bad = (np.asarray(ivar) <= 0) | (np.asarray(mask) != 0) | ~np.isfinite(flux)
    y = np.where(bad, 0.0, flux)
    base = median_filter(y, size=(1, 4 * W + 1), mode="nearest")
    snr = (y - base) * np.sqrt(np.clip(ivar, 0, None))
    peak = (y == maximum_filter1d(y, 5, axis=1)) & ~bad
    det = peak & (snr > detect_snr)
    out_f, out_r = [], []
    for f in range(nf):
        rows = np.flatnonzero(det[f])
        if rows.size == 0:
            continue
        strong = rows[snr[f, rows] > min_snr]
        for r in strong:
            if r < W or r >= ny - W:
                continue
            if np.any((np.abs(rows - r) <= 2 * W) & (rows != r)):
                continue
            if bad[f, r - W:r + W + 1].any():
                continue
            out_f.append(f)
            out_r.append(r)
    return np.asarray(out_f, int), np.asarray(out_r, int)


def measure_lsf_samples(arc: np.ndarray, arc_ivar: np.ndarray, arc_mask: np.ndarray | None,
                        traces: TraceSet, *, halfwidth: int = 8, order: int = DEFAULT_ORDER,
                        min_snr: float = 30.0, sigma_guess: float = 1.5) -> ProfileSamples:
    """Fit the LSF of isolated arc lines in the box-extracted arc.

    The background of each line is the median of the rows ``W + 1 .. 2 W`` on both sides (free
    of other lines by the isolation rule of :func:`find_arc_lines`), so the fit over the
    ``2 W + 1`` rows of the line keeps all of its wings.
    """
    from fiberlake.processors.extract import box_extract

    xall = traces.x()
    pitch = float(np.median(np.abs(np.diff(np.median(xall, axis=1))))) if traces.n_fibers > 1 else 16.0
    spec = box_extract(arc, arc_ivar, arc_mask, traces, halfwidth=min(7.0, 0.45 * pitch))
    dead = np.asarray(traces.dead, bool) if np.size(traces.dead) == traces.n_fibers else np.zeros(traces.n_fibers, bool)
    mask = spec.mask.astype(np.int64) | (dead[:, None] * 1)
    W = int(halfwidth)
    fib, row = find_arc_lines(spec.flux, spec.ivar, mask, halfwidth, min_snr=min_snr)
    ny = spec.flux.shape[1]
    inside = (row >= 2 * W) & (row < ny - 2 * W)
    fib, row = fib[inside], row[inside]
    if fib.size == 0:
        empty = np.zeros(0)
        return ProfileSamples(fib, empty, empty, empty, np.zeros((0, order + 1)), empty, empty)
    win = row[:, None] + np.arange(-W, W + 1)
    side = row[:, None] + np.concatenate([np.arange(-2 * W, -W), np.arange(W + 1, 2 * W + 1)])
    sflux = spec.flux[fib[:, None], side].astype(float)
    sgood = (spec.ivar[fib[:, None], side] > 0) & (mask[fib[:, None], side] == 0)
    bg = np.array([np.median(s[g]) if g.any() else 0.0 for s, g in zip(sflux, sgood)])
    y = spec.flux[fib[:, None], win].astype(float) - bg[:, None]
    v = spec.ivar[fib[:, None], win].astype(float)
    rel = np.broadcast_to(np.arange(-W, W + 1, dtype=float), y.shape)
    mu, sg, c, chi2, amp, _ = fit_profiles(y, v, rel, np.full(fib.size, sigma_guess), order)
    centre = row + mu
    x = xall[fib, np.clip(np.rint(centre).astype(int), 0, traces.ny - 1)]
    snr = np.max(y, axis=1) * np.sqrt(np.max(v, axis=1))
    ok = np.isfinite(chi2) & (np.abs(mu) < 1.5) & (amp > 0)
    return ProfileSamples(fiber=fib[ok], x=x[ok], row=centre[ok], sigma=sg[ok], c=c[ok], chi2=chi2[ok], snr=snr[ok])


def fit_field(samples: ProfileSamples, n_fibers: int, nx: int, ny: int, *, halfwidth: int,
              deg: tuple[int, int] = (2, 2), invariant: bool = False, min_per_fiber: int = 3,
              chi2_clip: float = 5.0, snr_cap: float = 300.0) -> GHField:
    """Smooth profile samples into a :class:`GHField`.

    Samples with a GH chi^2 above ``chi2_clip`` times the median are dropped. ``sigma`` is
    fitted as ``S(u, v) * (1 + e_f)`` (alternating: the surface on focus-corrected samples,
    then each fiber's median ratio, shrunk as ``n / (n + 2)`` and only with at least
    ``min_per_fiber`` samples); each ``c_k`` as a surface weighted by ``min(snr, snr_cap)^2``
    (the noise of a sample's coefficients scales as 1 / snr). Every fit is 3-sigma clipped.
    """
    K = samples.c.shape[1] - 1 if samples.c.ndim == 2 else 0
    deg = (0, 0) if invariant else tuple(int(d) for d in deg)
    if samples.sigma.size == 0:
        raise ValueError("no profile samples to fit the PSF with")
    chi2 = samples.chi2
    keep = np.isfinite(chi2) & np.isfinite(samples.sigma) & np.all(np.isfinite(samples.c), axis=1)
    if keep.any():
        keep &= chi2 <= chi2_clip * max(1.0, float(np.median(chi2[keep])))
    s = samples
    u = 2.0 * s.x[keep] / (nx - 1) - 1.0
    v = 2.0 * s.row[keep] / (ny - 1) - 1.0
    fib = s.fiber[keep]
    sig = s.sigma[keep]
    c = s.c[keep]
    wts = np.minimum(np.where(np.isfinite(s.snr[keep]), s.snr[keep], 0.0), snr_cap) ** 2
    focus = np.zeros(n_fibers)
    use = np.ones(sig.size, bool)
    for _ in range(1 if invariant else 4):
        scoef, use = _legfit2d(u, v, sig / (1.0 + focus[fib]), deg)
        if invariant:
            break
        model = legendre.legval2d(u, v, scoef)
        ratio = sig / model - 1.0
        new = np.zeros(n_fibers)
        for f in np.unique(fib):
            r = ratio[fib == f]
            if r.size >= min_per_fiber:
                med = float(np.median(r))
                new[f] = med * r.size / (r.size + 2.0)
        focus = new
    model = legendre.legval2d(u, v, scoef) * (1.0 + focus[fib])
    resid = sig / model - 1.0
    rms = float(1.4826 * np.median(np.abs(resid[use]))) if use.any() else 0.0
    coef = np.zeros((K,) + scoef.shape)
    for k in range(K):
        coef[k], _ = _legfit2d(u, v, c[:, k + 1], deg, weights=wts)
    return GHField(halfwidth=int(halfwidth), sigma_coef=scoef, coef=coef, focus=focus, rms=rms,
                   n_samples=int(use.sum()))


def fit_psf(flat: np.ndarray, flat_ivar: np.ndarray, flat_mask: np.ndarray | None,
            arc: np.ndarray, arc_ivar: np.ndarray, arc_mask: np.ndarray | None, traces: TraceSet, *,
            order: int = DEFAULT_ORDER, deg: tuple[int, int] = (2, 2), invariant: bool = False,
            lsf_halfwidth: int = 8, xsf_halfwidth: int = 12, n_rows: int = 48,
            min_snr: float = 30.0) -> PSFModel:
    """Fit the PSF model of one camera: LSF from the arc, cross-dispersion profile from the flat.

    Parameters
    ----------
    flat, flat_ivar, flat_mask
        Master flat in electrons, its inverse variance and mask.
    arc, arc_ivar, arc_mask
        Master arc, likewise.
    traces : TraceSet
        Traces measured on the flat.
    order : int
        Gauss-Hermite order of both profiles.
    deg : (int, int)
        Legendre degrees of the smooth series in column and row.
    invariant : bool
        One PSF for the whole frame (for rectified frames).
    lsf_halfwidth, xsf_halfwidth : int
        Window half-widths (pixels) of the two profiles.
    n_rows : int
        Rows of the flat where the cross-dispersion profiles are measured.
    min_snr : float
        Minimum peak S/N of an arc line used for the LSF.

    Returns
    -------
    PSFModel
        With ``info`` holding the sample counts and fit RMS.
    """
    ny, nx = np.shape(flat)
    nf = traces.n_fibers
    xsf = fit_xsf_field(flat, flat_ivar, flat_mask, traces, halfwidth=xsf_halfwidth, order=order,
                        n_rows=n_rows, deg=deg, invariant=invariant)
    sigma_guess = float(legendre.legval2d(0.0, 0.0, xsf.sigma_coef)) * 0.6
    ls = measure_lsf_samples(arc, arc_ivar, arc_mask, traces, halfwidth=lsf_halfwidth, order=order,
                             min_snr=min_snr, sigma_guess=max(sigma_guess, 1.0))
    lsf = fit_field(ls, nf, nx, ny, halfwidth=lsf_halfwidth, deg=deg, invariant=invariant)
    info = {"n_lsf_lines": int(ls.sigma.size), "n_xsf_samples": int(xsf.n_samples),
            "lsf_sigma_rms": lsf.rms, "xsf_sigma_rms": xsf.rms}
    return PSFModel(lsf=lsf, xsf=xsf, ny=ny, nx=nx, invariant=invariant, info=info)


# ----------------------------------------------------------------------------- held-out arcs


def arc_line_residuals(image: np.ndarray, ivar: np.ndarray, mask: np.ndarray | None, traces: TraceSet,
                       fibers: np.ndarray, rows: np.ndarray, stamp, *, halfwidth_rows: int = 8,
                       halfwidth_cols: int | None = None, shifts: np.ndarray | None = None) -> dict:
    """How well a PSF predicts arc lines in 2D: chi^2 / dof of each line's stamp.

    For each line (fiber ``f``, centroid row ``rows``) the stamp is rows ``+-halfwidth_rows``
    and the columns within ``halfwidth_cols`` (default: pitch / 2 - 0.5) of the trace. The
    model is ``a * stamp(f, centre)`` plus the same line in fibers ``f +- 1`` (their own
    amplitudes, same row) and a constant background; the amplitudes are linear, the centre is
    refined on a grid of row ``shifts`` (default +-0.3 px in 0.1 px steps) then by a parabola.

    Parameters
    ----------
    stamp : callable
        ``stamp(fiber, centre_row, r0, r1, c0, c1) -> ndarray (r1 - r0, c1 - c0)``: the PSF
        model of a unit-flux line in that pixel box.

    Returns
    -------
    dict
        ``chi2`` (per line, chi^2 / dof), ``rms`` (RMS of the normalised residuals),
        ``npix`` and ``snr`` (peak S/N) per line.
    """
    img, iv, good = _good(image, ivar, mask)
    ny, nx = img.shape
    order = _sorted(traces)
    pos = np.empty_like(order)
    pos[order] = np.arange(order.size)
    xall = traces.x()
    pitch = float(np.median(np.diff(np.median(xall[order], axis=1)))) if traces.n_fibers > 1 else 16.0
    hc = halfwidth_cols if halfwidth_cols is not None else 0.5 * pitch - 0.5
    H = int(halfwidth_rows)
    shifts = np.linspace(-0.3, 0.3, 7) if shifts is None else np.asarray(shifts, float)
    out = {"chi2": [], "rms": [], "npix": [], "snr": []}
    for f, r in zip(np.asarray(fibers, int), np.asarray(rows, float)):
        r0, r1 = int(np.rint(r)) - H, int(np.rint(r)) + H + 1
        if r0 < 0 or r1 > ny:
            continue
        xc = xall[f, int(np.rint(r))]
        c0, c1 = int(np.floor(xc - hc - 12)), int(np.ceil(xc + hc + 12)) + 1
        c0, c1 = max(c0, 0), min(c1, nx)
        rr = np.arange(r0, r1)
        cols = np.arange(c0, c1)
        sel = np.abs(cols[None, :] - xall[f, rr][:, None]) <= hc
        d = img[r0:r1, c0:c1]
        w = iv[r0:r1, c0:c1] * sel
        neigh = [order[p] for p in (pos[f] - 1, pos[f] + 1) if 0 <= p < order.size]

        def fit(centre):
            comps = [stamp(f, centre, r0, r1, c0, c1)]
            comps += [stamp(n, centre, r0, r1, c0, c1) for n in neigh]
            comps.append(np.ones_like(d))
            B = np.stack([cmp.ravel() for cmp in comps], axis=1)
            ww = w.ravel()
            A = B.T @ (B * ww[:, None]) + 1e-12 * np.eye(B.shape[1])
            coef = np.linalg.solve(A, B.T @ (ww * d.ravel()))
            res = (d.ravel() - B @ coef) * np.sqrt(ww)
            return float(res @ res), res, B.shape[1]

        chis = np.array([fit(r + s)[0] for s in shifts])
        k = int(np.clip(np.argmin(chis), 1, shifts.size - 2))
        y0, y1, y2 = chis[k - 1:k + 2]
        den = y0 - 2 * y1 + y2
        step = shifts[1] - shifts[0]
        best = shifts[k] + (0.5 * step * (y0 - y2) / den if den > 0 else 0.0)
        chi, res, npar = fit(r + best)
        npix = int((w > 0).sum())
        out["chi2"].append(chi / max(npix - npar - 1, 1))
        out["rms"].append(float(np.sqrt(np.mean(res[w.ravel() > 0] ** 2))))
        out["npix"].append(npix)
        out["snr"].append(float(np.max(d * np.sqrt(w))))
    return {k: np.asarray(v) for k, v in out.items()}


def psf_stamp(psf: PSFModel, traces: TraceSet):
    """A ``stamp`` callable for :func:`arc_line_residuals` from a :class:`PSFModel` (the
    cross-dispersion part of each box is computed once and cached)."""
    cache: dict = {}

    def across(f, r0, r1, c0, c1):
        key = (f, r0, r1, c0, c1)
        if key not in cache:
            rows = np.arange(r0, r1)
            fc, xw = psf.xsf_weights(np.full(rows.size, f), traces.x(rows)[f], rows)
            out = np.zeros((r1 - r0, c1 - c0))
            cidx = fc[:, None] + np.arange(xw.shape[1]) - c0
            okc = (cidx >= 0) & (cidx < c1 - c0)
            ri = np.broadcast_to(np.arange(rows.size)[:, None], cidx.shape)
            out[ri[okc], cidx[okc]] = xw[okc]
            cache[key] = out
        return cache[key]

    def stamp(f, centre, r0, r1, c0, c1):
        x_c = traces.x(np.array([centre]))[f, 0]
        first, lw = psf.lsf_weights(np.array(f), np.array(x_c), np.array(centre))
        lrow = np.zeros(r1 - r0)
        idx = first + np.arange(lw.size) - r0
        ok = (idx >= 0) & (idx < lrow.size)
        lrow[idx[ok]] = lw[ok]
        return across(f, r0, r1, c0, c1) * lrow[:, None]
    return stamp
