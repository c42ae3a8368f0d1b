"""Deconvolution extraction (spectro-perfectionism, Bolton & Schlegel 2010) on the CCD row grid.

Model
-----
The unknowns are, for every fiber ``f`` and row ``s``, the electrons ``F[f, s]`` whose
line-spread function (LSF) is centred on row ``s`` (the row-binned spectrum *before* the
LSF). With the PSF model of :mod:`fiberlake.processors.psf`, pixel ``(r, c)`` expects ::

    M(r, c) = sum_{f, s} A[(r, c), (f, s)] F[f, s],
    A[(r, c), (f, s)] = L_{f,s}(r - s) P_{f,r}(c - x_f(r)).

With pixel weights ``w = ivar`` (0 where masked, NaN or off the CCD) the estimate solves
``(A^T W A) F = A^T W p``. ``F`` itself is noisy and correlated (it is a deconvolution); the
products are, per fiber, the *reconvolved* flux ``f~ = R F`` with the resolution matrix ``R``
of the fiber: with ``C`` the covariance of ``F`` and ``C_ff`` its block for fiber ``f``,
``Q = (C_ff^-1)^(1/2)`` (symmetric square root by eigen-decomposition) and ``R = Q`` with its
rows normalised to unit sum. ``f~`` has uncorrelated errors along the fiber, inverse variance
(row sums of ``Q``)^2, and ``E[f~] = R F_true`` (DESI's ``decorrelate_blocks``; the small
correlations between neighbouring fibers remain).

Computation
-----------
* **Per fiber and row first.** Because each pixel row's light is ``L`` times ``P``,
  ``A^T W A`` needs only, per fiber and row, ``K0 = sum_c P_f^2 w``,
  ``K1 = sum_c P_f P_{f+1} w`` (nearest neighbours: a profile window of ``2 W + 1`` columns
  may only reach the next fiber) and ``b = sum_c P_f w p``; then
  ``H_ff = L_f^T diag(K0) L_f``, ``H_f,f+1 = L_f^T diag(K1) L_{f+1}``, ``rhs_f = L_f^T b``.
* **Patches.** Fibers are solved in groups of ``fibers_per_patch`` (plus ``overlap_fibers``
  on each side) and rows in blocks of ``rows_per_patch`` (plus ``pad_rows`` on each side);
  only a patch's core is kept. Each patch models the pixel rows of its bins; bins up to
  ``pad_rows`` beyond the CCD's first and last rows are unknowns too (their light reaches
  the edge rows), so the edges need no special case.
* **Block-tridiagonal solve.** In fiber-major order ``H`` is block tridiagonal (blocks of
  ``nb x nb`` bins per fiber). A forward sweep of Schur complements ``S_i`` (Cholesky,
  batched over patches) gives the solution by back-substitution; a backward sweep ``T_i``
  gives every fiber's decorrelation block without forming ``C``:
  ``C_ii^-1 = S_i + T_i - H_ii``. A ridge ``regularize * max(diag H_ii)`` is added to every
  block (it bounds the relative bias of ``R F`` by ``sqrt(regularize)``); a patch whose
  Cholesky fails is solved again with ``retry_regularize`` and flagged ``BAD2DFIT``.
* **Batched eigen-decomposition** of the ``C_ii^-1`` of every core fiber of a batch of
  patches at once (the dominant cost, as in DESI's GPU port). ``R`` must be the symmetric
  square root: the Cholesky factor of ``C_ii^-1`` decorrelates as well (every ``Q`` with
  ``Q^T Q = C_ii^-1`` does; they differ by a rotation) but gives a one-sided ``R`` whose rows'
  centroids sit rows off their bins, so it is not used. The ``deconv`` variance model's first
  pass needs only the fitted light and skips the backward sweep and the eigen-decomposition.
* **Profile windows** of the per-pixel arrays (weights, data, masks, residuals) are read
  through strided views of sliding windows over row blocks padded by the window width (no
  flat index arrays the size of the frame), their profile-weighted sums are stacked vector
  products, and the model image is a weighted ``bincount`` of the windows per row block.

Everything runs in float64 with torch (CUDA when available); :mod:`.deconv_reference`
implements the same equations with dense per-patch matrices in numpy/scipy.

Outputs and flags
-----------------
:class:`DeconvSpectra`: ``flux = R F`` (electrons per row), ``ivar``, ``mask``, ``chi2``
(chi^2 per pixel over each bin's spot, profile-weighted), ``npix`` (good pixels in the spot
with weight above ``SIGNIFICANT_WEIGHT``), ``resolution`` and ``model_rows``. The deconvolved
``F`` itself is not returned: it is dominated by its nearly unconstrained high-frequency modes
(differently in each patch); ``R F`` and the model ``L F`` are not.

``resolution[f, k, r]`` (float32, shape ``(n_fibers, 2 h + 1, ny)``) is the band of ``R``:
``flux[f, r] ~= sum_k resolution[f, k, r] * F_true[f, r + k - h]`` (row ``r`` of ``R``,
column ``r + k - h``; near the first and last rows the columns reach up to ``h`` bins beyond
the CCD, which are real unknowns: their light falls on the edge rows).
:func:`apply_resolution` applies it. The stored band is ``R`` truncated to ``|offset| <= h``
(on the simulator's corner LSF, h = 7 leaves a median 4e-5 and at most 4e-3 of a row's
weight outside); the row-grid wavelengths come from the calibration's wavelength solution.
``R`` follows the pixel weights: where a bright line's own photon noise dominates its pixels
the deconvolved line comes out narrower than the LSF (FWHM ~0.79 of it on the simulator);
on a continuum or at low signal it matches the LSF (see ``bench/deconv.py accuracy``).

Pixel variances: by default the input ``ivar`` only selects the good pixels and sets the read
noise; the weights of the solve are ``1 / (read_noise^2 + model)`` with the model from a
row-by-row fit of the cross-dispersion profiles (:class:`DeconvParams` ``variance_model``),
because weights computed from the noisy data bias the fluxes low.

With ``G`` the fraction of a bin's spot (LSF x profile) on good pixels and ``O`` the fraction
off the CCD (rows or columns): ``G < MIN_GOOD_FRACTION`` makes the bin unusable (flux 0,
ivar 0, ``OFFCCD`` when ``O`` exceeds the masked fraction, else ``ALLBADPIX``); a masked
fraction above ``SOMEBAD_FRACTION`` sets ``SOMEBADPIX``. Since the deconvolution models the
missing light, a bin half off the CCD (the first and last rows) stays usable. Dead fibers are
left out of the model (``DEADFIBER``, flux 0, ivar 0). ``BAD2DFIT`` where ``chi2`` exceeds
``BAD2DFIT_FACTOR`` times ``max(1, median)`` or the patch needed the retry.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from fiberlake.processors.content_cache import ContentCache, content_key
from fiberlake.processors.extract import prepare_pixels, solve_tridiagonal
from fiberlake.schemas.containers import PSFModel, Spectra1D, TraceSet
from fiberlake.schemas.maskbits import FATAL, MASK_DTYPE, Mask

MIN_GOOD_FRACTION = 0.5
"""Below this fraction of its spot on good pixels a bin is unusable."""
SOMEBAD_FRACTION = 0.05
"""Masked on-CCD spot fraction above which ``SOMEBADPIX`` is set."""
SIGNIFICANT_WEIGHT = 1e-3
"""Pixels (rows) with a profile (LSF) weight above this pass their mask bits to the bin."""
BAD2DFIT_FACTOR = 5.0
"""``BAD2DFIT`` where chi^2 per pixel exceeds this many times ``max(1, median)``."""
LSF_ROW_STEP = 4
"""Rows between exact evaluations of the LSF kernels (linear interpolation in between)."""
_NONFATAL = np.uint32(~int(FATAL) & 0xFFFFFFFF)


@dataclass(frozen=True)
class DeconvParams:
    """Patch layout and numerics of :func:`deconv_extract`.

    Attributes
    ----------
    fibers_per_patch : int
        Core fibers of a patch (DESI: 5 per sub-bundle). The block-tridiagonal solve costs
        linearly in the fibers of a patch, so more fibers only dilute the overlap fibers.
    rows_per_patch : int
        Core rows (bins) of a patch (DESI: 50 wavelength bins). Measured on a full-size frame
        (``bench/deconv.py speed``, one thread): 10 x 30 (+1, +10) gives 43.7k unknowns/s
        against 33.2k for DESI's 5 x 50 (+1, +10) and 42.2k for 5 x 20; the default.
    pad_rows : int
        Extra bins solved and discarded on each side of a patch's core (>= the LSF
        half-width; DESI's ``wavepad`` is 10).
    overlap_fibers : int
        Extra fibers solved and discarded on each side.
    resolution_halfwidth : int
        Half-width ``h`` of the stored resolution band (``2 h + 1`` diagonals).
    regularize : float
        Ridge added to every fiber block, relative to its largest diagonal element.
    retry_regularize : float
        Ridge of the second attempt for patches whose Cholesky failed.
    batch : int
        Patches per batched solve (0: 64 on CPU, 1024 on CUDA).
    variance_model : str
        Pixel variances of the solve. ``"rows"`` (default): ``read_noise^2 + model`` with the
        model from a row-by-row fit of the cross-dispersion profiles (a tridiagonal solve per
        row, much cheaper than a patch solve); ``"deconv"``: the same from a first full
        deconvolution (twice the cost); ``"none"``: the input ``ivar``. Weights computed from
        the noisy data themselves bias fluxes low (by ~0.3 sigma per row on simulated faint
        fibers).
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    cpu_threads : int
        torch intra-op threads during a CPU solve (the previous setting is restored after);
        0 keeps torch's setting. 1 by default: the many small LAPACK calls gain little from
        threads and lose badly when the cores are shared (a 25-fiber LAMOST strip: 2.4 s with
        1 thread, 101 s with 2 on a loaded 2-core machine); run frames in parallel processes
        instead.
    """

    fibers_per_patch: int = 10
    rows_per_patch: int = 30
    pad_rows: int = 10
    overlap_fibers: int = 1
    resolution_halfwidth: int = 7
    regularize: float = 1e-10
    retry_regularize: float = 1e-4
    batch: int = 0
    variance_model: str = "rows"
    device: str = "auto"
    cpu_threads: int = 1

    def __post_init__(self) -> None:
        if self.fibers_per_patch < 1 or self.rows_per_patch < 1 or self.pad_rows < 0 or self.overlap_fibers < 0:
            raise ValueError("deconv: patch sizes must be positive (pad and overlap >= 0)")
        if self.resolution_halfwidth < 0 or self.resolution_halfwidth > self.rows_per_patch + 2 * self.pad_rows:
            raise ValueError("deconv: resolution_halfwidth must lie in [0, rows_per_patch + 2 pad_rows]")
        if self.variance_model not in ("rows", "deconv", "none"):
            raise ValueError(f"deconv: variance_model {self.variance_model!r} not one of rows, deconv, none")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"deconv: device {self.device!r} not one of auto, cpu, cuda")

    def to_dict(self) -> dict:
        """Plain dict (for run records)."""
        return asdict(self)


@dataclass
class DeconvSpectra(Spectra1D):
    """Deconvolution-extracted spectra on the row grid (see the module notes).

    Attributes
    ----------
    resolution : ndarray of float32, shape (n_fibers, 2 h + 1, ny)
        Band of each fiber's resolution matrix: ``flux[f, r] ~ sum_k resolution[f, k, r]
        F[f, r + k - h]``.
    model_rows : ndarray of float64, shape (n_fibers, ny)
        The fitted light of each fiber per CCD row (``L F`` from the patch that kept the row),
        whose spread across the columns is the model image behind ``chi2``.
    info : dict
        Timings (s: ``t_prepare`` PSF sampling and per-row reductions, ``t_weights`` the model
        variance, ``t_solve`` the patch solves, ``t_finish`` flags and chi^2), patch counts and
        the number of patches solved with the retry ridge.
    """

    resolution: np.ndarray | None = None
    model_rows: np.ndarray | None = None
    info: dict = field(default_factory=dict)


def apply_resolution(resolution: np.ndarray, model: np.ndarray) -> np.ndarray:
    """Convolve row-binned model spectra with stored resolution bands.

    Parameters
    ----------
    resolution : ndarray, shape (n_fibers, 2 h + 1, ny)
    model : ndarray, shape (n_fibers, ny) or (n_fibers, ny + 2 h)
        Electrons per row *before* the LSF (the quantity ``F`` the extraction solves for);
        the longer form includes the ``h`` bins beyond each end of the CCD (their light
        reaches the first and last rows, and the first and last rows of ``R`` use them),
        the shorter one takes them as 0.

    Returns
    -------
    ndarray, shape (n_fibers, ny)
        ``R model``, comparable with ``DeconvSpectra.flux``.
    """
    res = np.asarray(resolution, float)
    nf, nd, ny = res.shape
    h = (nd - 1) // 2
    model = np.asarray(model, float)
    if model.shape[-1] == ny:
        padded = np.pad(model, ((0, 0), (h, h)))
    elif model.shape[-1] == ny + 2 * h:
        padded = model
    else:
        raise ValueError(f"model has {model.shape[-1]} rows; expected {ny} or {ny + 2 * h}")
    out = np.zeros((nf, ny))
    for k in range(nd):
        out += res[:, k] * padded[:, k:k + ny]
    return out


# ----------------------------------------------------------------------------- frame tables


@dataclass
class FrameTables:
    """Everything the patch solves need, per (sorted) fiber and row.

    Extended rows ``e = s + pad`` cover bins ``s`` in ``[-pad, ny + pad)``.

    Attributes
    ----------
    order : int array (nf,)
        Sorted position -> fiber index (fibers sorted by column).
    live : bool array (nf,)
        Not dead (sorted order).
    lsf : float array (nf, n_ext, 2 Wy + 1)
        ``lsf[f, e, d]``: fraction of bin ``s = e - pad`` landing on row ``s + d - Wy``.
    first : int array (nf, ny)
        First column of each fiber's profile window per CCD row.
    prof : float array (nf, ny, 2 Wx + 1)
        Cross-dispersion profile (0 for dead fibers).
    K0, K1, b : float arrays (nf, n_ext)
        Per-row reductions (0 off the CCD); ``K1[f]`` couples sorted fibers ``f`` and ``f+1``.
    gx, ox : float arrays (nf, ny)
        Profile fraction on good pixels and off the CCD columns.
    bits : uint32 array (nf, ny)
        OR of the mask bits of significant profile pixels.
    ngood : float array (nf, ny)
        Good pixels with a significant profile weight.
    img, w : float arrays (ny, nx)
        Image (0 where bad) and pixel weights (ivar, 0 where bad).
    good : bool array (ny, nx)
        Usable pixels.
    """

    order: np.ndarray
    live: np.ndarray
    pad: int
    lsf: np.ndarray
    first: np.ndarray
    prof: np.ndarray
    K0: np.ndarray
    K1: np.ndarray
    b: np.ndarray
    gx: np.ndarray
    ox: np.ndarray
    bits: np.ndarray
    ngood: np.ndarray
    img: np.ndarray
    w: np.ndarray
    good: np.ndarray


@dataclass(frozen=True)
class PSFSamples:
    """The PSF projected on the CCD: what :func:`prepare` needs of the traces and the PSF model.

    It depends on the calibration set (traces, PSF, CCD shape, padding) and on no frame, so it
    is sampled once per set (:func:`psf_samples` keeps the last few) and reused for every frame
    of that night and camera.

    Attributes
    ----------
    order, live : int and bool arrays (nf,)
        As in :class:`FrameTables`.
    pad : int
        Padding rows of the extended grid.
    lsf : float array (nf, n_ext, 2 Wy + 1)
        As in :class:`FrameTables`.
    first : int array (nf, ny)
        First column of each fiber's profile window per CCD row.
    xsf : float array (nf, ny, 2 Wx + 1)
        Cross-dispersion profile of every fiber (dead ones included).
    ny, nx : int
        CCD shape.
    """

    order: np.ndarray
    live: np.ndarray
    pad: int
    lsf: np.ndarray
    first: np.ndarray
    xsf: np.ndarray
    ny: int
    nx: int

    @property
    def nbytes(self) -> int:
        """Memory held by the samples."""
        return int(self.lsf.nbytes + self.first.nbytes + self.xsf.nbytes)


def sample_psf(traces: TraceSet, psf: PSFModel, ny: int, nx: int, pad: int, row_block: int = 256) -> PSFSamples:
    """Sample the LSF and cross-dispersion profile of every fiber on the CCD rows (no pixels)."""
    if traces.ny != ny:
        raise ValueError(f"traces.ny={traces.ny} but the image has {ny} rows")
    nf = traces.n_fibers
    order = np.argsort(np.median(traces.x(), axis=1), kind="stable")
    dead = np.asarray(traces.dead, bool).ravel()
    dead = dead[order] if dead.size == nf else np.zeros(nf, bool)
    live = ~dead
    Wy, Wx = psf.lsf.halfwidth, psf.xsf.halfwidth
    nw = 2 * Wx + 1
    if nf > 2:
        xm = np.median(traces.x()[order], axis=1)
        if np.min(xm[2:] - xm[:-2]) <= nw:
            raise ValueError(f"profile window of {nw} columns reaches beyond the next fiber; "
                             "lower the PSF's cross-dispersion half-width")
    n_ext = ny + 2 * pad
    s_ext = np.arange(-pad, ny + pad, dtype=float)
    x_ext = traces.x(s_ext)[order]
    fib = order[:, None]
    # LSF kernels of bins centred on integer rows: their shape changes by ~1e-4 per row, so they
    # are evaluated every LSF_ROW_STEP rows (and at the first and last CCD rows, where the PSF
    # model stops varying) and interpolated linearly, which keeps unit sum and zero centroid
    # exactly (error ~5e-5 of the peak on a 256-row CCD, ~1/250 of that on 4096 rows)
    knots = np.unique(np.concatenate([np.arange(0, n_ext, LSF_ROW_STEP), [pad, pad + ny - 1, n_ext - 1]]))
    lk = np.empty((nf, knots.size, 2 * Wy + 1))
    for k0 in range(0, knots.size, row_block):
        kk = knots[k0:k0 + row_block]
        _, lk[:, k0:k0 + kk.size] = psf.lsf_weights(np.broadcast_to(fib, (nf, kk.size)), x_ext[:, kk],
                                                    np.broadcast_to(s_ext[kk], (nf, kk.size)))
    seg = np.clip(np.searchsorted(knots, np.arange(n_ext), side="right") - 1, 0, knots.size - 2)
    t = ((np.arange(n_ext) - knots[seg]) / (knots[seg + 1] - knots[seg]))[None, :, None]
    lsf = (1.0 - t) * lk[:, seg] + t * lk[:, seg + 1]
    first = np.empty((nf, ny), np.int64)
    xsf = np.empty((nf, ny, nw))
    rows_all = np.arange(ny)
    for r0 in range(0, ny, row_block):
        r1 = min(ny, r0 + row_block)
        rows = rows_all[r0:r1]
        xc = x_ext[:, pad + r0:pad + r1]
        first[:, r0:r1], xsf[:, r0:r1] = psf.xsf_weights(np.broadcast_to(fib, xc.shape), xc,
                                                         np.broadcast_to(rows, xc.shape))
    return PSFSamples(order=order, live=live, pad=pad, lsf=lsf, first=first, xsf=xsf, ny=ny, nx=nx)


PSF_SAMPLE_CACHE = 2
"""Calibration sets whose :class:`PSFSamples` :func:`psf_samples` keeps (about 0.2 GB each for a
LAMOST camera): a worker reducing the frames of one camera samples its PSF once."""


def _freeze_samples(samples: PSFSamples) -> None:
    for array in (samples.order, samples.live, samples.lsf, samples.first, samples.xsf):
        array.setflags(write=False)                     # shared between frames: never changed in place


_samples_cache: ContentCache[PSFSamples] = ContentCache(lambda samples: 0, max_entries=PSF_SAMPLE_CACHE,
                                                        freeze=_freeze_samples)


def psf_samples(traces: TraceSet, psf: PSFModel, ny: int, nx: int, pad: int, row_block: int = 256) -> PSFSamples:
    """:func:`sample_psf`, kept for the last :data:`PSF_SAMPLE_CACHE` calibration sets (keyed by
    the content of the traces and PSF, so equal calibrations loaded twice share their samples)."""
    key = content_key(traces.to_arrays(), psf.to_arrays(), float(psf.x_offset), ny, nx, pad, row_block)
    return _samples_cache.get(key, lambda: sample_psf(traces, psf, ny, nx, pad, row_block))


def prepare(image: np.ndarray, ivar: np.ndarray, mask: np.ndarray | None, traces: TraceSet, psf: PSFModel,
            pad: int, row_block: int = 256, samples: PSFSamples | None = None) -> FrameTables:
    """PSF samples and per-row reductions of a frame (shared by every backend).

    ``samples`` (:func:`psf_samples` of the same traces, PSF and padding) skips the sampling.
    """
    img, w, good, msk = prepare_pixels(image, ivar, mask)
    ny, nx = img.shape
    if samples is None:
        samples = sample_psf(traces, psf, ny, nx, pad, row_block)
    elif (samples.ny, samples.nx, samples.pad) != (ny, nx, pad) or samples.order.size != traces.n_fibers:
        raise ValueError(f"PSF samples of a {samples.ny}x{samples.nx} CCD with pad {samples.pad} and "
                         f"{samples.order.size} fibers given for a {ny}x{nx} frame with pad {pad} and "
                         f"{traces.n_fibers} fibers")
    order, live, lsf, first = samples.order, samples.live, samples.lsf, samples.first
    nf, _, nw = samples.xsf.shape
    prof = np.where(live[:, None, None], samples.xsf, 0.0)
    gx = np.zeros((nf, ny))
    ox = np.zeros((nf, ny))
    bits = np.zeros((nf, ny), MASK_DTYPE)
    ngood = np.zeros((nf, ny))
    for r0 in range(0, ny, row_block):
        r1 = min(ny, r0 + row_block)
        Pfull = samples.xsf[:, r0:r1]
        on = _window_on(first, r0, r1, nw, nx)
        goodw, mskw = _gather_windows((good, msk), first, r0, r1, nw)
        gx[:, r0:r1] = np.sum(np.where(goodw, Pfull, 0.0), axis=-1)
        ox[:, r0:r1] = np.sum(np.where(on, 0.0, Pfull), axis=-1)
        sig = on & (Pfull > SIGNIFICANT_WEIGHT)
        ngood[:, r0:r1] = np.sum(sig & goodw, axis=-1)
        bits[:, r0:r1] = np.bitwise_or.reduce(np.where(sig, mskw, MASK_DTYPE(0)), axis=-1)
    n_ext = ny + 2 * pad
    tab = FrameTables(order=order, live=live, pad=pad, lsf=lsf, first=first, prof=prof,
                      K0=np.zeros((nf, n_ext)), K1=np.zeros((nf, n_ext)), b=np.zeros((nf, n_ext)),
                      gx=gx, ox=ox, bits=bits, ngood=ngood, img=img, w=w, good=good)
    reduce_rows(tab, row_block)
    return tab


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum(a * b, axis=-1)`` as stacked vector products (no temporary of the product)."""
    return np.matmul(a[..., None, :], b[..., :, None])[..., 0, 0]


def _window_on(first: np.ndarray, r0: int, r1: int, nw: int, nx: int) -> np.ndarray:
    """Which columns of each fiber's profile window (rows ``r0:r1``) lie on the CCD."""
    cols = first[:, r0:r1, None] + np.arange(nw)
    return (cols >= 0) & (cols < nx)


def _window_starts(first: np.ndarray, r0: int, r1: int, nw: int, nx: int) -> np.ndarray:
    """Start of each window in rows padded by ``nw`` columns on both sides (clipped: a window
    entirely off the CCD then lies entirely in the padding)."""
    return np.clip(first[:, r0:r1], -nw, nx) + nw


def _gather_windows(arrays, first: np.ndarray, r0: int, r1: int, nw: int) -> list[np.ndarray]:
    """Profile windows ``(nf, r1 - r0, nw)`` of per-pixel arrays (0 / False off the CCD).

    Each block of rows is padded by ``nw`` columns of zeros on both sides and read through a
    strided view of its sliding windows: a gather of contiguous runs, no flat index arrays.
    """
    nx = arrays[0].shape[1]
    start = _window_starts(first, r0, r1, nw, nx)
    rows = np.arange(r1 - r0)[None, :]
    out = []
    for a in arrays:
        padded = np.zeros((r1 - r0, nx + 2 * nw), a.dtype)
        padded[:, nw:nw + nx] = a[r0:r1]
        out.append(np.lib.stride_tricks.sliding_window_view(padded, nw, axis=1)[rows, start])
    return out


def reduce_rows(tab: FrameTables, row_block: int = 256) -> None:
    """Fill ``tab.K0``, ``tab.K1``, ``tab.b`` from the profiles, pixel weights and data."""
    nf, ny, nw = tab.prof.shape
    pad = tab.pad
    for r0 in range(0, ny, row_block):
        r1 = min(ny, r0 + row_block)
        ww, dw = _gather_windows((tab.w, tab.img), tab.first, r0, r1, nw)
        P = tab.prof[:, r0:r1]
        PW = P * ww
        tab.K0[:, pad + r0:pad + r1] = _rowdot(PW, P)
        tab.b[:, pad + r0:pad + r1] = _rowdot(PW, dw)
        if nf > 1:
            fc = tab.first[:, r0:r1]
            shift = fc[1:] - fc[:-1]                                     # (nf-1, nr)
            j = np.arange(nw)[None, None, :] - shift[..., None]
            okn = (j >= 0) & (j < nw)
            Pn = np.take_along_axis(P[1:], np.clip(j, 0, nw - 1), axis=-1) * okn
            tab.K1[:-1, pad + r0:pad + r1] = _rowdot(PW[:-1], Pn)


def model_image(tab: FrameTables, g: np.ndarray, row_block: int = 256) -> np.ndarray:
    """Model image ``sum_f g[f, r] P_f(r, c)`` of per-row light ``g`` (sorted fibers)."""
    nf, ny, nw = tab.prof.shape
    nx = tab.img.shape[1]
    model = np.zeros((ny, nx))
    offsets = np.arange(nw)
    for r0 in range(0, ny, row_block):
        r1 = min(ny, r0 + row_block)
        start = _window_starts(tab.first, r0, r1, nw, nx)
        pix = (np.arange(r1 - r0)[None, :, None] * (nx + 2 * nw) + start[..., None]) + offsets
        contrib = g[:, r0:r1, None] * tab.prof[:, r0:r1]
        padded = np.bincount(pix.ravel(), weights=contrib.ravel(), minlength=(r1 - r0) * (nx + 2 * nw))
        model[r0:r1] = padded.reshape(r1 - r0, nx + 2 * nw)[:, nw:nw + nx]
    return model


def row_fit(tab: FrameTables) -> np.ndarray:
    """Per-row light of every fiber from a simultaneous fit of the cross-dispersion profiles
    of each row (no LSF): a tridiagonal solve of ``K0, K1, b`` per row (sorted fibers)."""
    pad = tab.pad
    nf, ny, _ = tab.prof.shape
    sl = slice(pad, pad + ny)
    d, e, b = tab.K0[:, sl].copy(), tab.K1[:-1, sl].copy(), tab.b[:, sl].copy()
    tiny = d <= 1e-12 * max(float(d.max()), 1e-300)
    d = np.where(tiny, 1.0, d)
    b = np.where(tiny, 0.0, b)
    if nf == 1:
        return b / d
    e = np.where(tiny[:-1] | tiny[1:], 0.0, e)
    x, _ = solve_tridiagonal(d, e, b)
    return np.where(tiny, 0.0, x)


def set_model_weights(tab: FrameTables, g: np.ndarray, rn2: float) -> None:
    """Replace the pixel weights by ``1 / (rn2 + max(model, 0))`` and redo the reductions."""
    model = model_image(tab, g)
    tab.w = np.where(tab.good, 1.0 / (rn2 + np.maximum(model, 0.0)), 0.0)
    reduce_rows(tab)


def read_noise_variance(img: np.ndarray, w: np.ndarray) -> float:
    """Read-noise variance implied by the pixel weights: ``median(1/ivar - max(image, 0))``."""
    good = w > 0
    if not good.any():
        return 1.0
    stride = max(1, good.size // 200_000)
    v, d, g = w.ravel()[::stride], img.ravel()[::stride], good.ravel()[::stride]
    if not g.any():
        v, d, g = w.ravel(), img.ravel(), good.ravel()
    rn2 = float(np.median(1.0 / v[g] - np.maximum(d[g], 0.0)))
    return rn2 if rn2 > 0 else max(float(np.percentile(1.0 / v[g], 5)), 1e-6)


# ----------------------------------------------------------------------------- patches


@dataclass
class PatchPlan:
    """Which fibers and bins every patch solves, and which of them it keeps.

    Attributes
    ----------
    fibers : int array (n_patches, nfp)
        Sorted fiber positions of each patch's slots (-1: no fiber).
    e0 : int array (n_patches,)
        First extended bin (``s = e0 - pad``) of each patch; it has ``nb`` bins.
    core_slots : int array (nc,)
        Slots whose fibers a patch keeps.
    keep_fiber : bool array (n_patches, nc)
        Whether the core slot's fiber is taken from this patch (groups at the end of the slit
        overlap the previous one).
    keep_bins : bool array (n_patches, nb)
        Bins taken from this patch (its core, extended to the CCD's outer pads for the first
        and last blocks).
    """

    fibers: np.ndarray
    e0: np.ndarray
    core_slots: np.ndarray
    keep_fiber: np.ndarray
    keep_bins: np.ndarray
    nb: int

    @property
    def n_patches(self) -> int:
        """Number of patches."""
        return int(self.e0.size)


def plan_patches(n_fibers: int, ny: int, params: DeconvParams) -> PatchPlan:
    """Cut a frame into patches of ``fibers_per_patch x rows_per_patch`` cores (see module)."""
    nc = min(params.fibers_per_patch, n_fibers)
    ov = params.overlap_fibers
    nbc = min(params.rows_per_patch, ny)
    pad = params.pad_rows
    nb = nbc + 2 * pad
    g_starts = list(range(0, n_fibers - nc + 1, nc))
    if g_starts[-1] + nc < n_fibers:
        g_starts.append(n_fibers - nc)
    b_starts = list(range(0, ny - nbc + 1, nbc))
    if b_starts[-1] + nbc < ny:
        b_starts.append(ny - nbc)
    fibers, e0, kf, kb = [], [], [], []
    slots = np.arange(-ov, nc + ov)
    done_f = np.zeros(n_fibers, bool)
    for g in g_starts:
        f = g + slots
        keep_f = ~done_f[g:g + nc]
        done_f[g:g + nc] = True
        done_b = np.zeros(ny + 2 * pad, bool)
        for bi, b0 in enumerate(b_starts):
            keep = np.zeros(nb, bool)
            lo = 0 if bi == 0 else pad
            hi = nb if bi == len(b_starts) - 1 else pad + nbc
            e = b0 + np.arange(nb)
            keep[lo:hi] = True
            keep &= ~done_b[e]
            done_b[e[keep]] = True
            fibers.append(np.where((f >= 0) & (f < n_fibers), f, -1))
            e0.append(b0)
            kf.append(keep_f.copy())
            kb.append(keep)
    return PatchPlan(fibers=np.asarray(fibers, np.int64), e0=np.asarray(e0, np.int64),
                     core_slots=np.arange(ov, ov + nc), keep_fiber=np.asarray(kf, bool),
                     keep_bins=np.asarray(kb, bool), nb=nb)


def gather_patches(tab: FrameTables, plan: PatchPlan, sel: np.ndarray):
    """Band LSF, K0, K1 and b of patches ``sel`` (numpy).

    Returns
    -------
    lsf_band : (B, nfp, nb, 2 Wy + 1)
        ``lsf_band[p, i, j, d]``: LSF of bin ``j`` landing on patch row ``j + d - Wy``.
    K0, K1, b : (B, nfp, nb)
    """
    f = plan.fibers[sel]                                   # (B, nfp)
    real = f >= 0
    fc = np.where(real, f, 0)
    e = plan.e0[sel][:, None] + np.arange(plan.nb)         # (B, nb)
    lsf = tab.lsf[fc[:, :, None], e[:, None, :]] * real[:, :, None, None]
    K0 = tab.K0[fc[:, :, None], e[:, None, :]] * real[..., None]
    b = tab.b[fc[:, :, None], e[:, None, :]] * real[..., None]
    nxt = np.concatenate([real[:, 1:], np.zeros((real.shape[0], 1), bool)], axis=1)
    K1 = tab.K1[fc[:, :, None], e[:, None, :]] * (real & nxt)[..., None]
    return lsf, K0, K1, b


# ----------------------------------------------------------------------------- torch solve


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("deconv: device 'cuda' requested but torch sees no GPU")
    return torch.device(name)


def _band_to_dense_index(nb: int, wy: int):
    """Indices placing a band ``(nb, 2 wy + 1)`` into a dense ``nb x nb`` matrix: ``(row, col)``
    of the dense matrix and ``(bin, diagonal)`` of the band."""
    j = np.arange(nb)[:, None]
    d = np.arange(2 * wy + 1)[None, :]
    r = j + d - wy
    ok = (r >= 0) & (r < nb)
    return r[ok], np.broadcast_to(j, r.shape)[ok], np.broadcast_to(d, r.shape)[ok], np.broadcast_to(j, r.shape)[ok]


def solve_patches_torch(lsf_band, K0, K1, b, core_slots, *, regularize: float, halfwidth: int, device,
                        products: bool = True):
    """Batched block-tridiagonal solve and decorrelation of patches (torch, float64).

    Parameters
    ----------
    lsf_band, K0, K1, b : ndarrays from :func:`gather_patches`
    core_slots : int array (nc,)
    regularize : float
        Relative ridge per fiber block.
    halfwidth : int
        Resolution band half-width ``h``.
    device : torch.device
    products : bool
        False: only the fitted light ``g`` (what the ``deconv`` variance model needs); no
        backward sweep, no eigen-decomposition; ``flux``, ``ivar`` and ``res`` are zeros.

    Returns
    -------
    dict of ndarrays
        ``flux``, ``ivar`` (B, nc, nb); ``res`` (B, nc, 2h+1, nb); ``g`` (B, nc, nb): the
        fitted light per patch row ``L F``; ``failed`` (B,) bool (Cholesky failure or
        non-finite result).

    Notes
    -----
    Per patch of ``m`` fibers: ``2 m - 1`` block products for ``H``, ``m`` Cholesky
    factorisations with ``m - 1`` triangular solves (each for the coupling block and the
    right-hand side at once) and products ``W^T W`` in the forward sweep, the same down to the
    first core fiber in the backward sweep, then one eigen-decomposition per core fiber. The
    eigen-decomposition (LAPACK ``syevd`` on ``nb x nb``) is the largest single cost on a CPU;
    it is kept because ``R`` is the *symmetric* square root (see :func:`cholesky_resolution`
    for the Cholesky factor, which decorrelates as well but is a different, one-sided ``R``).
    Everything stays float64: the ridge is ``1e-10`` of a block's diagonal, below float32's
    resolution, and the deconvolved modes it bounds feed every product.
    """
    import torch

    dt = torch.float64
    B, m, nb, nd = lsf_band.shape
    wy = (nd - 1) // 2
    r_idx, j_idx, d_idx, _ = (torch.as_tensor(a, device=device) for a in _band_to_dense_index(nb, wy))
    band = torch.as_tensor(lsf_band, dtype=dt, device=device)
    L = torch.zeros((B, m, nb, nb), dtype=dt, device=device)
    L[:, :, r_idx, j_idx] = band[:, :, j_idx, d_idx]
    k0 = torch.as_tensor(K0, dtype=dt, device=device)
    k1 = torch.as_tensor(K1, dtype=dt, device=device)
    bb = torch.as_tensor(b, dtype=dt, device=device)
    Lt = L.transpose(-1, -2)
    Hd = Lt @ (k0[..., None] * L)                                       # (B, m, nb, nb)
    # H_{i,i+1} stored transposed with one more row for the right-hand side being eliminated:
    # HoT[:, i].mT is the column-major [H_{i,i+1} | y_i] the triangular solves read without a copy
    HoT = torch.empty((B, m - 1, nb + 1, nb), dtype=dt, device=device)
    HoT[:, :, :nb] = L[:, 1:].transpose(-1, -2) @ (k1[:, :-1, :, None] * L[:, :-1])
    Ho = HoT[:, :, :nb].transpose(-1, -2)                               # H_{i,i+1}
    rhs = (Lt @ bb[..., None])[..., 0]                                  # (B, m, nb)
    diag = Hd.diagonal(dim1=-2, dim2=-1)
    scale = diag.amax(dim=-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    diag.add_((regularize * scale)[..., None])
    failed = torch.zeros(B, dtype=torch.bool, device=device)

    # forward sweep: S_i = H_ii - W^T W with W = chol(S_{i-1})^-1 H_{i-1,i}; the right-hand
    # side is eliminated by the same triangular solve (one extra column)
    LS, S_list, y = [None] * m, [None] * m, [None] * m
    S = Hd[:, 0]
    y[0] = rhs[:, 0]
    for i in range(m):
        if i > 0:
            HoT[:, i - 1, nb] = y[i - 1]
            Wz = torch.linalg.solve_triangular(LS[i - 1], HoT[:, i - 1].transpose(-1, -2), upper=False)
            Wt = Wz[..., :nb].transpose(-1, -2)
            S = torch.baddbmm(Hd[:, i], Wt, Wz[..., :nb], alpha=-1.0)
            y[i] = rhs[:, i] - (Wt @ Wz[..., nb:])[..., 0]
        S_list[i] = S
        LS[i], info = torch.linalg.cholesky_ex(S)
        failed |= info != 0
    # back-substitution
    F = [None] * m
    F[m - 1] = torch.cholesky_solve(y[m - 1][..., None], LS[m - 1])[..., 0]
    for i in range(m - 2, -1, -1):
        F[i] = torch.cholesky_solve((y[i] - (Ho[:, i] @ F[i + 1][..., None])[..., 0])[..., None], LS[i])[..., 0]
    core = [int(c) for c in core_slots]
    Fall = torch.stack(F, dim=1)                                        # (B, m, nb)
    Fc = Fall[:, core]                                                  # (B, nc, nb)
    g = (L @ Fall[..., None])[:, core, :, 0]                            # light per patch row
    h = int(halfwidth)
    nc = len(core)
    if not products:
        zeros = np.zeros((B, nc, nb))
        return {"flux": zeros, "ivar": zeros.copy(), "res": np.zeros((B, nc, 2 * h + 1, nb), np.float32),
                "g": g.cpu().numpy(), "failed": (failed | ~torch.isfinite(g).all(dim=(-1, -2))).cpu().numpy()}
    # backward sweep down to the first core slot: T_i
    lo = min(core)
    T_list = [None] * m
    T = Hd[:, m - 1]
    T_list[m - 1] = T
    LT, bad = torch.linalg.cholesky_ex(T)
    failed |= bad != 0
    for i in range(m - 2, lo - 1, -1):
        V_ = torch.linalg.solve_triangular(LT, Ho[:, i].transpose(-1, -2), upper=False)
        T = torch.baddbmm(Hd[:, i], V_.transpose(-1, -2), V_, alpha=-1.0)
        T_list[i] = T
        LT, bad = torch.linalg.cholesky_ex(T)
        failed |= bad != 0
    # C_ii^-1 of the core fibers (eigh reads the lower triangle only)
    icov = torch.stack([S_list[i] + T_list[i] - Hd[:, i] for i in core], dim=1)   # (B, nc, nb, nb)
    w, V = torch.linalg.eigh(icov)
    Q = (V * torch.sqrt(torch.clamp(w, min=0.0))[..., None, :]) @ V.transpose(-1, -2)
    norm = Q.sum(dim=-1)
    okn = norm > 0
    inv_norm = torch.where(okn, 1.0 / torch.where(okn, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    flux = (Q @ Fc[..., None])[..., 0] * inv_norm                        # R F with R = Q / norm
    ivar = torch.where(okn, norm**2, torch.zeros_like(norm))
    # band of R: res[k, j] = R[j, j + k - h], read off the diagonals of Q
    res = torch.zeros(Q.shape[:-2] + (2 * h + 1, nb), dtype=dt, device=device)
    for k in range(2 * h + 1):
        o = k - h
        res[..., k, max(0, -o):nb - max(0, o)] = Q.diagonal(o, dim1=-2, dim2=-1)
    res *= inv_norm[..., None, :]
    finite = torch.isfinite(flux).all(dim=(-1, -2)) & torch.isfinite(ivar).all(dim=(-1, -2))
    failed |= ~finite
    return {"flux": flux.cpu().numpy(), "ivar": ivar.cpu().numpy(), "res": res.cpu().numpy(),
            "g": g.cpu().numpy(), "failed": failed.cpu().numpy()}


# ----------------------------------------------------------------------------- driver


def _with_threads(fn, n: int):
    """``fn`` run with ``n`` torch intra-op threads (restored afterwards)."""
    import torch

    def wrapped(*a, **k):
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn(*a, **k)
        finally:
            torch.set_num_threads(old)
    return wrapped


def _run_patches(tab: FrameTables, plan: PatchPlan, params: DeconvParams, solver, batch: int):
    """Solve every patch in batches, retrying failures with the larger ridge."""
    n = plan.n_patches
    nc = plan.core_slots.size
    nb = plan.nb
    h = params.resolution_halfwidth
    out = {"flux": np.zeros((n, nc, nb)), "ivar": np.zeros((n, nc, nb)),
           "res": np.zeros((n, nc, 2 * h + 1, nb), np.float32), "g": np.zeros((n, nc, nb)),
           "retried": np.zeros(n, bool)}
    for p0 in range(0, n, batch):
        sel = np.arange(p0, min(n, p0 + batch))
        r = solver(tab, plan, sel, regularize=params.regularize, halfwidth=h)
        bad = r["failed"]
        if bad.any():
            r2 = solver(tab, plan, sel[bad], regularize=params.retry_regularize, halfwidth=h)
            for k in ("flux", "ivar", "res", "g"):
                r[k][bad] = r2[k]
            still = r2["failed"]
            idx = np.flatnonzero(bad)
            for k in ("flux", "ivar", "g"):
                r[k][idx[still]] = 0.0
            r["res"][idx[still]] = 0.0
            out["retried"][sel[bad]] = True
        for k in ("flux", "ivar", "res", "g"):
            out[k][sel] = r[k]
    return out


def _assemble(tab: FrameTables, plan: PatchPlan, sol: dict, ny: int, h: int):
    """Place the kept parts of every patch on the (sorted-fiber) frame arrays."""
    nf = tab.K0.shape[0]
    pad = tab.pad
    n_ext = ny + 2 * pad
    flux = np.zeros((nf, n_ext))
    ivar = np.zeros((nf, n_ext))
    g = np.zeros((nf, n_ext))
    res = np.zeros((nf, 2 * h + 1, n_ext), np.float32)
    retried = np.zeros((nf, n_ext), bool)
    fib = plan.fibers[:, plan.core_slots]                                # (n_patches, nc)
    pi, ci, ji = np.nonzero((plan.keep_fiber & (fib >= 0))[:, :, None] & plan.keep_bins[:, None, :])
    f, e = fib[pi, ci], plan.e0[pi] + ji                   # every kept (fiber, bin) exactly once
    flux[f, e] = sol["flux"][pi, ci, ji]
    ivar[f, e] = sol["ivar"][pi, ci, ji]
    g[f, e] = sol["g"][pi, ci, ji]
    res[f, :, e] = sol["res"][pi, ci, :, ji]
    retried[f, e] = sol["retried"][pi]
    sl = slice(pad, pad + ny)
    return flux[:, sl], ivar[:, sl], g[:, sl], res[..., sl], retried[:, sl]


def _chi2_rows(tab: FrameTables, g: np.ndarray, model: np.ndarray | None = None, row_block: int = 256):
    """Profile-weighted chi^2 per pixel of each fiber at each row (model of all fibers)."""
    if model is None:
        model = model_image(tab, g)
    nf, ny, nw = tab.prof.shape
    resid2 = (tab.img - model) ** 2 * tab.w
    num = np.zeros((nf, ny))
    den = np.zeros((nf, ny))
    for r0 in range(0, ny, row_block):
        r1 = min(ny, r0 + row_block)
        r2, gw = _gather_windows((resid2, tab.w > 0), tab.first, r0, r1, nw)
        Pg = tab.prof[:, r0:r1] * gw
        num[:, r0:r1] = _rowdot(Pg, r2)
        den[:, r0:r1] = Pg.sum(axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0), den


def _finish(tab: FrameTables, flux, ivar, g, res, retried, ny: int, info: dict) -> DeconvSpectra:
    """Spot fractions, flags, chi^2; unsort the fibers."""
    nf, n_ext, nd = tab.lsf.shape
    wy = (nd - 1) // 2
    pad = tab.pad
    G = np.zeros((nf, ny))
    O = np.zeros((nf, ny))
    bits = np.zeros((nf, ny), MASK_DTYPE)
    chi_rows, den_rows = _chi2_rows(tab, g)
    chi_num = np.zeros((nf, ny))
    chi_den = np.zeros((nf, ny))
    npix = np.zeros((nf, ny))
    # per-row tables padded by wy rows beyond the CCD with what an off-CCD row contributes (no
    # good or significant pixels, all of the spot off the CCD), so bin s reaches row s + k - wy
    # at column k of the padded arrays: shifted views, no gathers
    def padded(a: np.ndarray, fill) -> np.ndarray:
        out = np.full((nf, ny + 2 * wy), fill, a.dtype)
        out[:, wy:wy + ny] = a
        return out

    gxp, oxp = padded(tab.gx, 0.0), padded(tab.ox, 1.0)
    bitsp, ngoodp = padded(tab.bits, MASK_DTYPE(0)), padded(tab.ngood, 0.0)
    posd = den_rows > 0
    chip, posp = padded(chi_rows * posd, 0.0), padded(posd.astype(float), 0.0)
    tmp = np.empty((nf, ny))
    for k in range(nd):
        L = np.ascontiguousarray(tab.lsf[:, pad:pad + ny, k])
        G += np.multiply(L, gxp[:, k:k + ny], out=tmp)
        O += np.multiply(L, oxp[:, k:k + ny], out=tmp)
        sig = L > SIGNIFICANT_WEIGHT
        bits |= np.where(sig, bitsp[:, k:k + ny], MASK_DTYPE(0))
        chi_num += np.multiply(L, chip[:, k:k + ny], out=tmp)
        chi_den += np.multiply(L, posp[:, k:k + ny], out=tmp)
        npix += np.where(sig, ngoodp[:, k:k + ny], 0.0)
    chi2 = np.where(chi_den > 0, chi_num / np.where(chi_den > 0, chi_den, 1.0), 0.0)
    masked = np.clip(1.0 - G - O, 0.0, 1.0)
    dead = ~tab.live
    mask = (bits & _NONFATAL).astype(MASK_DTYPE)
    mask |= np.where(masked > SOMEBAD_FRACTION, MASK_DTYPE(Mask.SOMEBADPIX), MASK_DTYPE(0))
    lowgood = G < MIN_GOOD_FRACTION
    mask |= np.where(lowgood & (O >= masked), MASK_DTYPE(Mask.OFFCCD), MASK_DTYPE(0))
    mask |= np.where(lowgood & (O < masked), MASK_DTYPE(Mask.ALLBADPIX), MASK_DTYPE(0))
    deadm = np.broadcast_to(dead[:, None], (nf, ny))
    mask |= np.where(deadm, MASK_DTYPE(Mask.DEADFIBER), MASK_DTYPE(0))
    unusable = lowgood | deadm | ~np.isfinite(flux) | ~np.isfinite(ivar) | (ivar <= 0)
    mask |= np.where(unusable, bits, MASK_DTYPE(0))
    okchi = ~unusable & np.isfinite(chi2)
    ref = max(1.0, float(np.median(chi2[okchi]))) if okchi.any() else 1.0
    mask |= np.where((okchi & (chi2 > BAD2DFIT_FACTOR * ref)) | (retried & ~unusable),
                     MASK_DTYPE(Mask.BAD2DFIT), MASK_DTYPE(0))
    flux = np.where(unusable, 0.0, flux)
    ivar = np.where(unusable, 0.0, ivar)
    res = np.where(unusable[:, None, :], 0.0, res).astype(np.float32)
    g = np.where(np.isfinite(g) & ~deadm, g, 0.0)
    inv = np.argsort(tab.order)
    info = dict(info)
    info["n_retried_bins"] = int(retried.sum())
    return DeconvSpectra(flux=flux[inv], ivar=ivar[inv], mask=mask[inv], chi2=chi2[inv].astype(np.float32),
                         npix=npix[inv].astype(np.float32), resolution=res[inv], model_rows=g[inv], info=info)


def deconv_extract(image: np.ndarray, ivar: np.ndarray, mask: np.ndarray | None, traces: TraceSet,
                   psf: PSFModel, params: DeconvParams | None = None, *, backend: str = "torch",
                   read_noise: float | None = None) -> DeconvSpectra:
    """Spectro-perfectionism extraction of every fiber on the CCD row grid.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        CCD-corrected frame in electrons.
    ivar : ndarray, shape (ny, nx)
        Inverse variance; 0 marks a bad pixel.
    mask : ndarray of uint32, shape (ny, nx), or None
        2D :class:`~fiberlake.schemas.maskbits.Mask` bits.
    traces : TraceSet
        Fiber traces (curved traces are fine; for a rectified frame, its straight traces).
    psf : PSFModel
        PSF model (:func:`fiberlake.processors.psf.fit_psf`; ``invariant=True`` for a
        rectified frame).
    params : DeconvParams, optional
    backend : str
        ``"torch"`` (batched, CUDA when available) or ``"numpy"`` (the dense reference,
        :mod:`fiberlake.processors.deconv_reference`).
    read_noise : float, optional
        Read noise (electrons) for the model variance; default implied by ``ivar``.

    Returns
    -------
    DeconvSpectra
        Electrons per row, shape ``(n_fibers, ny)``; see the module notes.
    """
    params = params or DeconvParams()
    t0 = time.perf_counter()
    ny = np.shape(image)[0]
    samples = psf_samples(traces, psf, ny, np.shape(image)[1], params.pad_rows)
    t_sample = time.perf_counter() - t0
    tab = prepare(image, ivar, mask, traces, psf, params.pad_rows, samples=samples)
    plan = plan_patches(traces.n_fibers, ny, params)
    t1 = time.perf_counter()
    if backend == "torch":
        dev = _device(params.device)
        batch = params.batch or (1024 if dev.type == "cuda" else 64)

        def solver(tab_, plan_, sel, **k):
            return solve_patches_torch(*gather_patches(tab_, plan_, sel), plan_.core_slots, device=dev, **k)

        def light_solver(tab_, plan_, sel, **k):                 # the fitted light only
            return solver(tab_, plan_, sel, products=False, **k)
        device_name = str(dev)
        if dev.type == "cpu" and params.cpu_threads > 0:
            solver, light_solver = _with_threads(solver, params.cpu_threads), _with_threads(light_solver,
                                                                                             params.cpu_threads)
    elif backend == "numpy":
        from fiberlake.processors.deconv_reference import solve_patches_reference

        batch = params.batch or 64
        solver = light_solver = solve_patches_reference
        device_name = "numpy"
    else:
        raise ValueError(f"backend {backend!r} not one of torch, numpy")
    h = params.resolution_halfwidth
    rn2 = read_noise**2 if read_noise is not None else read_noise_variance(tab.img, tab.w)
    if params.variance_model == "rows":
        set_model_weights(tab, row_fit(tab), rn2)
    elif params.variance_model == "deconv":
        sol = _run_patches(tab, plan, params, light_solver, batch)
        set_model_weights(tab, _assemble(tab, plan, sol, ny, h)[2], rn2)
    t2 = time.perf_counter()
    sol = _run_patches(tab, plan, params, solver, batch)
    flux, iv, g, res, retried = _assemble(tab, plan, sol, ny, h)
    t3 = time.perf_counter()
    out = _finish(tab, flux, iv, g, res, retried, ny,
                  {"backend": backend, "device": device_name, "n_patches": plan.n_patches,
                   "n_retried_patches": int(sol["retried"].sum()),
                   "t_psf_samples": t_sample, "t_prepare": t1 - t0, "t_weights": t2 - t1, "t_solve": t3 - t2})
    out.info["t_finish"] = time.perf_counter() - t3
    return out
