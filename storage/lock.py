"""One writer per lake: an advisory ``flock`` on ``<lake>/.writer.lock``.

Delta commits are atomic on their own, but the exactly-once rules of ingest (content-hash
identity, file versions) and of processing (replace by predicate, then a ``reductions`` marker)
read the tables and then write them; two writers interleaving those steps could both decide a
frame is new. Every job that writes takes this lock first. The kernel drops a ``flock`` when its
holder dies, even by SIGKILL, so a crashed job never leaves the lake locked.

On an object-store lake the lock is an object created with a conditional PUT, renewed while
held and taken over when stale (:mod:`fiberlake.storage.objectlock`); :class:`LakeLock` picks
the kind from the root.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

from fiberlake.storage.objectstore import ObjectPath


class LakeBusy(RuntimeError):
    """Another process holds the lake's writer lock."""


class LakeLock:
    """Context manager holding the writer lock of a lake.

    Parameters
    ----------
    root : Path or ObjectPath
        Lake root directory (created if missing), or object-store location.
    command : str
        What this writer is, recorded in the lock file for the error message of others.
    timeout : float
        Seconds to wait for the lock before raising :class:`LakeBusy` (0: fail at once).
    """

    def __init__(self, root: Path | ObjectPath, command: str = "", timeout: float = 0.0):
        self.command = command or " ".join(sys.argv[:3])
        self.timeout = timeout
        self._fd: int | None = None
        self._object = None
        if isinstance(root, ObjectPath):
            from fiberlake.storage.objectlock import ObjectStoreLock

            self._object = ObjectStoreLock(root, self.command, timeout)
            self.path = self._object.path
            return
        self.path = Path(root) / ".writer.lock"

    def __enter__(self) -> LakeLock:
        if self._object is not None:
            self._object.acquire()
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise LakeBusy(f"another fiberlake writer holds the lake {self.path.parent} ({holder or 'unknown'})") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": self.command}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._object is not None:
            self._object.release()
            return
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
