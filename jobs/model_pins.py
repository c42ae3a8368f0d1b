"""Model settings pinned to model ids at the start of a run: what a product was made with is a hash, not a name.

A reduction parameter such as ``cae.model = "default"`` names whatever model the installed package
ships: a new release that ships a retrained default would leave the name, and so every hash and
marker, unchanged while the products change. Before anything is decided, a run replaces each
model setting of the stages it will run by the ``model_id`` of the artifact it resolves to (and
copies that artifact into the lake's ``models/<stage>/`` with a ``models`` row, so the id resolves
on any machine that reads the lake, Ray actors included). The ``runs`` row, the reduction markers
and the products' hashes then name the exact weights, and a new default re-decides what it touches.
"""

from __future__ import annotations

from fiberlake.processors.params import ReductionParams
from fiberlake.storage import models as store
from fiberlake.storage.layout import Lake

# parameter path -> model stage (the folder under models/ and the card's "stage")
MODEL_SETTINGS: dict[str, str] = {"cae.model": "deconvolve", "classify.model": "classify", "denoise.model": "denoise"}


def settings_in_use(config: ReductionParams) -> list[str]:
    """The model settings of the stages ``config`` runs (an unused stage's model is not needed)."""
    used = {"cae.model": "cae" in config.extractions, "classify.model": config.classify.enabled,
            "denoise.model": config.denoise.enabled}
    return [name for name in MODEL_SETTINGS if used[name]]


def _registered(lake: Lake, stage: str, model_id: str) -> bool:
    """Whether the lake holds the artifact and its ``models`` row (both are written by ``register_model``)."""
    from fiberlake.storage.tables import TableStore

    if not (store.artifact_dir(lake.root, stage, model_id) / store.CARD).exists():
        return False
    rows = TableStore(lake.root / "tables").read("models", filters=[("stage", "=", stage), ("model_id", "=", model_id)],
                                                 columns=["model_id"])
    return rows.num_rows > 0


def pin_models(lake: Lake, config: ReductionParams) -> ReductionParams:
    """``config`` with every model setting of the stages it runs replaced by a model id in the lake.

    Parameters
    ----------
    lake : Lake
        The lake (the caller holds its writer lock: artifacts and ``models`` rows may be added).
    config : ReductionParams
        Reduction parameters whose model settings may be ``default``, a folder, or a model id.

    Returns
    -------
    ReductionParams
        The same parameters, model settings replaced by model ids.

    Raises
    ------
    fiberlake.storage.models.ArtifactError
        If a setting resolves to no artifact, or to a corrupt one (before any frame is touched).
    """
    from fiberlake.jobs.train import register_model

    pins = {}
    for name in settings_in_use(config):
        stage = MODEL_SETTINGS[name]
        section, field = name.split(".")
        source = getattr(getattr(config, section), field)
        directory = store.locate(source, stage, lake.root)
        _, card = store.read_artifact(directory)  # checks the weights' hash against the card
        if card.get("stage") != stage:
            raise store.ArtifactError(f"{name} = {source!r} is a {card.get('stage')!r} model, not a {stage!r} model")
        if not _registered(lake, stage, card["model_id"]):  # its folder may exist without its row (a kill between)
            register_model(lake, directory, source="pinned by a run" if source != "default" else "shipped default")
        pins[name] = card["model_id"]
    return config.updated(pins) if pins else config
