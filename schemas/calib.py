"""Former home of :class:`TraceSet` and :class:`WaveSolution`.

Both now live with the other data containers in :mod:`fiberlake.schemas.containers`; import them
from there. This module only re-exports them for ``processors/rectify_sampling.py``, whose import
line is outside this change's files, and can go once that line is updated.
"""

from fiberlake.schemas.containers import TraceSet, WaveSolution

__all__ = ["TraceSet", "WaveSolution"]
