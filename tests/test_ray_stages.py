"""The neural stages after the products on Ray actors: the same labels and denoised spectra as in process.

The shared reduced mini night (tests/qa_night.py: b1 and r1, two science exposures and a standard, box
extraction, stages off) is copied twice; ``process_night`` with the stages on then finds every frame
and product done and runs only the stages: once in this process, once on two Ray actors.
"""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
import ray

from fiberlake.jobs import executors
from fiberlake.jobs.process import Executor, process_night
from fiberlake.processors.params import ReductionParams
from fiberlake.storage.layout import Lake
from fiberlake.storage.tables import TableStore
from tests.qa_night import reduced_night

pytestmark = pytest.mark.slow  # reduces a night, then starts Ray actors

STAGES = ReductionParams().updated({
    "extractions": ("box",), "cosmics.enabled": False,            # the shared night's reduction
    "classify.methods": ("drcnet", "rcnet"),                     # the networks (the template fit runs in the driver's
                                                                 # code path all the same, but costs seconds a group)
    "denoise.steps": 4, "denoise.batch": 8, "denoise.cpu_threads": 1,
    "execution.denoise_chunk": 8,                                # several chunks per exposure: gathered in the driver
})
FLOAT_RTOL = 1e-4
"""Relative tolerance of the float columns: the actors run torch on one thread like the driver
(``denoise.cpu_threads`` 1), but their thread pools are their own."""
LABEL_ATOL = 1e-5
"""Absolute tolerance of the class probabilities."""


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    night = reduced_night(tmp_path_factory)
    yield night
    ray.shutdown()


def _copy(night, path) -> Lake:
    shutil.copytree(night.lake.root, path)
    return Lake.at(path)


def _table(lake: Lake, name: str, keys: list[str]) -> pl.DataFrame:
    drop = ["run_id", "made_at"]
    return TableStore(lake.root / "tables").scan(name).collect().drop(drop).sort(keys)


def _assert_same(got: pl.DataFrame, want: pl.DataFrame, keys: list[str], what: str) -> None:
    assert got.height == want.height and got.height > 0, f"{what}: {got.height} rows, in process {want.height}"
    assert got.columns == want.columns
    assert got.select(keys).equals(want.select(keys)), f"{what}: other keys than in process"
    for col in got.columns:
        a, b = got[col], want[col]
        if a.dtype in (pl.Float32, pl.Float64):
            np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=FLOAT_RTOL, atol=LABEL_ATOL,
                                       err_msg=f"{what}.{col}")
        elif isinstance(a.dtype, pl.List) and a.dtype.inner in (pl.Float32, pl.Float64):
            x, y = np.concatenate(a.to_numpy()), np.concatenate(b.to_numpy())
            np.testing.assert_allclose(x, y, rtol=FLOAT_RTOL, atol=FLOAT_RTOL * np.abs(y).max(), err_msg=f"{what}.{col}")
        else:
            assert a.equals(b), f"{what}.{col} differs from in process"


def test_stages_on_ray_actors_give_the_in_process_rows(template, tmp_path, monkeypatch):
    local = _copy(template, tmp_path / "local")
    report = process_night(local, template.night, config=STAGES)
    assert not report.done and report.products.denoise.joined > 0 and report.products.classify.labels > 0
    assert not report.products.denoise.failed and not report.products.classify.failed

    made, methods = [], []
    real_init, real_map = executors.RayPool.__init__, executors.RayPool.map

    def counting_init(self, *a, **k):
        made.append(self)
        real_init(self, *a, **k)

    def recording_map(self, method, calls):
        methods.append(method)
        return real_map(self, method, calls)

    monkeypatch.setattr(executors.RayPool, "__init__", counting_init)
    monkeypatch.setattr(executors.RayPool, "map", recording_map)
    on_ray = _copy(template, tmp_path / "ray")
    report = process_night(on_ray, template.night, config=STAGES, executor=Executor(kind="ray", actors=2))
    assert not report.products.denoise.failed and not report.products.classify.failed
    assert len(made) == 1 and methods == ["denoise_chunk", "classify_group"], (len(made), methods)

    label_keys = ["night", "expid", "spectrograph", "fiber", "method"]
    _assert_same(_table(on_ray, "labels", label_keys), _table(local, "labels", label_keys), label_keys, "labels")
    dn_keys = ["night", "source", "extraction", "scope", "expid", "spectrograph", "fiber", "targetid"]
    got, want = _table(on_ray, "spectra_denoised", dn_keys), _table(local, "spectra_denoised", dn_keys)
    assert set(want["source"].to_list()) == {"joined", "coadds"}
    assert want.filter(pl.col("source") == "joined").group_by("expid").len()["len"].max() > 8  # > 1 chunk
    _assert_same(got, want, dn_keys, "spectra_denoised")
