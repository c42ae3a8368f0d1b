"""The shipped classify model on simulated exposures it never saw (slow: simulates two exposures)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

HELDOUT_SEED = 1577
"""A seed no training run uses (training 1501/1502, held-out figures 1551/1552)."""


@pytest.fixture(scope="module")
def held():
    from fiberlake.jobs.classify_data import build_dataset, plan_exposures

    return build_dataset(plan_exposures(HELDOUT_SEED, 2, mag_offset=(-2.0, -1.0)))


def test_shipped_model_is_small_and_loads():
    from fiberlake.jobs.train_classify import load_classify_models
    from fiberlake.schemas.tables import LABEL_CLASSES

    nets, card = load_classify_models("default")
    assert tuple(card["classes"]) == LABEL_CLASSES and card["size_bytes"] < 2.5e6
    assert set(nets) == {"drcnet", "rcnet"}


def test_shipped_model_labels_unseen_stars_and_survives_a_missing_arm(held):
    import torch

    from fiberlake.jobs.train_classify import load_classify_models
    from fiberlake.processors.classify import classify_exposure
    from fiberlake.processors.stripes import ArmInputs
    from fiberlake.schemas.tables import LABEL_CLASSES

    torch.set_num_threads(2)
    nets, _ = load_classify_models("default")
    n = held["label"].size

    def arm(a):
        return ArmInputs(stripes=held[f"stripes_{a}"].astype(np.float32), usable=np.ones(n, bool),
                         flux=held[f"flux_{a}"], ivar=held[f"ivar_{a}"], snr=held[f"snr_{a}"])

    both = classify_exposure(arm("b"), arm("r"), nets, classes=LABEL_CLASSES, methods=("drcnet", "rcnet"))
    bright = held["snr_r"] > 30
    assert bright.sum() >= 10
    acc = {m: float((p.argmax(1) == held["label"])[bright].mean()) for m, p in both.probabilities.items()}
    assert acc["drcnet"] > 0.6 and acc["rcnet"] > 0.5, acc          # 7 classes: chance is 0.14
    red_only = classify_exposure(None, arm("r"), nets, classes=LABEL_CLASSES, methods=("drcnet",))
    assert set(red_only.flag) == {"one_arm"} and np.isfinite(red_only.probabilities["drcnet"]).all()
    assert float((red_only.probabilities["drcnet"].argmax(1) == held["label"])[bright].mean()) > 0.3
