"""A thread-safe, least-recently-used cache of values keyed by the content of their inputs.

What a calibration set determines (the rectification's resampling plan, the PSF's samples, the
extraction profiles) is the same for every frame of that set; each is built once and kept here,
keyed by a digest of the arrays it is built from (:func:`content_key`), so a calibration set
loaded again hits. Kept arrays are made read-only: they are shared between frames and threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Generic, TypeVar

import numpy as np

V = TypeVar("V")


def content_key(*parts) -> str:
    """A blake2b digest of ``parts``: arrays by dtype, shape and bytes; mappings of names to arrays
    (a container's ``to_arrays()``) name by name in sorted order; anything else by its ``repr``."""
    digest = hashlib.blake2b(digest_size=16)

    def add(part, prefix: str = "") -> None:
        if isinstance(part, np.ndarray):
            value = np.ascontiguousarray(part)
            digest.update(f"{prefix}{value.dtype.str}:{value.shape}:".encode())
            digest.update(value.tobytes())
        elif isinstance(part, Mapping):
            for name in sorted(part):
                add(part[name], f"{prefix}{name}/")
        else:
            digest.update(f"{prefix}{type(part).__name__}:{part!r};".encode())

    for part in parts:
        add(part)
    return digest.hexdigest()


class ContentCache(Generic[V]):
    """Values kept by key, the least recently used evicted first beyond ``max_bytes`` or ``max_entries``.

    Parameters
    ----------
    size : callable
        Bytes of a value (for ``max_bytes``).
    max_bytes, max_entries : int, optional
        Limits; the newest value is always kept, and one larger than ``max_bytes`` is returned
        without being kept.
    freeze : callable, optional
        Called on a value before it is kept (e.g. to make its arrays read-only).
    """

    def __init__(self, size: Callable[[V], int], *, max_bytes: int | None = None, max_entries: int | None = None,
                 freeze: Callable[[V], None] | None = None):
        self.size, self.max_bytes, self.max_entries, self.freeze = size, max_bytes, max_entries, freeze
        self._values: OrderedDict[Hashable, V] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], V]) -> V:
        """The value kept for ``key``, or ``build()``'s (kept within the limits)."""
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
        value = build()
        size = int(self.size(value))
        if self.max_bytes is not None and size > self.max_bytes:
            return value
        if self.freeze is not None:
            self.freeze(value)
        with self._lock:
            self._values[key] = value
            self._sizes[key] = size
            while len(self._values) > 1 and self._over():
                old, _ = self._values.popitem(last=False)
                del self._sizes[old]
        return value

    def _over(self) -> bool:
        return ((self.max_bytes is not None and sum(self._sizes.values()) > self.max_bytes)
                or (self.max_entries is not None and len(self._values) > self.max_entries))

    def clear(self) -> None:
        """Forget every value."""
        with self._lock:
            self._values.clear()
            self._sizes.clear()

    def nbytes(self) -> int:
        """Bytes kept now."""
        with self._lock:
            return sum(self._sizes.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)

    def empty_copy(self) -> ContentCache[V]:
        """A new, empty cache with the same limits."""
        return ContentCache(self.size, max_bytes=self.max_bytes, max_entries=self.max_entries, freeze=self.freeze)
