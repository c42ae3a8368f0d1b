"""When is a delivered file complete? FITS structure, size stability and age.

A data-acquisition system writes a frame into the night directory over seconds (or copies it
over a slow link). Reading it too early would quarantine a good frame as truncated. A file is
taken only when

* its FITS structure is whole: every HDU's header reaches its ``END`` card and the file holds
  exactly the data blocks those headers declare (:func:`fits_structure`); a gzip file (``.fits.gz``)
  is whole when its gzip stream is (CRC and length) and the FITS inside is;
* its size and modification time did not change between two looks (:class:`ArrivalTracker`),
  and the last change is at least ``settle`` seconds old.

CHECKSUM/DATASUM are verified when the frame is read (:func:`fiberlake.ingest.fitsreader.read_frame`);
a stable, structurally complete file whose checksum fails is corrupt, not in flight, and is
quarantined. A file that stays structurally incomplete and unchanged for ``stale_after`` seconds
is handed over anyway, so that it is quarantined as truncated instead of waiting forever.
"""

from __future__ import annotations

import io
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from astropy.io import fits

from fiberlake.ingest.delivery import GZIP_MAGIC, MAX_DELIVERY_BYTES, gunzip

FITS_BLOCK = 2880


def _hdu_data_bytes(header: fits.Header) -> int:
    """Bytes of an HDU's data (before padding), from its header (FITS standard 4.4.1)."""
    naxis = int(header.get("NAXIS", 0))
    if naxis == 0:
        return 0
    count = 1
    for axis in range(1, naxis + 1):
        count *= int(header[f"NAXIS{axis}"])
    if header.get("XTENSION", "").strip() in ("BINTABLE", "IMAGE", "TABLE") or "GROUPS" in header:
        count = int(header.get("GCOUNT", 1)) * (int(header.get("PCOUNT", 0)) + count)
    return abs(int(header["BITPIX"])) // 8 * count


def fits_structure(path: Path) -> tuple[bool, str]:
    """Whether ``path`` holds whole FITS HDUs from its first byte to its last.

    A ``.gz`` file is decompressed first (bounded, see :func:`fiberlake.ingest.delivery.gunzip`):
    it is whole when its gzip stream is (CRC and length check) and the FITS inside is. A file
    that cannot be opened (no permission, swapped for a link) counts as complete: there is nothing
    to wait for, and the reader logs why it is not taken.

    Returns
    -------
    complete : bool
        True when every header reaches ``END`` and the file ends exactly after the padded
        data of the last HDU.
    why : str
        Empty when complete, otherwise what is missing (for logs and reports).
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return False, "the file disappeared"
    except OSError:
        return True, ""
    with os.fdopen(fd, "rb") as handle:
        try:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return True, ""
            if handle.read(2) == GZIP_MAGIC:
                handle.seek(0)
                try:
                    inner = gunzip(handle.read(MAX_DELIVERY_BYTES + 1))
                except ValueError as err:
                    return False, str(err)
                return stream_structure(io.BytesIO(inner), len(inner))
            return stream_structure(handle, os.fstat(handle.fileno()).st_size)
        except OSError:
            return True, ""


def stream_structure(handle: BinaryIO, size: int) -> tuple[bool, str]:
    """:func:`fits_structure` of an open binary stream of ``size`` bytes."""
    if size == 0:
        return False, "the file is empty"
    if size % FITS_BLOCK:
        return False, f"{size} bytes is not a whole number of 2880-byte FITS blocks"
    offset = 0
    n_hdu = 0
    try:
        while offset < size:
            handle.seek(offset)
            try:
                header = fits.Header.fromfile(handle)
            except (EOFError, OSError, ValueError) as err:
                if n_hdu == 0:
                    return False, f"the primary header is incomplete or not FITS ({str(err)[:80]})"
                return False, f"header of HDU {n_hdu} is incomplete"
            data = _hdu_data_bytes(header)
            offset = handle.tell() + -(-data // FITS_BLOCK) * FITS_BLOCK
            n_hdu += 1
    except (KeyError, TypeError, ValueError) as err:
        return False, f"header of HDU {n_hdu} lacks its size keywords ({err})"
    if offset > size:
        return False, f"the headers declare {offset} bytes, the file has {size}"
    return True, ""


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    changed_at: float


@dataclass
class ArrivalTracker:
    """Remembers what each file looked like at the last poll, to tell finished from in-flight.

    Parameters
    ----------
    settle : float
        Seconds a file's size and mtime must stay unchanged before it is taken.
    stale_after : float
        Seconds after which an unchanged but structurally incomplete file is taken anyway (it
        will be quarantined as truncated by the reader).
    """

    settle: float = 1.0
    stale_after: float = 300.0
    _seen: dict[Path, _Seen] = field(default_factory=dict)

    def poll(self, paths: list[Path], now: float | None = None,
             structure: Callable[[Path], tuple[bool, str]] | None = None) -> tuple[list[Path], dict[Path, str]]:
        """Split ``paths`` into files to take now and files still in flight.

        Parameters
        ----------
        paths : list of Path
            Candidate files of the night directory.
        now : float, optional
            ``time.time()`` of this poll (tests pass their own clock).
        structure : callable, optional
            Completeness check of a settled file (default :func:`fits_structure`); files that
            are only logged, not read, pass one that always answers ``(True, "")``.

        Returns
        -------
        ready : list of Path
            Files that are complete (or stale), in name order.
        waiting : dict of Path to str
            Files in flight, with the reason they are not taken yet.
        """
        now = time.time() if now is None else now
        structure = structure or fits_structure
        ready: list[Path] = []
        waiting: dict[Path, str] = {}
        for path in sorted(paths):
            try:
                st = os.stat(path)
            except OSError:  # gone, or a link to nothing: the listing logs what it is
                self._seen.pop(path, None)
                continue
            seen = self._seen.get(path)
            if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                # First sight, or it changed since the last poll: the modification time tells
                # when it last changed (a file copied in finished long ago is taken at once).
                changed_at = min(now, st.st_mtime_ns / 1e9) if seen is None else now
                seen = _Seen(st.st_size, st.st_mtime_ns, changed_at)
                self._seen[path] = seen
            quiet_for = now - seen.changed_at
            if quiet_for < self.settle:
                waiting[path] = f"still being written (changed {quiet_for:.1f} s ago)"
                continue
            complete, why = structure(path)
            if complete or quiet_for >= self.stale_after:
                ready.append(path)
            else:
                waiting[path] = f"incomplete: {why}"
        return ready, waiting

    def forget(self, path: Path) -> None:
        """Drop a file that has been handled."""
        self._seen.pop(path, None)
