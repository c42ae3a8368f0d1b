"""Frame typing at ingest: pixels to a type, header and pixel types to the type the pipeline uses.

The ingest job calls :func:`prepare_for_typing` on each frame while its pixels are in memory
(keeping a 136 kB image), then :func:`type_prepared` once per batch: images and header types in,
one ``frames`` row per frame out (:data:`fiberlake.schemas.tables.FRAMES`, without the commit
time). :func:`type_frames` does both for raw arrays. Pure: the model comes in as a
:class:`~fiberlake.processors.spit.FrameTyper`.

The routing rule (:func:`route`, mode ``typing.routing``):

``auto`` (default)
    The header type stays primary, as in PypeIt. The pixels take over, and the row is
    flagged, when the header type is missing (or not a known type: ``header_missing``), or when
    it is contradicted by the pixels with at least ``min_flips`` of the 4 flips agreeing and a
    mean probability of at least ``min_confidence`` (``header_overridden``). A weaker
    disagreement keeps the header and flags ``disagree``.
``header``
    The header type always: the classical rules alone. Disagreements are flagged, never acted on.
``pixels``
    The pixel type whenever the final scheme decided one, else the header type.

A frame with no usable header type and no pixel type is ``UNKNOWN`` (``untypable``): the
calibration sets leave it out. Calibration sets are built from ``type_used`` so that a bias
labelled ARC never enters a master arc.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fiberlake.processors.spit import UNKNOWN, FrameTyper, vote
from fiberlake.processors.typing_prep import (PAPER_CHANNELS, frame_defect, prepare_channels, prepare_frame,
                                              prepare_with_scalars)
from fiberlake.schemas.header import OBSTYPES

ROUTING_MODES = ("auto", "header", "pixels")


@dataclass(frozen=True)
class Routing:
    """The decision for one frame."""

    type_used: str
    routed_by: str
    """``header`` or ``pixels``."""
    flag: str | None
    """None or ``header_missing``, ``header_overridden``, ``disagree``, ``untypable``, ``pixels_unknown``."""


def normalise_header_type(value: object) -> str | None:
    """A header OBSTYPE as one of :data:`~fiberlake.schemas.header.OBSTYPES`, or None when missing or unknown."""
    if not isinstance(value, str):
        return None
    text = value.strip().upper()
    return text if text in OBSTYPES else None


def route(type_header: object, type_pixels: str, flips_agreeing: int, confidence: float, mode: str = "auto",
          min_flips: int = 4, min_confidence: float = 0.9) -> Routing:
    """The type the pipeline acts on (see the module's description of the modes).

    Examples
    --------
    >>> route("ARC", "BIAS", 4, 0.99).type_used
    'BIAS'
    >>> route("ARC", "BIAS", 3, 0.99).type_used, route("ARC", "BIAS", 3, 0.99).flag
    ('ARC', 'disagree')
    >>> route(None, "FLAT", 3, 0.7).flag
    'header_missing'
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"routing mode {mode!r} is not one of {', '.join(ROUTING_MODES)}")
    header = normalise_header_type(type_header)
    known = type_pixels != UNKNOWN and type_pixels in OBSTYPES
    if header is None:
        if known and mode != "header":
            return Routing(type_pixels, "pixels", "header_missing")
        return Routing(UNKNOWN, "header", "untypable")
    if not known:
        return Routing(header, "header", "pixels_unknown")
    if type_pixels == header:
        return Routing(header, "header", None)
    if mode == "pixels":
        return Routing(type_pixels, "pixels", "header_overridden")
    if mode == "auto" and flips_agreeing >= min_flips and confidence >= min_confidence:
        return Routing(type_pixels, "pixels", "header_overridden")
    return Routing(header, "header", "disagree")


@dataclass(frozen=True)
class Prepared:
    """A frame ready for the network: its pre-processed image, or why it cannot be typed."""

    image: np.ndarray | None
    """uint8 ``(210, 650)`` (:func:`~fiberlake.processors.typing_prep.prepare_frame`), or ``(C, 210, 650)``
    for a model of several input channels (``prepare_channels``); None when untypable."""
    defect: str | None
    """``blank``, ``saturated``, ``not finite``, ``empty`` or None."""
    scalars: np.ndarray | None = None
    """float32 ``(S,)`` per-frame scalars (:func:`~fiberlake.processors.typing_prep.frame_scalars`) for a
    model that reads them; None otherwise."""


def prepare_for_typing(raw: np.ndarray, saturation: float | None = 65535, dispersion_axis: int = 0,
                       channels: tuple[str, ...] = PAPER_CHANNELS, scalars: tuple[str, ...] = ()) -> Prepared:
    """Pre-process one raw frame (call it while the frame's pixels are in memory; keep only the 136 kB
    per channel result). ``channels``, ``scalars``: the model's input channels and per-frame scalars
    (:attr:`FrameTyper.channels`, :attr:`FrameTyper.scalars`)."""
    defect = frame_defect(raw, saturation)
    if defect:
        return Prepared(None, defect)
    if scalars:
        image, values = prepare_with_scalars(raw, channels, scalars, dispersion_axis)
        return Prepared(image[0] if tuple(channels) == PAPER_CHANNELS else image, None, values)
    if tuple(channels) == PAPER_CHANNELS:
        return Prepared(prepare_frame(raw, dispersion_axis), None)
    return Prepared(prepare_channels(raw, channels, dispersion_axis), None)


def type_prepared(typer: FrameTyper | None, prepared: list[Prepared], header_types: list[object], keys: list[dict], *,
                  routing: str = "auto", min_flips: int = 4, min_confidence: float = 0.9,
                  super_majority: int = 3) -> list[dict]:
    """Type a batch of pre-processed frames (one forward pass per ``typer.batch``) and route them.

    Parameters
    ----------
    typer : FrameTyper or None
        The model; None when typing is off (every frame then goes by its header; ``model_id`` null).
    prepared : list of Prepared
        :func:`prepare_for_typing` of each frame.
    header_types : list
        OBSTYPE of each header (None when missing).
    keys : list of dict
        ``night``, ``expid``, ``camera``, ``file_version``, ``pixel_sha256`` of each frame.
    routing, min_flips, min_confidence, super_majority
        :class:`~fiberlake.processors.params.TypingParams`.

    Returns
    -------
    list of dict
        One ``frames`` row per frame, without ``typed_at``.
    """
    if not (len(prepared) == len(header_types) == len(keys)):
        raise ValueError("prepared, header_types and keys must have one entry per frame")
    n = len(prepared)
    pixel_types = [UNKNOWN] * n
    classes: tuple[str, ...] = typer.classes if typer is not None else OBSTYPES
    probs = np.full((n, len(classes)), np.nan)
    agreeing = np.zeros(n, dtype=np.int64)
    confidence = np.full(n, np.nan)
    todo = [i for i in range(n) if prepared[i].image is not None]
    if typer is not None and todo:
        scalars = np.stack([prepared[i].scalars for i in todo]) if typer.scalars else None
        types, votes = typer.type_images(np.stack([prepared[i].image for i in todo]), super_majority, scalars)
        for j, i in enumerate(todo):
            pixel_types[i] = types[j]
        probs[todo] = votes.probabilities
        agreeing[todo] = votes.flips_agreeing
        confidence[todo] = votes.confidence
    mode = routing if typer is not None else "header"
    rows = []
    for i in range(n):
        decision = route(header_types[i], pixel_types[i], int(agreeing[i]),
                         float(confidence[i]) if np.isfinite(confidence[i]) else 0.0, mode, min_flips, min_confidence)
        header = header_types[i].strip().upper() if isinstance(header_types[i], str) else None
        row = {k: keys[i].get(k) for k in ("night", "expid", "camera", "file_version", "pixel_sha256")}
        row.update({
            "type_header": header or None,
            "type_pixels": pixel_types[i] if typer is not None else None,
            "flips_agreeing": int(agreeing[i]),
            "confidence": float(confidence[i]) if np.isfinite(confidence[i]) else None,
            "type_agree": bool(typer is not None and pixel_types[i] != UNKNOWN and pixel_types[i] == header),
            "type_used": decision.type_used,
            "routed_by": decision.routed_by,
            "type_flag": decision.flag if typer is not None or decision.flag == "untypable" else None,
            "untypable": prepared[i].defect if typer is not None else None,
            "routing": mode,
            "model_id": typer.model_id if typer is not None else None,
        })
        for c in OBSTYPES:
            value = probs[i, classes.index(c)] if c in classes else np.nan
            row[f"p_{c.lower()}"] = float(value) if np.isfinite(value) else None
        rows.append(row)
    return rows


def type_frames(typer: FrameTyper | None, raws: list[np.ndarray], header_types: list[object], keys: list[dict], *,
                routing: str = "auto", min_flips: int = 4, min_confidence: float = 0.9, super_majority: int = 3,
                saturation: float | None = 65535, dispersion_axis: int = 0) -> list[dict]:
    """:func:`prepare_for_typing` of every raw frame, then :func:`type_prepared`: raw arrays and header
    types in, one ``frames`` row per frame out (without ``typed_at``)."""
    channels = typer.channels if typer is not None else PAPER_CHANNELS
    scalars = typer.scalars if typer is not None else ()
    prepared = [prepare_for_typing(raw, saturation, dispersion_axis, channels, scalars) for raw in raws]
    return type_prepared(typer, prepared, header_types, keys, routing=routing, min_flips=min_flips,
                         min_confidence=min_confidence, super_majority=super_majority)

CALIBRATION_TYPES = ("BIAS", "DARK", "FLAT", "ARC")
"""Types from which calibration sets are built (compared by :func:`header_audit`)."""


def header_audit(flip_probabilities: np.ndarray, labels: np.ndarray, classes: tuple[str, ...] | list[str],
                 groups: np.ndarray | None = None, *, fraction: float = 0.05, missing_share: float = 0.5,
                 trials: int = 200, seed: int = 0, routing: str = "auto", min_flips: int = 4,
                 min_confidence: float = 0.9, super_majority: int = 3) -> dict:
    """How the routing rule handles a night whose headers are partly wrong or missing.

    In each trial ``fraction`` of the frames get a bad header: ``missing_share`` of them none,
    the others a wrong type drawn from the other classes. Every frame is routed
    (:func:`route`) with its pixel type from the model's outputs.

    Parameters
    ----------
    flip_probabilities : ndarray, shape (N, 4, n_classes)
    labels : ndarray of int, shape (N,)
        True class of each frame (the header of an untouched frame).
    classes : sequence of str
    groups : ndarray, shape (N,), optional
        Night-and-camera of each frame: calibration sets are compared per group.

    Returns
    -------
    dict
        ``caught`` (bad headers flagged and routed by pixels), ``corrected`` (bad headers whose
        ``type_used`` is the true type), ``false_alarm`` (good headers overridden),
        ``disagree_flagged`` (good headers kept but flagged), ``calib_equal_routing`` and
        ``calib_equal_header`` (fraction of group calibration sets, over the groups a bad header
        touched, whose frames of each calibration type are exactly the true ones: with the
        routing rule, and with the header rules alone), counts of each.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.size
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
    votes = vote(flip_probabilities, super_majority)
    pixel = [classes[i] if i >= 0 else UNKNOWN for i in votes.index]
    truth = [classes[i] for i in labels]
    rng = np.random.default_rng(seed)
    m = max(1, int(round(fraction * n)))
    bad_total = caught = corrected = good_total = false_alarm = disagree = 0
    touched = equal_routing = equal_header = 0
    for _ in range(trials):
        chosen = rng.choice(n, size=m, replace=False)
        headers: list[str | None] = list(truth)
        for j, i in enumerate(chosen):
            if j < int(round(missing_share * m)):
                headers[i] = None
            else:
                others = [c for c in classes if c != truth[i]]
                headers[i] = others[int(rng.integers(len(others)))]
        used = []
        bad = np.zeros(n, dtype=bool)
        bad[chosen] = True
        for i in range(n):
            decision = route(headers[i], pixel[i], int(votes.flips_agreeing[i]), float(votes.confidence[i]), routing,
                             min_flips, min_confidence)
            used.append(decision.type_used)
            if bad[i]:
                bad_total += 1
                caught += decision.flag in ("header_missing", "header_overridden")
                corrected += decision.type_used == truth[i]
            else:
                good_total += 1
                false_alarm += decision.type_used != truth[i]
                disagree += decision.flag == "disagree"
        for g in np.unique(groups[chosen]):
            members = np.flatnonzero(groups == g)
            touched += 1
            ok_route = all({i for i in members if used[i] == t} == {i for i in members if truth[i] == t}
                           for t in CALIBRATION_TYPES)
            ok_header = all({i for i in members if headers[i] == t} == {i for i in members if truth[i] == t}
                            for t in CALIBRATION_TYPES)
            equal_routing += ok_route
            equal_header += ok_header
    return {
        "trials": trials, "frames": n, "bad_per_trial": m, "routing": routing,
        "caught": caught / max(1, bad_total), "corrected": corrected / max(1, bad_total),
        "false_alarm": false_alarm / max(1, good_total), "disagree_flagged": disagree / max(1, good_total),
        "calib_equal_routing": equal_routing / max(1, touched), "calib_equal_header": equal_header / max(1, touched),
        "bad_headers": bad_total, "good_headers": good_total, "groups_touched": touched,
    }
