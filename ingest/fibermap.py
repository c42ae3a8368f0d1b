"""Read a delivered fiber map (``fibermap-<expid>.fits``) into table rows, or refuse it with a reason.

A fiber map decides which target and object type every spectrum of its exposure gets, so it is
held to a contract as strict as a frame's header:

* the exposure id in the name fits int64 (a 23-digit name is refused, not overflowed), and an
  ``EXPID`` card, when present, agrees with it;
* ``NIGHT`` (the card, else the delivery directory's name) is a real date ``YYYY-MM-DD``;
* the ``FIBERMAP`` table has every column, with integer ``SPECID``, ``FIBER`` and ``TARGETID``,
  finite ``RA`` in [0, 360] and ``DEC`` in [-90, 90], and known ``OBJTYPE`` values;
* the optional ``MAG_G`` and ``MAG_I`` columns (a blue and a red catalogue magnitude, which the
  flux calibration uses as the standards' colours), when present, hold numbers in [-100, 100] or
  NaN (no photometry: null in the table); a fiber map without them (of before) gives nulls;
* each (``SPECID``, ``FIBER``) appears once, and names a fiber the instrument has.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from astropy.io import fits

from fiberlake.ingest.delivery import FIBERMAP_NAME
from fiberlake.ingest.fitsreader import FrameRejected, frame_bytes
from fiberlake.processors.warnings_guard import catch_warnings
from fiberlake.schemas.header import INT64_MAX, check_expid, check_night
from fiberlake.schemas.instrument import Instrument

FIBERMAP_COLUMNS = ("SPECID", "FIBER", "TARGETID", "RA", "DEC", "MAG", "OBJTYPE")
OPTIONAL_COLUMNS = ("MAG_G", "MAG_I")
"""Columns a fiber map may have: a blue and a red catalogue magnitude (null in the table when absent)."""
OBJTYPES = {"TGT", "SKY", "STD"}
INT16_MAX = 2**15 - 1


def is_fibermap(path: Path | str) -> bool:
    """Whether ``path`` is named like a fiber map."""
    return bool(FIBERMAP_NAME.match(Path(path).name))


def fibermap_expid(name: str) -> int:
    """Exposure id of a fiber map from its file name.

    Raises
    ------
    FrameRejected
        If the name is not ``fibermap-<expid>.fits`` or the id does not fit int64.
    """
    match = FIBERMAP_NAME.match(name)
    if not match:
        raise FrameRejected("bad_name", f"{name[:80]} is not named fibermap-<expid>.fits")
    digits = match.group(1)
    if len(digits) > 19:
        raise FrameRejected("bad_name", f"the exposure id in the name has {len(digits)} digits, more than int64 holds")
    try:
        return check_expid(int(digits))
    except ValueError as err:
        raise FrameRejected("bad_name", f"the file name's {err}") from None


def _integers(columns: dict[str, np.ndarray], name: str, low: int, high: int) -> np.ndarray:
    values = columns[name]
    if values.dtype.kind not in "iu":
        raise FrameRejected("bad_fibermap", f"column {name} holds {values.dtype} values, not integers")
    if values.size and (values.min() < low or values.max() > high):
        raise FrameRejected("bad_fibermap", f"column {name} has values outside {low}..{high}")
    return values.astype(np.int64)


def _floats(columns: dict[str, np.ndarray], name: str, low: float, high: float, allow_nan: bool) -> np.ndarray:
    values = columns[name]
    if values.dtype.kind not in "iuf":
        raise FrameRejected("bad_fibermap", f"column {name} holds {values.dtype} values, not numbers")
    values = values.astype(np.float64)
    bad = ~((values >= low) & (values <= high)) & ~(np.isnan(values) if allow_nan else False)
    if bad.any():
        raise FrameRejected("bad_fibermap", f"column {name} has {int(bad.sum())} values that are not finite numbers "
                                            f"in [{low}, {high}]")
    return values


def read_fibermap(source: Path | bytes, night: str, instrument: Instrument | None = None, *,
                  name: str | None = None) -> list[dict]:
    """Rows of the ``fibermap`` table from a fiber-map file.

    Parameters
    ----------
    source : Path or bytes
        ``fibermap-<expid>.fits`` with a ``FIBERMAP`` binary table, or its delivered bytes.
    night : str
        Night of the delivery directory (used when the header has no ``NIGHT``).
    instrument : Instrument, optional
        Instrument of the lake: every fiber must be one of its fibers.
    name : str, optional
        File name (required when ``source`` is bytes).

    Raises
    ------
    FrameRejected
        With one sentence for any breach of the contract (module docstring).
    """
    name = name if name is not None else Path(source).name
    expid = fibermap_expid(name)
    try:
        with catch_warnings():
            with fits.open(io.BytesIO(frame_bytes(source)), memmap=False) as hdul:
                header = hdul["FIBERMAP"].header.copy()
                table = hdul["FIBERMAP"].data
                if table is None:
                    raise FrameRejected("bad_fibermap", "the FIBERMAP table has no rows")
                columns = {column: np.array(table[column]) for column in FIBERMAP_COLUMNS}
                names = {name.upper(): name for name in table.columns.names}
                columns |= {column: np.array(table[names[column]]) for column in OPTIONAL_COLUMNS
                            if column in names}
    except FrameRejected:
        raise
    except KeyError as err:
        raise FrameRejected("bad_fibermap", f"fiber map lacks {str(err)[:80]}") from None
    except Exception as err:
        raise FrameRejected("unreadable", f"astropy could not read the fiber map: {str(err)[:200]}") from None
    try:
        card_night = header.get("NIGHT", night)
        card_expid = header.get("EXPID", expid)
    except Exception as err:  # a malformed card fails only when read
        raise FrameRejected("bad_header",
                            f"the fiber map header has a card astropy cannot parse: {str(err)[:160]}") from None
    try:
        night = check_night(card_night.strip() if isinstance(card_night, str) else card_night)
    except ValueError as err:
        raise FrameRejected("bad_keyword", f"fiber map NIGHT: {err}") from None
    if isinstance(card_expid, bool) or not isinstance(card_expid, (int, np.integer)) or int(card_expid) != expid:
        raise FrameRejected("bad_keyword", f"fiber map EXPID = {str(card_expid)[:40]!r} disagrees with its file name "
                                           f"(expid {expid})")
    n = len(columns["FIBER"])
    if n == 0:
        raise FrameRejected("bad_fibermap", "the FIBERMAP table has no rows")
    n_spec = instrument.n_spectrographs if instrument else INT16_MAX
    n_fib = instrument.n_fibers if instrument else INT16_MAX + 1
    where = f" on instrument {instrument.name!r}" if instrument else ""
    specid = _integers(columns, "SPECID", 1, INT16_MAX)
    fiber = _integers(columns, "FIBER", 0, INT16_MAX)
    outside = (specid > n_spec) | (fiber >= n_fib)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise FrameRejected("bad_fibermap", f"fiber {fiber[i]} of spectrograph {specid[i]} does not exist{where} "
                                            f"({n_spec} spectrographs of {n_fib} fibers)")
    pairs, counts = np.unique(np.stack([specid, fiber], axis=1), axis=0, return_counts=True)
    if (counts > 1).any():
        twice = pairs[counts > 1][0]
        raise FrameRejected("bad_fibermap", f"fiber {twice[1]} of spectrograph {twice[0]} is listed "
                                            f"{int(counts.max())} times; each fiber may have one target")
    targetid = _integers(columns, "TARGETID", -INT64_MAX - 1, INT64_MAX)
    ra = _floats(columns, "RA", 0.0, 360.0, allow_nan=False)
    dec = _floats(columns, "DEC", -90.0, 90.0, allow_nan=False)
    mag = _floats(columns, "MAG", -100.0, 100.0, allow_nan=True)
    extra = {column.lower(): _optional_floats(columns, column, n) for column in OPTIONAL_COLUMNS}
    raw_types = columns["OBJTYPE"]
    if raw_types.dtype.kind not in "US":
        raise FrameRejected("bad_fibermap", f"column OBJTYPE holds {raw_types.dtype} values, not text")
    objtypes = [(v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)).strip() for v in raw_types]
    unknown = set(objtypes) - OBJTYPES
    if unknown:
        shown = sorted(repr(u[:12]) for u in unknown)[:5]
        raise FrameRejected("bad_fibermap", f"unknown OBJTYPE values {', '.join(shown)} (known: TGT, SKY, STD)")
    return [
        {
            "night": night,
            "expid": expid,
            "spectrograph": int(specid[i]),
            "fiber": int(fiber[i]),
            "targetid": int(targetid[i]),
            "ra": float(ra[i]),
            "dec": float(dec[i]),
            "mag": float(mag[i]),
            "objtype": objtypes[i],
        }
        | {column: values[i] for column, values in extra.items()}
        for i in range(n)
    ]


def _optional_floats(columns: dict[str, np.ndarray], name: str, n: int) -> list[float | None]:
    """An optional magnitude column: its values, None where NaN or where the fiber map lacks it."""
    if name not in columns:
        return [None] * n
    if columns[name].ndim != 1:
        raise FrameRejected("bad_fibermap", f"column {name} holds arrays, not one number per fiber")
    values = _floats(columns, name, -100.0, 100.0, allow_nan=True)
    return [None if np.isnan(v) else float(v) for v in values]
