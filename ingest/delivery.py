"""What is in a night directory, and how its files may be read.

Every entry of a night directory is classified by its name and its ``lstat`` alone, before a
single byte of it is read:

* ``frame``: a regular file named ``*.fits``, ``*.fits.gz``, ``*.fits.fz`` or ``*.fz``;
* ``fibermap``: a regular file named ``fibermap-<expid>.fits``;
* ``ignored``: anything else that is harmless to leave (other extensions, hidden and temporary
  files, sub-directories such as ``truth/``); logged in ``deliveries`` with the reason;
* ``refused``: an entry that must not be read: a name that is not valid UTF-8, a FIFO, socket
  or device, and any symbolic link except one to a regular file inside the night directory
  itself (such a link is read as its target, and its bytes are then a duplicate of the target).

Links pointing anywhere else (outside the directory, to a directory, to nothing, in a loop) are
refused: their bytes are never read or copied, so a link cannot pull a protected file into the
lake. A frame or fiber map is then read whole, once, by :func:`read_delivery`: opened with
``O_NOFOLLOW`` (a file swapped for a link after listing is refused, not followed), checked to be
a regular file through the open descriptor, refused when larger than any frame can be, and a
``.gz`` file is decompressed with the same bound (a decompression bomb costs nothing). The bytes
returned are the ones hashed, validated and, when refused, kept in quarantine.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import re
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

from fiberlake.schemas.instrument import INSTRUMENTS

FRAME_SUFFIXES: tuple[str, ...] = (".fits", ".fits.gz", ".fits.fz", ".fz")
"""Names of frame deliveries (compared in lower case)."""

FIBERMAP_NAME = re.compile(r"^fibermap-([0-9]+)\.fits(?:\.gz)?\Z")
"""Names of fiber-map deliveries; the digits are the exposure id."""

FITS_BLOCK = 2880
GZIP_MAGIC = b"\x1f\x8b"
MAX_DELIVERY_BYTES = 2 * max(2 * i.raw_shape[0] * i.raw_shape[1] for i in INSTRUMENTS.values()) + (1 << 20)
"""Largest file (and largest decompressed ``.gz`` content) read: twice the largest raw frame of
any instrument plus 1 MiB of headers. Larger files are refused without being read."""


class DeliveryRefused(Exception):
    """A delivered entry that is not read at all (its bytes are neither hashed nor copied).

    Parameters
    ----------
    error_class : str
        Short class, e.g. ``"symlink"``, ``"unreadable"``, ``"too_large"``.
    reason : str
        What is wrong, in one sentence.
    """

    def __init__(self, error_class: str, reason: str):
        super().__init__(reason)
        self.error_class = error_class
        self.reason = reason


@dataclass(frozen=True)
class Entry:
    """One entry of a night directory, classified without reading it.

    Attributes
    ----------
    path : Path
        The entry as listed.
    name : str
        Its name as recorded in the tables (bytes that are not UTF-8 shown as ``\\xNN``).
    kind : str
        ``frame``, ``fibermap``, ``ignored`` or ``refused``.
    reason : str
        Why it is ignored or refused (empty otherwise).
    source : Path or None
        What to read: the entry itself, or for an accepted link its target.
    st : os.stat_result
        ``lstat`` of the entry (``stat`` of the target for an accepted link).
    error_class : str
        Short class of a refusal (empty otherwise).
    """

    path: Path
    name: str
    kind: str
    reason: str
    source: Path | None
    st: os.stat_result
    error_class: str = ""

    @property
    def candidate(self) -> bool:
        """Whether the entry is to be read (a frame or a fiber map)."""
        return self.kind in ("frame", "fibermap")


def display_name(path: Path | str) -> str:
    """The name of ``path`` as tables record it: its bytes decoded as UTF-8, others as ``\\xNN``."""
    return os.fsencode(os.path.basename(os.fspath(path))).decode("utf-8", "backslashreplace")


def is_utf8_name(path: Path | str) -> bool:
    """Whether the name of ``path`` is valid UTF-8."""
    try:
        os.fsencode(os.path.basename(os.fspath(path))).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def kind_of_name(name: str) -> tuple[str, str]:
    """``(kind, reason)`` of a regular file from its name alone (``frame``, ``fibermap`` or ``ignored``)."""
    lower = name.lower()
    if name.startswith("."):
        return "ignored", "a hidden or temporary file (its name starts with a dot), not a delivery"
    if FIBERMAP_NAME.match(name):
        return "fibermap", ""
    if lower.endswith(FRAME_SUFFIXES):
        return "frame", ""
    return "ignored", f"not a FITS delivery (the names taken end in {', '.join(FRAME_SUFFIXES)})"


_TYPES = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def _special(mode: int) -> str:
    for test, words in _TYPES:
        if test(mode):
            return words
    return "not a regular file"


def classify(path: Path, night_dir: Path | None = None) -> Entry:
    """Classify one entry of a night directory from its name and ``lstat`` (nothing is read).

    Parameters
    ----------
    path : Path
        The entry.
    night_dir : Path, optional
        Its directory (default ``path.parent``): a link is accepted only to a regular file in it.

    Raises
    ------
    FileNotFoundError
        If the entry vanished.
    """
    path = Path(path)
    night_dir = Path(night_dir) if night_dir is not None else path.parent
    st = os.lstat(path)
    name = display_name(path)

    def refuse(cls: str, reason: str) -> Entry:
        return Entry(path, name, "refused", reason, None, st, cls)

    if not is_utf8_name(path):
        return refuse("bad_name", "the file name is not valid UTF-8; rename it to ingest it")
    if stat.S_ISDIR(st.st_mode):
        return Entry(path, name, "ignored", "a directory (sub-directories are not deliveries)", None, st)
    source = path
    if stat.S_ISLNK(st.st_mode):
        try:
            target = Path(os.path.realpath(path, strict=True))
            tst = os.stat(target)
        except (OSError, RuntimeError):
            return refuse("symlink", "a symbolic link to nothing (dangling or a loop); links are read only when "
                                     "they point to a regular file inside the night directory")
        inside = target.parent == Path(os.path.realpath(night_dir))
        if not inside:
            return refuse("symlink", "a symbolic link to a file outside the night directory; its bytes are not read")
        if not stat.S_ISREG(tst.st_mode):
            what = "a directory" if stat.S_ISDIR(tst.st_mode) else _special(tst.st_mode)
            return refuse("symlink", f"a symbolic link to {what}; only links to regular files of the night "
                                     "directory are read")
        source, st = target, tst
    elif not stat.S_ISREG(st.st_mode):
        return refuse("not_regular", f"{_special(st.st_mode)}, not a regular file; it is not read")
    kind, reason = kind_of_name(name)
    return Entry(path, name, kind, reason, source, st)


def scan_night(night_dir: Path) -> list[Entry]:
    """Every entry of ``night_dir``, classified: regular files first, then links, each in name order."""
    entries = []
    for path in Path(night_dir).iterdir():
        try:
            entries.append(classify(path, night_dir))
        except FileNotFoundError:
            continue  # gone between listing and lstat
    return sorted(entries, key=delivery_order)


def delivery_order(entry: Entry) -> tuple[bool, bytes]:
    """Sort key of entries: the directory's own files first, then accepted links, each by name bytes."""
    return entry.source is not None and entry.source != entry.path, os.fsencode(entry.path.name)


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading without following a link; refuse anything but a regular file."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError:
        raise DeliveryRefused("unreadable", "the file cannot be read (permission denied); it is taken once its "
                                            "permissions allow") from None
    except FileNotFoundError:
        raise DeliveryRefused("vanished", "the file disappeared before it could be read") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DeliveryRefused("symlink", "the file became a symbolic link after it was listed; it is not "
                                             "followed") from None
        raise DeliveryRefused("unreadable", f"the file cannot be opened ({os.strerror(err.errno or 0)}); it is "
                                            "tried again by the next run") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise DeliveryRefused("not_regular", f"{_special(st.st_mode)}, not a regular file; it is not read")
    return fd, st


def read_delivery(entry: Entry, limit: int = MAX_DELIVERY_BYTES, digest=None) -> tuple[bytes, os.stat_result]:
    """The delivered bytes of a frame or fiber map, read whole and once.

    ``digest`` (a :mod:`hashlib` object), when given, is updated with each block as it is read:
    the file's hash in the same pass over its bytes.

    Returns
    -------
    data : bytes
        The file's bytes exactly as delivered (compressed for ``.gz``).
    st : os.stat_result
        ``fstat`` of the file that was read.

    Raises
    ------
    DeliveryRefused
        If the entry cannot be read (permission, gone, swapped for a link, not regular, an I/O
        error) or is larger than ``limit``; nothing of it was kept.
    """
    if entry.source is None:
        raise DeliveryRefused(entry.error_class or "not_read", entry.reason or "the entry is not a file to read")
    fd, st = _open_regular(entry.source)
    try:
        if st.st_size > limit:
            raise DeliveryRefused("too_large", f"the file has {st.st_size} bytes, more than any raw frame can "
                                               f"({limit}); it is not read")
        chunks, total = [], 0
        with os.fdopen(os.dup(fd), "rb", buffering=0) as handle:
            while chunk := handle.read(1 << 22):
                total += len(chunk)
                if total > limit:
                    raise DeliveryRefused("too_large", f"the file grew past {limit} bytes while being read")
                if digest is not None:
                    digest.update(chunk)
                chunks.append(chunk)
    except OSError as err:
        raise DeliveryRefused("unreadable", f"reading the file failed ({os.strerror(err.errno or 0)}); it is tried "
                                            "again by the next run") from None
    finally:
        os.close(fd)
    return b"".join(chunks), st


def gunzip(data: bytes, limit: int = MAX_DELIVERY_BYTES) -> bytes:
    """Decompress a whole gzip file, refusing output larger than ``limit``.

    Raises
    ------
    ValueError
        With one sentence when the stream is truncated, corrupt (CRC or length check) or too large.
    """
    out = bytearray()
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as stream:
            while chunk := stream.read(1 << 22):
                out += chunk
                if len(out) > limit:
                    raise ValueError(f"the gzip content exceeds {limit} bytes (more than any raw frame)")
    except EOFError:
        raise ValueError("the gzip stream ends early: truncated or still being written") from None
    except (OSError, zlib.error) as err:
        raise ValueError(f"the gzip stream is corrupt ({str(err)[:120]})") from None
    return bytes(out)
