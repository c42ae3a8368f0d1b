"""Process job: a night's frames in the lake -> calibration sets -> spectra and metrics tables.

Reads raw arrays and headers from the lake, calls :mod:`fiberlake.processors.pipeline`, and
writes products. Incremental and exactly once:

* A calibration set is identified by ``calib_id``, a hash of its night, camera, input frames
  (expid, file version, pixel hash) and reduction parameters; it is rebuilt only when that
  changes (a new arc arrives, other parameters), and swapped in atomically.
* A camera without its own bias, flat and arc on the night uses the nearest earlier night's set
  made with the same parameters; the ``reductions`` row records which (``calib_night``). When the
  night's own set appears later, the frames are reduced again with it.
* An exposure's ``spectra`` and ``metrics`` rows replace any earlier rows of that exposure and
  camera (one commit per table), then its ``reductions`` row is written: that row is the
  marker. A frame is reduced when it has no marker with the same raw pixels, calibration and
  parameters, so a crash anywhere is repaired by running again, and a night already reduced is
  not touched. A frame that fails is recorded (status ``failed`` with the error) and does not
  stop the night.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from fiberlake import __version__
from fiberlake.processors.ccd import CCDParams
from fiberlake.processors.pipeline import Calibration, ReducedFrame, ReductionParams, build_calibration
from fiberlake.schemas.header import SKY_OBSTYPES
from fiberlake.schemas.instrument import Instrument, parse_camera
from fiberlake.storage.calibstore import read_calib_meta, read_calib_set, write_calib_set
from fiberlake.storage.layout import Lake
from fiberlake.storage.lock import LakeLock
from fiberlake.storage.rawstore import read_raw_frame
from fiberlake.storage.tables import TableStore
from fiberlake.jobs.executors import LocalPool, RayPool
from fiberlake.jobs.reduce_worker import FrameResult
from fiberlake.jobs.table_writer import BatchWriter

ProcessConfig = ReductionParams
CALIB_OBSTYPES = ("BIAS", "FLAT", "ARC")


@dataclass(frozen=True)
class Executor:
    """Where a run's reducers execute.

    Attributes
    ----------
    kind : str
        ``"local"`` (in this process, the ``--no-ray`` path) or ``"ray"``.
    actors : int
        Ray actors.
    gpus_per_actor : float
        GPUs per actor when the cluster has GPUs (fractions share one GPU).
    max_in_flight : int
        Outstanding frames per actor (backpressure).
    address : str, optional
        Ray cluster to join; local Ray when omitted.
    cpus_per_actor : int
        CPUs each actor reserves; Ray sets the actor's ``OMP_NUM_THREADS`` to it, and the
        OpenMP stages (cosmic rays, rectification) use that many threads.
    """

    kind: str = "local"
    actors: int = 2
    gpus_per_actor: float = 1.0
    max_in_flight: int = 2
    address: str | None = None
    cpus_per_actor: int = 1


@dataclass
class ProcessReport:
    """Outcome of one process run."""

    run_id: str
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    n_spectra: int = 0
    skipped: int = 0

    def summary(self) -> str:
        """One line for people."""
        text = f"run {self.run_id}: {len(self.done)} frames reduced, {self.n_spectra} spectra written"
        if self.skipped:
            text += f", {self.skipped} already reduced with the same inputs"
        if self.failed:
            text += f", {len(self.failed)} failed: " + "; ".join(f"{k}: {v}" for k, v in self.failed.items())
        return text


def code_version() -> str:
    """fiberlake version plus the git commit of the source tree when available."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def latest_exposures(tables: TableStore, night: str) -> pl.DataFrame:
    """The newest file version of every (expid, camera) of ``night``."""
    if not tables.exists("exposures"):
        return pl.DataFrame()
    frame = tables.scan("exposures").filter(pl.col("night") == night).collect()
    if frame.is_empty():
        return frame
    return frame.sort("file_version").group_by(["expid", "camera"]).last().sort(["expid", "camera"])


def ccd_params_from_row(row: dict) -> CCDParams:
    """CCD parameters of a frame from its ``exposures`` row (header keywords)."""
    header = {card[0]: card[1] for card in json.loads(row["header_json"])}
    return CCDParams.from_header(header, saturation=float(header.get("SATURATE", 65535)))


def config_hash(config: ReductionParams) -> str:
    """SHA-256 of the reduction parameters as JSON (the ``config_hash`` of runs and reductions)."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()


def calibration_sources(camera_rows: pl.DataFrame) -> dict[str, list[list]]:
    """The calibration inputs of one camera and night: ``[expid, file_version, pixel_sha256]`` per type."""
    sources: dict[str, list[list]] = {}
    for obstype in CALIB_OBSTYPES:
        sel = camera_rows.filter(pl.col("obstype") == obstype).sort("expid")
        sources[obstype] = [[int(r["expid"]), int(r["file_version"]), r["pixel_sha256"]] for r in sel.iter_rows(named=True)]
    return sources


def calibration_id(night: str, camera: str, sources: dict, chash: str) -> str:
    """Content address of a calibration set: same inputs and parameters, same id."""
    text = json.dumps({"night": night, "camera": camera, "sources": sources, "config": chash}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class CalibrationChoice:
    """The calibration set a frame is reduced with, and where it came from."""

    night: str
    camera: str
    calib_id: str
    calib: Calibration | None = None


def _save_calibration(lake: Lake, night: str, camera: str, calib: Calibration, meta: dict) -> None:
    meta = {"night": night, "camera": camera, **meta, **calib.info,
            "wave_rms_median": float(np.median(calib.wave.rms)), "trace_rms_median": float(np.median(calib.traces.rms)),
            "dead_fibers": [int(i) for i in np.flatnonzero(calib.traces.dead)]}
    write_calib_set(lake.calib_path(night, camera), calib.to_arrays(), meta)


def load_calibration(lake: Lake, night: str, camera: str) -> Calibration:
    """Read a stored calibration set back into memory."""
    arrays, meta = read_calib_set(lake.calib_path(night, camera))
    return Calibration.from_arrays(arrays, meta)


def earlier_calibration(lake: Lake, night: str, camera: str, chash: str) -> CalibrationChoice | None:
    """The nearest earlier night's calibration set of ``camera`` made with the same parameters."""
    calib_root = lake.root / "calib"
    if not calib_root.is_dir():
        return None
    nights = sorted((p.name for p in calib_root.iterdir() if p.is_dir() and p.name < night), reverse=True)
    for other in nights:
        meta = read_calib_meta(lake.calib_path(other, camera))
        if meta and meta.get("config_hash") == chash and meta.get("calib_id"):
            return CalibrationChoice(night=other, camera=camera, calib_id=meta["calib_id"])
    return None


def choose_calibration(lake: Lake, night: str, camera: str, camera_rows: pl.DataFrame, chash: str) -> CalibrationChoice:
    """Which calibration set frames of ``camera`` on ``night`` are reduced with (nothing is built here).

    The night's own set when the night has at least one bias, flat and arc of the camera;
    otherwise the nearest earlier night's set with the same parameters.

    Raises
    ------
    LookupError
        If neither exists.
    """
    sources = calibration_sources(camera_rows)
    if all(sources[t] for t in CALIB_OBSTYPES):
        return CalibrationChoice(night=night, camera=camera, calib_id=calibration_id(night, camera, sources, chash))
    earlier = earlier_calibration(lake, night, camera, chash)
    if earlier is None:
        missing = ", ".join(t for t in CALIB_OBSTYPES if not sources[t])
        raise LookupError(f"no calibration for {camera}: night {night} has no {missing} frame and no earlier night "
                          "has a calibration set made with these parameters")
    return earlier


def ensure_calibration(
    lake: Lake,
    choice: CalibrationChoice,
    camera_rows: pl.DataFrame,
    config: ReductionParams,
    instrument: Instrument,
    *,
    rebuild: bool | str = False,
) -> Calibration:
    """Load the chosen calibration set, building and storing it first when it is the night's own and missing.

    A stored set whose ``calib_id`` differs (other inputs or parameters) is rebuilt and swapped in.
    ``rebuild=True`` rebuilds the night's own set regardless; ``rebuild=<run id>`` rebuilds it
    unless that run already did (resumable reprocessing).
    """
    own = not camera_rows.is_empty() and choice.night == camera_rows["night"][0]
    meta = read_calib_meta(lake.calib_path(choice.night, choice.camera))
    built_by = rebuild if isinstance(rebuild, str) else ""
    if built_by:  # a reprocessing run rebuilds each set once, not again when resumed
        rebuild = not (meta and meta.get("built_by") == built_by)
    rebuild = bool(rebuild) and own  # an earlier night's set is used as it is
    if choice.calib is not None and not rebuild:
        return choice.calib
    if meta and meta.get("calib_id") == choice.calib_id and not rebuild:
        choice.calib = load_calibration(lake, choice.night, choice.camera)
        return choice.calib
    if not own:
        raise LookupError(f"calibration set {choice.night}/{choice.camera} changed while in use; run again")
    arm, _ = parse_camera(choice.camera)

    def frames(obstype: str) -> list[np.ndarray]:
        sel = camera_rows.filter(pl.col("obstype") == obstype).sort("expid").to_dicts()
        return [read_raw_frame(lake.root, r["raw_path"]) for r in sel]

    biases, flats, arcs = frames("BIAS"), frames("FLAT"), frames("ARC")
    params = ccd_params_from_row(camera_rows.filter(pl.col("obstype") == "BIAS").row(0, named=True))
    calib = build_calibration(biases, flats, arcs, params, instrument, arm, config)
    _save_calibration(lake, choice.night, choice.camera, calib, {
        "calib_id": choice.calib_id, "config_hash": config_hash(config), "code_version": code_version(),
        "built_by": built_by,
        "sources": calibration_sources(camera_rows), "config": config.to_dict(),
    })
    choice.calib = calib
    return calib


def spectra_rows(exp: dict, fibermap: dict[int, dict], method: str, reduced: ReducedFrame,
                 calib: Calibration) -> tuple[list[dict], list[dict]]:
    """Rows of ``spectra`` and ``metrics`` for one frame and extraction (``run_id`` left to the writer)."""
    spectra, sky = reduced.spectra, reduced.sky
    resolution = getattr(reduced, "resolution", None)
    grid = calib.grid
    dwave = float(grid[1] - grid[0])
    n_fibers = spectra.flux.shape[0]
    rows, metric_rows = [], []
    for fiber in range(n_fibers):
        fm = fibermap.get(fiber, {})
        status = int(np.bitwise_and.reduce(spectra.mask[fiber])) if spectra.mask.shape[1] else 0
        base = {
            "night": exp["night"], "expid": exp["expid"], "camera": exp["camera"],
            "fiber": fiber, "extraction": method, "run_id": "", "objtype": fm.get("objtype", "TGT"),
        }
        rows.append(base | {
            "spectrograph": exp["spectrograph"], "arm": exp["arm"], "targetid": fm.get("targetid", -1),
            "obstype": exp["obstype"], "wave_min": float(grid[0]), "dwave": dwave, "nwave": len(grid),
            "fiber_status": status,
            "flux": spectra.flux[fiber].astype(np.float32), "ivar": spectra.ivar[fiber].astype(np.float32),
            "mask": spectra.mask[fiber].astype(np.uint32), "sky": sky.flux[0].astype(np.float32),
            "resolution": None if resolution is None else resolution[fiber].ravel().astype(np.float32),
            "resolution_ndiag": None if resolution is None else int(resolution.shape[1]),
            "resolution_wave": None if resolution is None else calib.wave.coeffs[fiber].astype(np.float64),
        })
        metric_rows.append(base | {name: _py(values[fiber]) for name, values in reduced.metrics.items()})
    return rows, metric_rows


def _py(value):
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def rows_to_table(rows: list[dict], name: str):
    """Arrow table of ``rows`` with the declared schema; list columns built from numpy arrays without copies per row."""
    import pyarrow as pa

    from fiberlake.schemas.tables import SCHEMAS

    schema = SCHEMAS[name]
    columns = {}
    for field_ in schema:
        values = [r[field_.name] for r in rows]
        if pa.types.is_list(field_.type) and any(v is None for v in values):  # nullable (resolution)
            columns[field_.name] = pa.array([None if v is None else np.asarray(v).tolist() for v in values],
                                            type=field_.type)
        elif pa.types.is_list(field_.type):
            flat = np.concatenate(values) if values else np.array([], dtype=field_.type.value_type.to_pandas_dtype())
            offsets = np.arange(len(values) + 1, dtype=np.int32) * (len(values[0]) if values else 0)
            columns[field_.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=field_.type.value_type))
        else:
            columns[field_.name] = pa.array(values, type=field_.type)
    return pa.table(columns, schema=schema)


def _fibermap_of(fibermaps: pl.DataFrame, expid: int, specid: int) -> dict[int, dict]:
    if fibermaps.is_empty():
        return {}
    fm = fibermaps.filter((pl.col("expid") == expid) & (pl.col("spectrograph") == specid))
    return {r["fiber"]: r for r in fm.to_dicts()}


def exposure_predicate(night: str, expid: int, camera: str) -> str:
    """SQL predicate selecting one exposure and camera (values were validated at ingest)."""
    return f"night = '{night}' AND expid = {int(expid)} AND camera = '{camera}'"


def make_pool(lake: Lake, config: ReductionParams, executor: Executor):
    """The reducers of a run: in this process, or Ray actors."""
    if executor.kind == "local":
        return LocalPool(str(lake.root), config.to_dict())
    return RayPool(str(lake.root), config.to_dict(), n_actors=executor.actors, num_gpus=executor.gpus_per_actor,
                   max_in_flight=executor.max_in_flight, address=executor.address,
                   num_cpus=executor.cpus_per_actor)


def _run(pool, writer: BatchWriter, work: list, fibermaps: pl.DataFrame, rebuild: bool | str, stop: Callable[[], bool],
         report: ProcessReport, progress: bool, night: str) -> None:
    """Calibrations first (one call per camera), then every frame; results go to the writer."""
    bar = tqdm(total=sum(len(w[3]) for w in work), desc=f"process {night}", unit="frame", disable=not progress)
    calib_calls = [(c.night, camera, c.calib_id, rows.to_dicts(), rebuild)
                   for camera, c, rows, _ in work if not isinstance(c, Exception)]
    calib_error = {camera: str(choice) for camera, choice, _, _ in work if isinstance(choice, Exception)}
    for call, outcome in pool.map("calibrate", calib_calls):
        if outcome is not None:
            calib_error[call[1]] = outcome if isinstance(outcome, str) else f"calibration failed: {outcome}"
    frame_calls = []
    for camera, choice, _, todo in work:
        _, specid = parse_camera(camera)
        for exp in todo:
            if camera in calib_error:
                known = not isinstance(choice, Exception)
                _record(_failed(exp, choice.night if known else None, choice.calib_id if known else None,
                                calib_error[camera]), writer, report)
                bar.update(1)
            else:
                frame_calls.append((exp, choice.night, choice.calib_id, _fibermap_of(fibermaps, exp["expid"], specid)))

    def calls():
        for call in frame_calls:
            if stop():
                return
            yield call

    for call, result in pool.reduce_frames(calls()):
        if isinstance(result, Exception):  # the worker died for good: record, go on
            result = _failed(call[0], call[1], call[2], f"worker lost: {type(result).__name__}: {str(result)[:300]}")
        _record(result, writer, report)
        bar.update(1)
    bar.close()


def _failed(exp: dict, calib_night: str | None, calib_id: str | None, error: str) -> FrameResult:
    """The result of a frame that could not be reduced (its marker records why)."""
    marker = {"night": exp["night"], "expid": exp["expid"], "camera": exp["camera"],
              "file_version": exp["file_version"], "pixel_sha256": exp["pixel_sha256"], "status": "failed",
              "error": error, "calib_night": calib_night, "calib_id": calib_id, "n_spectra": 0, "seconds": 0.0,
              "landed_at": exp["ingested_at"]}
    return FrameResult(exp["night"], exp["expid"], exp["camera"], marker=marker)


def _record(result: FrameResult, writer: BatchWriter, report: ProcessReport) -> None:
    key = f"{result.expid}/{result.camera}"
    if result.ok:
        report.done.append(key)
        report.n_spectra += result.marker["n_spectra"]
    else:
        report.failed[key] = result.marker["error"]
    writer.add(result)


def _needs_reduction(marker: dict | None, exp: dict, calib_id: str | None, chash: str, retry_failed: bool, force: bool,
                     run_id: str | None) -> bool:
    if run_id is not None:  # reprocessing: everything not yet done by this run
        return marker is None or marker["run_id"] != run_id
    return force or not _is_done(marker, exp, calib_id, chash, retry_failed)


def _is_done(marker: dict | None, exp: dict, calib_id: str | None, chash: str, retry_failed: bool) -> bool:
    if marker is None:
        return False
    same = (marker["file_version"] == exp["file_version"] and marker["pixel_sha256"] == exp["pixel_sha256"]
            and marker["calib_id"] == calib_id and marker["config_hash"] == chash)
    return same and (marker["status"] == "ok" or not retry_failed)


def process_night(
    lake: Lake,
    night: str,
    *,
    config: ReductionParams | None = None,
    progress: bool = False,
    force: bool = False,
    retry_failed: bool = False,
    lock: bool = True,
    stop: Callable[[], bool] | None = None,
    executor: Executor | None = None,
    batch_frames: int = 8,
    run_id: str | None = None,
) -> ProcessReport:
    """Reduce every science and standard frame of ``night`` that is not reduced yet with its current inputs.

    Parameters
    ----------
    lake : Lake
        The lake (must already hold the night's frames).
    night : str
        Night, ``YYYY-MM-DD``.
    config : ReductionParams, optional
        Reduction parameters (defaults otherwise).
    progress : bool
        Show a progress bar.
    force : bool
        Rebuild the calibration sets and reduce every frame again.
    retry_failed : bool
        Reduce again frames whose last reduction failed with the same inputs.
    lock : bool
        Take the lake's writer lock (callers that already hold it pass False).
    stop : callable, optional
        Checked between frames; when it returns True the run ends after the current frame
        (what is left is reduced by the next run).
    executor : Executor, optional
        Where the reducers run: in this process (default) or on Ray actors.
    batch_frames : int
        Frames per table commit of the single writer.
    run_id : str, optional
        Reprocessing: reduce every frame (and rebuild the night's calibration sets) under this
        run id, skipping only what this same run already did, so a killed run resumes where it
        stopped (:func:`fiberlake.jobs.reprocess.reprocess`).

    Returns
    -------
    ProcessReport
    """
    config = config or ReductionParams()
    with LakeLock(lake.root, "process") if lock else nullcontext():
        return _process_night(lake, night, config, progress, force, retry_failed, stop or (lambda: False),
                              executor or Executor(), batch_frames, run_id)


def _process_night(lake: Lake, night: str, config: ReductionParams, progress: bool, force: bool,
                   retry_failed: bool, stop: Callable[[], bool], executor: Executor, batch_frames: int,
                   fixed_run_id: str | None) -> ProcessReport:
    tables = TableStore(lake.root / "tables")
    exposures = latest_exposures(tables, night)
    if exposures.is_empty():
        raise LookupError(f"the lake has no frames for night {night} (run 'fiberlake ingest' first)")
    chash = config_hash(config)
    run_id = fixed_run_id or f"{night}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    started = dt.datetime.now(dt.timezone.utc)
    report = ProcessReport(run_id=run_id)
    markers = {}
    if tables.exists("reductions"):
        for row in tables.scan("reductions").filter(pl.col("night") == night).collect().iter_rows(named=True):
            markers[(row["expid"], row["camera"])] = row
    fibermaps = tables.scan("fibermap").filter(pl.col("night") == night).collect() if tables.exists("fibermap") else pl.DataFrame()

    science = exposures.filter(pl.col("obstype").is_in(list(SKY_OBSTYPES)))
    work: list[tuple[str, CalibrationChoice | Exception, pl.DataFrame, list[dict]]] = []
    for camera in sorted(science["camera"].unique().to_list()):
        cam_rows = exposures.filter(pl.col("camera") == camera)
        try:
            choice: CalibrationChoice | Exception = choose_calibration(lake, night, camera, cam_rows, chash)
            calib_id = choice.calib_id
        except LookupError as err:
            choice, calib_id = err, None
        todo = [exp for exp in science.filter(pl.col("camera") == camera).to_dicts()
                if _needs_reduction(markers.get((exp["expid"], camera)), exp, calib_id, chash, retry_failed, force,
                                    fixed_run_id)]
        report.skipped += science.filter(pl.col("camera") == camera).height - len(todo)
        if todo:
            work.append((camera, choice, cam_rows, todo))
    if not work:
        return report

    pool = make_pool(lake, config, executor)
    writer = BatchWriter(tables, run_id, chash, batch_frames=batch_frames)
    try:
        _run(pool, writer, work, fibermaps, fixed_run_id or force, stop, report, progress, night)
    finally:
        writer.flush()
        pool.close()
    markers_out = writer.markers
    if not markers_out:
        return report
    config_json = json.dumps(config.to_dict(), sort_keys=True)
    row = {
        "run_id": run_id, "night": night, "command": "reprocess" if fixed_run_id else "process",
        "code_version": code_version(),
        "config_json": config_json, "config_hash": chash,
        "started_at": started, "finished_at": dt.datetime.now(dt.timezone.utc),
        "n_frames": len(report.done) + len(report.failed), "n_failed": len(report.failed),
        "status_json": json.dumps({"done": report.done, "failed": report.failed,
                                   "calib_nights": {f"{m['expid']}/{m['camera']}": m["calib_night"] for m in markers_out}}),
    }
    if fixed_run_id:  # a resumed reprocessing run updates its row of the night
        tables.replace("runs", [row], f"run_id = '{run_id}' AND night = '{night}'")
    else:
        tables.append("runs", [row])
    return report
