"""Named failure points for crash testing (off unless ``FIBERLAKE_FAILPOINT`` is set).

The fault-injection tests run a job in a subprocess with ``FIBERLAKE_FAILPOINT=name:n``: the
``n``-th time (1-based) the process reaches :func:`failpoint` ``name`` it kills itself with
SIGKILL, exactly as an OOM killer or a node loss would, between two steps whose order the
exactly-once rules depend on. ``name`` may be ``*`` to count every failpoint. With
``FIBERLAKE_FAILPOINT_ONCE=<file>`` as well, only the first process to get there dies (it creates
the file first): a restarted worker then runs through, as after a one-off node loss. Production
runs never set the variables; the check costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_ENV = "FIBERLAKE_FAILPOINT"
_counts: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(_ENV)
    if not spec:
        return None
    name, _, count = spec.rpartition(":")
    return name, int(count)


def failpoint(name: str) -> None:
    """Die here with SIGKILL if the environment asks for it (see the module docstring)."""
    target = _target()
    if target is None:
        return
    wanted, n = target
    if wanted not in (name, "*"):
        return
    _counts[wanted] = _counts.get(wanted, 0) + 1
    if _counts[wanted] != n:
        return
    once = os.environ.get(_ENV + "_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def reached() -> dict[str, int]:
    """How many times each armed failpoint was reached in this process (for tests)."""
    return dict(_counts)
