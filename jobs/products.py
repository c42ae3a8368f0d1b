"""Products above the frame: flux calibration, arms joined, coadds per target (run after the frames).

:func:`build_products` is called by :func:`fiberlake.jobs.process.process_night` once the night's
frames are reduced (so ``process``, ``watch`` and ``reprocess`` all get it), under the same lake
lock, and commits from the driver only (one writer). For every extraction of the run:

1. **Exposures** (key: expid, spectrograph). An exposure's products are identified by a hash of
   its cameras' ``reductions`` markers (run, parameters, calibration set, pixels) and of the
   products' parameters (:meth:`ReductionParams.products_digest`). When it changes (a frame was
   reduced again, a camera arrived) the exposure's standards are fitted again
   (:func:`fiberlake.processors.fluxcal.calibrate_exposure`), every fiber is calibrated and its
   arms joined; its ``joined`` rows replace the old ones, then its ``fluxcal`` rows (the marker).
   An exposure with too few good standards takes the night's mean response (``fallback``); its
   hash then also holds the mean's, so a new standard exposure recalibrates it. A night with no
   good standards at all borrows the latest earlier night's mean; with none anywhere the spectra
   are flagged ``NOFLUXCAL`` (flux 0, ivar 0).
2. **Coadds** (key: targetid and night). A target's row holds the hash of the ``fluxcal`` rows
   of the exposures that saw it; when it differs the target's exposures are combined again and
   the row replaced. With ``coadd.across_nights`` the target's exposures of every night are
   combined too (``night = 'all'``).

A crash anywhere leaves hashes that do not match, so the next run redoes exactly what is missing;
a run with nothing new writes nothing. ``reprocess`` (a fixed run id) rebuilds every product not
made by that run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from fiberlake.jobs.calibrations import load_calibration
from fiberlake.processors import coadd as co
from fiberlake.processors import fluxcal as fc
from fiberlake.processors.params import ReductionParams
from fiberlake.processors.resample import bands_rebinned, resolutions_on_grid, ripple_factor
from fiberlake.schemas.instrument import Instrument, get_instrument, parse_camera
from fiberlake.schemas.parset import digest_of
from fiberlake.storage.layout import Lake
from fiberlake.storage.products import camera_arrays, products_table, read_rows, read_rows_in
from fiberlake.storage.tables import TableStore

SCOPE_NIGHT, SCOPE_ALL = "night", "all"
"""``scope`` of a coadd: one night's exposures, or every night's (in the partition of its latest night)."""


@dataclass
class ProductsReport:
    """What :func:`build_products` did."""

    exposures: list[str] = field(default_factory=list)
    """``expid/spectrograph/extraction`` whose fluxcal and joined rows were written."""
    fallback: list[str] = field(default_factory=list)
    """Those calibrated with a mean response (too few good standards)."""
    uncalibrated: list[str] = field(default_factory=list)
    """Those with no response at all (NOFLUXCAL)."""
    coadds: int = 0
    coadds_all: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    denoise: object | None = None
    """What the denoising stage did after them (:class:`fiberlake.jobs.denoise_stage.DenoiseReport`)."""
    classify: object | None = None
    """What the classification stage did (:class:`fiberlake.jobs.classify_stage.ClassifyReport`)."""

    def summary(self) -> str:
        """One line for people."""
        text = (f"products: {len(self.exposures)} exposure products ({len(self.fallback)} with the night's mean "
                f"response, {len(self.uncalibrated)} uncalibrated), {self.coadds} coadds, "
                f"{self.coadds_all} all-night coadds")
        if self.failed:
            text += f", {len(self.failed)} failed: " + "; ".join(f"{k}: {v}" for k, v in self.failed.items())
        if self.denoise is not None:
            text += "; " + self.denoise.summary()
        if self.classify is not None:
            text += "; " + self.classify.summary()
        return text


def settings_of(config: ReductionParams) -> fc.FluxCalSettings:
    """The flux calibration's settings from the run's parameters."""
    return fc.FluxCalSettings(**config.fluxcal.science_dict())


def joined_grid_of(instrument: Instrument, config: ReductionParams) -> co.LogGrid:
    """The joined grid of an instrument's arms."""
    return co.joined_grid([instrument.wave_grid(arm.name) for arm in instrument.arms], config.coadd.pixel_kms)


@dataclass
class _Context:
    lake: Lake
    tables: TableStore
    night: str
    config: ReductionParams
    instrument: Instrument
    run_id: str
    reprocess: bool
    exposures: pl.DataFrame
    fibermap: pl.DataFrame
    grid: co.LogGrid
    report: ProductsReport
    ripple: dict[str, np.ndarray] = field(default_factory=dict)
    resolution: dict[tuple[int, int, str], np.ndarray] = field(default_factory=dict)
    """(expid, spectrograph, camera) to the deconv resolution bands on the camera's grid."""

    def stale(self, stored: dict | None, wanted: str) -> bool:
        if stored is None or stored["input_hash"] != wanted:
            return True
        return self.reprocess and stored["run_id"] != self.run_id


def build_products(lake: Lake, night: str, config: ReductionParams, *, run_id: str, reprocess: bool = False,
                   stop: Callable[[], bool] | None = None) -> ProductsReport:
    """Build (or bring up to date) the night's flux calibration, joined spectra and coadds.

    Parameters
    ----------
    lake : Lake
    night : str
    config : ReductionParams
        The run's parameters (``fluxcal``, ``coadd`` and the extractions).
    run_id : str
        Written in every row.
    reprocess : bool
        Rebuild every product not made by ``run_id`` (a reprocessing run).
    stop : callable, optional
        Checked between exposures; True ends the work early (the next run finishes it).

    Returns
    -------
    ProductsReport
    """
    from fiberlake.jobs.process import latest_exposures

    stop = stop or (lambda: False)
    tables = TableStore(lake.root / "tables")
    report = ProductsReport()
    markers = read_rows(tables, "reductions", night=night)
    if markers.is_empty():
        return report
    markers = markers.filter(pl.col("status") == "ok")
    instrument = get_instrument(lake.instrument)
    ctx = _Context(lake, tables, night, config, instrument, run_id, reprocess, latest_exposures(tables, night),
                   read_rows(tables, "fibermap", night=night), joined_grid_of(instrument, config), report)
    for method in config.extractions:
        mine = markers.filter(pl.col("extraction") == method)
        if mine.is_empty():
            continue
        _exposure_products(ctx, method, mine, stop)
        if stop():
            break
        _coadds(ctx, method)
    return report


# --------------------------------------------------------------------------- exposures
def _own_hashes(ctx: _Context, method: str, markers: pl.DataFrame) -> dict[tuple[int, int], tuple[str, list[dict]]]:
    groups: dict[tuple[int, int], list[dict]] = {}
    for row in markers.iter_rows(named=True):
        groups.setdefault((int(row["expid"]), parse_camera(row["camera"])[1]), []).append(row)
    out = {}
    for key, rows in groups.items():
        # what the frames' spectra are made of, not which run made them: a re-run after a crash, or a
        # forced re-reduction of the same inputs, gives the same spectra and so the same products
        frames = sorted((r["camera"], r["config_hash"], r["calib_id"], r["pixel_sha256"]) for r in rows)
        out[key] = (digest_of({"params": ctx.config.products_digest(method), "frames": frames}), rows)
    return out


def _stored_calibrations(ctx: _Context, method: str) -> pl.DataFrame:
    return read_rows(ctx.tables, "fluxcal", night=ctx.night, extraction=method)


def _arms(ctx: _Context, method: str, expid: int, spec: int, cameras: list[dict]) -> dict[str, fc.Arm]:
    """The exposure's cameras as arrays, inverse variances decorrelated (no resampling ripple)."""
    rows = read_rows(ctx.tables, "spectra", night=ctx.night, expid=expid, spectrograph=spec, extraction=method)
    arms = {}
    for marker in cameras:
        camera = marker["camera"]
        cam_rows = rows.filter(pl.col("camera") == camera)
        if cam_rows.is_empty():
            continue
        data = camera_arrays(cam_rows, ctx.instrument.n_fibers)
        if data.resolution is not None:
            ctx.resolution[(expid, spec, camera)] = resolutions_on_grid(data.resolution, data.resolution_wave,
                                                                        data.wave)
        q = _ripple(ctx, marker, data.wave)
        spectra = co.decorrelate_ivar(data.spectra, q) if q is not None else data.spectra
        arm = ctx.instrument.arm(parse_camera(camera)[0])
        arms[camera] = fc.Arm(data.wave, spectra, arm.lsf_sigma_px * arm.dispersion)
    return arms


def _ripple(ctx: _Context, marker: dict, wave: np.ndarray) -> np.ndarray | None:
    """Ripple factor of the camera's grid against its rows (from the calibration set), cached."""
    key = f"{marker['calib_night']}/{marker['camera']}/{marker['calib_id']}"
    if key not in ctx.ripple:
        try:
            calib = load_calibration(ctx.lake, marker["calib_night"], marker["camera"])
            ok = calib.info.get("calib_id") == marker["calib_id"] and calib.grid.size == wave.size
            ctx.ripple[key] = ripple_factor(calib.wave_rows, calib.grid) if ok else None
        except (OSError, KeyError, ValueError, LookupError):
            ctx.ripple[key] = None
    return ctx.ripple[key]


def _fibers(ctx: _Context, expid: int, spec: int) -> pl.DataFrame:
    fm = ctx.fibermap.filter((pl.col("expid") == expid) & (pl.col("spectrograph") == spec)).sort("fiber")
    return fm


def _exptime(ctx: _Context, expid: int, camera: str) -> float:
    row = ctx.exposures.filter((pl.col("expid") == expid) & (pl.col("camera") == camera))
    return float(row["exptime"][0]) if row.height else float("nan")


def _cal_from_row(row: dict) -> fc.CameraCalibration:
    return fc.CameraCalibration(*(np.asarray(row[k], float) for k in ("response", "response_ivar", "telluric",
                                                                      "telluric_ivar")), int(row["n_used"] or 0))


def _night_means(ctx: _Context, method: str, cals: dict[tuple[int, int], tuple[str, fc.ExposureCalibration | None]],
                 stored: pl.DataFrame) -> dict[str, tuple[fc.CameraCalibration, str, str, list[int]]]:
    """Per camera: the mean response, its hash, its night and the exposures behind it."""
    per_camera: dict[str, list[tuple[int, str, fc.CameraCalibration]]] = {}
    for (expid, _spec), (own, cal) in cals.items():
        if cal is not None and cal.status == "ok":
            for camera, c in cal.cameras.items():
                per_camera.setdefault(camera, []).append((expid, own, c))
    fresh = {k[0] for k, (_, cal) in cals.items() if cal is not None}
    for row in stored.filter((pl.col("status") == "ok") & (pl.col("expid") > 0)).iter_rows(named=True):
        if int(row["expid"]) not in fresh:
            per_camera.setdefault(row["camera"], []).append((int(row["expid"]), row["input_hash"], _cal_from_row(row)))
    means = {}
    for camera, items in per_camera.items():
        items.sort(key=lambda t: t[0])
        mean = fc.mean_calibration([c for _, _, c in items])
        if mean is not None:
            means[camera] = (mean, digest_of([h for _, h, _ in items]), ctx.night, [e for e, _, _ in items])
    return means


def _borrowed_mean(ctx: _Context, method: str, camera: str) -> tuple[fc.CameraCalibration, str, str, list[int]] | None:
    """The latest earlier night's mean response of ``camera``."""
    rows = (ctx.tables.scan("fluxcal")
            .filter((pl.col("night") < ctx.night) & (pl.col("expid") == 0) & (pl.col("camera") == camera)
                    & (pl.col("extraction") == method) & (pl.col("status") == "mean"))
            .sort("night").collect())
    if rows.is_empty():
        return None
    row = rows.row(-1, named=True)
    return _cal_from_row(row), f"{row['night']}:{row['input_hash']}", row["night"], list(row["calib_expids"] or [])


def _exposure_products(ctx: _Context, method: str, markers: pl.DataFrame, stop: Callable[[], bool]) -> bool:
    """Calibrate and join every exposure whose inputs changed; returns whether anything was written."""
    settings = settings_of(ctx.config)
    own = _own_hashes(ctx, method, markers)
    stored = _stored_calibrations(ctx, method)
    stored_exp: dict[tuple[int, int], dict] = {}
    for row in stored.filter(pl.col("expid") > 0).iter_rows(named=True):
        stored_exp[(int(row["expid"]), int(row["spectrograph"]))] = row
    cals: dict[tuple[int, int], tuple[str, fc.ExposureCalibration | None]] = {}
    arms_of: dict[tuple[int, int], dict[str, fc.Arm]] = {}
    for key, (own_hash, cameras) in sorted(own.items()):
        st = stored_exp.get(key)
        old_own = None if st is None else st["input_hash"].split("|")[0]
        if st is not None and old_own == own_hash and not (ctx.reprocess and st["run_id"] != ctx.run_id):
            cals[key] = (own_hash, None)
            continue
        if stop():
            return False
        expid, spec = key
        try:
            arms = _arms(ctx, method, expid, spec, cameras)
            fm = _fibers(ctx, expid, spec)
            std = fm.filter(pl.col("objtype") == "STD")
            exptime = _exptime(ctx, expid, cameras[0]["camera"])
            colours = {f"mags_{b}": std[f"mag_{b}"].to_numpy() for b in ("g", "i") if f"mag_{b}" in std.columns}
            cal = fc.calibrate_exposure(arms, std["fiber"].to_numpy(), std["mag"].to_numpy(), exptime, settings,
                                        **colours)
            cals[key] = (own_hash, cal)
            arms_of[key] = arms
        except Exception as err:  # recorded, the night goes on
            ctx.report.failed[f"{expid}/{spec}/{method}"] = f"{type(err).__name__}: {err}"
    means = _night_means(ctx, method, cals, stored)
    wrote = False
    for key, (own_hash, cal) in sorted(cals.items()):
        expid, spec = key
        cameras = [r["camera"] for r in own[key][1]]
        st = stored_exp.get(key)
        if cal is None and st is not None and st["status"] == "ok" and not ctx.stale(st, own_hash):
            continue  # its own standards, inputs unchanged
        if cal is not None and cal.status == "ok":
            plan = {c: (cal.cameras.get(c), "ok", ctx.night, [expid]) for c in cameras}
            input_hash = own_hash
        else:
            plan, parts = {}, []
            for c in cameras:
                mean = means.get(c) or _borrowed_mean(ctx, method, c)
                plan[c] = (None, "none", None, []) if mean is None else (mean[0], "fallback", mean[2], mean[3])
                parts.append(f"{c}:none" if mean is None else f"{c}:{mean[1]}")
            input_hash = own_hash + "|" + digest_of(sorted(parts))
        if cal is None and not ctx.stale(stored_exp.get(key), input_hash):
            continue  # inputs unchanged (and, for a fallback, the mean it used unchanged)
        try:
            arms = arms_of.get(key) or _arms(ctx, method, expid, spec, own[key][1])
            _write_exposure(ctx, method, expid, spec, arms, cal, plan, input_hash, settings)
            wrote = True
        except Exception as err:  # recorded, the night goes on
            ctx.report.failed[f"{expid}/{spec}/{method}"] = f"{type(err).__name__}: {err}"
    _write_means(ctx, method, means, stored)
    return wrote


def _write_exposure(ctx: _Context, method: str, expid: int, spec: int, arms: dict[str, fc.Arm],
                    cal: fc.ExposureCalibration | None, plan: dict, input_hash: str,
                    settings: fc.FluxCalSettings) -> None:
    fm = _fibers(ctx, expid, spec)
    by_fiber = {int(r["fiber"]): r for r in fm.iter_rows(named=True)}
    calibrated = []
    statuses = set()
    for camera, arm in sorted(arms.items()):
        c, status, _, _ = plan.get(camera, (None, "none", None, []))
        statuses.add(status)
        exptime = _exptime(ctx, expid, camera)
        out = fc.apply_calibration(arm.spectra, c, exptime, fallback=status == "fallback", settings=settings)
        calibrated.append((arm.wave, out))
    joined = co.join_arms(calibrated, ctx.grid)
    resolution = _joined_resolution(ctx, expid, spec, sorted(arms), calibrated)
    status = "ok" if statuses == {"ok"} else "none" if statuses == {"none"} else "fallback"
    obstype = ctx.exposures.filter(pl.col("expid") == expid)["obstype"][0]
    rows = []
    for fiber in range(ctx.instrument.n_fibers):
        info = by_fiber.get(fiber, {})
        rows.append({
            "night": ctx.night, "expid": expid, "spectrograph": spec, "fiber": fiber, "extraction": method,
            "targetid": int(info.get("targetid", -1) if info.get("targetid") is not None else -1),
            "objtype": info.get("objtype"), "obstype": obstype, "run_id": ctx.run_id,
            "cameras": ",".join(sorted(arms)), "fluxcal_status": status,
            "loglam_min": ctx.grid.loglam_min, "dloglam": ctx.grid.dloglam, "nwave": ctx.grid.nwave,
            "flam": joined.flux[fiber], "flam_ivar": joined.ivar[fiber], "flam_mask": joined.mask[fiber],
            "resolution": None if resolution is None else resolution[fiber].ravel(),
            "resolution_ndiag": None if resolution is None else resolution.shape[1],
        })
    ctx.tables.replace_keys("joined", products_table(rows, "joined"),
                            {"night": ctx.night, "expid": expid, "spectrograph": spec, "extraction": method})
    now = dt.datetime.now(dt.timezone.utc)
    fits = cal.fits if cal is not None else []
    cal_rows = []
    for camera, arm in sorted(arms.items()):
        c, cam_status, calib_night, calib_expids = plan.get(camera, (None, "none", None, []))
        nwave = arm.wave.size
        cal_rows.append({
            "night": ctx.night, "expid": expid, "camera": camera, "spectrograph": spec, "extraction": method,
            "run_id": ctx.run_id, "status": cam_status, "calib_expids": np.asarray(calib_expids, np.int64),
            "calib_night": calib_night, "n_standards": cal.n_standards if cal is not None else None,
            "n_used": c.n_used if c is not None else 0,
            "std_fiber": np.array([f.fiber for f in fits], np.int16),
            "std_teff": np.array([f.labels.teff for f in fits], np.float32),
            "std_logg": np.array([f.labels.logg for f in fits], np.float32),
            "std_feh": np.array([f.labels.feh for f in fits], np.float32),
            "std_rv": np.array([f.labels.rv for f in fits], np.float32),
            "std_chi2": np.array([f.chi2 if np.isfinite(f.chi2) else -1.0 for f in fits], np.float32),
            "std_ok": np.array([f.ok for f in fits], bool),
            "exptime": _exptime(ctx, expid, camera), "wave_min": float(arm.wave[0]),
            "dwave": float(arm.wave[1] - arm.wave[0]), "nwave": nwave,
            "response": (c.response if c is not None else np.zeros(nwave)).astype(np.float32),
            "response_ivar": (c.response_ivar if c is not None else np.zeros(nwave)).astype(np.float32),
            "telluric": (c.telluric if c is not None else np.ones(nwave)).astype(np.float32),
            "telluric_ivar": (c.telluric_ivar if c is not None else np.zeros(nwave)).astype(np.float32),
            "input_hash": input_hash, "made_at": now,
        })
    ctx.tables.replace_keys("fluxcal", products_table(cal_rows, "fluxcal"),
                            [{"night": ctx.night, "expid": expid, "camera": r["camera"], "extraction": method}
                             for r in cal_rows])
    key = f"{expid}/{spec}/{method}"
    ctx.report.exposures.append(key)
    if status == "fallback":
        ctx.report.fallback.append(key)
    elif status == "none":
        ctx.report.uncalibrated.append(key)


def _joined_resolution(ctx: _Context, expid: int, spec: int, cameras: list[str],
                       calibrated: list[tuple[np.ndarray, object]]) -> np.ndarray | None:
    """The exposure's deconv resolution bands on the joined grid (None unless every camera has them)."""
    bands = [ctx.resolution.pop((expid, spec, c), None) for c in cameras]
    if any(b is None for b in bands):
        return None
    on_grid = [bands_rebinned(b, wave, ctx.grid.wave) for b, (wave, _) in zip(bands, calibrated)]
    ivars = [co.rebin(wave, spectra, ctx.grid).ivar for wave, spectra in calibrated]
    return co.join_resolution(on_grid, ivars)


def _write_means(ctx: _Context, method: str, means: dict, stored: pl.DataFrame) -> None:
    """The night's mean response rows (expid 0), replaced when their inputs changed."""
    old = {r["camera"]: r for r in stored.filter(pl.col("expid") == 0).iter_rows(named=True)}
    rows = []
    now = dt.datetime.now(dt.timezone.utc)
    for camera, (mean, mean_hash, _night, expids) in sorted(means.items()):
        if not ctx.stale(old.get(camera), mean_hash):
            continue
        wave_rows = ctx.instrument.wave_grid(parse_camera(camera)[0])
        rows.append({
            "night": ctx.night, "expid": 0, "camera": camera, "spectrograph": parse_camera(camera)[1],
            "extraction": method, "run_id": ctx.run_id, "status": "mean",
            "calib_expids": np.asarray(expids, np.int64), "calib_night": ctx.night, "n_standards": None,
            "n_used": mean.n_used, "std_fiber": None, "std_teff": None, "std_logg": None, "std_feh": None,
            "std_rv": None, "std_chi2": None, "std_ok": None, "exptime": None,
            "wave_min": wave_rows[0], "dwave": wave_rows[1], "nwave": wave_rows[2],
            "response": mean.response.astype(np.float32), "response_ivar": mean.response_ivar.astype(np.float32),
            "telluric": mean.telluric.astype(np.float32), "telluric_ivar": mean.telluric_ivar.astype(np.float32),
            "input_hash": mean_hash, "made_at": now,
        })
    if rows:
        ctx.tables.replace_keys("fluxcal", products_table(rows, "fluxcal"),
                                [{"night": ctx.night, "expid": 0, "camera": r["camera"], "extraction": method}
                                 for r in rows])


# --------------------------------------------------------------------------- coadds
def _coadds(ctx: _Context, method: str) -> None:
    cal = read_rows(ctx.tables, "fluxcal", night=ctx.night, extraction=method).filter(pl.col("expid") > 0)
    if cal.is_empty():
        return
    exp_hash = {}
    for row in cal.iter_rows(named=True):
        exp_hash.setdefault((int(row["expid"]), int(row["spectrograph"])), row["input_hash"])
    fm = ctx.fibermap.filter((pl.col("objtype") != "SKY") & (pl.col("targetid") >= 0))
    seen: dict[int, list[tuple[int, int, str]]] = {}
    for row in fm.iter_rows(named=True):
        key = (int(row["expid"]), int(row["spectrograph"]))
        if key in exp_hash:
            seen.setdefault(int(row["targetid"]), []).append((key[0], key[1], exp_hash[key]))
    params = ctx.config.coadd.science_dict()
    stored = {int(r["targetid"]): r for r in read_rows(ctx.tables, "coadds", night=ctx.night, extraction=method,
                                                       scope=SCOPE_NIGHT)
              .select("targetid", "input_hash", "run_id").iter_rows(named=True)}
    todo = {t: digest_of({"params": params, "inputs": sorted(v)}) for t, v in seen.items()}
    todo = {t: h for t, h in todo.items() if ctx.stale(stored.get(t), h)}
    if todo:
        joined = read_rows_in(ctx.tables, "joined", "targetid", sorted(todo), night=ctx.night, extraction=method)
        rows = _coadd_rows(ctx, method, joined, todo, SCOPE_NIGHT)
        if rows:
            ctx.tables.replace_keys("coadds", products_table(rows, "coadds"),
                                    [{"night": ctx.night, "targetid": r["targetid"], "extraction": method,
                                      "scope": SCOPE_NIGHT} for r in rows])
            ctx.report.coadds += len(rows)
    if ctx.config.coadd.across_nights:  # every target of the night: a crash between the two commits left some
        _coadds_all(ctx, method, sorted(seen))


def _coadds_all(ctx: _Context, method: str, targets: list[int]) -> None:
    cal = (ctx.tables.scan("fluxcal").filter((pl.col("extraction") == method) & (pl.col("expid") > 0))
           .select("night", "expid", "spectrograph", "input_hash").unique().collect())
    exp_hash = {(r["night"], int(r["expid"]), int(r["spectrograph"])): r["input_hash"] for r in cal.iter_rows(named=True)}
    joined = (ctx.tables.scan("joined").filter(pl.col("targetid").is_in(targets) & (pl.col("extraction") == method))
              .collect())
    if joined.is_empty():
        return
    params = ctx.config.coadd.science_dict()
    stored = {int(r["targetid"]): r for r in read_rows(ctx.tables, "coadds", scope=SCOPE_ALL, extraction=method)
              .select("targetid", "input_hash", "run_id").iter_rows(named=True)}
    todo = {}
    for t, group in joined.group_by("targetid"):
        inputs = sorted((r["night"], int(r["expid"]), exp_hash.get((r["night"], int(r["expid"]), int(r["spectrograph"])), ""))
                        for r in group.select("night", "expid", "spectrograph").iter_rows(named=True))
        h = digest_of({"params": params, "inputs": inputs})
        tid = int(t[0]) if isinstance(t, tuple) else int(t)
        if ctx.stale(stored.get(tid), h):
            todo[tid] = h
    rows = _coadd_rows(ctx, method, joined.filter(pl.col("targetid").is_in(list(todo))), todo, SCOPE_ALL)
    if rows:  # the old row may sit in an earlier night's partition: replaced wherever it is
        ctx.tables.replace_keys("coadds", products_table(rows, "coadds"),
                                [{"targetid": r["targetid"], "extraction": method, "scope": SCOPE_ALL} for r in rows])
        ctx.report.coadds_all += len(rows)


def _coadd_rows(ctx: _Context, method: str, joined: pl.DataFrame, hashes: dict[int, str], scope: str) -> list[dict]:
    rows = []
    now = dt.datetime.now(dt.timezone.utc)
    nside = ctx.config.coadd.nside
    fm = ctx.fibermap
    for t, group in joined.group_by("targetid"):
        tid = int(t[0]) if isinstance(t, tuple) else int(t)
        if tid not in hashes:
            continue
        group = group.sort(["night", "expid"])
        ndiag = group["resolution_ndiag"].to_list()
        res = None
        if all(n is not None for n in ndiag):
            res = np.stack([np.asarray(r, np.float32).reshape(int(n), -1)
                            for r, n in zip(group["resolution"].to_list(), ndiag)])
        result = co.coadd(np.stack(group["flam"].to_numpy()), np.stack(group["flam_ivar"].to_numpy()),
                          np.stack(group["flam_mask"].to_numpy()), resolution=res, clip_sigma=ctx.config.coadd.clip_sigma,
                          max_iter=ctx.config.coadd.max_iter, rescale=ctx.config.coadd.rescale,
                          rel_floor=ctx.config.coadd.rel_floor)
        info = fm.filter(pl.col("targetid") == tid)
        if info.is_empty():
            info = read_rows(ctx.tables, "fibermap", targetid=tid)
        first = info.row(0, named=True) if info.height else {}
        ra, dec = first.get("ra"), first.get("dec")
        statuses = set(group["fluxcal_status"].to_list())
        rows.append({
            "night": max(group["night"].to_list()), "targetid": tid, "extraction": method, "scope": scope,
            "run_id": ctx.run_id,
            "objtype": first.get("objtype"), "ra": ra, "dec": dec, "mag": first.get("mag"),
            "healpix": int(co.healpix_nested(np.array([np.nan if ra is None else ra]),
                                             np.array([np.nan if dec is None else dec]), nside)[0]),
            "nside": nside, "n_exp": group.height, "expids": group["expid"].to_numpy().astype(np.int64),
            "nights": np.array(group["night"].to_list(), dtype=object), "n_rejected": result.n_rejected,
            "fluxcal_status": "ok" if statuses == {"ok"} else "none" if statuses == {"none"} else "fallback",
            "loglam_min": ctx.grid.loglam_min, "dloglam": ctx.grid.dloglam, "nwave": ctx.grid.nwave,
            "flam": result.flux, "flam_ivar": result.ivar, "flam_mask": result.mask,
            "resolution": None if result.resolution is None else result.resolution.ravel(),
            "resolution_ndiag": None if result.resolution is None else result.resolution.shape[0],
            "input_hash": hashes[tid], "made_at": now,
        })
    return rows


def run_after_frames(lake: Lake, night: str, config: ReductionParams, report, fixed_run_id: str | None,
                     stop: Callable[[], bool] | None = None, pool=None) -> ProductsReport | None:
    """The hook of :func:`fiberlake.jobs.process.process_night`: build the night's products after its
    frames, under the run's id (``report.products`` then holds the outcome; a failure is recorded there,
    never raised, so the frames' run stands).

    The products are made in this process; the neural stages after them (denoising, labels) split
    their work into units that run on ``pool``, the run's reducers (its Ray actors on Ray; in this
    process when None), and commit the units' rows here through the single writer."""
    try:
        products = build_products(lake, night, config, run_id=report.run_id, reprocess=fixed_run_id is not None,
                                  stop=stop)
    except Exception as err:
        products = ProductsReport(failed={"products": f"{type(err).__name__}: {err}"})
    report.products = products
    from fiberlake.jobs.denoise_stage import run_after_products  # Bayesian denoising (issue 16)

    products.denoise = run_after_products(lake, night, config, report, fixed_run_id, stop, pool=pool)
    from fiberlake.jobs.classify_stage import run_after_products as classify_after_products  # labels (issue 15)

    products.classify = classify_after_products(lake, night, config, report, fixed_run_id, stop, pool=pool)
    return products
