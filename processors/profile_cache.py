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

from collections.abc import Callable

import numpy as np

from fiberlake.processors.content_cache import ContentCache

PROFILE_CACHE_BYTES = 768 << 20
"""Bytes of profiles kept: one LAMOST camera's box and optimal profiles (~560 MB: box 150 MB in
float64, optimal 410 MB: own and both neighbours' profiles in float32)."""

Profiles = list[dict[str, np.ndarray]]


def _freeze(value: Profiles) -> None:
    for part in value:
        for array in part.values():
            array.flags.writeable = False


_cache: ContentCache[Profiles] = ContentCache(lambda value: sum(a.nbytes for part in value for a in part.values()),
                                              max_bytes=PROFILE_CACHE_BYTES, freeze=_freeze)

def cached(name: str, build: Callable[[], Profiles]) -> Profiles:
    """``build()``'s value for ``name`` (a :func:`~fiberlake.processors.content_cache.content_key`), built on
    the first call and kept.

    The arrays are shared between callers: read them, never write them.
    """
    return _cache.get(name, build)


def clear() -> None:
    """Forget every kept profile."""
    _cache.clear()


def nbytes() -> int:
    """Bytes kept now."""
    return _cache.nbytes()
