"""Calibration sets of a lake: which set a camera's frames use, and building, storing, loading it.

A set is identified by ``calib_id``: a hash of its night, camera, input frames (expid, file
version, pixel hash) and the parameters of the stages that build its common part
(:meth:`~fiberlake.processors.params.ReductionParams.calibration_dict`). Each extraction adds its
own products to the set (fiber flat; PSF for ``deconv``), recorded in the set's metadata under
``methods`` with the hash of their parameters; a run that asks for a method the set lacks, or
with other parameters, rebuilds the set with every method it needs, under the same ``calib_id``.
Execution settings (chunking, devices, actors) never enter either hash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import polars as pl

from fiberlake.jobs.provenance import code_version
from fiberlake.processors.ccd import CCDParams
from fiberlake.processors.params import ReductionParams
from fiberlake.processors.pipeline import Calibration, build_calibration
from fiberlake.schemas.instrument import Instrument, parse_camera
from fiberlake.schemas.parset import digest_of
from fiberlake.storage.calibstore import read_calib_meta, read_calib_set, write_calib_set
from fiberlake.storage.layout import Lake
from fiberlake.storage.rawstore import read_raw_frame

CALIB_OBSTYPES = ("BIAS", "FLAT", "ARC")


def ccd_params_from_row(row: dict) -> CCDParams:
    """CCD parameters of a frame from its ``exposures`` row (header keywords)."""
    header = {card[0]: card[1] for card in json.loads(row["header_json"])}
    return CCDParams.from_header(header, saturation=float(header.get("SATURATE", 65535)))


def calibration_sources(camera_rows: pl.DataFrame) -> dict[str, list[list]]:
    """The calibration inputs of one camera and night: ``[expid, file_version, pixel_sha256]`` per type
    (the type the pipeline acts on, ``frames.type_used``: a frame re-typed changes the set's id)."""
    sources: dict[str, list[list]] = {}
    for obstype in CALIB_OBSTYPES:
        sel = camera_rows.filter(pl.col("obstype") == obstype).sort("expid")
        sources[obstype] = [[int(r["expid"]), int(r["file_version"]), r["pixel_sha256"]] for r in sel.iter_rows(named=True)]
    return sources


def typing_models(camera_rows: pl.DataFrame) -> list[str]:
    """Typing models (seed 001) that chose the types of a set's frames (``frames.model_id``)."""
    if "typing_model_id" not in camera_rows.columns:
        return []
    return sorted({m for m in camera_rows["typing_model_id"].to_list() if m})


def calibration_id(night: str, camera: str, sources: dict, calibration_digest: str) -> str:
    """Content address of a calibration set: same inputs, calibration parameters and array layout, same id
    (a set stored by code of another layout is rebuilt, not misread)."""
    return digest_of({"night": night, "camera": camera, "sources": sources, "config": calibration_digest,
                      "layout": Calibration.LAYOUT})[:24]


@dataclass
class CalibrationChoice:
    """The calibration set a camera's frames are reduced with, and where it came from."""

    night: str
    camera: str
    calib_id: str
    calib: Calibration | None = None


def method_digests(config: ReductionParams) -> dict[str, str]:
    """Hash of each requested extraction's calibration products' parameters."""
    return {method: config.method_digest(method) for method in config.extractions}


def _serves(meta: dict | None, config: ReductionParams, calib_id: str | None = None) -> bool:
    """True when a stored set's metadata has the common part and every method ``config`` asks for."""
    if not meta or not meta.get("calib_id"):
        return False
    if calib_id is not None and meta["calib_id"] != calib_id:
        return False
    if calib_id is None and meta.get("calibration_digest") != config.calibration_digest():
        return False
    stored = meta.get("methods") or {}
    return all(stored.get(m) == d for m, d in method_digests(config).items())


def save_calibration(lake: Lake, night: str, camera: str, calib: Calibration, meta: dict) -> None:
    """Store a set with its metadata (provenance, parameters, summary figures)."""
    meta = {"night": night, "camera": camera, **meta, **calib.info,
            "wave_rms_median": float(np.median(calib.wave.rms)), "trace_rms_median": float(np.median(calib.traces.rms)),
            "dead_fibers": [int(i) for i in np.flatnonzero(calib.traces.dead)]}
    write_calib_set(lake.calib_path(night, camera), calib.to_arrays(), meta)


def load_calibration(lake: Lake, night: str, camera: str) -> Calibration:
    """Read a stored calibration set back into memory."""
    arrays, meta = read_calib_set(lake.calib_path(night, camera))
    return Calibration.from_arrays(arrays, meta)


def earlier_calibration(lake: Lake, night: str, camera: str, config: ReductionParams) -> CalibrationChoice | None:
    """The nearest earlier night's set of ``camera`` made with the same calibration parameters and
    holding every extraction's products that ``config`` asks for."""
    calib_root = lake.root / "calib"
    if not calib_root.is_dir():
        return None
    nights = sorted((p.name for p in calib_root.iterdir() if p.is_dir() and p.name < night), reverse=True)
    for other in nights:
        meta = read_calib_meta(lake.calib_path(other, camera))
        if _serves(meta, config):
            return CalibrationChoice(night=other, camera=camera, calib_id=meta["calib_id"])
    return None


def choose_calibration(lake: Lake, night: str, camera: str, camera_rows: pl.DataFrame,
                       config: ReductionParams) -> CalibrationChoice:
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
        return CalibrationChoice(night=night, camera=camera,
                                 calib_id=calibration_id(night, camera, sources, config.calibration_digest()))
    earlier = earlier_calibration(lake, night, camera, config)
    if earlier is None:
        missing = ", ".join(t for t in CALIB_OBSTYPES if not sources[t])
        raise LookupError(f"no calibration for {camera}: night {night} has no {missing} frame and no earlier night "
                          f"has a calibration set made with these parameters for {', '.join(config.extractions)}")
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
    """Load the chosen calibration set, building and storing it first when it is the night's own and
    missing, made from other inputs or parameters, or lacking an extraction's products.

    A set is rebuilt with every extraction it held (same ``calib_id``) plus those asked for, so
    adding ``deconv`` to a night keeps its box and optimal products. ``rebuild=True`` rebuilds the
    night's own set regardless; ``rebuild=<run id>`` rebuilds it unless that run already did
    (resumable reprocessing).
    """
    own = not camera_rows.is_empty() and choice.night == camera_rows["night"][0]
    meta = read_calib_meta(lake.calib_path(choice.night, choice.camera))
    built_by = rebuild if isinstance(rebuild, str) else ""
    if built_by:  # a reprocessing run rebuilds each set once, not again when resumed
        rebuild = not (meta and meta.get("built_by") == built_by)
    rebuild = bool(rebuild) and own  # an earlier night's set is used as it is
    serves = _serves(meta, config, choice.calib_id)
    if choice.calib is not None and serves and not rebuild:
        return choice.calib
    if serves and not rebuild:
        choice.calib = load_calibration(lake, choice.night, choice.camera)
        return choice.calib
    if not own:
        raise LookupError(f"calibration set {choice.night}/{choice.camera} changed while in use; run again")
    methods = list(config.extractions)
    if meta and meta.get("calib_id") == choice.calib_id and not rebuild:  # keep the methods it already has
        methods += [m for m in (meta.get("methods") or {}) if m not in methods]
    build_config = config.updated({"extractions": tuple(methods)})
    arm, _ = parse_camera(choice.camera)

    def frames(obstype: str) -> list[np.ndarray]:
        sel = camera_rows.filter(pl.col("obstype") == obstype).sort("expid").to_dicts()
        return [read_raw_frame(lake.root, r["raw_path"]) for r in sel]

    biases, flats, arcs = frames("BIAS"), frames("FLAT"), frames("ARC")
    params = ccd_params_from_row(camera_rows.filter(pl.col("obstype") == "BIAS").row(0, named=True))
    calib = build_calibration(biases, flats, arcs, params, instrument, arm, build_config)
    save_calibration(lake, choice.night, choice.camera, calib, {
        "calib_id": choice.calib_id, "calibration_digest": config.calibration_digest(),
        "methods": method_digests(build_config), "code_version": code_version(), "built_by": built_by,
        "sources": calibration_sources(camera_rows), "config": build_config.science_dict(),
        "typing_models": typing_models(camera_rows),
    })
    choice.calib = calib
    return calib
