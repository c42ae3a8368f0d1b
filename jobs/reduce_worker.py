"""The unit of work of processing: a stateful reducer that builds calibration sets and reduces frames.

One :class:`FrameReducer` runs in-process (``--no-ray``) or as a Ray actor; the code is the
same. It reads raw arrays and calibration sets from the lake, keeps the calibration sets it has
loaded (and, through them, any models) in memory between frames, and returns table rows. It
never writes a table: results go back to the driver's single writer
(:class:`~fiberlake.jobs.table_writer.BatchWriter`), so commits never race. The one thing it
writes is a calibration set (a Zarr group published atomically, one writer per camera and night).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from fiberlake.processors.pipeline import Calibration, ReductionParams, reduce_frame
from fiberlake.schemas.instrument import get_instrument
from fiberlake.storage.failpoints import failpoint
from fiberlake.storage.layout import Lake
from fiberlake.storage.rawstore import read_raw_frame

CALIB_CACHE = 4
"""Calibration sets a reducer keeps in memory (a LAMOST set is ~300 MB)."""


@dataclass
class FrameResult:
    """What reducing one frame produced: its rows, and its ``reductions`` marker (less run fields)."""

    night: str
    expid: int
    camera: str
    marker: dict
    spectra: pa.Table | None = None
    metrics: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the frame was reduced."""
        return self.marker["status"] == "ok"


class FrameReducer:
    """Builds calibration sets and reduces frames of one lake with one set of parameters.

    Parameters
    ----------
    lake_root : str
        Lake root directory.
    config : dict
        :meth:`ReductionParams.to_dict` of the run.
    """

    def __init__(self, lake_root: str, config: dict):
        self.lake = Lake.at(lake_root)
        self.config = ReductionParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
        self.instrument = get_instrument(self.lake.instrument)
        self._calibs: OrderedDict[str, Calibration] = OrderedDict()

    def ping(self) -> str:
        """Liveness check (Ray waits on it when starting actors)."""
        return "ok"

    def calibrate(self, night: str, camera: str, calib_id: str, camera_rows: list[dict],
                  rebuild: bool | str = False) -> str | None:
        """Make sure the chosen calibration set exists (build and store it when missing).

        Returns
        -------
        str or None
            None on success, else why the set could not be built.
        """
        from fiberlake.jobs.process import CalibrationChoice, ensure_calibration

        choice = CalibrationChoice(night=night, camera=camera, calib_id=calib_id)
        try:
            calib = ensure_calibration(self.lake, choice, pl.DataFrame(camera_rows), self.config, self.instrument,
                                       rebuild=rebuild)
        except Exception as err:  # recorded on the camera's frames, does not stop the run
            return f"calibration failed: {type(err).__name__}: {err}"
        self._remember(calib_id, calib)
        return None

    def _calibration(self, night: str, camera: str, calib_id: str) -> Calibration:
        if calib_id in self._calibs:
            self._calibs.move_to_end(calib_id)
            return self._calibs[calib_id]
        from fiberlake.jobs.process import load_calibration

        calib = load_calibration(self.lake, night, camera)
        if calib.info.get("calib_id") != calib_id:
            raise LookupError(f"calibration set {night}/{camera} is not {calib_id} any more (rebuilt meanwhile)")
        self._remember(calib_id, calib)
        return calib

    def _remember(self, calib_id: str, calib: Calibration) -> None:
        self._calibs[calib_id] = calib
        self._calibs.move_to_end(calib_id)
        while len(self._calibs) > CALIB_CACHE:
            self._calibs.popitem(last=False)

    def reduce(self, exp: dict, calib_night: str, calib_id: str, fibermap: dict[int, dict]) -> FrameResult:
        """Reduce one science or standard frame to its spectra and metrics rows.

        A failure is returned as a result with status ``failed`` and the error, not raised: a
        frame that fails deterministically is recorded and the run goes on.
        """
        from fiberlake.jobs.process import ccd_params_from_row, spectra_rows, rows_to_table

        t0 = time.perf_counter()
        marker = {"night": exp["night"], "expid": exp["expid"], "camera": exp["camera"],
                  "file_version": exp["file_version"], "pixel_sha256": exp["pixel_sha256"],
                  "calib_night": calib_night, "calib_id": calib_id, "landed_at": exp["ingested_at"]}
        result = FrameResult(night=exp["night"], expid=exp["expid"], camera=exp["camera"], marker=marker)
        try:
            failpoint("reduce.frame")
            calib = self._calibration(calib_night, exp["camera"], calib_id)
            sky_fibers = np.array([fibermap.get(f, {}).get("objtype") == "SKY" for f in range(self.instrument.n_fibers)])
            raw = read_raw_frame(self.lake.root, exp["raw_path"])
            reduced = reduce_frame(raw, ccd_params_from_row(exp), calib, sky_fibers, self.config)
            rows, metrics = [], []
            for method, frame in reduced.items():
                s_rows, m_rows = spectra_rows(exp, fibermap, method, frame, calib)
                rows += s_rows
                metrics += m_rows
            result.spectra = rows_to_table(rows, "spectra")
            result.metrics = metrics
            marker |= {"status": "ok", "error": None, "n_spectra": len(rows)}
        except Exception as err:
            marker |= {"status": "failed", "error": f"{type(err).__name__}: {err}", "n_spectra": 0}
        marker["seconds"] = time.perf_counter() - t0
        return result
