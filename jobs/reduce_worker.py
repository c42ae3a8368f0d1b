"""The unit of work of processing: a stateful reducer that builds calibration sets and reduces frames.

One :class:`FrameReducer` runs in-process (``--no-ray``) or in a Ray actor (:class:`ReducerHost`,
which keeps one reducer per run's lake and parameters and outlives the run); the code is the same.
A frame is reduced in three calls: :meth:`~FrameReducer.prepare` (read, correct, cut into
fiber-bundle slabs), :meth:`~FrameReducer.extract` once per bundle (on any reducer) and
:meth:`~FrameReducer.finish` (sky, metrics, table rows); :meth:`~FrameReducer.reduce` chains
them in one process. It reads raw arrays and calibration sets from the lake, keeps the calibration sets it has
loaded (and, through them, any models) in memory between frames, and returns table rows. It
never writes a table: results go back to the driver's single writer
(:class:`~fiberlake.jobs.table_writer.BatchWriter`), so commits never race. The one thing it
writes is a calibration set (a Zarr group published atomically, one writer per camera and night).
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import polars as pl
import pyarrow as pa

from fiberlake.jobs.calibrations import CalibrationChoice, ccd_params_from_row, ensure_calibration, load_calibration
from fiberlake.jobs.failures import error_kind
from fiberlake.processors.ccd import CCDImage, CCDParams, correct_counts
from fiberlake.processors.chunks import n_bundles
from fiberlake.processors.frame_tiles import Tile, correct_tile, join_tiles, plan_tiles, tile_count
from fiberlake.processors.params import ReductionParams
from fiberlake.processors.pipeline import (
    BundleSpectra,
    Calibration,
    FrameConstants,
    FrameSlab,
    camera_ccd_params,
    cut_frame,
    extract_bundle,
    finish_frame,
    prepare_frame,
)
from fiberlake.processors.table_rows import spectra_rows
from fiberlake.schemas.instrument import get_instrument
from fiberlake.storage.failpoints import failpoint
from fiberlake.storage.layout import Lake
from fiberlake.storage.rawstore import read_raw_frame
from fiberlake.storage.rows import rows_to_table

CALIB_CACHE = 4
"""Calibration sets a reducer keeps in memory (a LAMOST set is ~300 MB)."""


@dataclass
class FrameResult:
    """What reducing one frame produced: its rows, and its ``reductions`` marker (less run fields)."""

    night: str
    expid: int
    camera: str
    marker: dict
    methods: tuple[str, ...] = ()
    """Extractions this result is for (one ``reductions`` marker each)."""
    spectra: pa.Table | None = None
    metrics: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the frame was reduced."""
        return self.marker["status"] == "ok"


@dataclass
class PreparedFrame:
    """A corrected frame's small part (its slabs travel separately): marker fields, the frame's
    extraction constants, or why it could not be prepared."""

    marker: dict
    methods: tuple[str, ...] = ()
    constants: FrameConstants | None = None
    error: str | None = None
    error_kind: str | None = None
    seconds: float = 0.0


@dataclass
class TileInput:
    """One column tile of a frame's corrected counts, for :meth:`FrameReducer.correct` on any reducer."""

    tile: Tile
    adu: np.ndarray
    mask: np.ndarray
    camera: CCDParams


@dataclass
class BundleError:
    """Why a bundle could not be extracted, and whether the data or the environment failed."""

    text: str
    kind: str


class FrameFailed(RuntimeError):
    """A step of a frame's reduction failed; the message is the marker's error."""

    def __init__(self, text: str, kind: str = "data"):
        super().__init__(text)
        self.kind = kind


@dataclass
class UnitResult:
    """What one unit of a stage after the products (a group to label, a chunk of spectra to denoise) gave:
    its rows, or why there are none (``data`` / ``environment``)."""

    rows: list[dict] = field(default_factory=list)
    error: str | None = None
    error_kind: str | None = None


class FrameReducer:
    """Builds calibration sets, reduces frames of one lake with one set of parameters, and runs the
    units of the neural stages after the products (:meth:`classify_group`, :meth:`denoise_chunk`).

    Parameters
    ----------
    lake_root : str
        Lake root directory.
    config : dict
        :meth:`ReductionParams.to_dict` of the run.
    cpus : int, optional
        CPUs reserved for this reducer (a Ray actor's ``num_cpus``): caps the torch threads of the
        neural stages. None in the driver's process (the stages' own thread settings apply).
    """

    def __init__(self, lake_root: str, config: dict, cpus: int | None = None):
        self.lake = Lake.at(lake_root)
        self.config = ReductionParams.from_dict(config)
        self.cpus = cpus
        """CPUs this reducer may use (a Ray actor's reservation; None in the driver's process)."""
        self._calibs: OrderedDict[str, Calibration] = OrderedDict()
        if "cae" in self.config.extractions:  # loaded once per reducer (Ray actor), CUDA when present
            from fiberlake.jobs.train_cae import ensure_model

            run = self.config.execution
            ensure_model(self.config.cae.model, self.lake.root, run.cae_device, run.cae_batch)

    @cached_property
    def instrument(self):
        """The lake's instrument (read on first use: a reducer that only runs the stages after the
        products on rows it is given needs none)."""
        return get_instrument(self.lake.instrument)

    def ping(self) -> str:
        """Liveness check (Ray waits on it when starting actors)."""
        return "ok"

    def calibrate(self, night: str, camera: str, calib_id: str, camera_rows: list[dict],
                  rebuild: bool | str = False) -> str | None:
        """Make sure the chosen calibration set exists (build and store it when missing).

        Returns
        -------
        tuple of (str, str), or None
            None on success, else why the set could not be built and whether the data or the
            environment failed (``data`` / ``environment``).
        """
        choice = CalibrationChoice(night=night, camera=camera, calib_id=calib_id)
        try:
            calib = ensure_calibration(self.lake, choice, pl.DataFrame(camera_rows), self.config, self.instrument,
                                       rebuild=rebuild)
        except Exception as err:  # recorded on the camera's frames, does not stop the run
            return f"calibration failed: {type(err).__name__}: {err}", error_kind(err)
        self._remember(calib_id, calib)
        return None

    def _calibration(self, night: str, camera: str, calib_id: str) -> Calibration:
        if calib_id in self._calibs:
            self._calibs.move_to_end(calib_id)
            return self._calibs[calib_id]
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

    def n_bundles(self) -> int:
        """Bundles a frame is cut into (the number of slabs :meth:`prepare` returns)."""
        return n_bundles(self.instrument.n_fibers, self.config.execution.chunk_fibers)

    def _marker(self, exp: dict, calib_night: str, calib_id: str) -> dict:
        return {"night": exp["night"], "expid": exp["expid"], "camera": exp["camera"],
                "file_version": exp["file_version"], "pixel_sha256": exp["pixel_sha256"],
                "calib_night": calib_night, "calib_id": calib_id, "landed_at": exp["ingested_at"]}

    def _params(self, methods: tuple[str, ...]) -> ReductionParams:
        """The run's parameters restricted to the extractions a frame still needs."""
        methods = tuple(methods)
        return self.config if methods == self.config.extractions else self.config.updated({"extractions": methods})

    def prepare(self, exp: dict, calib_night: str, calib_id: str, methods: tuple[str, ...]) -> tuple:
        """Read and correct one frame; cut it into its bundles' slabs.

        Returns
        -------
        tuple
            ``(PreparedFrame, slab_0, ..., slab_{n-1})`` with ``n = n_bundles()`` (Ray stores
            each slab as its own object, so a bundle's task fetches only its slab). On failure the
            slabs are None and the PreparedFrame carries the error.
        """
        t0 = time.perf_counter()
        prepared = PreparedFrame(marker=self._marker(exp, calib_night, calib_id), methods=tuple(methods))
        slabs: list = [None] * self.n_bundles()
        try:
            failpoint("reduce.frame")
            calib = self._calibration(calib_night, exp["camera"], calib_id)
            raw = read_raw_frame(self.lake.root, exp["raw_path"])
            prepared.constants, slabs = prepare_frame(raw, ccd_params_from_row(exp), calib,
                                                      self._params(prepared.methods))
            if len(slabs) != self.n_bundles():
                raise ValueError(f"calibration has {calib.traces.n_fibers} fibers, the instrument "
                                 f"{self.instrument.n_fibers}")
        except Exception as err:
            prepared.error, prepared.error_kind = f"{type(err).__name__}: {err}", error_kind(err)
            slabs = [None] * self.n_bundles()
        prepared.seconds = time.perf_counter() - t0
        return (prepared, *slabs)

    def n_tiles(self) -> int:
        """Column tiles :meth:`read` cuts a frame into (``execution.prepare_tiles``, fewer on narrow CCDs)."""
        return tile_count(self.instrument.nx, self.config.execution.prepare_tiles)

    def read(self, exp: dict, calib_night: str, calib_id: str, methods: tuple[str, ...]) -> tuple:
        """The first step of :meth:`prepare` spread over actors: read the frame, correct its counts,
        cut it into its column tiles (:mod:`~fiberlake.processors.frame_tiles`).

        Returns
        -------
        tuple
            ``(PreparedFrame, tile_0, ..., tile_{n-1})`` with ``n = n_tiles()``, each tile a
            :class:`TileInput` for :meth:`correct` on any reducer (None after a failure).
        """
        t0 = time.perf_counter()
        prepared = PreparedFrame(marker=self._marker(exp, calib_night, calib_id), methods=tuple(methods))
        inputs: list = [None] * self.n_tiles()
        try:
            failpoint("reduce.frame")
            calib = self._calibration(calib_night, exp["camera"], calib_id)
            raw = read_raw_frame(self.lake.root, exp["raw_path"])
            camera = camera_ccd_params(ccd_params_from_row(exp), self.config)
            adu, mask = correct_counts(raw, camera, calib.master_bias)
            rect = calib.rectification
            tiles = plan_tiles(adu.shape[1], self.n_tiles(), None if rect is None else rect.map)
            inputs = [TileInput(tile=t, adu=adu[:, t.read[0]:t.read[1]].copy(), mask=mask[:, t.read[0]:t.read[1]].copy(),
                                camera=camera) for t in tiles]
        except Exception as err:
            prepared.error, prepared.error_kind = f"{type(err).__name__}: {err}", error_kind(err)
        prepared.seconds = time.perf_counter() - t0
        return (prepared, *inputs)

    def correct(self, prepared: PreparedFrame, tile: TileInput | None) -> CCDImage | BundleError | None:
        """Cosmic rays and rectification of one tile (:func:`~fiberlake.processors.frame_tiles.correct_tile`)."""
        if prepared.error is not None or tile is None:
            return None
        try:
            calib = self._calibration(prepared.marker["calib_night"], prepared.marker["camera"],
                                      prepared.marker["calib_id"])
            rect = calib.rectification
            return correct_tile(tile.adu, tile.mask, tile.tile, tile.camera, cosmics=self.config.cosmics.enabled,
                                rmap=None if rect is None else rect.map, order=3 if rect is None else rect.config.order)
        except Exception as err:
            return BundleError(f"tile {tile.tile.index} (columns {tile.tile.out[0]}-{tile.tile.out[1] - 1}): "
                               f"{type(err).__name__}: {err}", error_kind(err))

    def cut(self, prepared: PreparedFrame, *tiles: CCDImage | BundleError | None) -> tuple:
        """The last step of :meth:`prepare` spread over actors: join the corrected tiles and cut the
        frame into its bundles' slabs. Returns what :meth:`prepare` returns."""
        t0 = time.perf_counter()
        prepared = dataclasses.replace(prepared)
        slabs: list = [None] * self.n_bundles()
        try:
            if prepared.error is not None:
                raise FrameFailed(prepared.error, prepared.error_kind or "data")
            errors = [t for t in tiles if isinstance(t, BundleError)]
            if errors or any(t is None for t in tiles):
                raise FrameFailed("; ".join(e.text for e in errors) or "a tile is missing",
                                  "environment" if any(e.kind == "environment" for e in errors) else "data")
            calib = self._calibration(prepared.marker["calib_night"], prepared.marker["camera"],
                                      prepared.marker["calib_id"])
            prepared.constants, slabs = cut_frame(join_tiles(list(tiles)), calib, self._params(prepared.methods))
            if len(slabs) != self.n_bundles():
                raise ValueError(f"calibration has {calib.traces.n_fibers} fibers, the instrument "
                                 f"{self.instrument.n_fibers}")
        except FrameFailed as err:
            prepared.error, prepared.error_kind = str(err), err.kind
            slabs = [None] * self.n_bundles()
        except Exception as err:
            prepared.error, prepared.error_kind = f"{type(err).__name__}: {err}", error_kind(err)
            slabs = [None] * self.n_bundles()
        prepared.seconds += time.perf_counter() - t0
        return (prepared, *slabs)

    def extract(self, prepared: PreparedFrame, slab: FrameSlab | None) -> BundleSpectra | BundleError | None:
        """Extract one bundle (see :func:`~fiberlake.processors.pipeline.extract_bundle`).

        Returns
        -------
        BundleSpectra, or a BundleError, or None when the frame could not be prepared.
        """
        if prepared.error is not None or slab is None:
            return None
        try:
            calib = self._calibration(prepared.marker["calib_night"], prepared.marker["camera"],
                                      prepared.marker["calib_id"])
            return extract_bundle(slab, prepared.constants, calib, self._params(prepared.methods))
        except Exception as err:
            return BundleError(f"bundle {slab.bundle.index} (fibers {slab.bundle.core[0]}-{slab.bundle.core[1] - 1}): "
                               f"{type(err).__name__}: {err}", error_kind(err))

    def finish(self, exp: dict, fibermap: dict[int, dict], prepared: PreparedFrame,
               *parts: BundleSpectra | BundleError | None) -> FrameResult:
        """Join a frame's bundles, subtract the sky, measure quality and make the table rows.

        A failure is returned as a result with status ``failed`` and the error, not raised: a
        frame that fails deterministically is recorded and the run goes on.
        """
        t0 = time.perf_counter()
        marker = dict(prepared.marker)
        result = FrameResult(night=exp["night"], expid=exp["expid"], camera=exp["camera"], marker=marker,
                             methods=prepared.methods)
        try:
            if prepared.error is not None:
                raise FrameFailed(prepared.error, prepared.error_kind or "data")
            errors = [p for p in parts if isinstance(p, BundleError)]
            if errors:
                kind = "environment" if any(e.kind == "environment" for e in errors) else "data"
                raise FrameFailed("; ".join(e.text for e in errors), kind)
            calib = self._calibration(marker["calib_night"], exp["camera"], marker["calib_id"])
            sky_fibers = np.array([fibermap.get(f, {}).get("objtype") == "SKY" for f in range(self.instrument.n_fibers)])
            reduced = finish_frame(list(parts), calib, sky_fibers, self._params(prepared.methods))
            rows, metrics = [], []
            for method, frame in reduced.items():
                s_rows, m_rows = spectra_rows(exp, fibermap, method, frame, calib)
                rows += s_rows
                metrics += m_rows
            result.spectra = rows_to_table(rows, "spectra")
            result.metrics = metrics
            marker |= {"status": "ok", "error": None, "error_kind": None, "n_spectra": len(rows)}
        except FrameFailed as err:
            marker |= {"status": "failed", "error": str(err), "error_kind": err.kind, "n_spectra": 0}
        except Exception as err:
            marker |= {"status": "failed", "error": f"{type(err).__name__}: {err}", "error_kind": error_kind(err),
                       "n_spectra": 0}
        marker["seconds"] = prepared.seconds + (time.perf_counter() - t0)
        return result

    def reduce(self, exp: dict, calib_night: str, calib_id: str, fibermap: dict[int, dict],
               methods: tuple[str, ...]) -> FrameResult:
        """Reduce one science or standard frame to its spectra and metrics rows for ``methods``, in
        this process: :meth:`prepare`, :meth:`extract` for every bundle, :meth:`finish`."""
        prepared, *slabs = self.prepare(exp, calib_night, calib_id, methods)
        return self.finish(exp, fibermap, prepared, *(self.extract(prepared, slab) for slab in slabs))

    def classify_group(self, unit) -> UnitResult:
        """Label the stars of one exposure and spectrograph, both arms paired
        (:func:`fiberlake.jobs.classify_stage.label_unit`); the networks are loaded once per process
        (CUDA when this reducer has a GPU and ``classify.device`` is auto) and kept. Never raises."""
        from fiberlake.jobs.classify_stage import label_unit

        try:
            calibs = {}
            for marker in unit.cams:  # the calibration sets this reducer already holds (frames reduced here)
                key = (marker["calib_night"], marker["camera"], marker["calib_id"])
                calibs[key] = self._calibration(*key)
            return UnitResult(rows=label_unit(self.lake, unit, calibs))
        except Exception as err:  # recorded by the driver against the group
            return UnitResult(error=f"{type(err).__name__}: {err}", error_kind=error_kind(err))

    def denoise_chunk(self, unit) -> UnitResult:
        """Denoise one chunk of spectra rows (:func:`fiberlake.jobs.denoise_stage.denoise_unit`); the
        model is loaded once per process (CUDA when this reducer has a GPU and ``denoise.device`` is
        auto) and kept. Never raises."""
        from fiberlake.jobs.denoise_stage import denoise_unit

        try:
            return UnitResult(rows=denoise_unit(self.lake, unit, self.cpus))
        except Exception as err:  # recorded by the driver against the chunk
            return UnitResult(error=f"{type(err).__name__}: {err}", error_kind=error_kind(err))


WARM_IMPORTS = ("scipy.signal",)
"""Modules a frame's reduction imports on first use (``scipy.signal``: ~1 s, the overscan's smoothing),
imported by a :class:`ReducerHost` in the background as it starts, while it waits for its first calls."""


@dataclass(frozen=True)
class ReducerContext:
    """Which reducer a call is for: a lake and a run's parameters (sent with every call to a
    :class:`ReducerHost`, so an actor serves any run and a restarted actor rebuilds its reducer)."""

    key: str
    """A digest of ``lake_root`` and ``config`` (the host's reducers are keyed by it)."""
    lake_root: str
    config: dict

    @classmethod
    def of(cls, lake_root: str, config: dict) -> ReducerContext:
        """The context of a run's lake and parameters (:meth:`ReductionParams.to_dict`)."""
        import hashlib
        import json

        text = json.dumps([str(lake_root), config], sort_keys=True, default=str)
        return cls(key=hashlib.blake2b(text.encode(), digest_size=16).hexdigest(), lake_root=str(lake_root),
                   config=config)


class ReducerHost:
    """A Ray actor that runs :class:`FrameReducer` methods for any run: an actor outlives the job that
    started it (the pool is kept by :mod:`fiberlake.jobs.executors`), so a driver that runs many
    nights (``watch``, ``reprocess``) starts its actors once.

    Each call names its :class:`ReducerContext`; the host keeps the reducers of its last
    ``HOST_REDUCERS`` contexts (with their calibration sets and models) and makes a reducer on the
    first call of a context, also after Ray restarted the actor.

    Parameters
    ----------
    cpus : int, optional
        CPUs the actor reserves (:class:`FrameReducer`'s ``cpus``).
    """

    HOST_REDUCERS = 2
    """Reducers (runs' lakes and parameters) an actor keeps."""

    def __init__(self, cpus: int | None = None):
        import threading

        self.cpus = cpus
        self._reducers: OrderedDict[str, FrameReducer] = OrderedDict()
        threading.Thread(target=_warm_imports, name="fiberlake-warm-imports", daemon=True).start()

    def ping(self) -> str:
        """Liveness check (the pool waits on it when starting or reusing actors)."""
        return "ok"

    def call(self, context: ReducerContext, method: str, *args):
        """``method(*args)`` of the context's reducer (made now when this host has none)."""
        reducer = self._reducers.get(context.key)
        if reducer is None:
            reducer = FrameReducer(context.lake_root, context.config, cpus=self.cpus)
            self._reducers[context.key] = reducer
            while len(self._reducers) > self.HOST_REDUCERS:
                self._reducers.popitem(last=False)
        self._reducers.move_to_end(context.key)
        return getattr(reducer, method)(*args)


def _warm_imports() -> None:
    """Import :data:`WARM_IMPORTS` (a failure is left to the call that needs the module)."""
    import importlib

    for name in WARM_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the frame that needs it reports it
            pass
