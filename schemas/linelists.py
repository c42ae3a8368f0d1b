"""Reference line lists shipped with fiberlake (arc lamps and night-sky emission)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np


def _read(name: str) -> np.ndarray:
    text = resources.files("fiberlake.schemas").joinpath("data", name).read_text()
    rows = [line.split(",") for line in text.splitlines() if line and not line.startswith("#")]
    header, body = rows[0], rows[1:]
    dtype = [(header[0], "f8"), (header[1], "U8"), (header[2], "f8")]
    return np.array([(float(a), b, float(c)) for a, b, c in body], dtype=dtype)


@lru_cache(maxsize=None)
def arc_lines() -> np.ndarray:
    """Hg, Cd, Ar and Ne lamp lines (NIST air wavelengths).

    Returns
    -------
    numpy.ndarray
        Structured array with fields ``wave_air`` (Angstrom), ``ion`` and
        ``relative_intensity``, sorted by wavelength.
    """
    return _read("arc_lines.csv")


@lru_cache(maxsize=None)
def sky_lines() -> np.ndarray:
    """Night-sky emission lines ([OI], NaI D, OH): fields ``wave_air``, ``species``,
    ``relative_intensity``."""
    return _read("sky_lines.csv")
