"""Refused deliveries kept byte for byte under ``quarantine/``, so nothing delivered is lost.

A copy appears whole or not at all: on a local disk it is written to ``<name>.tmp`` and renamed
into place; on an object store it is one upload (a PUT, or a multipart upload, which becomes
visible only when completed). An existing copy is never rewritten: its name carries the bytes'
SHA-256.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fiberlake.storage.objectstore import LakeRoot, ObjectPath, filesystem, sha256_stored


def keep_copy(root: LakeRoot, relpath: str, source: Path) -> None:
    """Copy the delivered file ``source`` to ``root/relpath`` unless a copy is already there.

    Parameters
    ----------
    root : Path or ObjectPath
        Lake root.
    relpath : str
        Destination relative to the root (``Lake.quarantine_relpath``).
    source : Path
        The delivered file (local).
    """
    dest = root / relpath
    if isinstance(dest, ObjectPath):
        if not dest.is_file():
            filesystem().put_file(str(source), dest.path)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)


def stored_copy_sha256(root: LakeRoot, relpath: str) -> str | None:
    """SHA-256 of a kept copy, None if it is missing."""
    stored = root / relpath
    if not stored.exists():
        return None
    return sha256_stored(stored)[0]
