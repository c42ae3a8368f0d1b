"""Contract of the simulator's output: file names, and what the truth files hold.

A simulated night directory looks like a delivered one, plus a ``truth/`` folder::

    <out>/<night>/fl-<expid:08d>-<camera>.fits          raw frame (as delivered)
    <out>/<night>/fibermap-<expid:08d>.fits             fiber map of a SCIENCE/STANDARD exposure
    <out>/<night>/truth/camera-<camera>.fits            static truth of a camera on that night
    <out>/<night>/truth/spectra-<expid:08d>-<camera>.fits   per-frame truth (every non-bias frame)

Raw frame (primary HDU)
    ``uint16`` pixels ``[ny, nx + n_overscan]`` stored as int16 with ``BZERO = 32768``; every
    keyword of :data:`fiberlake.schemas.header.REQUIRED_KEYWORDS` plus ``TELESCOP``, ``OBJECT``,
    ``CCDTEMP``, ``SATURATE``, ``BUNIT``, ``SIMULATE``, ``SIMSEED``, ``SIMVERS``; sky frames add
    ``RA``, ``DEC`` (plate centre, deg), ``AIRMASS``, ``PLATEID``; lamp frames add ``LAMP``. A
    valid ``CHECKSUM``/``DATASUM`` pair is written (its comment is fixed text, not the wall-clock
    time, so the same seed gives the same bytes).

Fiber map (``FIBERMAP`` binary table, one row per fiber of every spectrograph)
    ``SPECID`` int16, ``FIBER`` int16 (0-based within the spectrograph), ``TARGETID`` int64, ``RA``,
    ``DEC`` float64 (deg), ``MAG`` float32 (r-band-like; 99 for sky fibers), ``OBJTYPE``
    (``TGT``, ``SKY``, ``STD``). Header: ``NIGHT``, ``EXPID``, ``OBSTYPE``, ``PLATEID``, ``RA``,
    ``DEC``.

Camera truth (``truth/camera-<camera>.fits``)
    Primary header: ``CAMERA``, ``NIGHT``, ``INSTRUME``, ``SIMSEED``, ``GAIN`` (e-/ADU),
    ``RDNOISE`` (e-), ``BIASLVL`` (ADU), the distortion ``DISTK``, ``DISTCX``, ``DISTCY`` (0-based
    pixels), ``DISTR`` (pixels) with ``(x, y) = c + (p0 - c)(1 + k r^2)``, ``r = |p0 - c| / R``;
    the PSF wing sigma ratio ``WINGRAT``; dispersion shape ``DISPQ2``, ``DISPQ3``, ``SMILE``;
    flexure ``FLEXX``, ``FLEXY``. Image HDUs, rows = fibers:

    ``TRACE_X`` float64 [n_fibers, ny]
        Column of the flux centroid of the cross-dispersion profile at each row centre.
    ``WAVE`` float64 [n_fibers, ny]
        Air wavelength (A) whose line-spread-function centroid falls on each row centre.
    ``THROUGHPUT`` float64 [n_fibers]
        Relative fiber throughput; mean 1 over live fibers, 0 for dead fibers.
    ``DEADFIBER`` uint8 [n_fibers]
        1 for a dead fiber.
    ``PSF_SIGMA_X``, ``PSF_SIGMA_Y`` float32 [n_fibers, ny]
        Core Gaussian sigma (px) of the cross-dispersion profile and of the LSF.
    ``PSF_WING_FRAC``, ``PSF_WING_DX``, ``PSF_WING_DY`` float32 [n_fibers, ny]
        Flux fraction of the wing Gaussian (sigma ``WINGRAT`` times the core's) and its offset
        from the core (px, radially outward). The core sits at ``-frac * d`` and the wing at
        ``(1 - frac) * d`` from the centroid, so the profile's centroid is ``TRACE_X`` (and the
        LSF's centroid is the row of ``WAVE``). Profiles are pixel-integrated and normalised
        within +-12 columns (cross-dispersion) and +-8 rows (LSF).

Spectra truth (``truth/spectra-<expid:08d>-<camera>.fits``)
    Primary header: ``EXPID``, ``CAMERA``, ``OBSTYPE``, ``NIGHT``, ``EXPTIME``, the camera's true
    ``GAIN``, ``RDNOISE``, ``BIASLVL`` and the exposure's conditions (``AIRMASS``, ``TRANSP``,
    ``SKYSCALE`` and the stellar model ``SPECMODL`` for sky frames; ``LAMPSCAL`` for lamps).

    ``OBJ_ROWS``, ``SKY_ROWS`` float32 [n_fibers, ny] (SCIENCE, STANDARD)
        Noiseless electrons per CCD row from the object / the sky in each fiber, for a fiber of
        throughput 1: after the atmosphere, the system efficiency and the line-spread function;
        before the fiber throughput, the cross-dispersion profile, the pixel response and noise.
        A spectrum extracted per row and fiber-flatted to mean-1 throughput estimates
        ``OBJ_ROWS + SKY_ROWS``; after sky subtraction, ``OBJ_ROWS``.
    ``LAMP_ROWS`` float32 [n_fibers, ny] (FLAT, ARC)
        The same for the lamp light.
    ``CRMASK`` uint8 [ny, nx] (tile-compressed; read it like any image HDU)
        Cosmic-ray charge per pixel: bit 0 set where it is >= 1 e-, bit 1 where it is >= 3 times
        the read noise.
    ``TARGETS`` table (SCIENCE, STANDARD)
        ``FIBER``, ``TARGETID``, ``OBJTYPE``, ``SPECTYPE`` (``A F G K M``, ``DA`` white dwarf, ``C`` carbon star, or ``SKY``), ``TEFF`` (K),
        ``LOGG``, ``FEH``, ``RV`` (km/s), ``MAG``, ``FLUXFRAC`` (fraction of the star's light that
        entered the fiber in this exposure: transparency times aperture loss).
    ``ARCLINES`` table and ``LINE_ROW`` float64 [n_fibers, n_lines] (ARC)
        Lamp lines that fall on the CCD (``WAVE``, ``ION``, ``FLUX``: electrons for throughput 1)
        and the fractional row of each line's LSF centroid in each fiber.
"""

from __future__ import annotations

import re

RAW_NAME = re.compile(r"^fl-(\d{8})-([a-z]\d{1,2})\.fits$")


def raw_frame_name(expid: int, camera: str) -> str:
    """File name of a raw frame, ``fl-<expid:08d>-<camera>.fits``."""
    return f"fl-{int(expid):08d}-{camera}.fits"


def parse_raw_frame_name(name: str) -> tuple[int, str]:
    """``(expid, camera)`` of a raw frame file name.

    Raises
    ------
    ValueError
        If ``name`` is not ``fl-<expid:08d>-<camera>.fits``.
    """
    match = RAW_NAME.match(name)
    if not match:
        raise ValueError(f"{name!r} is not a raw frame name fl-<expid:08d>-<camera>.fits")
    return int(match.group(1)), match.group(2)


def fibermap_name(expid: int) -> str:
    """File name of an exposure's fiber map, ``fibermap-<expid:08d>.fits``."""
    return f"fibermap-{int(expid):08d}.fits"


TRUTH_DIR = "truth"
"""Sub-folder of a night directory holding the truth files."""


def camera_truth_name(camera: str) -> str:
    """Path of a camera's static truth, relative to the night directory."""
    return f"{TRUTH_DIR}/camera-{camera}.fits"


def spectra_truth_name(expid: int, camera: str) -> str:
    """Path of a frame's spectra truth, relative to the night directory."""
    return f"{TRUTH_DIR}/spectra-{int(expid):08d}-{camera}.fits"
