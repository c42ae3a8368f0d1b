"""Read a delivered fiber map (``fibermap-<expid>.fits``) into table rows."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from astropy.io import fits

from fiberlake.ingest.fitsreader import FrameRejected

FIBERMAP_NAME = re.compile(r"^fibermap-(\d+)\.fits$")
FIBERMAP_COLUMNS = ("SPECID", "FIBER", "TARGETID", "RA", "DEC", "MAG", "OBJTYPE")
OBJTYPES = {"TGT", "SKY", "STD"}


def is_fibermap(path: Path) -> bool:
    """Whether ``path`` is named like a fiber map."""
    return bool(FIBERMAP_NAME.match(Path(path).name))


def read_fibermap(path: Path, night: str) -> list[dict]:
    """Rows of the ``fibermap`` table from a fiber-map file.

    Parameters
    ----------
    path : Path
        ``fibermap-<expid>.fits`` with a ``FIBERMAP`` binary table.
    night : str
        Night of the delivery (used when the header has no ``NIGHT``).

    Raises
    ------
    FrameRejected
        If the file cannot be read or lacks a required column or has an unknown OBJTYPE.
    """
    match = FIBERMAP_NAME.match(Path(path).name)
    if not match:
        raise FrameRejected("bad_name", f"{Path(path).name} is not named fibermap-<expid>.fits")
    expid = int(match.group(1))
    try:
        with fits.open(path, memmap=False) as hdul:
            table = hdul["FIBERMAP"].data
            header = hdul["FIBERMAP"].header
            columns = {name: np.array(table[name]) for name in FIBERMAP_COLUMNS}
    except KeyError as err:
        raise FrameRejected("bad_fibermap", f"fiber map lacks {err}") from None
    except Exception as err:
        raise FrameRejected("unreadable", f"astropy could not read the fiber map: {str(err)[:200]}") from None
    night = str(header.get("NIGHT", night))
    objtypes = [str(v).strip() for v in columns["OBJTYPE"]]
    unknown = set(objtypes) - OBJTYPES
    if unknown:
        raise FrameRejected("bad_fibermap", f"unknown OBJTYPE values {sorted(unknown)}")
    return [
        {
            "night": night,
            "expid": expid,
            "spectrograph": int(columns["SPECID"][i]),
            "fiber": int(columns["FIBER"][i]),
            "targetid": int(columns["TARGETID"][i]),
            "ra": float(columns["RA"][i]),
            "dec": float(columns["DEC"][i]),
            "mag": float(columns["MAG"][i]),
            "objtype": objtypes[i],
        }
        for i in range(len(objtypes))
    ]
