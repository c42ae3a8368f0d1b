"""Classification stage (seed 003): stellar classes of a night's stars from both arms, into ``labels``.

A product above the frame keyed by (expid, spectrograph) (DESIGN.md, Products above the frame):
:func:`fiberlake.jobs.products.run_after_frames` calls :func:`run_after_products` once the night's
frames are reduced. The driver decides the work and commits through the same single writer; each
group (step 2-3 below, one :class:`LabelUnit`) runs on one of the run's reducers (a Ray actor, CUDA
when it has a GPU; in this process with ``--no-ray``), which loads the networks once and keeps them.
For each SCIENCE/STANDARD exposure and spectrograph with at least one reduced camera (``reductions``
markers, status ok):

1. the group's hash: its cameras' (camera, calibration id, raw pixels' SHA-256), the model id,
   the template grid and the stage's science parameters; a group whose ``labels`` rows carry that
   hash is skipped (exactly once: a crash leaves a mismatch and the next run redoes the rest);
2. each camera's raw frame is corrected as the frame stage does (overscan, bias, gain, cosmic rays
   when the run detects them; rectified when the calibration holds an aberration map) and its
   11-pixel stripes cut around the calibration's traces
   (:func:`fiberlake.processors.stripes.arm_inputs`; sky from the fiber map's SKY fibers);
3. DRC-Net, RC-Net and the template fit label every star fiber
   (:func:`fiberlake.processors.classify.classify_exposure`); a camera that is missing (not
   reduced, quarantined) leaves its arm's input zero and the labels say ``one_arm``; a fiber
   with neither arm usable gets a ``no_stripe`` row without a class;
4. the group's rows replace the old ones in one commit.

The frame is corrected a second time here (the frame stage does not keep its corrected pixels);
``bench/classify.py`` measures that cost beside the inference.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import polars as pl

from fiberlake.processors.params import ClassifyParams, ReductionParams
from fiberlake.schemas.instrument import get_instrument, parse_camera
from fiberlake.schemas.parset import digest_of
from fiberlake.schemas.tables import LABEL_CLASSES
from fiberlake.storage import models as store
from fiberlake.storage.layout import Lake
from fiberlake.storage.products import products_table, read_rows
from fiberlake.storage.tables import TableStore

TABLE = "labels"


@dataclass
class ClassifyReport:
    """What :func:`classify_night` did."""

    model_id: str = ""
    exposures: int = 0
    labels: int = 0
    flagged: dict[str, int] = field(default_factory=dict)
    skipped_groups: int = 0
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for people."""
        text = f"classified {self.labels} fibers in {self.exposures} exposure spectrographs"
        if self.model_id:
            text += f" ({self.model_id})"
        if self.flagged:
            text += ", flagged: " + ", ".join(f"{k} {v}" for k, v in sorted(self.flagged.items()))
        if self.failed:
            text += f", {len(self.failed)} failed: " + "; ".join(f"{k}: {v}" for k, v in self.failed.items())
        return text


@dataclass
class LabelUnit:
    """One exposure and spectrograph to label on a reducer (:meth:`FrameReducer.classify_group`): both
    arms' markers and rows, its fiber map, the run's parameters and the model the driver hashed."""

    night: str
    expid: int
    spectrograph: int
    cams: list[dict]
    """``reductions`` markers of its reduced cameras (one per arm at most)."""
    exposures: pl.DataFrame
    fibermap: pl.DataFrame
    config: ReductionParams
    params: ClassifyParams
    model_id: str
    grid_id: str


def label_unit(lake: Lake, unit: LabelUnit, calibs: dict) -> list[dict]:
    """The ``labels`` rows of one unit (without run id, hash and time), on this process's device.

    ``calibs`` maps ``(calib_night, camera, calib_id)`` to calibration sets already loaded.
    """
    from fiberlake.jobs.classify_templates import template_grid

    params = unit.params
    device = _device(params.device)
    nets, card = _models(params.model, str(lake.root), device)
    if card["model_id"] != unit.model_id:
        raise LookupError(f"classify model {params.model} is {card['model_id']} here, {unit.model_id} in the driver")
    grid = template_grid(params.template_model, sigma_a=params.template_sigma) if "template" in params.methods else None
    grid_id = template_grid_id(grid) if grid is not None else ""
    if grid_id != unit.grid_id:
        raise LookupError(f"template grid is {grid_id} here, {unit.grid_id} in the driver")
    return _label_group(lake, unit.night, unit.expid, unit.spectrograph, unit.cams, unit.exposures, unit.fibermap,
                        unit.config, params, nets, tuple(card["classes"]), grid, unit.model_id, grid_id,
                        get_instrument(lake.instrument), calibs, device)


@lru_cache(maxsize=2)
def _models(source: str, lake_root: str, device: str):
    from fiberlake.jobs.train_classify import load_classify_models

    return load_classify_models(source, lake_root, device)


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def template_grid_id(grid) -> str:
    """Id of a template grid: its star model and a hash of its labels and smoothing."""
    return f"template-{grid.source.split()[0]}-{digest_of({'labels': grid.labels.tolist(), 'classes': grid.classes.tolist()})[:12]}"


def arm_of_frame(lake: Lake, exp: dict, marker: dict, config: ReductionParams, sky: np.ndarray, calibs: dict):
    """Stripes and aperture spectra of one camera's frame, and the wavelengths of the stripe rows."""
    from fiberlake.jobs.calibrations import ccd_params_from_row, load_calibration
    from fiberlake.processors import ccd, rectify
    from fiberlake.processors.pipeline import camera_ccd_params
    from fiberlake.processors.stripes import arm_inputs, stripe_window
    from fiberlake.schemas.maskbits import FATAL, MASK_DTYPE, Mask
    from fiberlake.storage.rawstore import read_raw_frame

    key = (marker["calib_night"], marker["camera"], marker["calib_id"])
    if key not in calibs:
        calib = load_calibration(lake, marker["calib_night"], marker["camera"])
        if calib.info.get("calib_id") != marker["calib_id"]:
            raise LookupError(f"calibration set {key[0]}/{key[1]} is not {key[2]} any more")
        calibs[key] = calib
    calib = calibs[key]
    raw = read_raw_frame(lake.root, exp["raw_path"])
    image = ccd.preprocess(raw, camera_ccd_params(ccd_params_from_row(exp), config), calib.master_bias,
                           cosmics=config.cosmics.enabled)
    if calib.rectification is not None:
        image = rectify.rectify_image(image.image, image.ivar, image.mask, calib.rectification.map,
                                      order=calib.rectification.config.order)
    ny = image.image.shape[0]
    trace_x = calib.traces.x(np.arange(ny))
    bad = (image.mask & MASK_DTYPE(FATAL | Mask.COSMIC)) != 0
    inputs = arm_inputs(image.image, image.ivar, bad, trace_x, sky, dead=calib.traces.dead)
    r0, r1 = stripe_window(ny)
    return inputs, np.asarray(calib.wave_rows, dtype=np.float32)[:, r0:r1]


def classify_night(lake: Lake, night: str, config: ReductionParams, params: ClassifyParams, *, run_id: str,
                   reprocess: bool = False, stop: Callable[[], bool] | None = None, pool=None) -> ClassifyReport:
    """Label (or bring up to date) the stars of every exposure and spectrograph of ``night``.

    Each group to label runs on ``pool`` (the run's reducers: :class:`~fiberlake.jobs.executors.RayPool`
    or :class:`~fiberlake.jobs.executors.LocalPool`; in this process when None); its rows are committed
    here, one commit per group. A group that fails is recorded in the report, never raised.
    """
    from fiberlake.jobs.classify_templates import template_grid
    from fiberlake.jobs.executors import pool_or_local
    from fiberlake.jobs.process import latest_exposures

    stop = stop or (lambda: False)
    report = ClassifyReport()
    if not params.enabled:
        return report
    tables = TableStore(lake.root / "tables")
    markers = read_rows(tables, "reductions", night=night)
    if markers.is_empty():
        return report
    markers = markers.filter(pl.col("status") == "ok").unique(subset=["expid", "camera"], keep="first")
    exposures = latest_exposures(tables, night)
    if exposures.is_empty():
        return report
    exposures = exposures.filter(pl.col("obstype").is_in(["SCIENCE", "STANDARD"]))
    fibermap = read_rows(tables, "fibermap", night=night)
    card = store.stage_card(params.model, "classify", lake.root)
    report.model_id = card["model_id"]
    classes = tuple(card["classes"])
    if classes != LABEL_CLASSES:
        raise ValueError(f"classify model {card['model_id']} has classes {classes}, the labels table {LABEL_CLASSES}")
    grid = template_grid(params.template_model, sigma_a=params.template_sigma) if "template" in params.methods else None
    grid_id = template_grid_id(grid) if grid is not None else ""
    science = params.science_dict()
    groups: dict[tuple[int, int], list[dict]] = {}
    science_expids = set(exposures["expid"].to_list())
    for row in markers.iter_rows(named=True):
        if int(row["expid"]) in science_expids:
            groups.setdefault((int(row["expid"]), parse_camera(row["camera"])[1]), []).append(row)
    stored = {}
    if tables.exists(TABLE):
        for r in read_rows(tables, TABLE, night=night).select("expid", "spectrograph", "input_hash").unique().iter_rows(
                named=True):
            stored[(int(r["expid"]), int(r["spectrograph"]))] = r["input_hash"]
    now = dt.datetime.now(dt.timezone.utc)
    wanted_of: dict[tuple[int, int], str] = {}
    units = []
    for (expid, spec), cams in sorted(groups.items(), key=lambda g: (g[0][1], g[0][0])):  # a spectrograph's
        frames = sorted((m["camera"], m["calib_id"], m["pixel_sha256"]) for m in cams)  # calibrations stay loaded
        wanted = digest_of({"frames": frames, "model": card["model_id"], "templates": grid_id, "params": science})
        if stored.get((expid, spec)) == wanted and not reprocess:
            report.skipped_groups += 1
            continue
        wanted_of[(expid, spec)] = wanted
        units.append(LabelUnit(night=night, expid=expid, spectrograph=spec, cams=cams,
                               exposures=exposures.filter(pl.col("expid") == expid),
                               fibermap=fibermap.filter((pl.col("expid") == expid) & (pl.col("spectrograph") == spec)),
                               config=config, params=params, model_id=card["model_id"], grid_id=grid_id))

    def calls():
        for unit in units:
            if stop():
                return
            yield (unit,)

    with pool_or_local(pool, str(lake.root), config.to_dict()) as workers:
        for (unit,), result in workers.map("classify_group", calls()):
            _commit_group(tables, unit, result, wanted_of[(unit.expid, unit.spectrograph)], run_id, now, report)
    return report


def _commit_group(tables: TableStore, unit: LabelUnit, result, wanted: str, run_id: str, now: dt.datetime,
                  report: ClassifyReport) -> None:
    """Commit one group's rows (replacing the group's old ones) or record why it has none."""
    night, expid, spec = unit.night, unit.expid, unit.spectrograph
    if isinstance(result, Exception):  # the reducer died for good
        report.failed[f"{expid}/{spec}"] = f"worker lost: {type(result).__name__}: {str(result)[:300]}"
        return
    if result.error is not None:
        report.failed[f"{expid}/{spec}"] = result.error
        return
    try:
        rows = result.rows
        for r in rows:
            r.update({"run_id": run_id, "input_hash": wanted, "made_at": now})
        if rows:
            tables.replace_keys(TABLE, products_table(rows, TABLE),
                                {"night": night, "expid": expid, "spectrograph": spec})
        report.exposures += 1
        report.labels += sum(1 for r in rows if r["method"] == "drcnet")
        for r in rows:
            if r["method"] == "drcnet" and r["flag"] != "ok":
                report.flagged[r["flag"]] = report.flagged.get(r["flag"], 0) + 1
    except Exception as err:  # recorded; the night goes on
        report.failed[f"{expid}/{spec}"] = f"{type(err).__name__}: {err}"


def _label_group(lake, night, expid, spec, cams, exposures, fibermap, config, params, nets, classes, grid, model_id,
                 grid_id, instrument, calibs, device) -> list[dict]:
    from fiberlake.processors.classify import classify_exposure

    fm = fibermap.filter((pl.col("expid") == expid) & (pl.col("spectrograph") == spec)).sort("fiber")
    n = instrument.n_fibers
    objtype = np.full(n, "SKY", dtype=object)
    targetid = np.full(n, -1, dtype=np.int64)
    for r in fm.iter_rows(named=True):
        objtype[int(r["fiber"])] = r["objtype"] or "TGT"
        targetid[int(r["fiber"])] = -1 if r["targetid"] is None else int(r["targetid"])
    sky = objtype == "SKY"
    arms, waves = {}, {}
    for marker in cams:
        exp = exposures.filter((pl.col("expid") == expid) & (pl.col("camera") == marker["camera"]))
        if exp.is_empty():
            continue
        inputs, wave = arm_of_frame(lake, exp.row(0, named=True), marker, config, sky, calibs)
        arm = parse_camera(marker["camera"])[0]
        arms[arm], waves[arm] = inputs, wave
    if not arms:
        return []
    ref = next(iter(waves.values()))
    labels = classify_exposure(arms.get("b"), arms.get("r"), nets, wave_b=waves.get("b", ref), wave_r=waves.get("r", ref),
                               template_grid=grid, classes=classes, methods=tuple(params.methods),
                               batch=params.batch, device=device)
    rows = []
    stars = np.flatnonzero(~sky)
    for method, probs in labels.probabilities.items():
        mid = grid_id if method == "template" else model_id
        for f in stars:
            p = probs[f]
            flag = str(labels.flag[f])
            ok = np.all(np.isfinite(p))
            if flag != "no_stripe" and not ok:
                flag = "no_fit"
            elif ok and flag == "ok" and labels.snr_r[f] < params.min_snr:
                flag = "low_snr"
            row = {"night": night, "expid": expid, "spectrograph": spec, "fiber": int(f), "targetid": int(targetid[f]),
                   "method": method, "model_id": mid, "class": classes[int(np.argmax(p))] if ok else None,
                   "snr_r": float(labels.snr_r[f]), "snr_b": float(labels.snr_b[f]), "arms": str(labels.arms[f]),
                   "flag": flag}
            for c, v in zip(classes, p):
                row[f"p_{c.lower()}"] = float(v) if ok else None
            rows.append(row)
    return rows


def run_after_products(lake: Lake, night: str, config: ReductionParams, report, fixed_run_id: str | None,
                       stop: Callable[[], bool] | None = None, pool=None) -> ClassifyReport | None:
    """The hook after the products: label under the run's id on the run's reducers (``pool``); failures
    are recorded, never raised."""
    params = getattr(config, "classify", None) or ClassifyParams()
    try:
        return classify_night(lake, night, config, params, run_id=report.run_id, reprocess=fixed_run_id is not None,
                              stop=stop, pool=pool)
    except Exception as err:
        return ClassifyReport(failed={"classify": f"{type(err).__name__}: {err}"})
