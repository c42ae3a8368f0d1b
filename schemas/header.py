"""The raw FITS header contract: what a frame must carry, and how values are checked.

Every raw frame is a FITS file whose primary HDU holds the ``uint16`` pixels (stored, as FITS
does, as int16 with ``BZERO = 32768``) and the keywords below.
"""

from __future__ import annotations

import datetime as dt
import numbers
import re
from dataclasses import dataclass

OBSTYPES: tuple[str, ...] = ("BIAS", "DARK", "FLAT", "ARC", "SCIENCE", "STANDARD")
"""Frame types. SPIT (seed 001) types bias, arc, flat, science, standard; dark is optional."""

CALIBRATION_OBSTYPES: tuple[str, ...] = ("BIAS", "DARK", "FLAT", "ARC")
SKY_OBSTYPES: tuple[str, ...] = ("SCIENCE", "STANDARD")


@dataclass(frozen=True)
class Keyword:
    """One required header keyword: its type and what it means."""

    name: str
    kind: type
    description: str


REQUIRED_KEYWORDS: tuple[Keyword, ...] = (
    Keyword("INSTRUME", str, "instrument name, e.g. 'lamost' or 'mini'"),
    Keyword("NIGHT", str, "observing night, YYYY-MM-DD (local evening date)"),
    Keyword("EXPID", int, "exposure id, unique within the survey"),
    Keyword("OBSTYPE", str, "BIAS, DARK, FLAT, ARC, SCIENCE or STANDARD"),
    Keyword("EXPTIME", float, "exposure time (s)"),
    Keyword("DATE-OBS", str, "UTC start of exposure, ISO 8601"),
    Keyword("MJD-OBS", float, "modified Julian date of the exposure start"),
    Keyword("SPECID", int, "spectrograph number, 1-based"),
    Keyword("ARM", str, "spectrograph arm, 'b' or 'r'"),
    Keyword("CAMERA", str, "camera name, <arm><spectrograph>"),
    Keyword("GAIN", float, "gain (electrons per ADU)"),
    Keyword("RDNOISE", float, "read noise (electrons)"),
    Keyword("DATASEC", str, "data section, FITS 1-based '[x1:x2,y1:y2]'"),
    Keyword("BIASSEC", str, "overscan section, FITS 1-based '[x1:x2,y1:y2]'"),
)

NIGHT_PATTERN = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")
CAMERA_PATTERN = re.compile(r"^[a-z][0-9]{1,2}\Z")
SECTION_PATTERN = re.compile(r"^\[(\d+):(\d+),(\d+):(\d+)\]$")
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}\Z")
"""Any other string that may become a key: letters, digits and ``._:+-``, no quotes, no spaces."""

INT64_MAX = 2**63 - 1
"""Largest exposure id (the ``expid`` columns are int64)."""


def check_night(value: object) -> str:
    """Return ``value`` if it is a real calendar date written ``YYYY-MM-DD``.

    Raises
    ------
    ValueError
        If it is not a string of that form or not a date that exists (``2026-02-30``).
    """
    if not isinstance(value, str) or not NIGHT_PATTERN.match(value):
        raise ValueError(f"night {str(value)[:40]!r} is not written YYYY-MM-DD")
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"night {value!r} is not a calendar date") from None
    return value


def check_camera(value: object) -> str:
    """Return ``value`` if it is a camera name, an arm letter and a spectrograph number (``b1``, ``r16``).

    Raises
    ------
    ValueError
        Otherwise.
    """
    if not isinstance(value, str) or not CAMERA_PATTERN.match(value):
        raise ValueError(f"camera {str(value)[:40]!r} is not <arm letter><spectrograph number>")
    return value


def check_int(value: object, what: str, low: int = 0, high: int = INT64_MAX) -> int:
    """Return ``value`` as an int if it is an integer (not a bool) in ``[low, high]``.

    Raises
    ------
    ValueError
        If it is not an integer or lies outside the range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} {str(value)[:40]!r} is not an integer")
    value = int(value)
    if not low <= value <= high:
        shown = str(value) if abs(value) < 10**40 else f"of {len(str(abs(value)))} digits"
        raise ValueError(f"{what} {shown} is outside {low}..{high}")
    return value


def check_expid(value: object) -> int:
    """Return ``value`` if it is an exposure id: an integer from 0 to 2**63 - 1 (int64).

    Raises
    ------
    ValueError
        Otherwise.
    """
    return check_int(value, "exposure id")


def check_token(value: object, what: str) -> str:
    """Return ``value`` if it is a plain identifier (:data:`TOKEN_PATTERN`).

    Raises
    ------
    ValueError
        If it holds anything else (quotes, spaces, operators, non-ASCII) or is too long.
    """
    if not isinstance(value, str) or not TOKEN_PATTERN.match(value):
        raise ValueError(f"{what} {str(value)[:40]!r} is not a plain identifier (letters, digits, ._:+-)")
    return value


def parse_section(section: str) -> tuple[slice, slice]:
    """Convert a FITS section string to numpy slices ``(rows, cols)``.

    Parameters
    ----------
    section : str
        FITS 1-based inclusive section, ``'[x1:x2,y1:y2]'``.

    Returns
    -------
    tuple of slice
        ``(row_slice, col_slice)`` for ``array[row_slice, col_slice]``.

    Examples
    --------
    >>> parse_section('[1:10,1:20]')
    (slice(0, 20, None), slice(0, 10, None))
    """
    match = SECTION_PATTERN.match(section.replace(" ", ""))
    if not match:
        raise ValueError(f"section {section!r} is not of the form '[x1:x2,y1:y2]'")
    x1, x2, y1, y2 = (int(g) for g in match.groups())
    if x1 < 1 or y1 < 1 or x2 < x1 or y2 < y1:
        raise ValueError(f"section {section!r} is empty or not 1-based")
    return slice(y1 - 1, y2), slice(x1 - 1, x2)


def format_section(rows: slice, cols: slice) -> str:
    """Inverse of :func:`parse_section` for 0-based half-open slices."""
    return f"[{cols.start + 1}:{cols.stop},{rows.start + 1}:{rows.stop}]"
