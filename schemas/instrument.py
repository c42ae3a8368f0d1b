"""Instrument descriptions as data.

Geometry convention used by every stage (simulator, processors, jobs):

* A raw frame is ``image[row, col]`` with **wavelength along rows** (the ordinate, as on
  LAMOST) and the fibers spread along columns.
* The *data section* is ``raw[:, :nx]``; the serial overscan is the ``n_overscan`` columns to
  its right, ``raw[:, nx:nx + n_overscan]``. Headers carry both as FITS sections
  (``DATASEC = '[1:nx,1:ny]'``, ``BIASSEC = '[nx+1:nx+n_overscan,1:ny]'``).
* Pixel coordinates are 0-based pixel *centres* in the data section: column ``x`` covers
  ``[x - 0.5, x + 0.5)``.
* Fiber ``f`` (0-based within a spectrograph) sits, before distortion, at column
  ``x0_f = (nx - 1) / 2 + (f - (n_fibers - 1) / 2) * fiber_pitch``.
* A camera is named ``<arm><spectrograph>``, e.g. ``b1`` or ``r16``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ArmSpec:
    """One spectrograph arm.

    Parameters
    ----------
    name : str
        Arm letter, ``"b"`` or ``"r"``.
    wave_center : float
        Wavelength (Angstrom, air) at the CCD centre row.
    dispersion : float
        Nominal dispersion (Angstrom per pixel) at the centre.
    lsf_sigma_px : float
        Nominal Gaussian sigma of the line-spread function along the wavelength axis (pixels).
    """

    name: str
    wave_center: float
    dispersion: float
    lsf_sigma_px: float = 1.4

    def wave_range(self, ny: int) -> tuple[float, float]:
        """Nominal wavelength range ``(min, max)`` covered by ``ny`` rows."""
        half = 0.5 * ny * self.dispersion
        return self.wave_center - half, self.wave_center + half


@dataclass(frozen=True)
class Instrument:
    """A multi-fiber spectrograph system, described as data.

    Parameters
    ----------
    name : str
        Instrument name written to the ``INSTRUME`` header keyword.
    n_spectrographs : int
        Number of spectrographs (each has one camera per arm).
    arms : tuple of ArmSpec
        The arms of each spectrograph.
    n_fibers : int
        Fibers per spectrograph.
    ny, nx : int
        Rows (wavelength) and columns (spatial) of the CCD data section.
    n_overscan : int
        Serial overscan columns to the right of the data section.
    fiber_pitch : float
        Fiber spacing on the CCD (pixels).
    profile_sigma_px : float
        Cross-dispersion Gaussian sigma of a fiber profile at the CCD centre (pixels).
    gain : float
        Nominal gain (electrons per ADU).
    read_noise : float
        Nominal read noise (electrons).
    bias_level : float
        Bias level (ADU).
    saturation : int
        Saturation level of the ADC (ADU).
    distortion_k : float
        Nominal pincushion coefficient: a point at normalised radius ``r`` (unit
        :attr:`distortion_radius`, half the larger CCD dimension) moves outward from the CCD
        centre by a factor ``1 + k r^2``.
    sky_fiber_fraction : float
        Fraction of fibers assigned to sky in a science fiber map.
    """

    name: str
    n_spectrographs: int
    arms: tuple[ArmSpec, ...]
    n_fibers: int
    ny: int
    nx: int
    n_overscan: int
    fiber_pitch: float = 16.0
    profile_sigma_px: float = 2.4
    gain: float = 1.2
    read_noise: float = 3.5
    bias_level: float = 1000.0
    saturation: int = 65535
    distortion_k: float = 0.012
    sky_fiber_fraction: float = 0.1
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def distortion_radius(self) -> float:
        """Normalising radius R of the distortion (pixels): half the larger CCD dimension."""
        return 0.5 * max(self.nx, self.ny)

    @property
    def raw_shape(self) -> tuple[int, int]:
        """Shape ``(rows, cols)`` of a raw frame including overscan."""
        return self.ny, self.nx + self.n_overscan

    @property
    def cameras(self) -> list[str]:
        """Camera names, spectrograph-major: ``b1, r1, b2, r2, ...``."""
        return [f"{arm.name}{s}" for s in range(1, self.n_spectrographs + 1) for arm in self.arms]

    def arm(self, name: str) -> ArmSpec:
        """Return the arm called ``name`` (``"b"`` or ``"r"``)."""
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(f"instrument {self.name!r} has no arm {name!r}")

    def nominal_fiber_columns(self) -> np.ndarray:
        """Undistorted column of each fiber centre, shape ``(n_fibers,)``."""
        f = np.arange(self.n_fibers, dtype=float)
        return (self.nx - 1) / 2.0 + (f - (self.n_fibers - 1) / 2.0) * self.fiber_pitch

    def wave_grid(self, arm: str) -> tuple[float, float, int]:
        """Output wavelength grid of extracted spectra for ``arm``.

        Returns
        -------
        wave_min, dwave, nwave : float, float, int
            Linear grid ``wave_min + dwave * arange(nwave)``. Every arm of an instrument has
            the same ``nwave`` so spectra tables can use fixed-size list columns. The grid is
            trimmed by 2 % at each end, where the distortion moves rows off the CCD.
        """
        spec = self.arm(arm)
        lo, hi = spec.wave_range(self.ny)
        trim = 0.02 * (hi - lo)
        nwave = int(self.ny * 0.96)
        dwave = (hi - lo - 2 * trim) / (nwave - 1)
        return lo + trim, dwave, nwave

    def wavelengths(self, arm: str) -> np.ndarray:
        """Wavelengths (Angstrom) of the output grid of ``arm``."""
        wmin, dw, n = self.wave_grid(arm)
        return wmin + dw * np.arange(n)


def parse_camera(camera: str) -> tuple[str, int]:
    """Split a camera name like ``"r12"`` into ``("r", 12)``.

    Raises
    ------
    ValueError
        If the name is not an arm letter followed by a spectrograph number.
    """
    if len(camera) < 2 or not camera[0].isalpha() or not camera[1:].isdigit():
        raise ValueError(f"camera name {camera!r} is not <arm letter><spectrograph number>")
    return camera[0], int(camera[1:])


LAMOST = Instrument(
    name="lamost",
    n_spectrographs=16,
    arms=(
        ArmSpec("b", wave_center=4800.0, dispersion=2200.0 / 4096, lsf_sigma_px=1.4),
        ArmSpec("r", wave_center=7350.0, dispersion=3300.0 / 4096, lsf_sigma_px=1.4),
    ),
    n_fibers=250,
    ny=4096,
    nx=4096,
    n_overscan=40,
)

# Same physics as LAMOST (pitch, PSF, dispersion, noise); fewer fibers and pixels. The arm
# centres are chosen so that the 1024-row window still holds arc lines, sky lines and
# stellar features (b: H-beta, Mg b; r: [OI] sky, H-alpha, Ne/Ar lamp lines).
MINI = Instrument(
    name="mini",
    n_spectrographs=1,
    arms=(
        ArmSpec("b", wave_center=4950.0, dispersion=2200.0 / 4096, lsf_sigma_px=1.4),
        ArmSpec("r", wave_center=6700.0, dispersion=3300.0 / 4096, lsf_sigma_px=1.4),
    ),
    n_fibers=32,
    ny=1024,
    nx=608,
    n_overscan=32,
    distortion_k=0.012,
)

INSTRUMENTS: dict[str, Instrument] = {inst.name: inst for inst in (LAMOST, MINI)}


def get_instrument(name: str) -> Instrument:
    """Look up an instrument description by name (``"lamost"`` or ``"mini"``)."""
    try:
        return INSTRUMENTS[name]
    except KeyError:
        raise KeyError(f"unknown instrument {name!r}; known: {sorted(INSTRUMENTS)}") from None
