"""A run pins its model settings to model ids: the hashes name the exact weights, and the lake holds them."""

from __future__ import annotations

import shutil

import pytest

from fiberlake.jobs.model_pins import MODEL_SETTINGS, pin_models
from fiberlake.processors.params import ReductionParams
from fiberlake.storage import models as store
from fiberlake.storage.layout import Lake
from fiberlake.storage.tables import TableStore


def test_defaults_become_the_shipped_ids_and_land_in_the_lake(tmp_path):
    lake = Lake.at(tmp_path / "lake")
    config = ReductionParams().updated({"extractions": ("box", "cae")})
    pinned = pin_models(lake, config)
    for name, stage in MODEL_SETTINGS.items():
        section, field = name.split(".")
        model_id = getattr(getattr(pinned, section), field)
        assert model_id == store.shipped_dir(stage).name  # the folder of a shipped artifact is its id
        assert (store.artifact_dir(lake.root, stage, model_id) / store.CARD).exists()
        assert store.locate(model_id, stage, str(lake.root)) == store.artifact_dir(lake.root, stage, model_id)
    assert pinned.extraction_digest("cae") != config.extraction_digest("cae")
    assert pinned.extraction_digest("box") == config.extraction_digest("box")  # box uses no model
    rows = TableStore(lake.root / "tables").read("models")
    assert set(rows["stage"].to_pylist()) >= set(MODEL_SETTINGS.values())
    assert pin_models(lake, pinned) == pinned  # an id resolves to itself, nothing added
    assert pin_models(lake, config) == pinned


def test_unused_stages_are_not_pinned_and_a_bad_setting_fails_first(tmp_path):
    lake = Lake.at(tmp_path / "lake")
    config = ReductionParams().updated({"extractions": ("box",), "classify.enabled": False, "denoise.enabled": False})
    assert pin_models(lake, config) == config
    with pytest.raises(store.ArtifactError):
        pin_models(lake, config.updated({"classify.enabled": True, "classify.model": "classify-0000000000000000"}))
    wrong = tmp_path / "wrong"  # a typing artifact named where a denoise model belongs
    shutil.copytree(store.shipped_dir("typing"), wrong)
    with pytest.raises(store.ArtifactError, match="not a 'denoise' model"):
        pin_models(lake, config.updated({"denoise.enabled": True, "denoise.model": str(wrong)}))


def test_a_folder_without_its_row_is_registered_again(tmp_path):
    """A kill between the artifact's copy and its ``models`` commit: the next run adds the row."""
    lake = Lake.at(tmp_path / "lake")
    shipped = store.shipped_dir("denoise")
    shutil.copytree(shipped, store.artifact_dir(lake.root, "denoise", shipped.name))
    config = ReductionParams().updated({"extractions": ("box",), "classify.enabled": False})
    assert pin_models(lake, config).denoise.model == shipped.name
    rows = TableStore(lake.root / "tables").read("models")
    assert rows["model_id"].to_pylist() == [shipped.name]
