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
``cleantype='meanmask'``, ``fsmode='median'``), then each later iteration on cells of
:data:`CELL` x :data:`CELL` pixels around the changed pixels, each read with a margin of
``2 * REACH`` (cells that do not touch the image's edge are stacked into one image per
iteration, since what their margins see does not reach their inner part). The flags are those
of ``astroscrappy.detect_cosmics`` on the same input (``tests/test_cosmics.py``;
``bench/prepare.py`` counts the pixels that differ on a full-size LAMOST frame).
"""

from __future__ import annotations

import numpy as np
from astroscrappy.astroscrappy import update_mask
from astroscrappy.utils import dilate3, laplaceconvolve, median, rebin, sepmedfilt5, sepmedfilt7, sepmedfilt9, subsample

REACH = 8
"""Pixels of input around a pixel that one detection step reads: the Laplacian 1, the noise's
7 x 7 median 3 more, the 7 x 7 median of the significance 3 more (the fine structure: 5 x 5 then
9 x 9 medians, 6), two 3 x 3 dilations 2 more."""
CELL = 8
"""Side (pixels) of the cells an iteration after the first is recomputed in (read with 2 x REACH
more on each side: 8 covers the hits of a LAMOST frame with the fewest pixels read)."""


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
    """In place: the detection of ``cosmics`` redone around the ``changed`` pixels."""
    ys, xs = changed
    if ys.size == 0:
        return
    ny, nx = cosmics.shape
    margin = 2 * REACH
    side = CELL + 2 * margin
    cells = np.unique((ys // CELL) * ((nx + CELL - 1) // CELL) + xs // CELL)
    ncx = (nx + CELL - 1) // CELL
    y0, x0 = (cells // ncx) * CELL - margin, (cells % ncx) * CELL - margin
    interior = (y0 >= 0) & (x0 >= 0) & (y0 + side <= ny) & (x0 + side <= nx)
    keep = slice(margin - REACH, margin + CELL + REACH)
    if interior.any():
        oy, ox = y0[interior], x0[interior]
        rr = oy[:, None, None] + np.arange(side)[None, :, None]
        cc = ox[:, None, None] + np.arange(side)[None, None, :]
        n = oy.size
        stack = [np.ascontiguousarray(a[rr, cc].reshape(n * side, side)) for a in (cleanarr, clean_var, mask)]
        det = _detect(*stack, *args).reshape(n, side, side)[:, keep, keep]
        cosmics[rr[:, keep, :], cc[:, :, keep]] = det
    for cy, cx in zip(y0[~interior], x0[~interior]):
        r0, r1 = max(0, cy), min(ny, cy + side)
        c0, c1 = max(0, cx), min(nx, cx + side)
        det = _detect(*(np.ascontiguousarray(a[r0:r1, c0:c1]) for a in (cleanarr, clean_var, mask)), *args)
        k0, k1 = max(0, cy + margin - REACH), min(ny, cy + margin + CELL + REACH)
        j0, j1 = max(0, cx + margin - REACH), min(nx, cx + margin + CELL + REACH)
        cosmics[k0:k1, j0:j1] = det[k0 - r0:k1 - r0, j0 - c0:j1 - c0]
