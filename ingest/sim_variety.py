"""Variety of simulated frames, for the frame typer (seed 001): what an observing run really holds.

A night simulated with the defaults has one kind of each frame (10 s dome flats at one lamp
level, 30 s arcs with every lamp on, 1200-1800 s science under a dark sky). Real nights are
more varied, and the frame typer is only as good as the variety it was trained on. A
:class:`FrameVariant` passed to :func:`fiberlake.ingest.simulate.simulate_frame` changes one frame:

* the lamps: a brighter or fainter flat or arc lamp (``lamp_scale``), arc lamps that are out
  (``lamps_off``: any of ``Hg Cd Ar Ne``);
* twilight flats (``twilight_peak_adu``): a FLAT lit by the twilight sky, a solar spectrum
  (with its absorption lines) plus night-sky emission lines in every fiber, instead of the lamp;
* the sky of science and standard frames: moonlight (``moon``: scattered solar spectrum, in units
  of the dark-sky continuum at 5000 A), clouds (``transparency``), brighter or fainter plates
  (``mag_offset`` added to every target's magnitude);
* the bias: a frame-level offset (``bias_offset_adu``) and a stronger row drift (``drift_scale``).

Darks need no variant: a DARK is the bias plus the (negligible, ``SimParams.dark_rate``) dark
current plus the cosmic rays of its exposure time, the shutter closed. What tells a dark from a
bias in its pixels is the cosmic rays alone.

:func:`draw_variant` draws a variant and an exposure time for a frame type over realistic ranges.
Without a variant the simulator is unchanged (the same seed gives the same bytes as before).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fiberlake.ingest.sim_spectra import atmosphere_transmission, sky_line_list, stellar_spectra

LAMPS: tuple[str, ...] = ("Hg", "Cd", "Ar", "Ne")
"""Arc lamps (the ions of the line list without their ionisation stage)."""

SOLAR = {"teff": 5778.0, "logg": 4.44, "feh": 0.0}
"""Stellar parameters of the solar-like spectrum of moonlight and twilight."""


@dataclass(frozen=True)
class FrameVariant:
    """How one simulated frame departs from the simulator's defaults (every default: no change).

    Attributes
    ----------
    lamp_scale : float
        Multiplies the flat or arc lamp's brightness.
    lamps_off : tuple of str
        Arc lamps that are off (members of :data:`LAMPS`).
    twilight_peak_adu : float
        > 0: the FLAT is a twilight flat whose brightest fiber peaks at this many ADU.
    twilight_line_ew : float
        Equivalent width (A) of [OI] 5577 against the twilight continuum (other sky lines scale).
    moon : float
        Scattered moonlight (solar spectrum) in units of the dark-sky continuum at 5000 A.
    transparency : float
        Multiplies the exposure's transparency (clouds).
    mag_offset : float
        Added to every target's magnitude (negative: a brighter plate).
    bias_offset_adu : float
        Added to the bias level of the frame (data and overscan).
    drift_scale : float
        Multiplies the frame's row-dependent bias drift.
    """

    lamp_scale: float = 1.0
    lamps_off: tuple[str, ...] = ()
    twilight_peak_adu: float = 0.0
    twilight_line_ew: float = 5.0
    moon: float = 0.0
    transparency: float = 1.0
    mag_offset: float = 0.0
    bias_offset_adu: float = 0.0
    drift_scale: float = 1.0

    def __post_init__(self) -> None:
        bad = [lamp for lamp in self.lamps_off if lamp not in LAMPS]
        if bad:
            raise ValueError(f"lamps_off: {bad} are not lamps ({', '.join(LAMPS)})")
        if self.lamp_scale < 0 or self.moon < 0 or self.twilight_peak_adu < 0 or not 0 < self.transparency <= 1.5:
            raise ValueError(f"frame variant out of range: {self}")

    def to_dict(self) -> dict:
        """Plain dict (JSON-able)."""
        out = asdict(self)
        out["lamps_off"] = list(self.lamps_off)
        return out

    @property
    def kind(self) -> str:
        """A short name of the variety (for reports): ``twilight``, ``lamp-out``, ``moon``, ..."""
        if self.twilight_peak_adu > 0:
            return "twilight"
        if self.lamps_off:
            return "lamp-out"
        if self.lamp_scale < 0.3:
            return "weak-lamp"
        if self.moon > 3:
            return "moonlit"
        if self.mag_offset > 1.5:
            return "faint"
        if self.mag_offset < -1.5:
            return "bright"
        return "plain"


def lamp_of(ion: str) -> str:
    """Lamp of an ion of the line list: ``"ArII"`` is ``"Ar"``."""
    return ion.rstrip("IVX")


def arc_line_factor(ions: np.ndarray, variant: FrameVariant | None) -> np.ndarray | float:
    """Per-line multiplier of the arc-lamp lines: lamp brightness, 0 for the lamps that are off."""
    if variant is None:
        return 1.0
    on = np.array([lamp_of(str(ion)) not in variant.lamps_off for ion in ions], dtype=float)
    return variant.lamp_scale * on


def solar_rows(cam, airmass: float = 1.3) -> np.ndarray:
    """Electrons per row of each fiber (throughput 1) of a solar-like spectrum at 1 photon/s/A at 5000 A.

    The spectrum is the stellar model of the Sun (absorption lines included), reddened by the
    atmosphere at ``airmass``, bluer by the ``lambda^-1`` of scattering, times the camera's
    efficiency, binned into rows and spread by the line-spread function.

    Returns
    -------
    ndarray, shape (n_fibers, ny)
    """
    grid = cam.fine_grid
    wave = grid.wave
    sun = stellar_spectra(grid, SOLAR["teff"], SOLAR["logg"], SOLAR["feh"], 0.0)[0]
    ref = stellar_spectra(type(grid).covering(4990.0, 5010.0, grid.dw), SOLAR["teff"], SOLAR["logg"],
                          SOLAR["feh"], 0.0)[0].mean()
    shape = sun / ref * (wave / 5000.0) ** -1.0 * atmosphere_transmission(wave, airmass) * cam.efficiency(wave)
    return cam.convolve_lsf(cam.bin_continuum(grid, shape))


def twilight_rows(cam, det, variant: FrameVariant, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Light of a twilight flat: solar continuum plus night-sky lines, the same in every fiber.

    Scaled so that the brightest fibers peak at ``variant.twilight_peak_adu`` (as a dome flat's
    ``flat_peak_adu``). Returns the rows (electrons, throughput 1) and the scale applied.
    """
    unit = solar_rows(cam)
    lw, strength = sky_line_list(rng)
    flux = variant.twilight_line_ew * strength * cam.efficiency(lw)  # the continuum is ~1 photon/s/A
    unit = unit + cam.deposit_lines(lw, flux)
    weights, _ = cam.profile
    peak = np.percentile(unit * weights.max(axis=0), 99.5)
    scale = variant.twilight_peak_adu * det.gain / peak
    return unit * scale, float(scale)


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


EXPTIME_RANGES: dict[str, tuple[float, float]] = {
    "BIAS": (0.0, 0.0),
    "DARK": (300.0, 3600.0),
    "FLAT": (2.0, 60.0),
    "TWILIGHT": (1.0, 60.0),
    "ARC": (10.0, 120.0),
    "SCIENCE": (300.0, 2700.0),
    "STANDARD": (10.0, 600.0),
}
"""Exposure time ranges (s) drawn by :func:`draw_variant` (log-uniform)."""


def draw_variant(rng: np.random.Generator, obstype: str, flat_peak_adu: float = 30000.0,
                 flat_exptime: float = 10.0, arc_exptime: float = 30.0) -> tuple[float, FrameVariant]:
    """Draw an exposure time and a variant for a frame of type ``obstype``.

    The ranges (documented in the code, one line each) span what an observing run holds: dome
    flats peaking from ~1,500 ADU to saturation, a quarter of the flats twilight flats; arcs from
    a weak lamp (2-20 % of nominal) to twice nominal, a quarter with one lamp out; science from
    bright plates (magnitudes 3 brighter) to sky-dominated faint ones (3 fainter), half under
    moonlight up to 50 times the dark-sky continuum, some through clouds; standards of 10-600 s.
    Every frame gets a bias offset (sigma 20 ADU) and a row drift 1-10 times the default.

    Returns
    -------
    exptime : float
    variant : FrameVariant
    """
    obstype = obstype.upper()
    common = {"bias_offset_adu": float(rng.normal(0.0, 20.0)), "drift_scale": _loguniform(rng, 1.0, 10.0)}
    if obstype == "BIAS":
        return 0.0, FrameVariant(**common)
    if obstype == "DARK":
        return _loguniform(rng, *EXPTIME_RANGES["DARK"]), FrameVariant(**common)
    if obstype == "FLAT":
        peak = _loguniform(rng, 1500.0, 60000.0)                       # several lamp levels, some saturated
        if rng.uniform() < 0.25:                                      # twilight flat
            exptime = _loguniform(rng, *EXPTIME_RANGES["TWILIGHT"])
            return exptime, FrameVariant(twilight_peak_adu=peak, twilight_line_ew=_loguniform(rng, 1.0, 30.0), **common)
        exptime = _loguniform(rng, *EXPTIME_RANGES["FLAT"])
        return exptime, FrameVariant(lamp_scale=peak / flat_peak_adu * flat_exptime / exptime, **common)
    if obstype == "ARC":
        exptime = _loguniform(rng, *EXPTIME_RANGES["ARC"])
        level = _loguniform(rng, 0.02, 0.2) if rng.uniform() < 0.2 else _loguniform(rng, 0.3, 2.0)
        off: tuple[str, ...] = (str(rng.choice(LAMPS)),) if rng.uniform() < 0.25 else ()
        return exptime, FrameVariant(lamp_scale=level * arc_exptime / exptime, lamps_off=off, **common)
    if obstype == "SCIENCE":
        exptime = _loguniform(rng, *EXPTIME_RANGES["SCIENCE"])
        moon = _loguniform(rng, 1.0, 50.0) if rng.uniform() < 0.5 else 0.0
        transparency = rng.uniform(0.15, 1.0) if rng.uniform() < 0.3 else 1.0
        return exptime, FrameVariant(moon=moon, transparency=transparency, mag_offset=float(rng.uniform(-3.0, 3.0)),
                                     **common)
    if obstype == "STANDARD":
        exptime = _loguniform(rng, *EXPTIME_RANGES["STANDARD"])
        moon = _loguniform(rng, 1.0, 30.0) if rng.uniform() < 0.3 else 0.0
        return exptime, FrameVariant(moon=moon, mag_offset=float(rng.uniform(-2.0, 1.0)), **common)
    raise ValueError(f"no variety for frame type {obstype!r}")
