"""Refused deliveries kept byte for byte under ``quarantine/``, so nothing delivered is lost.

A copy appears whole or not at all: on a local disk it is written to ``<name>.tmp`` and renamed
into place; on an object store it is one upload (a PUT, or a multipart upload, which becomes
visible only when completed). An existing copy is never rewritten: its name carries the bytes'
SHA-256.

A local copy is never more readable than its source (:func:`copy_mode`): ``0o644`` when the
delivered file was readable by everyone, ``0o600`` (the lake's owner only) otherwise. The file is
created with that mode, so it is never wider even for an instant, and a copy left wider by an
older version is narrowed when met again.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fiberlake.storage.objectstore import LakeRoot, ObjectPath, filesystem, sha256_stored


def copy_mode(source_mode: int) -> int:
    """Permission bits of a quarantined copy: ``0o644`` for a world-readable source, else ``0o600``."""
    return 0o644 if source_mode & stat.S_IROTH else 0o600


def keep_copy(root: LakeRoot, relpath: str, source: Path | bytes, mode: int | None = None) -> None:
    """Keep the delivered bytes at ``root/relpath`` unless a copy is already there.

    Parameters
    ----------
    root : Path or ObjectPath
        Lake root.
    relpath : str
        Destination relative to the root (``Lake.quarantine_relpath``).
    source : Path or bytes
        The delivered bytes (what ingest hashed), or a local file to copy.
    mode : int, optional
        Permission bits of a local copy (see :func:`copy_mode`); default ``0o600``.
    """
    mode = 0o600 if mode is None else mode
    dest = root / relpath
    if isinstance(dest, ObjectPath):
        if not dest.is_file():
            if isinstance(source, bytes):
                dest.write_bytes(source)
            else:
                filesystem().put_file(str(source), dest.path)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        current = stat.S_IMODE(dest.stat().st_mode)
        if current & ~mode:
            os.chmod(dest, current & mode)
        return
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)  # left by a crash
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, dest)


def stored_copy_sha256(root: LakeRoot, relpath: str) -> str | None:
    """SHA-256 of a kept copy, None if it is missing."""
    stored = root / relpath
    if not stored.exists():
        return None
    return sha256_stored(stored)[0]
