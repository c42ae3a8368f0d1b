"""Model artifacts: safetensors weights plus a JSON model card, identified by a content hash.

An artifact is a directory holding two files:

* ``weights.safetensors`` - the network's tensors (safetensors: a JSON header and raw little-endian
  buffers; nothing is executed when it is read, unlike a pickle);
* ``card.json`` - the model card: stage, architecture and its parameters, classes, input shape,
  pre-processing, training command, seeds, data sizes, simulator settings, held-out figures,
  code version, and ``model_id``.

``model_id`` is ``<stage>-`` plus the first 16 hex digits of the SHA-256 of the weights file and
of the card's *definition* (:data:`DEFINITION_KEYS`: what the model computes, not how well it
did), so the same network is the same id wherever it is written and a changed byte is noticed
at load time. The lake keeps artifacts under ``<lake>/models/<stage>/<model_id>/`` and lists them
in the ``models`` table; a small default per stage ships inside the package
(``fiberlake/schemas/data/models/<stage>/<model_id>/``).

Reading is strict: a missing file, a truncated or corrupt weights file, a card that is not JSON
or whose hash does not match its bytes raise :class:`ArtifactError` with one sentence.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import numpy as np

from fiberlake.storage.objectstore import LakeRoot, ObjectPath

WEIGHTS = "weights.safetensors"
CARD = "card.json"
DEFINITION_KEYS: tuple[str, ...] = ("stage", "architecture", "arch_params", "classes", "input_shape", "prep")
"""Card fields that define what a model computes (hashed into ``model_id`` with the weights)."""


class ArtifactError(RuntimeError):
    """A model artifact that cannot be used (missing, truncated, corrupt, not the model it claims)."""


def definition(card: dict) -> dict:
    """The part of a card that defines the model (:data:`DEFINITION_KEYS`)."""
    return {key: card.get(key) for key in DEFINITION_KEYS}


def model_id_of(stage: str, weights_bytes: bytes, card: dict) -> str:
    """Content hash of a model: ``<stage>-<16 hex digits>``."""
    h = hashlib.sha256(weights_bytes)
    h.update(json.dumps(definition(card), sort_keys=True).encode())
    return f"{stage}-{h.hexdigest()[:16]}"


def encode_weights(tensors: dict[str, np.ndarray]) -> bytes:
    """The safetensors bytes of named arrays (keys sorted, so the bytes depend on the values alone)."""
    from safetensors.numpy import save

    return save({name: np.array(tensors[name], order="C", copy=True) for name in sorted(tensors)})  # keeps 0-d


def decode_weights(data: bytes, where: str = "weights") -> dict[str, np.ndarray]:
    """Named arrays of safetensors bytes.

    Raises
    ------
    ArtifactError
        If the bytes are not a complete safetensors file.
    """
    from safetensors.numpy import load

    if len(data) < 8:
        raise ArtifactError(f"{where} is truncated ({len(data)} bytes): not a safetensors file")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise ArtifactError(f"{where} is truncated: its header needs {header_len} bytes, {len(data) - 8} are there")
    try:
        header = json.loads(data[8:8 + header_len])
        end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] or [0])
    except (ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{where} is not a safetensors file ({err})") from None
    if 8 + header_len + end != len(data):
        raise ArtifactError(f"{where} is truncated or padded: {len(data)} bytes, its header describes "
                            f"{8 + header_len + end}")
    try:
        return load(data)
    except Exception as err:  # safetensors raises its own error types
        raise ArtifactError(f"{where} cannot be read as safetensors: {err}") from None


def write_artifact(directory: LakeRoot | str, tensors: dict[str, np.ndarray], card: dict) -> dict:
    """Write an artifact (weights, then the card last) and return the card with its ``model_id``.

    ``directory`` is the artifact's own folder; see :func:`artifact_dir` for the lake's layout.
    The card is written after the weights, so a folder with a card is complete.
    """
    data = encode_weights(tensors)
    card = dict(card)
    card["model_id"] = model_id_of(card["stage"], data, card)
    card["weights_sha256"] = hashlib.sha256(data).hexdigest()
    card["size_bytes"] = len(data)
    text = json.dumps(card, indent=2, sort_keys=True, default=_json_default) + "\n"
    root = directory if isinstance(directory, ObjectPath) else Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if isinstance(root, ObjectPath):
        (root / WEIGHTS).write_bytes(data)
        (root / CARD).write_text(text)
    else:
        for name, payload in ((WEIGHTS, data), (CARD, text.encode())):
            tmp = root / f".{name}.tmp"
            tmp.write_bytes(payload)
            os.replace(tmp, root / name)
    return card


def write_artifact_named(out: str | Path, tensors: dict[str, np.ndarray], card: dict, stage: str) -> tuple[dict, Path]:
    """Write an artifact into ``out/<model_id>/`` (through a temporary folder, then one rename).

    Returns
    -------
    tuple of (dict, Path)
        The card (with ``model_id``) and the artifact's folder.
    """
    import shutil

    tmp = Path(out) / f".incoming-{stage}"
    card = write_artifact(tmp, tensors, card)
    path = Path(out) / card["model_id"]
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return card, path


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_artifact(directory: LakeRoot | str) -> tuple[dict[str, np.ndarray], dict]:
    """Weights and card of an artifact, checked against the card's ``model_id``.

    Raises
    ------
    ArtifactError
        Missing folder or file, a card that is not JSON, truncated or corrupt weights, or
        weights whose hash is not the card's ``model_id``.
    """
    root = directory if isinstance(directory, ObjectPath) else Path(directory)
    for name in (CARD, WEIGHTS):
        if not (root / name).exists():
            raise ArtifactError(f"model artifact {root} has no {name}")
    try:
        card = json.loads((root / CARD).read_text())
    except ValueError as err:
        raise ArtifactError(f"model card {root / CARD} is not JSON ({err})") from None
    for key in DEFINITION_KEYS + ("model_id",):
        if key not in card:
            raise ArtifactError(f"model card {root / CARD} lacks {key!r}")
    data = (root / WEIGHTS).read_bytes()
    tensors = decode_weights(data, str(root / WEIGHTS))
    expected = model_id_of(card["stage"], data, card)
    if expected != card["model_id"]:
        raise ArtifactError(f"model artifact {root}: its weights and card hash to {expected}, "
                            f"the card says {card['model_id']} (changed or corrupt)")
    return tensors, card


def artifact_dir(lake_root: LakeRoot, stage: str, model_id: str) -> LakeRoot:
    """``<lake>/models/<stage>/<model_id>``."""
    for part, what in ((stage, "stage"), (model_id, "model id")):
        if not part or "/" in part or ".." in part:
            raise ArtifactError(f"{what} {part!r} is not a safe path component")
    return lake_root / "models" / stage / model_id


def shipped_dir(stage: str) -> Path:
    """The default model of ``stage`` shipped with the package.

    Raises
    ------
    ArtifactError
        If the package holds none (or more than one) for the stage.
    """
    base = Path(str(resources.files("fiberlake.schemas").joinpath("data", "models", stage)))
    found = sorted(p for p in base.iterdir() if (p / CARD).exists()) if base.is_dir() else []
    if len(found) != 1:
        raise ArtifactError(f"the package ships {len(found)} default models for stage {stage!r} under {base} "
                            f"(expected exactly one; 'fiberlake train {stage}' makes one)")
    return found[0]


def ship(directory: str | Path, stage: str) -> Path:
    """Make an artifact the package's default model of ``stage`` (replacing the one shipped before).

    For maintainers regenerating the default (``fiberlake train typing --ship``): the artifact is
    read back (and so checked) before anything is replaced.
    """
    import shutil

    _, card = read_artifact(Path(directory))
    base = Path(str(resources.files("fiberlake.schemas").joinpath("data", "models", stage)))
    target = base / card["model_id"]
    if base.is_dir():
        for old in base.iterdir():
            if old.is_dir() and old.name != target.name:
                shutil.rmtree(old)
    shutil.copytree(Path(directory), target, dirs_exist_ok=True)
    return target


def locate(source: str, stage: str, lake_root: LakeRoot | str | None = None) -> LakeRoot:
    """The artifact folder a model setting names: ``default``, a folder path, or a model id in the lake.

    Raises
    ------
    ArtifactError
        If nothing matches.
    """
    if source == "default":
        return shipped_dir(stage)
    if isinstance(lake_root, str):  # a lake root given as text (a path or an s3:// URL)
        from fiberlake.storage.objectstore import as_root

        lake_root = as_root(lake_root)
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if lake_root is not None and source.startswith(f"{stage}-"):
        candidate = artifact_dir(lake_root, stage, source)
        if (candidate / CARD).exists():
            return candidate
    try:
        shipped = shipped_dir(stage)
        if shipped.name == source:
            return shipped
    except ArtifactError:
        pass
    raise ArtifactError(f"no {stage} model {source!r}: not 'default', not a folder"
                        + ("" if lake_root is None else f", not in {lake_root}/models/{stage}/"))


def _number(value) -> float | None:
    """A card's figure as a float column value (None when absent or not a number)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def stage_card(source: str, stage: str, lake_root: LakeRoot | str | None = None) -> dict:
    """The card of the model a setting names (:func:`locate`), checked against its weights and its stage,
    without building a network (the driver of a stage whose networks run on the reducers).

    Raises
    ------
    ArtifactError
        As :func:`read_artifact`, or a model of another stage.
    """
    _, card = read_artifact(locate(source, stage, lake_root))
    if card.get("stage") != stage:
        raise ArtifactError(f"model {card.get('model_id')} is a {card.get('stage')!r} model, not {stage!r}")
    return card


def models_row(card: dict, path: str, source: str, registered_at) -> dict:
    """The ``models`` table row of an artifact (see :data:`fiberlake.schemas.tables.MODELS`)."""
    figures = card.get("heldout", {}) or {}
    n_parameters = card.get("n_parameters", 0)
    if isinstance(n_parameters, dict):  # an artifact of several networks (DRC-Net and RC-Net): their sum
        n_parameters = sum(int(n) for n in n_parameters.values())
    return {
        "night": registered_at.strftime("%Y-%m-%d"),
        "stage": card["stage"],
        "model_id": card["model_id"],
        "architecture": card["architecture"],
        "n_parameters": int(n_parameters),
        "size_bytes": int(card.get("size_bytes", 0)),
        "path": path,
        "source": source,
        "code_version": card.get("code_version", ""),
        "heldout_accuracy": _number(figures.get("final_accuracy")),
        "heldout_unknown": _number(figures.get("unknown_rate")),
        "card_json": json.dumps(card, sort_keys=True),
        "registered_at": registered_at,
    }
