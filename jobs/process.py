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
import json
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import polars as pl
from tqdm import tqdm

from fiberlake.jobs.calibrations import CalibrationChoice, choose_calibration
from fiberlake.jobs.executors import LazyPool, LocalPool, RayPool
from fiberlake.jobs.provenance import code_version
from fiberlake.jobs.reduce_worker import FrameResult
from fiberlake.jobs.table_writer import BatchWriter
from fiberlake.processors.params import ReductionParams
from fiberlake.schemas.header import SKY_OBSTYPES
from fiberlake.schemas.instrument import parse_camera
from fiberlake.storage.layout import Lake
from fiberlake.storage.lock import LakeLock
from fiberlake.storage.tables import TableStore

ProcessConfig = ReductionParams


@dataclass(frozen=True)
class Executor:
    """Where a run's reducers execute (recorded in ``runs.execution_json``; never changes a product).

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
    """Outcome of one process run.

    Attributes
    ----------
    failed : dict
        ``"expid/camera"`` to the error of frames that failed on their data (remembered: not
        retried without ``--retry-failed``).
    retry : dict
        Frames that failed because of the environment (no space, I/O error, lost worker): the
        next run reduces them again.
    calib_nights : dict
        Camera to the night of the calibration set its frames used, for cameras that used
        another night's set.
    """

    run_id: str
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    retry: dict[str, str] = field(default_factory=dict)
    n_spectra: int = 0
    skipped: int = 0
    calib_nights: dict[str, str] = field(default_factory=dict)
    products: object | None = None
    """What the products above the frame did (:class:`fiberlake.jobs.products.ProductsReport`)."""

    def summary(self) -> str:
        """One line for people."""
        text = f"run {self.run_id}: {len(self.done)} frames reduced, {self.n_spectra} spectra written"
        if self.skipped:
            text += f", {self.skipped} already reduced with the same inputs"
        if self.calib_nights:
            text += ", calibrations from other nights: " + ", ".join(
                f"{camera} <- {night}" for camera, night in sorted(self.calib_nights.items()))
        if self.failed:
            text += f", {len(self.failed)} failed on their data: " + "; ".join(f"{k}: {v}" for k, v in self.failed.items())
        if self.retry:
            text += (f", {len(self.retry)} failed on the environment (retried by the next run): "
                     + "; ".join(f"{k}: {v}" for k, v in self.retry.items()))
        if self.products is not None:
            text += "; " + self.products.summary()
        return text


FRAME_KEY = ["night", "expid", "camera", "file_version"]


def latest_exposures(tables: TableStore, night: str) -> pl.DataFrame:
    """The newest file version of every (expid, camera) of ``night``, typed as the pipeline acts on it.

    ``obstype`` is the frame's ``type_used`` from the ``frames`` table (header type, or the pixel
    type where the routing rule chose it; seed 001), so a bias labelled ARC never enters a master
    arc; the header's type stays in ``obstype_header``. Frames of type ``UNKNOWN`` (no header type
    and no pixel type) are left out. Columns ``typing_model_id`` and ``type_flag`` say how each
    frame was typed.
    """
    if not tables.exists("exposures"):
        return pl.DataFrame()
    frame = tables.scan("exposures").filter(pl.col("night") == night).collect()
    if frame.is_empty():
        return frame
    frame = frame.sort("file_version").group_by(["expid", "camera"]).last().sort(["expid", "camera"])
    typed = (tables.scan("frames").filter(pl.col("night") == night)
             .select(*FRAME_KEY, "type_used", pl.col("model_id").alias("typing_model_id"), "type_flag").collect()
             if tables.exists("frames") else pl.DataFrame())
    if typed.is_empty():
        return frame.with_columns(pl.col("obstype").alias("obstype_header"),
                                  pl.lit(None, pl.String).alias("typing_model_id"), pl.lit(None, pl.String).alias("type_flag"))
    frame = frame.join(typed, on=FRAME_KEY, how="left")
    return (frame.with_columns(pl.col("obstype").alias("obstype_header"),
                               pl.coalesce("type_used", "obstype").alias("obstype"))
            .drop("type_used").filter(pl.col("obstype") != "UNKNOWN"))


def config_hash(config: ReductionParams) -> str:
    """SHA-256 of the run's science parameters (the ``config_hash`` of ``runs``; execution settings excluded)."""
    return config.digest()


def _fibermap_of(fibermaps: pl.DataFrame, expid: int, specid: int) -> dict[int, dict]:
    if fibermaps.is_empty():
        return {}
    fm = fibermaps.filter((pl.col("expid") == expid) & (pl.col("spectrograph") == specid))
    return {r["fiber"]: r for r in fm.to_dicts()}


def make_pool(lake: Lake, config: ReductionParams, executor: Executor):
    """The reducers of a run: in this process, or Ray actors."""
    if executor.kind == "local":
        return LocalPool(str(lake.root), config.to_dict())
    return RayPool(str(lake.root), config.to_dict(), n_actors=executor.actors, num_gpus=executor.gpus_per_actor,
                   max_in_flight=executor.max_in_flight, address=executor.address,
                   num_cpus=executor.cpus_per_actor)


@dataclass
class CameraWork:
    """A camera's frames to reduce in a run and the calibration set they use."""

    camera: str
    choice: CalibrationChoice | LookupError
    rows: pl.DataFrame
    todo: list[tuple[dict, tuple[str, ...]]]
    """``(exposure row, extractions it needs)`` per frame."""


def _run(pool, writer: BatchWriter, work: list[CameraWork], fibermaps: pl.DataFrame, rebuild: bool | str,
         stop: Callable[[], bool], report: ProcessReport, progress: bool, night: str) -> None:
    """Calibrations first (one call per camera), then every frame; results go to the writer."""
    bar = tqdm(total=sum(len(w.todo) for w in work), desc=f"process {night}", unit="frame", disable=not progress)
    calib_calls = [(w.choice.night, w.camera, w.choice.calib_id, w.rows.to_dicts(), rebuild)
                   for w in work if not isinstance(w.choice, Exception)]
    calib_error = {w.camera: (str(w.choice), "data") for w in work if isinstance(w.choice, Exception)}
    for call, outcome in pool.map("calibrate", calib_calls):
        if isinstance(outcome, Exception):  # the worker died: the environment, not the frames
            calib_error[call[1]] = (f"worker lost: {type(outcome).__name__}: {str(outcome)[:300]}", "environment")
        elif outcome is not None:
            calib_error[call[1]] = tuple(outcome)
    frame_calls = []
    for w in work:
        _, specid = parse_camera(w.camera)
        choice = None if isinstance(w.choice, Exception) else w.choice
        for exp, methods in w.todo:
            if w.camera in calib_error:
                error, kind = calib_error[w.camera]
                _record(failed_result(exp, methods, choice.night if choice else None, choice.calib_id if choice else None,
                                      error, kind), writer, report)
                bar.update(1)
            else:
                frame_calls.append((exp, choice.night, choice.calib_id, _fibermap_of(fibermaps, exp["expid"], specid),
                                    methods))

    def calls():
        for call in frame_calls:
            if stop():
                return
            yield call

    for call, result in pool.reduce_frames(calls(), total=len(frame_calls)):
        if isinstance(result, Exception):  # the worker died for good: record, go on
            result = failed_result(call[0], call[4], call[1], call[2],
                                   f"worker lost: {type(result).__name__}: {str(result)[:300]}", "environment")
        _record(result, writer, report)
        bar.update(1)
    bar.close()


def failed_result(exp: dict, methods: tuple[str, ...], calib_night: str | None, calib_id: str | None, error: str,
                  kind: str) -> FrameResult:
    """The result of a frame that could not be reduced (its markers record why, and whether to retry)."""
    marker = {"night": exp["night"], "expid": exp["expid"], "camera": exp["camera"],
              "file_version": exp["file_version"], "pixel_sha256": exp["pixel_sha256"], "status": "failed",
              "error": error, "error_kind": kind, "calib_night": calib_night, "calib_id": calib_id, "n_spectra": 0,
              "seconds": 0.0, "landed_at": exp["ingested_at"]}
    return FrameResult(exp["night"], exp["expid"], exp["camera"], marker=marker, methods=tuple(methods))


def _record(result: FrameResult, writer: BatchWriter, report: ProcessReport) -> None:
    key = f"{result.expid}/{result.camera}"
    if result.ok:
        report.done.append(key)
        report.n_spectra += result.marker["n_spectra"]
    elif result.marker.get("error_kind") == "environment":
        report.retry[key] = result.marker["error"]
    else:
        report.failed[key] = result.marker["error"]
    writer.add(result)


def methods_to_reduce(markers: dict, exp: dict, calib_id: str | None, config: ReductionParams, *,
                      retry_failed: bool, force: bool, run_id: str | None) -> tuple[str, ...]:
    """The extractions of ``config`` that a frame still needs (its markers decide, one per extraction)."""
    todo = []
    for method in config.extractions:
        marker = markers.get((exp["expid"], exp["camera"], method))
        if run_id is not None:  # reprocessing: everything not yet done by this run
            needed = marker is None or marker["run_id"] != run_id
        else:
            needed = force or not is_done(marker, exp, calib_id, config.extraction_digest(method), retry_failed)
        if needed:
            todo.append(method)
    return tuple(todo)


def is_done(marker: dict | None, exp: dict, calib_id: str | None, chash: str, retry_failed: bool) -> bool:
    """True when a marker says the frame was reduced with these pixels, calibration and parameters.

    A failure caused by the environment (``error_kind`` ``environment``) is never done: the
    next run tries again. A failure of the data is done unless ``retry_failed``.
    """
    if marker is None:
        return False
    same = (marker["file_version"] == exp["file_version"] and marker["pixel_sha256"] == exp["pixel_sha256"]
            and marker["calib_id"] == calib_id and marker["config_hash"] == chash)
    if not same:
        return False
    if marker["status"] == "ok":
        return True
    return marker.get("error_kind") != "environment" and not retry_failed


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
        from fiberlake.jobs.model_pins import pin_models  # model settings -> the ids of the exact weights

        config = pin_models(lake, config)
        executor = executor or Executor()
        pool = LazyPool(lambda: make_pool(lake, config, executor))  # the frames and the neural stages share it
        try:
            report = _process_night(lake, night, config, progress, force, retry_failed, stop or (lambda: False),
                                    executor, batch_frames, run_id, pool)
            from fiberlake.jobs.products import run_after_frames  # products above the frame (issue 14)
            run_after_frames(lake, night, config, report, run_id, stop, pool=pool)
        finally:
            pool.close()
        return report


def _process_night(lake: Lake, night: str, config: ReductionParams, progress: bool, force: bool,
                   retry_failed: bool, stop: Callable[[], bool], executor: Executor, batch_frames: int,
                   fixed_run_id: str | None, pool: LazyPool) -> ProcessReport:
    tables = TableStore(lake.root / "tables")
    exposures = latest_exposures(tables, night)
    if exposures.is_empty():
        raise LookupError(f"the lake has no frames for night {night} (run 'fiberlake ingest' first)")
    run_id = fixed_run_id or f"{night}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    started = dt.datetime.now(dt.timezone.utc)
    report = ProcessReport(run_id=run_id)
    markers = {}
    if tables.exists("reductions"):
        for row in tables.scan("reductions").filter(pl.col("night") == night).collect().iter_rows(named=True):
            markers[(row["expid"], row["camera"], row["extraction"])] = row
    fibermaps = tables.scan("fibermap").filter(pl.col("night") == night).collect() if tables.exists("fibermap") else pl.DataFrame()

    science = exposures.filter(pl.col("obstype").is_in(list(SKY_OBSTYPES)))
    work: list[CameraWork] = []
    for camera in sorted(science["camera"].unique().to_list()):
        cam_rows = exposures.filter(pl.col("camera") == camera)
        try:
            choice: CalibrationChoice | LookupError = choose_calibration(lake, night, camera, cam_rows, config)
            calib_id = choice.calib_id
        except LookupError as err:
            choice, calib_id = err, None
        todo = []
        for exp in science.filter(pl.col("camera") == camera).to_dicts():
            methods = methods_to_reduce(markers, exp, calib_id, config, retry_failed=retry_failed, force=force,
                                        run_id=fixed_run_id)
            if methods:
                todo.append((exp, methods))
        report.skipped += science.filter(pl.col("camera") == camera).height - len(todo)
        if todo:
            work.append(CameraWork(camera=camera, choice=choice, rows=cam_rows, todo=todo))
            if not isinstance(choice, Exception) and choice.night != night:
                report.calib_nights[camera] = choice.night
    if not work:
        return report

    writer = BatchWriter(tables, run_id, {m: config.extraction_digest(m) for m in config.extractions},
                         batch_frames=batch_frames)
    try:
        _run(pool, writer, work, fibermaps, fixed_run_id or force, stop, report, progress, night)
    finally:
        writer.flush()
    markers_out = writer.markers
    if not markers_out:
        return report
    row = {
        "run_id": run_id, "night": night, "command": "reprocess" if fixed_run_id else "process",
        "code_version": code_version(),
        "config_json": json.dumps(config.to_dict(), sort_keys=True), "config_hash": config_hash(config),
        "execution_json": json.dumps(asdict(executor) | {"batch_frames": batch_frames}, sort_keys=True),
        "started_at": started, "finished_at": dt.datetime.now(dt.timezone.utc),
        "n_frames": len(report.done) + len(report.failed) + len(report.retry),
        "n_failed": len(report.failed) + len(report.retry),
        "status_json": json.dumps({"done": report.done, "failed": report.failed, "retry": report.retry,
                                   "calib_nights": {f"{m['expid']}/{m['camera']}": m["calib_night"]
                                                    for m in markers_out}}),
    }
    if fixed_run_id:  # a resumed reprocessing run updates its row of the night
        tables.replace_keys("runs", [row], {"run_id": run_id, "night": night})
    else:
        tables.append("runs", [row])
    return report
