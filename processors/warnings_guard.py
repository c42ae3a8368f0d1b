"""``warnings.catch_warnings`` for code that runs on threads (ingest's reading threads).

``warnings.catch_warnings`` saves the process-wide filter list on entry and puts it back on exit.
Two threads inside it at once interleave those saves and restores, and one thread's filters
outlive both blocks: a reader's ``simplefilter("error")`` left behind turned every later warning
of the process into an exception (a flux calibration's empty median crashed after a threaded
ingest), and a ``record=True`` block could collect another file's checksum warning. Every block
here takes one process-wide lock, so no two of them interleave. They stay short (a header parse,
a clipping of a few columns); a warning that another thread emits meanwhile goes by the
block's filters, so the blocks never set ``"error"``: they record or ignore.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_LOCK = threading.RLock()


@contextmanager
def catch_warnings(*, record: bool = False, action: str = "ignore") -> Iterator[list | None]:
    """``warnings.catch_warnings(record=record)`` with ``simplefilter(action)``, one thread at a time.

    Parameters
    ----------
    record : bool
        Collect the warnings into the list yielded (``action`` should then be ``"always"``).
    action : str
        ``"ignore"`` or ``"always"``; ``"error"`` is refused: while the block runs, the filter
        applies to every thread of the process.
    """
    if action not in ("ignore", "always"):
        raise ValueError(f"action is 'ignore' or 'always', not {action!r}")
    with _LOCK, warnings.catch_warnings(record=record) as caught:
        warnings.simplefilter(action)
        yield caught
