"""Reference implementation of the deconvolution extraction: plain numpy/scipy, one patch at a
time, with the explicit pixel-level projection matrix.

For every patch this module builds the sparse matrix ``A[(r, c), (f, s)] = L_{f,s}(r - s)
P_{f,r}(c - x_f(r))`` over the pixels the patch's fibers and rows reach, forms the dense
``H = A^T W A`` and ``A^T W p``, adds the same ridge as :mod:`fiberlake.processors.deconv`
(``regularize * max diag`` of each fiber block), solves by a dense Cholesky factorisation,
inverts ``H`` in full to get the covariance ``C``, and for each core fiber inverts its block
``C_ff``, takes the symmetric square root by ``scipy.linalg.eigh`` and normalises the rows into
``R``. It shares the PSF sampling, the patch plan and the final assembly/flagging with
:mod:`~fiberlake.processors.deconv` but none of its linear algebra: neither the per-row
reductions ``K0, K1, b`` nor the block-tridiagonal Schur sweeps. The tests compare the two.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from fiberlake.processors import deconv as D
from fiberlake.processors.deconv import DeconvParams, DeconvSpectra, FrameTables, PatchPlan, deconv_extract


def patch_matrix(tab: FrameTables, plan: PatchPlan, p: int):
    """Explicit projection matrix of patch ``p``.

    Returns
    -------
    A : scipy.sparse.csr_matrix, shape (n_pixels, nfp * nb)
        Columns in fiber-major order (slot ``i``, bin ``j`` -> ``i * nb + j``).
    pix : int array (n_pixels,)
        Flat pixel index ``r * nx + c`` of each row of ``A``.
    """
    ny, nx = tab.img.shape
    nf, n_ext, nd = tab.lsf.shape
    wy = (nd - 1) // 2
    nw = tab.prof.shape[-1]
    pad = tab.pad
    nb = plan.nb
    e0 = int(plan.e0[p])
    s0 = e0 - pad                                           # first bin / pixel row of the patch
    rows_lo, rows_hi = max(s0, 0), min(s0 + nb, ny)
    pix_all, col_all, val_all = [], [], []
    j = np.arange(nb)[:, None, None]
    d = np.arange(nd)[None, :, None]
    jj = np.arange(nw)[None, None, :]
    for i, f in enumerate(plan.fibers[p]):
        if f < 0:
            continue
        r = s0 + j + d - wy                                 # (nb, nd, 1)
        okr = (r >= rows_lo) & (r < rows_hi)
        rc = np.clip(r, 0, ny - 1)
        c = tab.first[f, rc[..., 0]][..., None] + jj        # (nb, nd, nw)
        ok = okr & (c >= 0) & (c < nx)
        val = tab.lsf[f, e0 + j[..., 0], d[..., 0]][..., None] * tab.prof[f, rc[..., 0]]
        ok &= val != 0
        rb = np.broadcast_to(rc, c.shape)
        pix_all.append((rb * nx + c)[ok])
        col_all.append(np.broadcast_to(i * nb + j, c.shape)[ok])
        val_all.append(val[ok])
    m = plan.fibers.shape[1]
    if not pix_all:
        return sp.csr_matrix((0, m * nb)), np.zeros(0, np.int64)
    pix = np.concatenate(pix_all)
    upix, rowi = np.unique(pix, return_inverse=True)
    A = sp.csr_matrix((np.concatenate(val_all), (rowi, np.concatenate(col_all))), shape=(upix.size, m * nb))
    return A, upix


def solve_patch_reference(tab: FrameTables, plan: PatchPlan, p: int, *, regularize: float, halfwidth: int):
    """Dense solve and decorrelation of one patch (see the module notes)."""
    nb = plan.nb
    m = plan.fibers.shape[1]
    A, pix = patch_matrix(tab, plan, p)
    w = tab.w.ravel()[pix]
    data = tab.img.ravel()[pix]
    H = (A.T @ sp.diags(w) @ A).toarray()
    rhs = A.T @ (w * data)
    for i in range(m):
        blk = slice(i * nb, (i + 1) * nb)
        scale = float(np.max(np.diag(H)[blk]))
        H[blk, blk] += regularize * (scale if scale > 0 else 1.0) * np.eye(nb)
    nc = plan.core_slots.size
    h = int(halfwidth)
    out = {"flux": np.zeros((nc, nb)), "ivar": np.zeros((nc, nb)), "res": np.zeros((nc, 2 * h + 1, nb)),
           "g": np.zeros((nc, nb)), "failed": False}
    try:
        cf = scipy.linalg.cho_factor(H, lower=True)
        F = scipy.linalg.cho_solve(cf, rhs)
        C = scipy.linalg.cho_solve(cf, np.eye(H.shape[0]))
    except (np.linalg.LinAlgError, ValueError):
        out["failed"] = True
        return out
    jj = np.arange(nb)
    nd = tab.lsf.shape[-1]
    wy = (nd - 1) // 2
    e0 = int(plan.e0[p])
    for ci, slot in enumerate(plan.core_slots):
        blk = slice(slot * nb, (slot + 1) * nb)
        Cb = 0.5 * (C[blk, blk] + C[blk, blk].T)
        icov = scipy.linalg.inv(Cb)
        icov = 0.5 * (icov + icov.T)
        ev, V = scipy.linalg.eigh(icov)
        Q = (V * np.sqrt(np.clip(ev, 0.0, None))) @ V.T
        norm = Q.sum(axis=1)
        okn = norm > 0
        R = np.where(okn[:, None], Q / np.where(okn, norm, 1.0)[:, None], 0.0)
        out["flux"][ci] = R @ F[blk]
        out["ivar"][ci] = np.where(okn, norm**2, 0.0)
        f = plan.fibers[p, slot]
        if f >= 0:                                          # light per patch row: L F
            for k in range(nd):
                row = jj + k - wy
                ok = (row >= 0) & (row < nb)
                out["g"][ci, row[ok]] += tab.lsf[f, e0 + jj[ok], k] * F[blk][ok]
        for k in range(2 * h + 1):
            col = jj + k - h
            ok = (col >= 0) & (col < nb)
            out["res"][ci, k, ok] = R[jj[ok], col[ok]]
    if not (np.all(np.isfinite(out["flux"])) and np.all(np.isfinite(out["ivar"]))):
        out["failed"] = True
    return out


def solve_patches_reference(tab: FrameTables, plan: PatchPlan, sel: np.ndarray, *, regularize: float,
                            halfwidth: int) -> dict:
    """:func:`solve_patch_reference` over patches ``sel``, stacked like the torch solver's output."""
    parts = [solve_patch_reference(tab, plan, int(p), regularize=regularize, halfwidth=halfwidth) for p in sel]
    return {"flux": np.stack([q["flux"] for q in parts]), "ivar": np.stack([q["ivar"] for q in parts]),
            "res": np.stack([q["res"] for q in parts]).astype(np.float32), "g": np.stack([q["g"] for q in parts]),
            "failed": np.array([q["failed"] for q in parts], bool)}


def deconv_extract_reference(image, ivar, mask, traces, psf, params: DeconvParams | None = None) -> DeconvSpectra:
    """:func:`~fiberlake.processors.deconv.deconv_extract` with the dense numpy/scipy solver."""
    return deconv_extract(image, ivar, mask, traces, psf, params, backend="numpy")


def solve_patches_torch_dense(lsf_band, K0, K1, b, core_slots, *, regularize: float, halfwidth: int, device):
    """The torch solver as it was before issue 19 (kept to compare the products against).

    Same equations as :func:`fiberlake.processors.deconv.solve_patches_torch`; separate
    triangular solves for the coupling blocks and the right-hand side, and every
    Cholesky-solve step written out.

    Parameters
    ----------
    lsf_band, K0, K1, b : ndarrays from :func:`gather_patches`
    core_slots : int array (nc,)
    regularize : float
        Relative ridge per fiber block.
    halfwidth : int
        Resolution band half-width ``h``.
    device : torch.device

    Returns
    -------
    dict of ndarrays
        ``flux``, ``ivar`` (B, nc, nb); ``res`` (B, nc, 2h+1, nb); ``g`` (B, nc, nb): the
        fitted light per patch row ``L F``; ``failed`` (B,) bool (Cholesky failure or
        non-finite result).
    """
    import torch

    dt = torch.float64
    B, m, nb, nd = lsf_band.shape
    wy = (nd - 1) // 2
    r_idx, j_idx, d_idx, _ = D._band_to_dense_index(nb, wy)
    band = torch.as_tensor(lsf_band, dtype=dt, device=device)
    L = torch.zeros((B, m, nb, nb), dtype=dt, device=device)
    L[:, :, torch.as_tensor(r_idx, device=device), torch.as_tensor(j_idx, device=device)] = \
        band[:, :, torch.as_tensor(j_idx, device=device), torch.as_tensor(d_idx, device=device)]
    k0 = torch.as_tensor(K0, dtype=dt, device=device)
    k1 = torch.as_tensor(K1, dtype=dt, device=device)
    bb = torch.as_tensor(b, dtype=dt, device=device)
    Lt = L.transpose(-1, -2)
    Hd = Lt @ (k0[..., None] * L)                                       # (B, m, nb, nb)
    Ho = Lt[:, :-1] @ (k1[:, :-1, :, None] * L[:, 1:])                  # H_{i,i+1}
    rhs = (Lt @ bb[..., None])[..., 0]                                  # (B, m, nb)
    diag = torch.diagonal(Hd, dim1=-2, dim2=-1)
    scale = diag.amax(dim=-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    Hd.diagonal(dim1=-2, dim2=-1).add_((regularize * scale)[..., None])
    failed = torch.zeros(B, dtype=torch.bool, device=device)

    def chol(A):
        Lc, info = torch.linalg.cholesky_ex(A)
        return Lc, info != 0

    # forward sweep: S_i and the forward-eliminated rhs
    LS, Wt, y = [None] * m, [None] * m, [None] * m
    S_list = [None] * m
    S = Hd[:, 0]
    y[0] = rhs[:, 0]
    for i in range(m):
        if i > 0:
            W_ = torch.linalg.solve_triangular(LS[i - 1], Ho[:, i - 1], upper=False)
            Wt[i] = W_
            S = Hd[:, i] - W_.transpose(-1, -2) @ W_
            z = torch.linalg.solve_triangular(LS[i - 1], y[i - 1][..., None], upper=False)
            y[i] = rhs[:, i] - (W_.transpose(-1, -2) @ z)[..., 0]
        S_list[i] = S
        LS[i], bad = chol(S)
        failed |= bad
    # back-substitution
    F = [None] * m
    F[m - 1] = torch.cholesky_solve(y[m - 1][..., None], LS[m - 1])[..., 0]
    for i in range(m - 2, -1, -1):
        F[i] = torch.cholesky_solve((y[i] - (Ho[:, i] @ F[i + 1][..., None])[..., 0])[..., None], LS[i])[..., 0]
    # backward sweep down to the first core slot: T_i
    lo = int(np.min(core_slots))
    T_list = [None] * m
    T = Hd[:, m - 1]
    T_list[m - 1] = T
    LT, bad = chol(T)
    failed |= bad
    for i in range(m - 2, lo - 1, -1):
        V_ = torch.linalg.solve_triangular(LT, Ho[:, i].transpose(-1, -2), upper=False)
        T = Hd[:, i] - V_.transpose(-1, -2) @ V_
        T_list[i] = T
        LT, bad = chol(T)
        failed |= bad
    core = [int(c) for c in core_slots]
    # C_ii^-1 of the core fibers (eigh reads the lower triangle only)
    icov = torch.stack([S_list[i] + T_list[i] - Hd[:, i] for i in core], dim=1)   # (B, nc, nb, nb)
    Fc = torch.stack([F[i] for i in core], dim=1)                       # (B, nc, nb)
    g = (L[:, core] @ Fc[..., None])[..., 0]                            # light per patch row
    w, V = torch.linalg.eigh(icov)
    Q = (V * torch.sqrt(torch.clamp(w, min=0.0))[..., None, :]) @ V.transpose(-1, -2)
    norm = Q.sum(dim=-1)
    okn = norm > 0
    inv_norm = torch.where(okn, 1.0 / torch.where(okn, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    flux = (Q @ Fc[..., None])[..., 0] * inv_norm                        # R F with R = Q / norm
    ivar = torch.where(okn, norm**2, torch.zeros_like(norm))
    # band of R: res[k, j] = R[j, j + k - h]
    h = int(halfwidth)
    jj = torch.arange(nb, device=device)
    kk = torch.arange(2 * h + 1, device=device)
    col = jj[None, :] + kk[:, None] - h                                 # (2h+1, nb)
    okc = (col >= 0) & (col < nb)
    colc = col.clamp(0, nb - 1)
    res = Q[..., jj[None, :].expand_as(colc), colc] * okc * inv_norm[..., None, :]
    finite = torch.isfinite(flux).all(dim=(-1, -2)) & torch.isfinite(ivar).all(dim=(-1, -2))
    failed |= ~finite
    return {"flux": flux.cpu().numpy(), "ivar": ivar.cpu().numpy(), "res": res.cpu().numpy(),
            "g": g.cpu().numpy(), "failed": failed.cpu().numpy()}


def cholesky_resolution(icov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resolution matrix from the Cholesky factor instead of the symmetric square root.

    With ``icov = U^T U`` (``U`` upper triangular) the spectrum ``U F`` has unit-variance,
    uncorrelated errors too: every ``Q`` with ``Q^T Q = icov`` decorrelates, and they differ
    by an orthogonal rotation (``Q_sym = O U`` with ``O`` the polar factor of ``U``). Only
    the symmetric one keeps ``R`` a symmetric, centred line-spread; ``U``'s rows are
    one-sided. This function exists for the test that shows the two are *not* the same
    product, which is why the solver keeps the eigen-decomposition.

    Returns
    -------
    R : ndarray (nb, nb)
        ``U`` with rows normalised to unit sum.
    ivar : ndarray (nb,)
        Squared row sums of ``U``.
    """
    U = scipy.linalg.cholesky(icov, lower=False)
    norm = U.sum(axis=1)
    return U / norm[:, None], norm**2
