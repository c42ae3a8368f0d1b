"""Process job: a night's frames in the lake -> calibration sets -> spectra and metrics tables.

Reads raw arrays and headers from the lake, calls :mod:`fiberlake.processors.pipeline`, and
writes products. Each exposure+camera's rows replace any earlier rows of that exposure and
camera in one atomic commit per table, so re-processing never duplicates. A frame that fails
is recorded in the run's ``status_json`` with its error and does not stop the night.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from fiberlake import __version__
from fiberlake.processors.ccd import CCDParams
from fiberlake.processors.pipeline import Calibration, ReducedFrame, ReductionParams, build_calibration, reduce_frame
from fiberlake.schemas.header import SKY_OBSTYPES
from fiberlake.schemas.instrument import get_instrument, parse_camera
from fiberlake.storage.calibstore import read_calib_set, write_calib_set
from fiberlake.storage.layout import Lake
from fiberlake.storage.rawstore import read_raw_frame
from fiberlake.storage.tables import TableStore

ProcessConfig = ReductionParams


@dataclass
class ProcessReport:
    """Outcome of one process run."""

    run_id: str
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    n_spectra: int = 0

    def summary(self) -> str:
        """One line for people."""
        text = f"run {self.run_id}: {len(self.done)} frames reduced, {self.n_spectra} spectra written"
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


def _save_calibration(lake: Lake, night: str, camera: str, calib: Calibration, sources: dict) -> None:
    meta = {"night": night, "camera": camera, "sources": sources, **calib.info,
            "wave_rms_median": float(np.median(calib.wave.rms)), "trace_rms_median": float(np.median(calib.traces.rms)),
            "dead_fibers": [int(i) for i in np.flatnonzero(calib.traces.dead)]}
    write_calib_set(lake.calib_path(night, camera), calib.to_arrays(), meta)


def load_calibration(lake: Lake, night: str, camera: str) -> Calibration:
    """Read a stored calibration set back into memory."""
    arrays, meta = read_calib_set(lake.calib_path(night, camera))
    return Calibration.from_arrays(arrays, meta)


def _spectra_rows(exp: dict, fibermap: dict[int, dict], method: str, reduced: ReducedFrame, calib: Calibration, run_id: str) -> tuple[list[dict], list[dict]]:
    spectra, sky = reduced.spectra, reduced.sky
    grid = calib.grid
    dwave = float(grid[1] - grid[0])
    n_fibers = spectra.flux.shape[0]
    rows, metric_rows = [], []
    for fiber in range(n_fibers):
        fm = fibermap.get(fiber, {})
        status = int(np.bitwise_and.reduce(spectra.mask[fiber])) if spectra.mask.shape[1] else 0
        base = {
            "night": exp["night"], "expid": exp["expid"], "camera": exp["camera"],
            "fiber": fiber, "extraction": method, "run_id": run_id, "objtype": fm.get("objtype", "TGT"),
        }
        rows.append(base | {
            "spectrograph": exp["spectrograph"], "arm": exp["arm"], "targetid": fm.get("targetid", -1),
            "obstype": exp["obstype"], "wave_min": float(grid[0]), "dwave": dwave, "nwave": len(grid),
            "fiber_status": status,
            "flux": spectra.flux[fiber].astype(np.float32), "ivar": spectra.ivar[fiber].astype(np.float32),
            "mask": spectra.mask[fiber].astype(np.uint32), "sky": sky.flux[0].astype(np.float32),
        })
        metric_rows.append(base | {name: _py(values[fiber]) for name, values in reduced.metrics.items()})
    return rows, metric_rows


def _py(value):
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _rows_to_table(rows: list[dict], name: str):
    import pyarrow as pa

    from fiberlake.schemas.tables import SCHEMAS

    schema = SCHEMAS[name]
    columns = {}
    for field_ in schema:
        values = [r[field_.name] for r in rows]
        if pa.types.is_list(field_.type):
            flat = np.concatenate(values) if values else np.array([], dtype=field_.type.value_type.to_pandas_dtype())
            offsets = np.arange(len(values) + 1, dtype=np.int32) * (len(values[0]) if values else 0)
            columns[field_.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=field_.type.value_type))
        else:
            columns[field_.name] = pa.array(values, type=field_.type)
    return pa.table(columns, schema=schema)


def process_night(lake: Lake, night: str, *, config: ReductionParams | None = None, progress: bool = False) -> ProcessReport:
    """Build calibration sets and reduce every science and standard frame of ``night``.

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

    Returns
    -------
    ProcessReport
    """
    config = config or ReductionParams()
    instrument = get_instrument(lake.instrument)
    tables = TableStore(lake.root / "tables")
    exposures = latest_exposures(tables, night)
    if exposures.is_empty():
        raise LookupError(f"the lake has no frames for night {night} (run 'fiberlake ingest' first)")
    run_id = f"{night}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    started = dt.datetime.now(dt.timezone.utc)
    report = ProcessReport(run_id=run_id)
    fibermaps = tables.scan("fibermap").filter(pl.col("night") == night).collect() if tables.exists("fibermap") else pl.DataFrame()

    science = exposures.filter(pl.col("obstype").is_in(list(SKY_OBSTYPES)))
    cameras = sorted(science["camera"].unique().to_list())
    total = science.height + len(cameras)
    bar = tqdm(total=total, desc=f"process {night}", unit="frame", disable=not progress)
    for camera in cameras:
        cam_rows = exposures.filter(pl.col("camera") == camera)
        arm, specid = parse_camera(camera)
        try:
            def frames(obstype: str) -> tuple[list[np.ndarray], list[int]]:
                sel = cam_rows.filter(pl.col("obstype") == obstype).to_dicts()
                return [read_raw_frame(lake.root, r["raw_path"]) for r in sel], [r["expid"] for r in sel]

            biases, bias_ids = frames("BIAS")
            flats, flat_ids = frames("FLAT")
            arcs, arc_ids = frames("ARC")
            params = ccd_params_from_row(cam_rows.row(0, named=True))
            calib = build_calibration(biases, flats, arcs, params, instrument, arm, config)
            _save_calibration(lake, night, camera, calib, {"BIAS": bias_ids, "FLAT": flat_ids, "ARC": arc_ids})
        except Exception as err:  # a camera without a calibration set fails its frames, not the night
            reason = f"calibration failed: {type(err).__name__}: {err}"
            for exp in science.filter(pl.col("camera") == camera).to_dicts():
                report.failed[f"{exp['expid']}/{camera}"] = reason
            bar.update(1 + science.filter(pl.col("camera") == camera).height)
            continue
        bar.update(1)
        for exp in science.filter(pl.col("camera") == camera).to_dicts():
            key = f"{exp['expid']}/{camera}"
            try:
                fm = fibermaps.filter((pl.col("expid") == exp["expid"]) & (pl.col("spectrograph") == specid)) if not fibermaps.is_empty() else pl.DataFrame()
                fibermap = {r["fiber"]: r for r in fm.to_dicts()} if not fm.is_empty() else {}
                sky_fibers = np.array([fibermap.get(f, {}).get("objtype") == "SKY" for f in range(instrument.n_fibers)])
                raw = read_raw_frame(lake.root, exp["raw_path"])
                reduced = reduce_frame(raw, ccd_params_from_row(exp), calib, sky_fibers, config)
                spectra_rows, metric_rows = [], []
                for method, result in reduced.items():
                    s_rows, m_rows = _spectra_rows(exp, fibermap, method, result, calib, run_id)
                    spectra_rows += s_rows
                    metric_rows += m_rows
                predicate = f"night = '{night}' AND expid = {int(exp['expid'])} AND camera = '{camera}'"
                tables.replace("spectra", _rows_to_table(spectra_rows, "spectra"), predicate)
                tables.replace("metrics", metric_rows, predicate)
                report.done.append(key)
                report.n_spectra += len(spectra_rows)
            except Exception as err:
                report.failed[key] = f"{type(err).__name__}: {err}"
            bar.update(1)
    bar.close()
    config_json = json.dumps(config.to_dict(), sort_keys=True)
    tables.append("runs", [{
        "run_id": run_id, "night": night, "command": "process", "code_version": code_version(),
        "config_json": config_json, "config_hash": hashlib.sha256(config_json.encode()).hexdigest(),
        "started_at": started, "finished_at": dt.datetime.now(dt.timezone.utc),
        "n_frames": len(report.done) + len(report.failed), "n_failed": len(report.failed),
        "status_json": json.dumps({"done": report.done, "failed": report.failed}),
    }])
    return report
