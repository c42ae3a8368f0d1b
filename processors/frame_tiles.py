"""The corrected frame computed in column tiles: cosmic rays and rectification per slab.

Cosmic-ray detection (L.A.Cosmic) and the resampling into the rectified frame are the serial
bulk of a frame's preparation (a full-size LAMOST frame on one core: ~11 s and ~4 s, of which one
L.A.Cosmic pass over the frame is ~8 s; ``bench/prepare.py``).
Both are local: a cosmic-ray flag depends on a few pixels around it, and a rectified column on
the CCD columns its light came from. So the frame is cut into ``n`` tiles of adjacent rectified
columns; each tile's CCD columns (:func:`~fiberlake.processors.rectify.source_columns`), plus
:data:`~fiberlake.processors.ccd.COSMIC_MARGIN` columns on each side for the cosmic-ray
detection, are corrected on their own (:func:`correct_tile`), on any worker, and the tiles'
outputs joined side by side are the corrected frame.

Against the whole frame at once: the cosmic-ray mask is identical, the rectified flux and
variance agree to float32 rounding (the cumulative sums of the resampling start at the tile's
first column) except next to a run of bad pixels along a row longer than :data:`FILL_MARGIN`
that crosses a tile's outer source column (its fill then sees other neighbours); the mask bits are
identical. ``tests/test_chunks.py`` states the tolerances; ``bench/prepare.py`` measures the
spectra of a full-size LAMOST frame.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from fiberlake.processors import ccd, rectify
from fiberlake.processors.rectify_map import CoordinateMap


MIN_TILE_COLUMNS = 512
"""Narrowest tile: a narrower one would spend more on its margins (2 x ~70 columns) than the
spread gains. A 4096-column LAMOST frame takes up to 8 tiles; a 608-column mini frame 1 (the
whole frame, as before tiles)."""


def tile_count(nx: int, setting: int) -> int:
    """Tiles of a frame of ``nx`` columns: ``execution.prepare_tiles``, fewer on narrow frames."""
    return max(1, min(int(setting), nx // MIN_TILE_COLUMNS))


FILL_MARGIN = 16
"""Extra CCD columns resampled on each side of a tile's sources: the rectification fills a bad
pixel from the nearest good ones along its row, so a run of bad pixels (a cosmic ray, a saturated
star) up to this long that crosses a tile's edge is filled as in the whole frame."""


@dataclass(frozen=True)
class Tile:
    """Columns of one tile of a frame.

    Attributes
    ----------
    index : int
        Position along the CCD's columns (0 first).
    out : tuple of int
        Columns ``[c0, c1)`` of the corrected (rectified) frame the tile delivers.
    src : tuple of int
        CCD columns ``[a, b)`` they are resampled from, with :data:`FILL_MARGIN` on each side
        (``out`` itself without rectification).
    read : tuple of int
        CCD columns ``[a', b')`` the tile needs: ``src`` and the cosmic-ray margin (clipped).
    """

    index: int
    out: tuple[int, int]
    src: tuple[int, int]
    read: tuple[int, int]


def plan_tiles(nx: int, n_tiles: int, rmap: CoordinateMap | None = None, *,
               cosmic_margin: int = ccd.COSMIC_MARGIN) -> list[Tile]:
    """Cut a frame of ``nx`` columns into ``n_tiles`` tiles of nearly equal width.

    Parameters
    ----------
    nx : int
        Columns of the frame.
    n_tiles : int
        Tiles (at least 1; at most ``nx``).
    rmap : CoordinateMap, optional
        The calibration set's aberration map when frames are rectified.
    cosmic_margin : int
        Extra CCD columns read on each side for the cosmic-ray detection.
    """
    if n_tiles < 1:
        raise ValueError("a frame needs at least one tile")
    edges = np.linspace(0, nx, min(int(n_tiles), nx) + 1).round().astype(int)
    tiles = []
    for i, (c0, c1) in enumerate(zip(edges[:-1], edges[1:])):
        src = (rectify.source_columns(rmap, (int(c0), int(c1)), pad=4 + FILL_MARGIN) if rmap is not None
               else (int(c0), int(c1)))
        read = (max(0, src[0] - cosmic_margin), min(nx, src[1] + cosmic_margin))
        tiles.append(Tile(index=i, out=(int(c0), int(c1)), src=src, read=read))
    return tiles


def correct_tile(adu: np.ndarray, mask: np.ndarray, tile: Tile, ccd_params: ccd.CCDParams, *,
                 cosmics: bool, rmap: CoordinateMap | None = None, order: int = 3,
                 cache_plan: bool = True) -> ccd.CCDImage:
    """Cosmic rays, electrons and inverse variance, rectification of one tile.

    Parameters
    ----------
    adu, mask : ndarray, shape (ny, tile.read width)
        CCD columns ``tile.read`` of :func:`~fiberlake.processors.ccd.correct_counts`'s output.
    tile : Tile
    ccd_params : CCDParams
    cosmics : bool
        Detect cosmic rays.
    rmap : CoordinateMap, optional
        Rectify with this map (the one ``tile`` was planned with).
    order : int
        Interpolation order of the rectification.
    cache_plan : bool
        Take the resampling's geometry from :func:`~fiberlake.processors.rectify.resample_plan`
        (computed once per calibration set and tile); False computes it for this frame alone.

    Returns
    -------
    CCDImage
        Columns ``tile.out`` of the corrected frame.
    """
    if adu.shape != mask.shape or adu.shape[1] != tile.read[1] - tile.read[0]:
        raise ValueError(f"tile {tile.index} reads columns {tile.read}, got an array of shape {adu.shape}")
    mask = np.array(mask, copy=True)
    if cosmics:
        mask[ccd.cosmic_mask(np.ascontiguousarray(adu), mask, ccd_params)] |= np.uint32(ccd.Mask.COSMIC)
    lo, hi = tile.src[0] - tile.read[0], tile.src[1] - tile.read[0]
    image = ccd.to_electrons(np.array(adu[:, lo:hi], np.float32), np.ascontiguousarray(mask[:, lo:hi]), ccd_params)
    if rmap is None:
        return image
    plan = rectify.resample_plan(rmap, tile.src[0], hi - lo, tile.out) if cache_plan else None
    return rectify.rectify_columns(image.image, image.ivar, image.mask, rmap, col0=tile.src[0], out=tile.out,
                                   order=order, plan=plan)


def correct_frame(adu: np.ndarray, mask: np.ndarray, ccd_params: ccd.CCDParams, *, cosmics: bool,
                  rmap: CoordinateMap | None = None, order: int = 3, n_tiles: int = 1,
                  threads: int = 1, cache_plan: bool = True) -> ccd.CCDImage:
    """The corrected frame from :func:`~fiberlake.processors.ccd.correct_counts`'s output, in tiles.

    ``n_tiles`` is capped by :func:`tile_count`; 1 is the whole frame at once (:func:`~fiberlake.processors.ccd.preprocess`'s
    cosmic rays, then :func:`~fiberlake.processors.rectify.rectify_image`). Tiles run on
    ``threads`` threads (the cosmic-ray detection and the array arithmetic release the GIL).
    """
    nx = adu.shape[1]
    n_tiles = tile_count(nx, n_tiles)
    if n_tiles <= 1:
        if cosmics:
            mask = np.array(mask, copy=True)
            mask[ccd.cosmic_mask(adu, mask, ccd_params)] |= np.uint32(ccd.Mask.COSMIC)
        image = ccd.to_electrons(adu, mask, ccd_params)
        if rmap is None:
            return image
        plan = rectify.resample_plan(rmap, 0, nx, (0, nx)) if cache_plan else None
        return rectify.rectify_columns(image.image, image.ivar, image.mask, rmap, col0=0, out=(0, nx), order=order,
                                       plan=plan)
    tiles = plan_tiles(nx, n_tiles, rmap)

    def run(tile: Tile) -> ccd.CCDImage:
        cols = slice(*tile.read)
        return correct_tile(adu[:, cols], mask[:, cols], tile, ccd_params, cosmics=cosmics, rmap=rmap, order=order,
                            cache_plan=cache_plan)

    if threads > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(tiles))) as pool:
            parts = list(pool.map(run, tiles))
    else:
        parts = [run(t) for t in tiles]
    return join_tiles(parts)


def join_tiles(parts: list[ccd.CCDImage]) -> ccd.CCDImage:
    """The tiles' outputs side by side, in column order."""
    return ccd.CCDImage(image=np.concatenate([p.image for p in parts], axis=1),
                        ivar=np.concatenate([p.ivar for p in parts], axis=1),
                        mask=np.concatenate([p.mask for p in parts], axis=1))


def threads(setting: int) -> int:
    """Threads for the tiles: ``setting``, or when 0 the CPUs this process is meant to use
    (``OMP_NUM_THREADS``, which Ray sets to an actor's CPUs, else every CPU of the machine)."""
    if setting > 0:
        return int(setting)
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)
