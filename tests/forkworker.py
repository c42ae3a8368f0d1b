"""Run ``fiberlake`` commands as killable child processes that skip the import of the libraries.

A fault test starts its worker twenty-odd times; as a fresh interpreter each start imports torch,
astropy, scipy, deltalake and the pipeline again (~6 s of a ~20 s clean run). Here the children
are forked from a multiprocessing *forkserver* that imported those modules once, so each attempt
costs only its own work. A child is still a separate process with its own memory, killed by a
real SIGKILL, and everything it leaves is on disk: what the fault tests check. The forkserver
runs no torch op before forking (no thread pools exist to be copied).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from pathlib import Path

#: Modules the forkserver imports once (what ``fiberlake watch`` / ``process`` import lazily).
PRELOAD = [
    "fiberlake.jobs.cli",
    "fiberlake.jobs.watch",
    "fiberlake.jobs.ingest",
    "fiberlake.jobs.process",
    "fiberlake.jobs.products",
    "fiberlake.jobs.typing_stage",
    "fiberlake.jobs.upkeep",
    "fiberlake.processors.pipeline",
    "scipy.signal",
    "scipy.optimize",
]

_context: multiprocessing.context.ForkServerContext | None = None


def _preloaded_context() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _run_cli(argv: list[str], env: dict[str, str], stderr_path: str) -> None:
    """The child: this environment, stdout to /dev/null, stderr to a file, then ``fiberlake argv``."""
    os.environ.clear()
    os.environ.update(env)
    devnull = os.open(os.devnull, os.O_WRONLY)
    err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(devnull, 1)
    os.dup2(err, 2)
    from fiberlake.jobs.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no atexit handlers or finalizers of the forkserver's copies


def run_cli(argv: list[str], env: dict[str, str], stderr_path: Path, kill_after: float | None = None,
            timeout: float = 240.0) -> tuple[int, str]:
    """Run ``fiberlake argv`` in a forked, preloaded child; SIGKILL it after ``kill_after`` seconds.

    Returns
    -------
    tuple of (int, str)
        The exit code as ``subprocess`` gives it (``-9`` for SIGKILL) and the child's stderr.
    """
    child = _preloaded_context().Process(target=_run_cli, args=(list(argv), dict(env), str(stderr_path)))
    child.start()
    try:
        if kill_after is not None:
            child.join(kill_after)
            if child.exitcode is None:
                os.kill(child.pid, signal.SIGKILL)
        child.join(timeout)
    finally:
        if child.exitcode is None:
            os.kill(child.pid, signal.SIGKILL)
            child.join()
    text = stderr_path.read_text(errors="replace") if stderr_path.exists() else ""
    return child.exitcode, text
