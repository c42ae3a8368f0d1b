"""Calibration products as data: fiber traces and wavelength solutions.

Both are per-fiber Legendre series in the CCD row coordinate, normalised to ``[-1, 1]`` over
``[0, ny - 1]``. They are plain containers (arrays + evaluation) so processors can build them
and storage can persist them without either knowing about the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.polynomial import legendre


def _normalise_rows(rows: np.ndarray, ny: int) -> np.ndarray:
    return 2.0 * np.asarray(rows, dtype=float) / (ny - 1) - 1.0


def _legval_fibers(coeffs: np.ndarray, u: np.ndarray) -> np.ndarray:
    # coeffs [nfiber, ncoef]; u [nrows] or [nfiber, nrows] -> [nfiber, nrows]
    if u.ndim == 1:
        return legendre.legval(u, coeffs.T).reshape(coeffs.shape[0], -1)
    return np.stack([legendre.legval(u[i], coeffs[i]) for i in range(coeffs.shape[0])])


@dataclass
class TraceSet:
    """Fiber centre column as a function of row, one Legendre series per fiber.

    Attributes
    ----------
    coeffs : ndarray, shape (n_fibers, deg + 1)
        Legendre coefficients of ``x(row)``.
    ny : int
        Number of rows of the frame the traces were measured on.
    dead : ndarray of bool, shape (n_fibers,)
        Fibers with no light on the flat; their coefficients are interpolated from neighbours.
    rms : ndarray, shape (n_fibers,)
        RMS (pixels) of the centroid residuals about each fit.
    sigma : ndarray, shape (n_fibers,)
        Median cross-dispersion Gaussian sigma (pixels) of each fiber profile on the flat.
    """

    coeffs: np.ndarray
    ny: int
    dead: np.ndarray
    rms: np.ndarray
    sigma: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def n_fibers(self) -> int:
        """Number of fibers."""
        return int(self.coeffs.shape[0])

    def x(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Trace columns at ``rows`` (default every row), shape ``(n_fibers, n_rows)``."""
        rows = np.arange(self.ny) if rows is None else np.asarray(rows, dtype=float)
        return _legval_fibers(self.coeffs, _normalise_rows(rows, self.ny))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for storage; the inverse of :meth:`from_arrays`."""
        sigma = self.sigma if self.sigma.size else np.zeros(self.n_fibers)
        return {"coeffs": self.coeffs, "ny": np.array(self.ny), "dead": self.dead, "rms": self.rms, "sigma": sigma}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "TraceSet":
        """Rebuild from :meth:`to_arrays` output."""
        return cls(
            coeffs=np.asarray(arrays["coeffs"], float),
            ny=int(arrays["ny"]),
            dead=np.asarray(arrays["dead"], bool),
            rms=np.asarray(arrays["rms"], float),
            sigma=np.asarray(arrays["sigma"], float),
        )


@dataclass
class WaveSolution:
    """Wavelength (Angstrom, air) as a function of row along each fiber's trace.

    Attributes
    ----------
    coeffs : ndarray, shape (n_fibers, deg + 1)
        Legendre coefficients of ``wave(row)``.
    ny : int
        Number of rows of the frame.
    rms : ndarray, shape (n_fibers,)
        RMS (Angstrom) of the identified arc lines about each fiber's fit.
    n_lines : ndarray of int, shape (n_fibers,)
        Number of arc lines used in each fit.
    row_range : ndarray, shape (n_fibers, 2)
        First and last row constrained by an identified line; outside it the solution is an
        extrapolation (mask bit ``EXTRAPWAVE``).
    """

    coeffs: np.ndarray
    ny: int
    rms: np.ndarray
    n_lines: np.ndarray
    row_range: np.ndarray

    @property
    def n_fibers(self) -> int:
        """Number of fibers."""
        return int(self.coeffs.shape[0])

    def wave(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Wavelengths at ``rows`` (default every row), shape ``(n_fibers, n_rows)``."""
        rows = np.arange(self.ny) if rows is None else np.asarray(rows, dtype=float)
        return _legval_fibers(self.coeffs, _normalise_rows(rows, self.ny))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for storage; the inverse of :meth:`from_arrays`."""
        return {"coeffs": self.coeffs, "ny": np.array(self.ny), "rms": self.rms,
                "n_lines": self.n_lines, "row_range": self.row_range}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "WaveSolution":
        """Rebuild from :meth:`to_arrays` output."""
        return cls(
            coeffs=np.asarray(arrays["coeffs"], float),
            ny=int(arrays["ny"]),
            rms=np.asarray(arrays["rms"], float),
            n_lines=np.asarray(arrays["n_lines"], int),
            row_range=np.asarray(arrays["row_range"], float),
        )
