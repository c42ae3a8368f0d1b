"""The extraction profiles of a calibration set, computed once and kept for its next frames.

The pixel-integrated cross-dispersion profiles that :func:`~fiberlake.processors.extract.box_extract`
and :func:`~fiberlake.processors.extract.optimal_extract` weigh a frame's pixels with depend only
on the traces, the profile model and the window geometry: the same for every frame of a
calibration set. Evaluating them (two normal CDFs per pixel edge with wings, the neighbours'
profiles moved onto each window) was ~0.3 s of a LAMOST bundle's ~0.9 s extraction on one core.
:func:`cached` keeps them, keyed by a blake2b hash of the inputs' content (so a calibration set
loaded again hits), least recently used first out beyond :data:`PROFILE_CACHE_BYTES`. The
values are the ones the extraction computes itself, bit for bit.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

PROFILE_CACHE_BYTES = 768 << 20
"""Bytes of profiles kept: one LAMOST camera's box and optimal profiles (~560 MB: box 150 MB in
float64, optimal 410 MB: own and both neighbours' profiles in float32)."""

_cache: OrderedDict[str, list[dict[str, np.ndarray]]] = OrderedDict()
_sizes: dict[str, int] = {}
_lock = threading.Lock()


def key(*parts) -> str:
    """A content hash of arrays and scalars (dtype, shape and bytes of each array)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, np.ndarray):
            value = np.ascontiguousarray(part)
            digest.update(f"{value.dtype.str}:{value.shape}:".encode())
            digest.update(value.tobytes())
        else:
            digest.update(f"{type(part).__name__}:{part!r};".encode())
    return digest.hexdigest()


def cached(name: str, build: Callable[[], list[dict[str, np.ndarray]]]) -> list[dict[str, np.ndarray]]:
    """``build()``'s value for ``name`` (a :func:`key`), built on the first call and kept.

    The arrays are shared between callers: read them, never write them.
    """
    with _lock:
        hit = _cache.get(name)
        if hit is not None:
            _cache.move_to_end(name)
            return hit
    value = build()
    size = sum(a.nbytes for part in value for a in part.values())
    if size > PROFILE_CACHE_BYTES:
        return value
    for part in value:
        for a in part.values():
            a.flags.writeable = False
    with _lock:
        _cache[name] = value
        _sizes[name] = size
        total = sum(_sizes.values())
        while total > PROFILE_CACHE_BYTES and len(_cache) > 1:
            old, _ = _cache.popitem(last=False)
            total -= _sizes.pop(old)
    return value


def clear() -> None:
    """Forget every kept profile."""
    with _lock:
        _cache.clear()
        _sizes.clear()


def nbytes() -> int:
    """Bytes kept now."""
    with _lock:
        return sum(_sizes.values())
