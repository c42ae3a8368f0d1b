"""The instrument simulator: raw frames as the survey writes them, with known truth.

:func:`simulate_frame` renders one camera of one exposure in memory; :func:`simulate_night`
writes a whole night directory (raw frames, fiber maps, truth files; see
:mod:`fiberlake.schemas.truth`). The physics lives in small modules:

* :mod:`~fiberlake.ingest.sim_optics` - traces, wavelengths, PSF, rendering (static per camera
  and night: :func:`camera_truth`);
* :mod:`~fiberlake.ingest.sim_spectra` - stars, sky, lamps, atmosphere, efficiency;
* :mod:`~fiberlake.ingest.sim_detector` - bias, pixel response, cosmic rays, noise
  (static per camera: :func:`detector_truth`);
* :mod:`~fiberlake.ingest.sim_rng` - one seeded stream per purpose, so the same seed gives the
  same bytes and a frame does not depend on which frames were simulated before it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time

from fiberlake.ingest.sim_detector import DetectorModel, bias_drift, build_detector, cosmic_rays, digitize
from fiberlake.ingest.sim_optics import CameraModel, build_camera_model
from fiberlake.ingest.sim_params import DEFAULT_PARAMS, SIM_VERSION, SimParams
from fiberlake.ingest.sim_rng import TAG, rng_for
from fiberlake.ingest.sim_variety import FrameVariant, arc_line_factor, solar_rows, twilight_rows
from fiberlake.ingest.sim_spectra import (
    arc_line_list,
    atmosphere_transmission,
    TARGET_CLASS_PROBS,
    draw_stellar_params,
    flat_lamp,
    sky_continuum,
    resolve_stellar_model,
    sky_line_list,
    stellar_spectra,
)
from fiberlake.ingest.sim_spectra import G_BAND, I_BAND, absolute_flux, band_magnitudes, effective_area_cm2
from fiberlake.schemas.header import OBSTYPES, SKY_OBSTYPES, format_section
from fiberlake.schemas.instrument import Instrument, get_instrument, parse_camera
from fiberlake.schemas.truth import camera_truth_name, fibermap_name, raw_frame_name, spectra_truth_name

DEFAULT_EXPTIME = {"BIAS": 0.0, "DARK": 600.0, "FLAT": 10.0, "ARC": 30.0, "SCIENCE": 1200.0, "STANDARD": 300.0}
READOUT_S = 60.0
EPOCH = dt.date(2020, 1, 1)
CHECKSUM_NOTE = "fiberlake simulator"
SITE_UTC_OFFSET_H = 8.0
"""Hours east of UTC of the site (Xinglong); ``instrument.extra['utc_offset_h']`` overrides."""


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def _instrument(instrument: Instrument | str) -> Instrument:
    return get_instrument(instrument) if isinstance(instrument, str) else instrument


def _night_date(night: str) -> dt.date:
    try:
        return dt.date.fromisoformat(night)
    except ValueError:
        raise ValueError(f"night {night!r} is not YYYY-MM-DD") from None


def make_expid(night: str, seq: int) -> int:
    """Exposure id: days since 2020-01-01 times 1000 plus the night's sequence number (1-999)."""
    if not 1 <= seq <= 999:
        raise ValueError("at most 999 exposures per night")
    return (_night_date(night) - EPOCH).days * 1000 + seq


def _default_date_obs(instrument: Instrument, night: str, expid: int) -> str:
    offset = float(instrument.extra.get("utc_offset_h", SITE_UTC_OFFSET_H))
    start = dt.datetime.combine(_night_date(night), dt.time(18, 0)) - dt.timedelta(hours=offset)
    return (start + dt.timedelta(minutes=5 * (expid % 1000))).isoformat(timespec="milliseconds")


@lru_cache(maxsize=4)
def camera_truth(instrument: Instrument | str, camera: str, night: str, seed: int = 0,
                 params: SimParams = DEFAULT_PARAMS) -> CameraModel:
    """Static truth of a camera on a night: traces, wavelengths, PSF, fiber throughputs.

    Cached (the last few cameras), so every frame of a camera and night shares one model.
    See :class:`~fiberlake.ingest.sim_optics.CameraModel`.
    """
    return build_camera_model(_instrument(instrument), camera, night, seed, params)


@lru_cache(maxsize=4)
def detector_truth(instrument: Instrument | str, camera: str, seed: int = 0,
                   params: SimParams = DEFAULT_PARAMS) -> DetectorModel:
    """Static CCD properties of a camera (gain, read noise, bias pattern, pixel response)."""
    return build_detector(_instrument(instrument), camera, seed, params)


# --------------------------------------------------------------------------------------
# plan of a night, plates and fiber maps
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedExposure:
    """One exposure of a simulated night."""

    expid: int
    obstype: str
    exptime: float
    date_obs: str
    plate: int = -1
    """Plate number within the night for SCIENCE/STANDARD exposures (-1 otherwise)."""


def plan_night(instrument: Instrument | str, night: str, seed: int = 0, *, n_bias: int = 3, n_flat: int = 2,
               n_arc: int = 1, n_science: int = 2, n_standard: int = 1) -> list[PlannedExposure]:
    """Exposure sequence of a night: biases, flats, arcs in the evening, then science and standards.

    Science exposures come in plates of up to three exposures of the same field (1200, 1500 or
    1800 s per plate); each standard exposure (300 s) observes its own plate of F stars.
    """
    inst = _instrument(instrument)
    offset = float(inst.extra.get("utc_offset_h", SITE_UTC_OFFSET_H))
    t = dt.datetime.combine(_night_date(night), dt.time(17, 30)) - dt.timedelta(hours=offset)
    plan: list[PlannedExposure] = []

    def add(obstype: str, exptime: float, plate: int = -1, gap: float = 0.0) -> None:
        nonlocal t
        t += dt.timedelta(seconds=gap)
        plan.append(PlannedExposure(make_expid(night, len(plan) + 1), obstype, float(exptime),
                                    t.isoformat(timespec="milliseconds"), plate))
        t += dt.timedelta(seconds=exptime + READOUT_S)

    for _ in range(n_bias):
        add("BIAS", 0.0)
    for _ in range(n_flat):
        add("FLAT", DEFAULT_EXPTIME["FLAT"])
    for _ in range(n_arc):
        add("ARC", DEFAULT_EXPTIME["ARC"])
    sky_start = dt.datetime.combine(_night_date(night), dt.time(20, 30)) - dt.timedelta(hours=offset)
    t = max(t, sky_start)
    for i in range(n_science):
        plate = i // 3
        exptime = float(rng_for(seed, TAG.PLATE, night, "SCIENCE", plate).choice([1200.0, 1500.0, 1800.0]))
        add("SCIENCE", exptime, plate, gap=300.0 if i % 3 == 0 else 0.0)
    for i in range(n_standard):
        add("STANDARD", DEFAULT_EXPTIME["STANDARD"], n_science // 3 + 1 + i, gap=300.0)
    return plan


PHOT_ERROR = 0.02
"""Catalogue error (mag, Gaussian) of the fiber map's ``MAG_G`` and ``MAG_I`` (``MAG`` is exact: it sets the flux)."""


def make_fibermap(instrument: Instrument | str, night: str, seed: int = 0, obstype: str = "SCIENCE",
                  plate: int = 0, expid: int | None = None, n_std: int = 0, *, photometry: bool = False,
                  stellar_model: str = "analytic", sim_params: SimParams | None = None) -> Table:
    """Fiber assignment of a plate: one row per fiber of every spectrograph.

    About ``sky_fiber_fraction`` of each spectrograph's fibers are ``SKY``, spread evenly along
    the slit. On a SCIENCE plate the rest are ``TGT`` stars with magnitudes stratified between
    r = 12 and 19 (so every spectrograph has bright and faint targets); on a STANDARD plate they
    are mostly ``STD`` F stars of r = 11-14.5 with a few targets. ``n_std`` > 0 turns that many
    targets of each spectrograph of a SCIENCE plate into ``STD`` F stars of r = 12.5-15 (as
    surveys place standards on every plate, for the flux calibration of each exposure); they are
    drawn from their own stream, so ``n_std = 0`` (the default) gives the plates of before.

    With ``photometry`` (as :func:`simulate_night` writes them) every star also gets a blue and a
    red catalogue magnitude, ``MAG_G`` and ``MAG_I``: photon-counting AB through the top hats
    :data:`~fiberlake.ingest.sim_spectra.G_BAND` and :data:`~fiberlake.ingest.sim_spectra.I_BAND`,
    from its true spectrum above the atmosphere (``stellar_model``, radial velocity included), plus
    a Gaussian catalogue error of :data:`PHOT_ERROR` mag drawn from a stream of their own (every
    other column, and so every raw frame, is the same with or without them); NaN (no photometry)
    for sky fibers. Rendering frames does not need them, and on a large instrument they cost
    seconds per plate, hence off by default.

    Returns
    -------
    astropy.table.Table
        Columns ``SPECID FIBER TARGETID RA DEC MAG OBJTYPE`` (then ``MAG_G MAG_I`` with
        ``photometry``); ``meta`` holds ``PLATEID``, ``RA``, ``DEC`` (field centre), ``NIGHT``,
        ``OBSTYPE`` and ``EXPID`` when given.
    """
    inst = _instrument(instrument)
    kind = "STANDARD" if obstype == "STANDARD" else "SCIENCE"
    rng = rng_for(seed, TAG.PLATE, night, kind, plate)
    ra0 = rng.uniform(0.0, 360.0)
    dec0 = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-10.0)), np.sin(np.radians(60.0)))))
    nf, ns = inst.n_fibers, inst.n_spectrographs
    n_sky = max(1, int(round(inst.sky_fiber_fraction * nf)))
    cols = {k: [] for k in ("SPECID", "FIBER", "TARGETID", "RA", "DEC", "MAG", "OBJTYPE")}
    for s in range(1, ns + 1):
        step = nf / n_sky
        sky = np.unique(np.clip(((np.arange(n_sky) + 0.5) * step + rng.uniform(-step / 3, step / 3, n_sky)).astype(int),
                                0, nf - 1))
        objtype = np.full(nf, "TGT", dtype="<U3")
        objtype[sky] = "SKY"
        rest = np.flatnonzero(objtype != "SKY")
        mag = np.full(nf, 99.0)
        if kind == "STANDARD":
            n_tgt = max(1, rest.size // 10)
            tgt = rng.choice(rest, size=n_tgt, replace=False)
            std = np.setdiff1d(rest, tgt)
            objtype[std] = "STD"
            mag[std] = 11.0 + 3.5 * (rng.permutation(std.size) + rng.uniform(size=std.size)) / std.size
            mag[tgt] = rng.uniform(13.0, 17.0, size=tgt.size)
        else:
            mag[rest] = 12.0 + 7.0 * (rng.permutation(rest.size) + rng.uniform(size=rest.size)) / rest.size
            if n_std > 0:
                std_rng = rng_for(seed, TAG.PLATE, night, kind, plate, "standards", s)
                std = std_rng.choice(rest, size=min(int(n_std), rest.size), replace=False)
                objtype[std] = "STD"
                mag[std] = std_rng.uniform(12.5, 15.0, size=std.size)
        r = 2.5 * np.sqrt(rng.uniform(size=nf))
        phi = rng.uniform(0.0, 2 * np.pi, size=nf)
        dec = np.clip(dec0 + r * np.sin(phi), -90.0, 90.0)
        ra = (ra0 + r * np.cos(phi) / np.cos(np.radians(dec0))) % 360.0
        cols["SPECID"].append(np.full(nf, s, dtype=np.int16))
        cols["FIBER"].append(np.arange(nf, dtype=np.int16))
        cols["TARGETID"].append(rng.integers(10**12, 10**16, size=nf, dtype=np.int64))
        cols["RA"].append(ra)
        cols["DEC"].append(dec)
        cols["MAG"].append(mag.astype(np.float32))
        cols["OBJTYPE"].append(objtype)
    table = Table({k: np.concatenate(v) for k, v in cols.items()})
    if photometry:
        _add_photometry(table, seed, night, kind, plate, stellar_model, sim_params)
    table.meta.update({"PLATEID": f"{night}-{kind[:3]}{plate}", "RA": round(ra0, 6), "DEC": round(float(dec0), 6),
                       "NIGHT": night, "OBSTYPE": obstype})
    if expid is not None:
        table.meta["EXPID"] = int(expid)
    return table


def _add_photometry(table: Table, seed: int, night: str, kind: str, plate: int, stellar_model: str,
                    sim_params: SimParams | None = None) -> None:
    """``MAG_G`` and ``MAG_I`` columns of a plate's fiber map (see :func:`make_fibermap`)."""
    n = len(table)
    out = np.full((n, 2), np.nan)
    objtype = np.asarray(table["OBJTYPE"]).astype(str)
    star = np.flatnonzero(objtype != "SKY")
    if star.size:
        params = [target_params(seed, int(table["TARGETID"][i]), objtype[i], sim_params) for i in star]
        true = band_magnitudes(np.asarray(table["MAG"], dtype=float)[star],
                               *(np.array([p[k] for p in params]) for k in ("teff", "logg", "feh", "rv")),
                               bands=(G_BAND, I_BAND), model=stellar_model,
                               spectype=np.array([p["spectype"] for p in params]))
        noise = rng_for(seed, TAG.PLATE, night, kind, plate, "photometry").normal(0.0, PHOT_ERROR, size=(n, 2))
        out[star] = true + noise[star]
    table["MAG_G"] = out[:, 0].astype(np.float32)
    table["MAG_I"] = out[:, 1].astype(np.float32)


def _fibermap_columns(fibermap) -> dict[str, np.ndarray]:
    if isinstance(fibermap, Table):
        return {name: np.asarray(fibermap[name]) for name in fibermap.colnames}
    if isinstance(fibermap, np.ndarray) and fibermap.dtype.names:
        return {name: np.asarray(fibermap[name]) for name in fibermap.dtype.names}
    if isinstance(fibermap, fits.FITS_rec):
        return {name: np.asarray(fibermap[name]) for name in fibermap.names}
    return {k: np.asarray(v) for k, v in dict(fibermap).items()}


def _fibermap_meta(fibermap) -> dict:
    return dict(getattr(fibermap, "meta", {}) or {})


# --------------------------------------------------------------------------------------
# exposure conditions and targets
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Conditions:
    """Observing conditions of one exposure (shared by every camera)."""

    airmass: float
    transparency: float
    sky_scale: float
    aperture: np.ndarray = field(repr=False)
    """Fraction of each star's light entering its fiber, ``(n_spectrographs, n_fibers)``."""
    lamp_scale: float = 1.0


def exposure_conditions(instrument: Instrument | str, night: str, expid: int, seed: int = 0,
                        obstype: str = "SCIENCE") -> Conditions:
    """Draw the conditions of an exposure (airmass, transparency, sky brightness, aperture losses)."""
    inst = _instrument(instrument)
    rng = rng_for(seed, TAG.EXPOSURE, night, expid)
    airmass = rng.uniform(1.0, 1.3) if obstype == "STANDARD" else rng.uniform(1.0, 1.6)
    transparency = rng.uniform(0.75, 1.0)
    sky_scale = rng.lognormal(0.0, 0.2)
    seeing_loss = rng.uniform(0.75, 0.95)
    aperture = np.clip(seeing_loss * rng.normal(1.0, 0.04, size=(inst.n_spectrographs, inst.n_fibers)), 0.4, 1.0)
    lamp_scale = 1.0 + rng.normal(0.0, 0.01)
    return Conditions(float(airmass), float(transparency), float(sky_scale), aperture, float(lamp_scale))


def target_params(seed: int, targetid: int, objtype: str, params: SimParams | None = None) -> dict:
    """Stellar parameters of a target, reproducible from ``(seed, targetid)`` (and the class mix of ``params``).

    Whether a science target is a DA white dwarf or a carbon star is decided from its own stream
    (``params.exotic_class_probs``), so every other target is the star it was without them.
    """
    params = params or DEFAULT_PARAMS
    probs = dict(params.target_class_probs)
    class_probs = None if probs == TARGET_CLASS_PROBS else probs
    return draw_stellar_params(rng_for(seed, TAG.TARGET, int(targetid)), objtype,
                               class_rng=rng_for(seed, TAG.TARGET, int(targetid), "class"),
                               class_probs=class_probs, exotic_probs=dict(params.exotic_class_probs))


# --------------------------------------------------------------------------------------
# light in each fiber, per CCD row
# --------------------------------------------------------------------------------------
def _sky_rows(cam: CameraModel, cond: Conditions, exptime: float, night: str, expid: int, seed: int) -> np.ndarray:
    p = cam.params
    grid = cam.fine_grid
    wave = grid.wave
    cont_rate = p.sky_rate * cond.sky_scale
    cont = cont_rate * sky_continuum(wave) * cam.efficiency(wave) * exptime
    rows = cam.convolve_lsf(cam.bin_continuum(grid, cont))
    lw, strength = sky_line_list(rng_for(seed, TAG.EXPOSURE, night, expid, "skylines"))
    flux = p.sky_line_ew * p.sky_rate * sky_continuum(np.array([5577.338]))[0] * strength
    flux = flux * cam.efficiency(lw) * exptime
    return rows + cam.deposit_lines(lw, flux)


def _object_rows(cam: CameraModel, cond: Conditions, exptime: float, fib: dict, seed: int,
                 flam_out: dict | None = None) -> tuple[np.ndarray, dict]:
    """Object electrons per row (throughput 1) and the TARGETS truth table of this spectrograph.

    When ``flam_out`` is given it receives ``FLAM_ROWS``: each star's flux above the atmosphere
    (erg s^-1 cm^-2 per row: :func:`~fiberlake.ingest.sim_spectra.absolute_flux` integrated over
    the row, through the same line-spread function as ``OBJ_ROWS``; 0 for sky fibers).
    """
    inst = cam.instrument
    nf = inst.n_fibers
    spec = fib["OBJTYPE"]
    has_star = spec != "SKY"
    info = {k: [] for k in ("SPECTYPE", "TEFF", "LOGG", "FEH", "RV")}
    for tid, ot in zip(fib["TARGETID"], spec):
        if ot == "SKY":
            vals = {"spectype": "SKY", "teff": 0.0, "logg": 0.0, "feh": 0.0, "rv": 0.0}
        else:
            vals = target_params(seed, int(tid), str(ot), cam.params)
        for k in info:
            info[k].append(vals[k.lower()])
    fluxfrac = np.where(has_star, cond.transparency * cond.aperture[cam.specid - 1], 0.0)
    rows = np.zeros((nf, inst.ny))
    if has_star.any():
        grid = cam.fine_grid
        wave = grid.wave
        idx = np.flatnonzero(has_star)
        shape = stellar_spectra(grid, np.array(info["TEFF"])[idx], np.array(info["LOGG"])[idx],
                                np.array(info["FEH"])[idx], np.array(info["RV"])[idx], cam.params.stellar_model,
                                spectype=np.array(info["SPECTYPE"])[idx])
        mag = fib["MAG"][idx].astype(float)
        scale = cam.params.rate_mag16 * 10.0 ** (-0.4 * (mag - 16.0)) * fluxfrac[idx] * exptime
        common = atmosphere_transmission(wave, cond.airmass) * cam.efficiency(wave)
        photons = shape * (scale[:, None] * common[None, :])
        binned = np.zeros((nf,) + cam.wave_ext.shape[1:])
        binned[idx] = cam.bin_continuum(grid, photons, idx)
        rows = cam.convolve_lsf(binned)
        if flam_out is not None:
            flam = np.zeros_like(binned)
            flam[idx] = cam.bin_continuum(grid, absolute_flux(wave, shape, mag, cam.params.rate_mag16), idx)
            flam_out["FLAM_ROWS"] = cam.convolve_lsf(flam)
    targets = {
        "FIBER": fib["FIBER"].astype(np.int16),
        "TARGETID": fib["TARGETID"].astype(np.int64),
        "OBJTYPE": np.asarray(spec, dtype="<U3"),
        "SPECTYPE": np.asarray(info["SPECTYPE"], dtype="<U3"),
        "TEFF": np.asarray(info["TEFF"], dtype=np.float32),
        "LOGG": np.asarray(info["LOGG"], dtype=np.float32),
        "FEH": np.asarray(info["FEH"], dtype=np.float32),
        "RV": np.asarray(info["RV"], dtype=np.float32),
        "MAG": fib["MAG"].astype(np.float32),
        "FLUXFRAC": fluxfrac.astype(np.float32),
    }
    return rows, targets


def _flat_rows(cam: CameraModel, det: DetectorModel, cond: Conditions, exptime: float) -> tuple[np.ndarray, float]:
    p = cam.params
    grid = cam.fine_grid
    wave = grid.wave
    unit = cam.convolve_lsf(cam.bin_continuum(grid, flat_lamp(wave, p.flat_temperature) * cam.efficiency(wave)))
    weights, _ = cam.profile
    peak = np.percentile(unit * weights.max(axis=0), 99.5)
    scale = p.flat_peak_adu * det.gain / peak * (exptime / DEFAULT_EXPTIME["FLAT"]) * cond.lamp_scale
    return unit * scale, scale


def _arc_rows(cam: CameraModel, cond: Conditions, exptime: float, night: str, seed: int,
              variant: FrameVariant | None = None) -> tuple[np.ndarray, dict]:
    p = cam.params
    grid = cam.fine_grid
    wave = grid.wave
    cont = p.arc_continuum_rate * cam.efficiency(wave) * exptime * cond.lamp_scale
    rows = cam.convolve_lsf(cam.bin_continuum(grid, cont))
    lw, rel, ion = arc_line_list(rng_for(seed, TAG.LAMP, night))
    flux = p.arc_rate_1000 * rel / 1000.0 * cam.efficiency(lw) * exptime * cond.lamp_scale
    if variant is not None:
        rows = rows * variant.lamp_scale
        flux = flux * arc_line_factor(ion, variant)
    rows = rows + cam.deposit_lines(lw, flux)
    on = (lw > cam.wave.min()) & (lw < cam.wave.max())
    lines = {"WAVE": lw[on], "ION": np.asarray(ion[on], dtype="<U8"), "FLUX": flux[on]}
    return rows, {"ARCLINES": lines, "LINE_ROW": cam.rows_of_wave(lw[on])}


# --------------------------------------------------------------------------------------
# frames
# --------------------------------------------------------------------------------------
@dataclass
class SimulatedFrame:
    """One simulated raw frame and its truth.

    Attributes
    ----------
    raw : ndarray of uint16, shape ``instrument.raw_shape``
    header : astropy.io.fits.Header
    truth : dict
        ``OBJ_ROWS``, ``SKY_ROWS`` (sky frames), ``LAMP_ROWS`` (lamps), ``CRMASK``, ``TARGETS``
        (dict of columns, sky frames), ``ARCLINES``/``LINE_ROW`` (arcs), ``THROUGHPUT``, and
        ``meta`` (dict of scalars: exptime, airmass, gain, read noise, ...). See
        :mod:`fiberlake.schemas.truth`.
    camera : CameraModel
        Static truth of the camera and night (traces, wavelengths, PSF).
    detector : DetectorModel
    """

    raw: np.ndarray
    header: fits.Header
    truth: dict
    camera: CameraModel
    detector: DetectorModel

    def write(self, path: str | os.PathLike) -> Path:
        """Write the raw frame as a FITS file (atomically: temporary name, then rename)."""
        return write_raw_frame(path, self.raw, self.header)


def frame_electrons(camera: CameraModel, truth: dict) -> np.ndarray:
    """Noiseless light image (electrons) of a frame from its truth rows, before the pixel response.

    ``sum(frame_electrons) == sum(throughput[:, None] * (OBJ_ROWS + SKY_ROWS + LAMP_ROWS))`` up to
    the light that falls off the CCD columns.
    """
    rows = np.zeros(camera.trace_x.shape)
    for key in ("OBJ_ROWS", "SKY_ROWS", "LAMP_ROWS"):
        if key in truth:
            rows += truth[key]
    return camera.render(camera.throughput[:, None] * rows)


def simulate_frame(instrument: Instrument | str, camera: str, obstype: str, *, night: str, expid: int,
                   seed: int, exptime: float | None = None, fibermap=None, date_obs: str | None = None,
                   params: SimParams = DEFAULT_PARAMS, camera_model: CameraModel | None = None,
                   detector: DetectorModel | None = None, variant: FrameVariant | None = None) -> SimulatedFrame:
    """Simulate one camera of one exposure in memory.

    Parameters
    ----------
    instrument : Instrument or str
        ``LAMOST``, ``MINI`` or their names.
    camera : str
        ``<arm><spectrograph>``, e.g. ``"b1"``.
    obstype : str
        ``BIAS``, ``DARK``, ``FLAT``, ``ARC``, ``SCIENCE`` or ``STANDARD``.
    night : str
        ``YYYY-MM-DD`` (local evening date).
    expid : int
        Exposure id (see :func:`make_expid`).
    seed : int
        Simulation seed; the same arguments give the same bytes.
    exptime : float, optional
        Seconds; default per type (bias 0, flat 10, arc 30, science 1200, standard 300).
    fibermap : Table, structured array or dict of columns, optional
        Fiber map of a SCIENCE/STANDARD exposure (all spectrographs or at least this one); by
        default plate 0 of the night from :func:`make_fibermap`. Targets' spectra follow from
        their ``TARGETID``, ``OBJTYPE`` and ``MAG``.
    date_obs : str, optional
        UTC start (ISO 8601); by default derived from the night and the sequence number.
    params : SimParams, optional
    camera_model, detector : optional
        Precomputed :func:`camera_truth` / :func:`detector_truth` for this camera and night.
    variant : FrameVariant, optional
        How this frame departs from the defaults (lamp level, lamps out, twilight flat,
        moonlight, clouds, plate brightness, bias drift; :mod:`~fiberlake.ingest.sim_variety`).
        None (default): the frame of the defaults, byte for byte.

    Returns
    -------
    SimulatedFrame
    """
    inst = _instrument(instrument)
    obstype = obstype.upper()
    if obstype not in OBSTYPES:
        raise ValueError(f"obstype {obstype!r} not one of {OBSTYPES}")
    arm_name, specid = parse_camera(camera)
    inst.arm(arm_name)
    _night_date(night)
    if exptime is None:
        exptime = DEFAULT_EXPTIME[obstype]
    exptime = float(exptime)
    cam = camera_model or camera_truth(inst, camera, night, seed, params)
    det = detector or detector_truth(inst, camera, seed, params)
    cond = exposure_conditions(inst, night, expid, seed, obstype)
    if variant is not None and variant.transparency != 1.0:
        cond = dataclasses.replace(cond, transparency=cond.transparency * variant.transparency)
    nf, ny, nx = inst.n_fibers, inst.ny, inst.nx

    truth: dict = {"THROUGHPUT": cam.throughput.copy()}
    meta = {"EXPTIME": exptime, "GAIN": det.gain, "RDNOISE": det.read_noise, "BIASLVL": det.bias_adu}
    light = np.zeros((nf, ny))
    fm_meta: dict = {}
    if obstype in SKY_OBSTYPES:
        if fibermap is None:
            fibermap = make_fibermap(inst, night, seed, obstype, 0, expid)
        fm_meta = _fibermap_meta(fibermap)
        cols = _fibermap_columns(fibermap)
        mine = np.flatnonzero(cols["SPECID"].astype(int) == specid)
        order = mine[np.argsort(cols["FIBER"][mine].astype(int))]
        fib = {k: v[order] for k, v in cols.items()}
        fib["OBJTYPE"] = np.char.strip(np.asarray(fib["OBJTYPE"]).astype(str))
        if variant is not None and variant.mag_offset:
            fib["MAG"] = fib["MAG"].astype(np.float32) + np.float32(variant.mag_offset)
        if not np.array_equal(fib["FIBER"].astype(int), np.arange(nf)):
            raise ValueError(f"fiber map lacks rows for fibers of spectrograph {specid} (needs 0..{nf - 1})")
        flam: dict = {}
        obj, targets = _object_rows(cam, cond, exptime, fib, seed, flam)
        sky = _sky_rows(cam, cond, exptime, night, expid, seed)
        if variant is not None and variant.moon > 0:
            sky = sky + variant.moon * cam.params.sky_rate * exptime * solar_rows(cam, cond.airmass)
        truth.update({"OBJ_ROWS": obj.astype(np.float32), "SKY_ROWS": sky.astype(np.float32), "TARGETS": targets})
        truth["FLAM_ROWS"] = flam.get("FLAM_ROWS", np.zeros((nf, ny))).astype(np.float32)
        light = obj + sky
        meta.update({"AIRMASS": cond.airmass, "TRANSP": cond.transparency, "SKYSCALE": cond.sky_scale,
                     "SPECMODL": resolve_stellar_model(params.stellar_model)[0]})
        meta["AEFF"] = effective_area_cm2(params.rate_mag16)
    elif obstype == "FLAT" and variant is not None and variant.twilight_peak_adu > 0:
        light, scale = twilight_rows(cam, det, variant, rng_for(seed, TAG.EXPOSURE, night, expid, "skylines"))
        truth["LAMP_ROWS"] = light.astype(np.float32)
        meta["LAMPSCAL"] = scale
    elif obstype == "FLAT":
        light, scale = _flat_rows(cam, det, cond, exptime)
        if variant is not None:
            light, scale = light * variant.lamp_scale, scale * variant.lamp_scale
        truth["LAMP_ROWS"] = light.astype(np.float32)
        meta["LAMPSCAL"] = scale
    elif obstype == "ARC":
        light, extra = _arc_rows(cam, cond, exptime, night, seed, variant)
        truth["LAMP_ROWS"] = light.astype(np.float32)
        truth.update(extra)
        meta["LAMPSCAL"] = cond.lamp_scale

    if obstype == "BIAS":
        electrons = np.zeros((ny, nx))
    else:
        # Render from the stored (float32) truth rows, so the truth describes the frame exactly.
        stored = [truth[k].astype(np.float64) for k in ("OBJ_ROWS", "SKY_ROWS", "LAMP_ROWS") if k in truth]
        rows = np.sum(stored, axis=0) if stored else light
        electrons = cam.render(cam.throughput[:, None] * rows) * det.prnu
        electrons += cam.params.dark_rate * exptime
    exposed = obstype != "BIAS" and exptime > 0
    cr = cosmic_rays(rng_for(seed, TAG.COSMICS, night, expid, camera), (ny, nx), exptime, params) if exposed else None
    crmask = np.zeros((ny, nx), dtype=np.uint8)
    if cr is not None:
        crmask |= (cr >= 1.0).astype(np.uint8)
        crmask |= ((cr >= 3.0 * det.read_noise).astype(np.uint8) << 1)
    truth["CRMASK"] = crmask
    drift = bias_drift(rng_for(seed, TAG.BIAS_DRIFT, night, expid, camera), ny, params)
    if variant is not None:
        drift = variant.drift_scale * drift + variant.bias_offset_adu
        truth["VARIANT"] = variant.to_dict()
    raw = digitize(electrons, det, drift, inst.n_overscan, inst.saturation,
                   rng_for(seed, TAG.NOISE, night, expid, camera), cr)
    truth["meta"] = meta
    header = frame_header(inst, camera, obstype, night=night, expid=expid, exptime=exptime,
                          date_obs=date_obs or _default_date_obs(inst, night, expid), gain=det.gain,
                          read_noise=det.read_noise, seed=seed, fibermap_meta=fm_meta, conditions=cond)
    if variant is not None and obstype == "FLAT" and variant.twilight_peak_adu > 0:
        header["LAMP"] = ("twilight", "twilight sky flat")
    return SimulatedFrame(raw=raw, header=header, truth=truth, camera=cam, detector=det)


def frame_header(instrument: Instrument, camera: str, obstype: str, *, night: str, expid: int, exptime: float,
                 date_obs: str, gain: float, read_noise: float, seed: int, fibermap_meta: dict | None = None,
                 conditions: Conditions | None = None) -> fits.Header:
    """Primary header of a raw frame (every required keyword, in a fixed order)."""
    inst = instrument
    arm, specid = parse_camera(camera)
    ny, nx, no = inst.ny, inst.nx, inst.n_overscan
    mjd = Time(date_obs, format="isot", scale="utc").mjd
    h = fits.Header()
    h["INSTRUME"] = (inst.name, "instrument")
    h["TELESCOP"] = (str(inst.extra.get("telescope", "LAMOST")), "telescope")
    h["NIGHT"] = (night, "observing night (local evening date)")
    h["EXPID"] = (int(expid), "exposure id")
    h["OBSTYPE"] = (obstype, "frame type")
    h["EXPTIME"] = (float(exptime), "exposure time (s)")
    h["DATE-OBS"] = (date_obs, "UTC start of exposure")
    h["MJD-OBS"] = (round(float(mjd), 8), "MJD of exposure start")
    h["SPECID"] = (int(specid), "spectrograph number")
    h["ARM"] = (arm, "spectrograph arm")
    h["CAMERA"] = (camera, "camera")
    h["GAIN"] = (round(float(gain), 4), "gain (e-/ADU)")
    h["RDNOISE"] = (round(float(read_noise), 3), "read noise (e-)")
    h["DATASEC"] = (format_section(slice(0, ny), slice(0, nx)), "data section")
    h["BIASSEC"] = (format_section(slice(0, ny), slice(nx, nx + no)), "overscan section")
    h["SATURATE"] = (int(inst.saturation), "ADC saturation (ADU)")
    h["BUNIT"] = ("ADU", "pixel unit")
    h["CCDTEMP"] = (round(-100.0 + 0.5 * np.sin(expid * 0.37 + specid), 2), "CCD temperature (C)")
    fm = fibermap_meta or {}
    if obstype in SKY_OBSTYPES:
        h["OBJECT"] = (str(fm.get("PLATEID", "field")), "field observed")
        h["PLATEID"] = (str(fm.get("PLATEID", "")), "plate")
        h["RA"] = (float(fm.get("RA", 0.0)), "field centre RA (deg)")
        h["DEC"] = (float(fm.get("DEC", 0.0)), "field centre Dec (deg)")
        if conditions is not None:
            h["AIRMASS"] = (round(conditions.airmass, 4), "airmass at start")
    else:
        h["OBJECT"] = (obstype.lower(), "calibration")
    if obstype == "ARC":
        h["LAMP"] = ("HgCdArNe", "arc lamps")
    elif obstype == "FLAT":
        h["LAMP"] = ("halogen", "continuum lamp")
    h["SIMULATE"] = (True, "simulated by fiberlake")
    h["SIMSEED"] = (int(seed), "simulation seed")
    h["SIMVERS"] = (SIM_VERSION, "simulator version")
    return h


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------
def _atomic_write(hdul: fits.HDUList, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    hdul.writeto(tmp, overwrite=True)
    os.replace(tmp, path)
    return path


def write_raw_frame(path: str | os.PathLike, raw: np.ndarray, header: fits.Header) -> Path:
    """Write a raw frame: uint16 primary HDU (int16 + BZERO) with a valid, deterministic checksum."""
    hdu = fits.PrimaryHDU(data=np.ascontiguousarray(raw, dtype=np.uint16), header=header.copy())
    # writeto(checksum=True) stamps the wall-clock time into the CHECKSUM comment, which would
    # make the bytes differ between runs; add_checksum with a fixed note is equally valid.
    hdu.add_checksum(when=CHECKSUM_NOTE)
    return _atomic_write(fits.HDUList([hdu]), Path(path))


def write_fibermap(path: str | os.PathLike, fibermap: Table, night: str, expid: int, obstype: str) -> Path:
    """Write a fiber map file (``FIBERMAP`` binary table)."""
    cols = _fibermap_columns(fibermap)
    meta = _fibermap_meta(fibermap)
    hdu = fits.BinTableHDU.from_columns([
        fits.Column("SPECID", "I", array=cols["SPECID"].astype(np.int16)),
        fits.Column("FIBER", "I", array=cols["FIBER"].astype(np.int16)),
        fits.Column("TARGETID", "K", array=cols["TARGETID"].astype(np.int64)),
        fits.Column("RA", "D", array=cols["RA"].astype(np.float64)),
        fits.Column("DEC", "D", array=cols["DEC"].astype(np.float64)),
        fits.Column("MAG", "E", array=cols["MAG"].astype(np.float32)),
        fits.Column("OBJTYPE", "3A", array=np.asarray(cols["OBJTYPE"]).astype("U3")),
    ] + [fits.Column(name, "E", array=cols[name].astype(np.float32)) for name in ("MAG_G", "MAG_I") if name in cols],
        name="FIBERMAP")
    hdu.header["NIGHT"] = night
    hdu.header["EXPID"] = int(expid)
    hdu.header["OBSTYPE"] = obstype
    hdu.header["PLATEID"] = str(meta.get("PLATEID", ""))
    hdu.header["RA"] = (float(meta.get("RA", 0.0)), "field centre RA (deg)")
    hdu.header["DEC"] = (float(meta.get("DEC", 0.0)), "field centre Dec (deg)")
    return _atomic_write(fits.HDUList([fits.PrimaryHDU(), hdu]), Path(path))


def write_camera_truth(path: str | os.PathLike, cam: CameraModel, det: DetectorModel) -> Path:
    """Write a camera's static truth file (see :mod:`fiberlake.schemas.truth`)."""
    h = fits.Header()
    h["CAMERA"] = cam.camera
    h["NIGHT"] = cam.night
    h["INSTRUME"] = cam.instrument.name
    h["SIMSEED"] = int(cam.seed)
    h["SIMVERS"] = SIM_VERSION
    h["GAIN"] = (det.gain, "true gain (e-/ADU)")
    h["RDNOISE"] = (det.read_noise, "true read noise (e-)")
    h["BIASLVL"] = (det.bias_adu, "mean bias level (ADU)")
    h["DISTK"] = (cam.distortion["k"], "pincushion k: p = c + (p0 - c)(1 + k r^2)")
    h["DISTCX"] = (cam.distortion["cx"], "distortion centre column (0-based)")
    h["DISTCY"] = (cam.distortion["cy"], "distortion centre row (0-based)")
    h["DISTR"] = (cam.distortion["R"], "distortion normalising radius (px)")
    h["WINGRAT"] = (cam.params.wing_sigma_ratio, "PSF wing sigma / core sigma")
    h["PSFWIN"] = (cam.params.window_px, "cross-dispersion window half width (px)")
    h["LSFWIN"] = (cam.params.lsf_window_px, "LSF window half width (px)")
    g = cam.geometry_params
    h["DISPQ2"] = (float(g["q2"]), "dispersion quadratic term")
    h["DISPQ3"] = (float(g["q3"]), "dispersion cubic term")
    h["SMILE"] = (float(g["smile"]), "line curvature at slit ends (px)")
    h["FLEXX"] = (float(g["flex_x"]), "nightly flexure shift, columns")
    h["FLEXY"] = (float(g["flex_y"]), "nightly flexure shift, rows")
    hdus = [fits.PrimaryHDU(header=h),
            fits.ImageHDU(cam.trace_x.astype(np.float64), name="TRACE_X"),
            fits.ImageHDU(cam.wave.astype(np.float64), name="WAVE"),
            fits.ImageHDU(cam.throughput.astype(np.float64), name="THROUGHPUT"),
            fits.ImageHDU(cam.dead.astype(np.uint8), name="DEADFIBER"),
            fits.ImageHDU(cam.sigma_x.astype(np.float32), name="PSF_SIGMA_X"),
            fits.ImageHDU(cam.sigma_y.astype(np.float32), name="PSF_SIGMA_Y"),
            fits.ImageHDU(cam.wing_frac.astype(np.float32), name="PSF_WING_FRAC"),
            fits.ImageHDU(cam.wing_dx.astype(np.float32), name="PSF_WING_DX"),
            fits.ImageHDU(cam.wing_dy.astype(np.float32), name="PSF_WING_DY")]
    return _atomic_write(fits.HDUList(hdus), Path(path))


def write_spectra_truth(path: str | os.PathLike, frame: SimulatedFrame) -> Path:
    """Write a frame's spectra truth file (see :mod:`fiberlake.schemas.truth`)."""
    t = frame.truth
    h = fits.Header()
    for key in ("EXPID", "CAMERA", "OBSTYPE", "NIGHT"):
        h[key] = frame.header[key]
    for key, value in t["meta"].items():
        h[key] = value if isinstance(value, str) else float(value)
    hdus: list = [fits.PrimaryHDU(header=h)]
    for key in ("OBJ_ROWS", "SKY_ROWS", "LAMP_ROWS"):
        if key in t:
            hdus.append(fits.ImageHDU(t[key].astype(np.float32), name=key))
    if "FLAM_ROWS" in t:
        flam = fits.ImageHDU(t["FLAM_ROWS"].astype(np.float32), name="FLAM_ROWS")
        flam.header["BUNIT"] = ("erg s-1 cm-2", "per row, above the atmosphere")
        hdus.append(flam)
    hdus.append(fits.CompImageHDU(t["CRMASK"], name="CRMASK", compression_type="RICE_1"))
    if "TARGETS" in t:
        hdus.append(fits.BinTableHDU(Table(t["TARGETS"]), name="TARGETS"))
    if "ARCLINES" in t:
        hdus.append(fits.BinTableHDU(Table(t["ARCLINES"]), name="ARCLINES"))
        hdus.append(fits.ImageHDU(t["LINE_ROW"].astype(np.float64), name="LINE_ROW"))
    return _atomic_write(fits.HDUList(hdus), Path(path))


def _cache_bytes(inst: Instrument, params: SimParams) -> int:
    k = 2 * params.window_px + 1 + 2 * params.lsf_window_px + 1
    return inst.n_fibers * inst.ny * k * 4 + 2 * inst.ny * inst.nx * 4


def simulate_night(instrument: Instrument | str, night: str, out_dir: str | Path, seed: int = 0, *,
                   n_bias: int = 3, n_flat: int = 2, n_arc: int = 1, n_science: int = 2,
                   n_standard: int = 1, cameras: list[str] | None = None,
                   progress: bool = False, params: SimParams = DEFAULT_PARAMS,
                   std_per_spectrograph: int = 0) -> list[Path]:
    """Write a night to ``out_dir/<night>/`` and return the raw frame paths written.

    Writes every exposure of :func:`plan_night` for every camera (``fl-<expid>-<camera>.fits``),
    a fiber map per SCIENCE/STANDARD exposure, and the truth files under ``truth/``. Files are
    written atomically (temporary name, then rename), so a watcher never sees a partial file.
    Small instruments are written exposure by exposure; large ones camera by camera (so each
    camera's rendering kernels are built once and memory stays bounded). ``std_per_spectrograph``
    places that many flux standards on each spectrograph of every SCIENCE plate
    (:func:`make_fibermap`'s ``n_std``; 0, the default, keeps the nights of before byte for byte).

    Returns
    -------
    list of Path
        Raw frame paths, sorted by exposure id then camera.
    """
    inst = _instrument(instrument)
    cams = list(cameras) if cameras is not None else inst.cameras
    for cam in cams:
        if cam not in inst.cameras:
            raise ValueError(f"camera {cam!r} is not a camera of {inst.name} ({inst.cameras[:4]}...)")
    plan = plan_night(inst, night, seed, n_bias=n_bias, n_flat=n_flat, n_arc=n_arc,
                      n_science=n_science, n_standard=n_standard)
    night_dir = Path(out_dir) / night
    (night_dir / "truth").mkdir(parents=True, exist_ok=True)
    fibermaps, plates = {}, {}
    for exp in plan:
        if exp.obstype in SKY_OBSTYPES:
            key = (exp.obstype, exp.plate)
            if key not in plates:     # the exposures of a plate share its fiber map (and its photometry)
                plates[key] = make_fibermap(inst, night, seed, exp.obstype, exp.plate, None,
                                            n_std=std_per_spectrograph if exp.obstype == "SCIENCE" else 0,
                                            photometry=True, stellar_model=params.stellar_model, sim_params=params)
            fm = plates[key].copy()
            fm.meta["EXPID"] = int(exp.expid)
            write_fibermap(night_dir / fibermap_name(exp.expid), fm, night, exp.expid, exp.obstype)
            fibermaps[exp.expid] = fm

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plan) * len(cams), desc=f"simulate {night}", unit="frame")
    exposure_major = _cache_bytes(inst, params) * len(cams) < 1.5e9
    models: dict[str, tuple[CameraModel, DetectorModel]] = {}

    def model(camera: str) -> tuple[CameraModel, DetectorModel]:
        if camera not in models:
            cm = build_camera_model(inst, camera, night, seed, params)
            dm = build_detector(inst, camera, seed, params)
            write_camera_truth(night_dir / camera_truth_name(camera), cm, dm)
            models[camera] = (cm, dm)
        return models[camera]

    def one(exp: PlannedExposure, camera: str) -> Path:
        cm, dm = model(camera)
        frame = simulate_frame(inst, camera, exp.obstype, night=night, expid=exp.expid, seed=seed,
                               exptime=exp.exptime, fibermap=fibermaps.get(exp.expid), date_obs=exp.date_obs,
                               params=params, camera_model=cm, detector=dm)
        path = frame.write(night_dir / raw_frame_name(exp.expid, camera))
        if exp.obstype != "BIAS":
            write_spectra_truth(night_dir / spectra_truth_name(exp.expid, camera), frame)
        if bar is not None:
            bar.update(1)
        return path

    written: dict[tuple[int, int], Path] = {}
    if exposure_major:
        for exp in plan:
            for ci, camera in enumerate(cams):
                written[(exp.expid, ci)] = one(exp, camera)
    else:
        for ci, camera in enumerate(cams):
            for exp in plan:
                written[(exp.expid, ci)] = one(exp, camera)
            models.pop(camera, None)
    if bar is not None:
        bar.close()
    return [written[k] for k in sorted(written)]
