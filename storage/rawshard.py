"""The single shard of a raw frame's Zarr array, encoded directly: the bytes zarr writes, less work.

A raw frame is one Zarr v3 array with one shard (:mod:`fiberlake.storage.rawstore`). Writing it
through ``zarr.Array.__setitem__`` copies each inner chunk several times (selection into a chunk
buffer, bytes codec, blosc output into a buffer, all the chunks into one shard buffer) and
compresses the chunks one after another. :func:`encode_shard` builds the same shard (inner
chunks in zarr's Morton order, chunks equal to the fill value left out, padding with the fill
value at the edge, the index of ``(offset, nbytes)`` little-endian uint64 pairs with its CRC32C
at the end) from the frame's own memory, compressing the chunks on a small thread pool (blosc
releases the GIL). ``tests/test_ingest_speed.py`` checks the bytes equal zarr's for every layout
the lake writes and that zarr reads them back.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
from zarr.core.indexing import morton_order_iter

EMPTY = np.uint64(2**64 - 1)
"""Index entry of a chunk that is not stored (zarr's ``MAX_UINT_64``)."""
ENCODE_THREADS = 2
"""Threads compressing a shard's chunks (numcodecs' blosc releases the GIL)."""

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=ENCODE_THREADS, thread_name_prefix="fiberlake-blosc")
    return _POOL


def blosc_codec(codec: dict, typesize: int) -> numcodecs.Blosc:
    """The numcodecs Blosc that ``zarr.codecs.BloscCodec(typesize=typesize, **codec)`` encodes with."""
    shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
               "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[codec.get("shuffle", "bitshuffle")]
    return numcodecs.Blosc(cname=codec["cname"], clevel=codec["clevel"], shuffle=shuffle,
                           blocksize=codec.get("blocksize", 0), typesize=typesize)


def encode_shard(pixels: np.ndarray, chunk: tuple[int, int], codec: dict, fill_value: int = 0) -> list[bytes]:
    """The bytes of the one shard holding all of ``pixels``, as a list of pieces to write in order.

    Parameters
    ----------
    pixels : ndarray, 2-D, integer
        The whole frame; the shard covers it, rounded up to whole inner chunks.
    chunk : (int, int)
        Inner chunk shape.
    codec : dict
        ``zarr.codecs.BloscCodec`` arguments (``cname``, ``clevel``, ``shuffle``, ``blocksize``).
    fill_value : int
        The array's fill value: chunks holding only it are not stored, edges are padded with it.

    Returns
    -------
    list of bytes
        The compressed chunks, then the index (empty list: every chunk is the fill value, and
        zarr writes no shard).
    """
    data = np.asarray(pixels)
    if data.ndim != 2:
        raise ValueError(f"a raw frame is 2-D, not {data.shape}")
    little = data.dtype.newbyteorder("<")
    cy, cx = chunk
    grid = (-(-data.shape[0] // cy), -(-data.shape[1] // cx))
    compressor = blosc_codec(codec, data.dtype.itemsize)

    def encode(coords: tuple[int, int]) -> bytes | None:
        iy, ix = coords
        block = data[iy * cy:(iy + 1) * cy, ix * cx:(ix + 1) * cx]
        if block.shape != (cy, cx):
            padded = np.full((cy, cx), fill_value, dtype=little)
            padded[:block.shape[0], :block.shape[1]] = block
            block = padded
        else:
            block = np.ascontiguousarray(block, dtype=little)
        if np.all(block == fill_value):
            return None
        return compressor.encode(block)

    order = list(morton_order_iter(grid))
    pieces = list(_pool().map(encode, order)) if len(order) > 1 else [encode(order[0])]
    index = np.full(grid + (2,), EMPTY, dtype="<u8")
    out: list[bytes] = []
    offset = 0
    for coords, piece in zip(order, pieces):
        if piece is None:
            continue
        index[coords] = (offset, len(piece))
        out.append(piece)
        offset += len(piece)
    if not out:
        return []
    index_bytes = index.tobytes()
    out.append(index_bytes + np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes())
    return out


def write_pieces(path: Path, pieces: list[bytes]) -> None:
    """Write ``pieces`` one after another as the file ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb", buffering=0, closefd=False) as handle:
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    view = view[handle.write(view):]
    finally:
        os.close(fd)
