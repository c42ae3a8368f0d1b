"""The neural stages after the products on Ray actors: the same labels and denoised spectra as in process.

A reduced mini night (b1 and r1, one science exposure with 4 standards and a standard exposure, box
extraction, stages off; tests/qa_night.py's night, with a second science exposure, took the test to 98 s
on two free cores) is copied twice; ``process_night`` with the stages on then finds every frame and
product done and runs only the stages: once in this process, once on two Ray actors.
"""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
import ray

from fiberlake.jobs import executors
from fiberlake.jobs.denoise_stage import DenoiseReport, _Group, _run_groups
from fiberlake.jobs.process import Executor, process_night
from fiberlake.jobs.reduce_worker import UnitResult
from fiberlake.processors.params import DenoiseParams, ReductionParams
from fiberlake.storage.layout import Lake
from fiberlake.storage.tables import TableStore
from tests.stages import LIGHT_PRODUCTS

STAGES = ReductionParams().updated({
    "extractions": ("box",), "cosmics.enabled": False,            # the night's reduction
    "fluxcal.max_standards": 2,                                  # as the template's (tests/stages.py LIGHT_PRODUCTS)
    "classify.methods": ("drcnet", "rcnet"),                     # the networks (the template fit, no network,
                                                                 # runs in the same call and costs seconds a group)
    "denoise.steps": 4, "denoise.batch": 8, "denoise.cpu_threads": 1,
    "execution.denoise_chunk": 8,                                # several chunks per exposure: gathered in the driver
})
FLOAT_RTOL = 1e-4
"""Relative tolerance of the float columns: the actors run torch on one thread like the driver
(``denoise.cpu_threads`` 1), but their thread pools are their own."""
LABEL_ATOL = 1e-5
"""Absolute tolerance of the class probabilities."""


NIGHT = "2026-12-14"
SEED = 1803


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Lake:
    """The reduced night's lake (frames and products, no labels, nothing denoised)."""
    from fiberlake.ingest.simulate import simulate_night
    from fiberlake.jobs.ingest import ingest_night

    root = tmp_path_factory.mktemp("ray-stages")
    simulate_night("mini", NIGHT, root / "sim", seed=SEED, n_bias=1, n_flat=1, n_arc=1, n_science=1, n_standard=1,
                   std_per_spectrograph=4)
    lake = Lake.at(root / "lake")
    ingest_night(lake, root / "sim" / NIGHT, instrument="mini")
    report = process_night(lake, NIGHT, config=STAGES.updated(LIGHT_PRODUCTS))
    assert len(report.done) == 4 and not report.failed and not report.products.failed, report.summary()
    yield lake
    ray.shutdown()


def _copy(lake: Lake, path) -> Lake:
    shutil.copytree(lake.root, path)
    return Lake.at(path)


def _table(lake: Lake, name: str, keys: list[str]) -> pl.DataFrame:
    drop = ["run_id", "made_at"]
    return TableStore(lake.root / "tables").scan(name).collect().drop(drop).sort(keys)


def _assert_same(got: pl.DataFrame, want: pl.DataFrame, keys: list[str], what: str) -> None:
    assert got.height == want.height and got.height > 0, f"{what}: {got.height} rows, in process {want.height}"
    assert got.columns == want.columns
    assert got.select(keys).equals(want.select(keys)), f"{what}: other keys than in process"
    largest = 0.0
    for col in got.columns:
        a, b = got[col], want[col]
        if a.dtype in (pl.Float32, pl.Float64):
            x, y = a.to_numpy(), b.to_numpy()
            np.testing.assert_allclose(x, y, rtol=FLOAT_RTOL, atol=LABEL_ATOL, err_msg=f"{what}.{col}")
        elif isinstance(a.dtype, pl.List) and a.dtype.inner in (pl.Float32, pl.Float64):
            x, y = np.concatenate(a.to_numpy()), np.concatenate(b.to_numpy())
            np.testing.assert_allclose(x, y, rtol=FLOAT_RTOL, atol=FLOAT_RTOL * np.abs(y).max(), err_msg=f"{what}.{col}")
        else:
            assert a.equals(b), f"{what}.{col} differs from in process"
            continue
        scale = np.nanmax(np.abs(y), initial=0.0)
        if scale > 0:
            largest = max(largest, float(np.nanmax(np.abs(x - y), initial=0.0) / scale))
    print(f"{what}: {got.height} rows, largest float difference {largest:.2e} of its column's largest value")


@pytest.mark.slow  # reduces a night, then starts Ray actors
def test_stages_on_ray_actors_give_the_in_process_rows(template, tmp_path, monkeypatch):
    local = _copy(template, tmp_path / "local")
    report = process_night(local, NIGHT, config=STAGES)
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
    report = process_night(on_ray, NIGHT, config=STAGES, executor=Executor(kind="ray", actors=2))
    assert not report.products.denoise.failed and not report.products.classify.failed
    assert len(made) == 1 and methods == ["denoise_chunk", "classify_group"], (len(made), methods)

    label_keys = ["night", "expid", "spectrograph", "fiber", "method"]
    _assert_same(_table(on_ray, "labels", label_keys), _table(local, "labels", label_keys), label_keys, "labels")
    dn_keys = ["night", "source", "extraction", "scope", "expid", "spectrograph", "fiber", "targetid"]
    got, want = _table(on_ray, "spectra_denoised", dn_keys), _table(local, "spectra_denoised", dn_keys)
    assert set(want["source"].to_list()) == {"joined", "coadds"}
    assert want.filter(pl.col("source") == "joined").group_by("expid").len()["len"].max() > 8  # > 1 chunk
    _assert_same(got, want, dn_keys, "spectra_denoised")


class _FakePool:
    """Runs ``denoise_chunk`` calls in order: a chunk whose first row is in ``fail`` gives an error, one in
    ``lost`` a dead actor's exception; the others one output per row (its row index)."""

    def __init__(self, fail=(), lost=()):
        self.fail, self.lost, self.sent = set(fail), set(lost), []

    def map(self, method, calls):
        assert method == "denoise_chunk"
        for (unit,) in calls:
            self.sent.append((unit.group, unit.start, unit.source.height))
            key = (unit.group, unit.start)
            if key in self.lost:
                yield (unit,), RuntimeError("actor died")
            elif key in self.fail:
                yield (unit,), UnitResult(error="ValueError: bad chunk", error_kind="data")
            else:
                yield (unit,), UnitResult(rows=[{"row": unit.start + i} for i in range(unit.source.height)])


def _group(name, n, whole, committed):
    source = pl.DataFrame({"loglam_min": [3.6] * n, "dloglam": [1e-4] * n, "flam": [[1.0]] * n,
                           "flam_ivar": [[1.0]] * n, "flam_mask": [[0]] * n})
    return _Group(name=name, source=source, commit=lambda outs: committed.append((name, list(outs))), whole=whole)


def test_chunks_are_gathered_per_group_and_failures_recorded_per_chunk():
    committed, report = [], DenoiseReport()
    groups = [_group("joined 1/1/box", 20, True, committed), _group("joined 2/1/box", 20, True, committed),
              _group("coadds n/box", 20, False, committed), _group("joined 3/1/box", 5, True, committed)]
    pool = _FakePool(fail={(1, 8)}, lost={(2, 16)})
    _run_groups(pool, iter(groups), 8, DenoiseParams(), "denoise-x", lambda: False, report)
    assert [(g, s) for g, s, _ in pool.sent] == [(0, 0), (0, 8), (0, 16), (1, 0), (1, 8), (1, 16), (2, 0), (2, 8),
                                                  (2, 16), (3, 0)]
    assert [n for n, _ in committed] == ["joined 1/1/box", "coadds n/box", "joined 3/1/box"]  # joined 2 only whole
    assert committed[0][1] == [{"row": i} for i in range(20)]                    # the chunks in their rows' order
    assert committed[1][1][16:] == [None] * 4 and committed[1][1][15] == {"row": 15}  # coadds without the lost chunk
    assert report.failed == {"joined 2/1/box rows 8-15": "ValueError: bad chunk",
                             "coadds n/box rows 16-19": "worker lost: RuntimeError: actor died"}


def test_stop_is_checked_between_groups():
    committed, report = [], DenoiseReport()
    groups = [_group("joined 1/1/box", 20, True, committed), _group("joined 2/1/box", 20, True, committed)]
    pool = _FakePool()
    _run_groups(pool, iter(groups), 8, DenoiseParams(), "denoise-x", lambda: bool(committed), report)
    assert [n for n, _ in committed] == ["joined 1/1/box"] and {g for g, _, _ in pool.sent} == {0}


def test_a_group_that_fails_on_its_reducer_is_recorded_not_committed():
    from fiberlake.jobs.classify_stage import ClassifyReport, LabelUnit, _commit_group

    unit = LabelUnit(night="n", expid=7, spectrograph=1, cams=[], exposures=pl.DataFrame(), fibermap=pl.DataFrame(),
                     config=ReductionParams(), params=None, model_id="m", grid_id="")
    report = ClassifyReport()
    _commit_group(None, unit, UnitResult(error="LookupError: calibration rebuilt", error_kind="data"), "h", "r", None,
                  report)
    _commit_group(None, LabelUnit(**{**unit.__dict__, "expid": 8}), RuntimeError("actor died"), "h", "r", None, report)
    assert report.failed == {"7/1": "LookupError: calibration rebuilt", "8/1": "worker lost: RuntimeError: actor died"}
    assert report.exposures == 0


def test_the_run_pool_is_made_once_on_first_use_and_a_failed_start_is_not_retried():
    made, closed = [], []

    class Pool:
        def map(self, method, calls):
            return iter([(c, method) for c in calls])

        def close(self):
            closed.append(self)

    lazy = executors.LazyPool(lambda: made.append(Pool()) or made[-1])
    lazy.close()
    assert not made and not closed                                  # nothing to do: no pool
    assert list(lazy.map("denoise_chunk", [(1,)])) == [((1,), "denoise_chunk")]
    assert list(lazy.map("classify_group", [(2,)])) == [((2,), "classify_group")]
    lazy.close()
    assert len(made) == 1 and closed == made                        # the stages shared the one pool

    def no_ray():
        made.append(None)
        raise RuntimeError("local Ray did not start")

    failing = executors.LazyPool(no_ray)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="did not start"):
            failing.map("classify_group", [])
    assert made.count(None) == 1
