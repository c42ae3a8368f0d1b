"""The writer lock of an object-store lake: a lock object created with a conditional PUT.

No kernel releases a lock object when its holder dies, so the object says who holds it, the
holder keeps renewing it, and a stale one can be taken over:

* ``<lake>/.writer.lock`` is created with ``If-None-Match: *``: of two writers only one creates
  it; the other reads who holds it and gets :class:`~fiberlake.storage.lock.LakeBusy` (after
  ``timeout`` seconds of retrying). The object is JSON: pid, host, boot id and start time of
  the process, command, a random token, and when it was acquired and last renewed.
* The holder rewrites it every ``stale_after / 5`` seconds, with ``If-Match`` its last ETag, so
  a holder whose lock was taken over (after a long stall) learns it, warns, and stops renewing.
* **Stale rule.** A lock is stale when (a) it was taken on this machine (same host name and
  boot id) by a process that no longer runs: a crashed job's lock is taken over at once by the
  next job on the same machine; or (b) it has not been renewed for ``stale_after`` seconds
  (default 300, ``FIBERLAKE_LOCK_STALE_SECONDS``), judged by the object's ``LastModified`` (the
  server's clock) against this machine's clock, so clocks must agree to well under that: its
  holder died on another machine or lost the store. A stale lock is replaced with ``If-Match``
  its ETag, so of two writers taking over the same stale lock only one succeeds.
* It is deleted on exit (normal, exception, SIGINT/SIGTERM through the jobs' handlers) if it is
  still this writer's. SIGKILL or a lost machine leave it, to be taken over by the rule above.
* The server must honour conditional PUTs: after creating the lock, creating it again must be
  refused; if it is not, :class:`~fiberlake.storage.objectstore.ConditionalPutUnsupported` is
  raised (neither this lock nor deltalake's commits would be safe there).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fiberlake.storage.lock import LakeBusy
from fiberlake.storage.objectstore import (
    ConditionalPutUnsupported,
    ObjectPath,
    filesystem,
    put_if_absent,
    put_if_match,
    stat,
    unsupported_message,
)

LOCK_NAME = ".writer.lock"
STALE_ENV = "FIBERLAKE_LOCK_STALE_SECONDS"
DEFAULT_STALE_SECONDS = 300.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """Start time of process ``pid`` in clock ticks since boot (Linux), '' when unknown."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat_line.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int, start: str) -> bool:
    """Whether process ``pid`` of this machine runs and is the one that started at ``start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return not start or _process_start(pid) in ("", start)


@dataclass(frozen=True)
class Holder:
    """What a lock object says, with its ETag and last modification (server time)."""

    info: dict
    etag: str
    modified: dt.datetime

    def describe(self, now: dt.datetime) -> str:
        """One line for people."""
        info = self.info
        age = (now - self.modified).total_seconds()
        return (f"{info.get('command') or 'unknown command'}, pid {info.get('pid', '?')} on {info.get('host', '?')}, "
                f"since {info.get('acquired_at', '?')}, renewed {age:.0f} s ago")


class ObjectStoreLock:
    """Writer lock of an object-store lake (see the module docstring for the rules).

    Parameters
    ----------
    root : ObjectPath
        Lake root.
    command : str
        What this writer is, recorded in the lock for the error message of others.
    timeout : float
        Seconds to keep trying before raising :class:`~fiberlake.storage.lock.LakeBusy`.
    stale_after : float, optional
        Seconds without renewal after which a lock is stale (default: ``FIBERLAKE_LOCK_STALE_SECONDS``
        or 300).
    """

    def __init__(self, root: ObjectPath, command: str = "", timeout: float = 0.0, stale_after: float | None = None):
        self.path = root / LOCK_NAME
        self.command = command or " ".join(sys.argv[:3])
        self.timeout = timeout
        self.stale_after = float(stale_after or os.environ.get(STALE_ENV) or DEFAULT_STALE_SECONDS)
        self.token = uuid.uuid4().hex
        self.lost = False
        self._acquired_at = ""
        self._etag: str | None = None
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._renewer: threading.Thread | None = None

    # --- the lock object -----------------------------------------------------------------------
    def _body(self) -> bytes:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        pid = os.getpid()
        return json.dumps({
            "pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "pid_start": _process_start(pid),
            "command": self.command, "token": self.token, "acquired_at": self._acquired_at or now, "renewed_at": now,
        }).encode()

    def holder(self) -> Holder | None:
        """Who holds the lock now (None when there is no lock object)."""
        info = stat(self.path)  # the ETag first: a takeover with it fails if the object changed since
        if info is None:
            return None
        try:
            content = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:  # not ours or truncated by hand: judged by its age alone
            content = {}
        return Holder(content if isinstance(content, dict) else {}, str(info["ETag"]), info["LastModified"])

    def is_stale(self, holder: Holder) -> bool:
        """The stale rule (module docstring)."""
        info = holder.info
        if (info.get("host") == socket.gethostname() and info.get("boot_id") == _boot_id()
                and isinstance(info.get("pid"), int) and not _alive(info["pid"], str(info.get("pid_start", "")))):
            return True
        age = (dt.datetime.now(dt.timezone.utc) - holder.modified).total_seconds()
        return age > self.stale_after

    # --- acquire and release ---------------------------------------------------------------------
    def acquire(self) -> ObjectStoreLock:
        """Take the lock, taking over a stale one.

        Raises
        ------
        LakeBusy
            If another live writer holds it after ``timeout`` seconds.
        ConditionalPutUnsupported
            If the server does not honour conditional PUTs.
        """
        deadline = time.monotonic() + self.timeout
        self._acquired_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        while True:
            body = self._body()
            etag = put_if_absent(self.path, body)
            if etag is not None:
                return self._held(etag, body)
            holder = self.holder()
            if holder is None:  # released meanwhile
                continue
            if self.is_stale(holder):
                etag = put_if_match(self.path, body, holder.etag)
                if etag is not None:
                    return self._held(etag, body)
                continue
            if time.monotonic() >= deadline:
                now = dt.datetime.now(dt.timezone.utc)
                raise LakeBusy(
                    f"another fiberlake writer holds the lake {self.path.parent} ({holder.describe(now)}); its lock "
                    f"is taken over when not renewed for {self.stale_after:.0f} s or when its process died on this "
                    f"machine (or delete {self.path} by hand once sure no writer runs)")
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())) or 0.05)

    def _held(self, etag: str, body: bytes) -> ObjectStoreLock:
        if put_if_absent(self.path, body) is not None:  # the create was not exclusive
            filesystem().rm_file(self.path.path)
            raise ConditionalPutUnsupported(
                unsupported_message(self.path) + " (it accepted a second create of the lock)")
        self._etag = etag
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name="fiberlake-lock-renewal", daemon=True)
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.stale_after / 5):
            with self._mutex:
                if self._stop.is_set():
                    return
                try:
                    etag = put_if_match(self.path, self._body(), self._etag or "")
                except Exception:  # noqa: BLE001 - a network hiccup: try again at the next tick
                    continue
                if etag is None:
                    self.lost = True
                    print(f"fiberlake: warning: the writer lock {self.path} was taken over by another writer "
                          "(this one stalled longer than the stale limit); stop this job", file=sys.stderr)
                    return
                self._etag = etag

    def release(self) -> None:
        """Stop renewing and delete the lock object if it is still this writer's."""
        self._stop.set()
        with self._mutex:
            pass
        if self._renewer is not None:
            self._renewer.join(timeout=30)
            self._renewer = None
        if self.lost or self._etag is None:
            return
        self._etag = None
        try:
            holder = self.holder()
            if holder is not None and holder.info.get("token") == self.token:
                filesystem().rm_file(self.path.path)
        except OSError as err:  # the store is unreachable: the lock goes stale by itself
            print(f"fiberlake: warning: could not delete the writer lock {self.path} ({err}); it is stale after "
                  f"{self.stale_after:.0f} s, or at once for the next writer on this machine", file=sys.stderr)

    def __enter__(self) -> ObjectStoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
