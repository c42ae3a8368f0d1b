"""L.A.Cosmic (van Dokkum 2001) as astroscrappy runs it, with the iterations after the first
recomputed only where the cleaned image changed.

:func:`astroscrappy.detect_cosmics` runs every iteration over the whole image. But an iteration
only cleans the pixels flagged so far (a 5 x 5 masked mean of their unflagged neighbours), and
every step of the detection is local: the flags of iteration ``k + 1`` can differ from those of
iteration ``k`` only within :data:`REACH` pixels of a pixel whose cleaned value changed, and a
cleaned value changes only within 2 pixels of a newly flagged one. So :func:`detect_cosmics`
runs the first iteration over the whole image with astroscrappy's own compiled kernels
(``astroscrappy.utils``: subsampling, Laplacian, separable median filters, dilation) and the
same numpy steps in the same order as ``astroscrappy.detect_cosmics`` (``sepmed=True``,
``cleantype='meanmask'``, ``fsmode='median'``), then each later iteration only in a box around
each group of changed pixels (their bounding box widened by ``REACH``, read with a margin of
``2 * REACH``: what lies beyond the margin does not reach the box's inner part). The flags are those
of ``astroscrappy.detect_cosmics`` on the same input (``tests/test_cosmics.py``;
``bench/prepare.py`` counts the pixels that differ on a full-size LAMOST frame).
"""

from __future__ import annotations

import numpy as np
from astroscrappy.astroscrappy import update_mask
from astroscrappy.utils import dilate3, laplaceconvolve, median, rebin, sepmedfilt5, sepmedfilt7, sepmedfilt9, subsample
from scipy.ndimage import label

REACH = 8
"""Pixels of input around a pixel that one detection step reads: the Laplacian 1, the noise's
7 x 7 median 3 more, the 7 x 7 median of the significance 3 more (the fine structure: 5 x 5 then
9 x 9 medians, 6), two 3 x 3 dilations 2 more."""
CELL = 8
"""Side (pixels) of the cells that group the changed pixels of an iteration after the first:
changed pixels in touching cells share one box (one cosmic ray, usually)."""


def _f32(x: float) -> float:
    """A Python float holding ``x`` rounded to float32 (astroscrappy takes its settings as C floats)."""
    return float(np.float32(x))


def _detect(cleanarr: np.ndarray, clean_var: np.ndarray, mask: np.ndarray, sigclip: float, sigcliplow: float,
            objlim: float) -> np.ndarray:
    """One L.A.Cosmic detection, as in ``astroscrappy.detect_cosmics`` (``sepmed``, ``fsmode='median'``)."""
    conved = laplaceconvolve(subsample(cleanarr))
    conved[conved < 0] = 0.0
    s = rebin(conved)
    del conved
    m5 = sepmedfilt7(clean_var)
    m5[m5 < 0.00001] = 0.00001
    noise = np.sqrt(m5)
    del m5
    s /= 2.0 * noise
    sp = s - sepmedfilt7(s)
    del s
    goodpix = np.logical_not(mask)
    cosmics = np.logical_and(sp > sigclip, goodpix)
    f = sepmedfilt5(cleanarr)
    m7 = sepmedfilt9(f)
    f = (f - m7) / noise
    f[f < 0.01] = 0.01
    del m7, noise
    cosmics = np.logical_and(cosmics, (sp / f) > objlim)
    cosmics = dilate3(cosmics)
    cosmics = np.logical_and(cosmics, goodpix)
    cosmics = np.logical_and(sp > sigclip, cosmics)
    cosmics = dilate3(cosmics)
    cosmics = np.logical_and(cosmics, goodpix)
    return np.logical_and(sp > sigcliplow, cosmics)


class _Backgrounds:
    """astroscrappy's background levels (medians of the unmasked input image in electrons, and of
    its variance), the fill of a cleaned pixel without an unflagged neighbour; computed from the
    input when first needed."""

    def __init__(self, indat: np.ndarray, gain: float, read_var: float, good: np.ndarray) -> None:
        self._indat, self._gain, self._read_var, self._good, self._levels = indat, gain, read_var, good, {}

    def level(self, which: int) -> float:
        if which not in self._levels:
            data = np.empty(self._indat.shape, np.float32)
            data[:, :] = np.asarray(self._indat) * self._gain
            if which == 1:
                data = data + self._read_var
            data = np.ascontiguousarray(data[self._good])
            self._levels[which] = float(median(data, len(data)))
        return self._levels[which]


def _clean_meanmask(arr: np.ndarray, crmask: np.ndarray, mask: np.ndarray, ys: np.ndarray, xs: np.ndarray,
                    background) -> None:
    """astroscrappy's ``clean_meanmask`` at the pixels ``(ys, xs)`` (not within 2 of the edge), in place.

    The 5 x 5 mean of the neighbours that are neither flagged nor masked, summed in float32 in
    astroscrappy's order; ``background()`` where there is none. Only unflagged pixels are read, and
    only flagged ones written, so the order of the pixels does not matter.
    """
    s = np.zeros(ys.size, np.float32)
    n = np.zeros(ys.size, np.int64)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            y, x = ys + dy, xs + dx
            ok = ~(crmask[y, x] | mask[y, x])
            s += np.where(ok, arr[y, x], np.float32(0))
            n += ok
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = (s.astype(np.float64) / n).astype(np.float32)
    arr[ys, xs] = np.where(n == 0, np.float32(background()), mean) if np.any(n == 0) else mean


def detect_cosmics(indat: np.ndarray, inmask: np.ndarray | None, *, sigclip: float, sigfrac: float, objlim: float,
                   gain: float, readnoise: float, niter: int, satlevel: float = np.inf) -> np.ndarray:
    """Cosmic-ray pixels of ``indat`` (ADU), as ``astroscrappy.detect_cosmics(..., sepmed=True,
    cleantype='meanmask', fsmode='median')`` flags them.

    Parameters
    ----------
    indat : ndarray, shape (ny, nx)
        Image (ADU).
    inmask : ndarray of bool, optional
        Pixels to ignore.
    sigclip, sigfrac, objlim, gain, readnoise, niter, satlevel
        As astroscrappy's.

    Returns
    -------
    ndarray of bool
    """
    ny, nx = np.shape(indat)
    sigclip, objlim, gain, readnoise = _f32(sigclip), _f32(objlim), _f32(gain), _f32(readnoise)
    sigcliplow = float(np.float32(sigfrac) * np.float32(sigclip))
    cleanarr = np.empty((ny, nx), np.float32)
    cleanarr[:, :] = np.asarray(indat) * gain
    mask = np.zeros((ny, nx), np.uint8) if inmask is None else np.ascontiguousarray(inmask, np.uint8).copy()
    read_var = float(np.float32(readnoise) * np.float32(readnoise))
    clean_var = cleanarr + read_var
    if np.any(cleanarr >= satlevel):
        update_mask(cleanarr, mask, satlevel, True)
    else:  # what update_mask leaves without saturated pixels (skips its 7 x 7 median of the image)
        mask[:, :] = dilate3(mask).astype(bool)
    maskb = mask.astype(bool)
    if maskb.all():
        return np.zeros((ny, nx), bool)
    backgrounds = _Backgrounds(indat, gain, read_var, ~maskb)

    crmask = np.zeros((ny, nx), bool)
    cosmics = np.zeros((ny, nx), bool)
    changed: tuple[np.ndarray, np.ndarray] | None = None  # None: the whole image
    args = (sigclip, sigcliplow, objlim)
    for it in range(int(niter)):
        if changed is None:
            cosmics = _detect(cleanarr, clean_var, mask, *args)
        else:
            _redetect(cosmics, cleanarr, clean_var, mask, changed, args)
        numcr = int(np.count_nonzero(cosmics))
        new = cosmics & ~crmask
        crmask |= cosmics
        if numcr == 0 or it == int(niter) - 1:
            break
        # clean the flagged pixels whose 5 x 5 neighbourhood gained a flag (all of them at first)
        ys, xs = np.nonzero(new)
        if ys.size == 0:
            changed = (ys, xs)
            continue
        off = np.arange(-2, 3)
        cy = (ys[:, None, None] + off[None, :, None] + np.zeros((1, 1, 5), np.int64)).ravel()
        cx = (xs[:, None, None] + np.zeros((1, 5, 1), np.int64) + off[None, None, :]).ravel()
        inner = (cy >= 2) & (cy < ny - 2) & (cx >= 2) & (cx < nx - 2)
        flat = np.unique(cy[inner] * nx + cx[inner])
        flat = flat[crmask.ravel()[flat]]
        ys, xs = flat // nx, flat % nx
        _clean_meanmask(cleanarr, crmask, maskb, ys, xs, lambda: backgrounds.level(0))
        _clean_meanmask(clean_var, crmask, maskb, ys, xs, lambda: backgrounds.level(1))
        changed = (ys, xs)
    return crmask


def _redetect(cosmics: np.ndarray, cleanarr: np.ndarray, clean_var: np.ndarray, mask: np.ndarray,
              changed: tuple[np.ndarray, np.ndarray], args: tuple) -> None:
    """In place: the detection of ``cosmics`` redone around the ``changed`` pixels.

    Only pixels within :data:`REACH` of a changed one can change. The changed pixels are grouped
    (touching :data:`CELL` x :data:`CELL` cells: one cosmic ray, usually); each group's flags are
    redone in the bounding box of its changed pixels widened by ``REACH`` (what is written),
    read with ``2 * REACH`` (clipped at the image's edges, where the detection sees the same
    edges as over the whole image): one detection per group.
    """
    ys, xs = changed
    if ys.size == 0:
        return
    ny, nx = cosmics.shape
    # the groups: touching cells of CELL x CELL pixels that hold a changed pixel (labelling the
    # binned image costs little)
    ncy, ncx = (ny + CELL - 1) // CELL, (nx + CELL - 1) // CELL
    cells = np.zeros((ncy, ncx), bool)
    cells[ys // CELL, xs // CELL] = True
    labels, _ = label(cells, structure=np.ones((3, 3), bool))
    # each group's box: the bounding box of its changed pixels, widened by 2 x REACH
    group = labels[ys // CELL, xs // CELL]
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(group[order]) != 0])
    ys_g, xs_g = ys[order], xs[order]
    bounds = (np.minimum.reduceat(ys_g, starts), np.maximum.reduceat(ys_g, starts) + 1,
              np.minimum.reduceat(xs_g, starts), np.maximum.reduceat(xs_g, starts) + 1)
    margin = 2 * REACH
    for y0, y1, x0, x1 in zip(*(b.tolist() for b in bounds)):
        r0, r1 = max(0, y0 - margin), min(ny, y1 + margin)
        c0, c1 = max(0, x0 - margin), min(nx, x1 + margin)
        det = _detect(*(np.ascontiguousarray(a[r0:r1, c0:c1]) for a in (cleanarr, clean_var, mask)), *args)
        k0, k1 = max(0, y0 - REACH), min(ny, y1 + REACH)
        j0, j1 = max(0, x0 - REACH), min(nx, x1 + REACH)
        cosmics[k0:k1, j0:j1] = det[k0 - r0:k1 - r0, j0 - c0:j1 - c0]
