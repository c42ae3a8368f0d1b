"""Processing on Ray actors: same tables as in-process, and exact after an actor is killed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from fiberlake.ingest.simulate import simulate_night
from fiberlake.jobs.ingest import ingest_night
from fiberlake.jobs.process import Executor, process_night
from fiberlake.jobs.reprocess import reprocess
from fiberlake.processors.params import ReductionParams
from fiberlake.storage.layout import Lake
from fiberlake.storage.tables import TableStore
from tests.lakecompare import assert_lakes_equal
from tests.stages import LIGHT_PRODUCTS, LIGHT_PRODUCTS_FLAGS

pytestmark = pytest.mark.slow  # runs Ray actors over a simulated night

NIGHT = "2026-11-26"
CONFIG = ReductionParams().updated({"extractions": ("box",), "cosmics.enabled": False, "execution.chunk_fibers": 8} | LIGHT_PRODUCTS)  # 4 bundles a frame


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """A mini night (b1: one bias, flat and arc, four science frames) ingested into a template lake."""
    out = tmp_path_factory.mktemp("raynight")
    simulate_night("mini", NIGHT, out, seed=31, n_bias=1, n_flat=1, n_arc=1, n_science=3, n_standard=1,
                   cameras=["b1"])
    template = out / "template"
    ingest_night(Lake.at(template), out / NIGHT)
    reference = out / "reference"
    shutil.copytree(template, reference)
    report = process_night(Lake.at(reference), NIGHT, config=CONFIG)
    assert len(report.done) == 4 and not report.failed
    yield template, Lake.at(reference)
    ray.shutdown()


def _copy(template, tmp_path) -> Lake:
    shutil.copytree(template, tmp_path / "lake")
    return Lake.at(tmp_path / "lake")


def test_ray_actors_give_the_same_tables_as_in_process(ingested, tmp_path):
    template, reference = ingested
    lake = _copy(template, tmp_path)
    report = process_night(lake, NIGHT, config=CONFIG, executor=Executor(kind="ray", actors=2), batch_frames=3)
    assert len(report.done) == 4 and not report.failed
    assert_lakes_equal(lake, reference)


def test_a_second_run_reuses_the_kept_actors_and_a_dead_one_is_replaced(ingested, tmp_path, monkeypatch):
    from fiberlake.jobs import executors

    template, reference = ingested
    pools = []
    real_init = executors.RayPool.__init__

    def recording_init(self, *a, **k):
        real_init(self, *a, **k)
        pools.append(self)

    monkeypatch.setattr(executors.RayPool, "__init__", recording_init)
    executors.release_kept_actors()
    first, second = _copy(template, tmp_path / "first"), _copy(template, tmp_path / "second")
    process_night(first, NIGHT, config=CONFIG, executor=Executor(kind="ray", actors=2))
    report = process_night(second, NIGHT, config=CONFIG, executor=Executor(kind="ray", actors=2))
    assert len(report.done) == 4 and not report.failed
    assert [p.started for p in pools] == [True, False], "the second run takes the actors the first one kept"
    assert_lakes_equal(second, reference)  # another lake: the kept actors read its calibration sets, not the first's
    shape, actors = executors._kept
    ray.kill(actors[0])                     # a kept actor dies for good between two runs
    _wait_until_dead(actors[0])             # ray.kill is asynchronous: dead before the next take
    assert executors._take_kept(shape) is None and executors._kept is None
    _wait_until_dead(actors[1])             # the other one was stopped with it


def _wait_until_dead(actor, timeout_s: float = 60.0) -> None:
    """Return once ``actor`` answers a ping with RayActorError; fail after ``timeout_s``.

    ``ray.kill`` only sends the request: a ping submitted right after it may still be served.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the actor still answers {timeout_s:.0f} s after it was killed")


def test_a_killed_actor_is_restarted_and_the_tables_stay_exact(ingested, tmp_path):
    template, reference = ingested
    lake = _copy(template, tmp_path)
    marker = tmp_path / "killed-once"
    ray.shutdown()  # the actors must start with the failpoint in their environment
    os.environ["FIBERLAKE_FAILPOINT"] = "reduce.frame:2"
    os.environ["FIBERLAKE_FAILPOINT_ONCE"] = str(marker)
    try:
        report = process_night(lake, NIGHT, config=CONFIG, executor=Executor(kind="ray", actors=2))
    finally:
        del os.environ["FIBERLAKE_FAILPOINT"], os.environ["FIBERLAKE_FAILPOINT_ONCE"]
        ray.shutdown()
    assert marker.exists(), "an actor must have been killed"
    assert len(report.done) == 4 and not report.failed, report.failed
    assert_lakes_equal(lake, reference)


def test_reprocess_resumes_after_the_driver_is_killed(ingested, tmp_path):
    _, reference = ingested
    whole = tmp_path / "whole"
    shutil.copytree(reference.root, whole)
    uninterrupted = reprocess(Lake.at(whole), release="dr1", config=CONFIG, batch_frames=1)
    assert uninterrupted.done == 4 and uninterrupted.skipped == 0
    killed = tmp_path / "killed"
    shutil.copytree(reference.root, killed)
    command = [sys.executable, "-m", "fiberlake.jobs.cli", "reprocess", "--lake", str(killed), "--release", "dr1",
               "--no-ray", "--batch-frames", "1", "--extract", "box", "--no-cosmics", "--chunk-fibers", "8", "--quiet",
               *LIGHT_PRODUCTS_FLAGS]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.run(command, env=env | {"FIBERLAKE_FAILPOINT": "committed.reductions:2"}, capture_output=True)
    assert first.returncode == -9, first.stderr.decode()[-2000:]
    second = subprocess.run(command, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "2 frames reduced, 2 already done by this run" in second.stdout, second.stdout
    assert_lakes_equal(Lake.at(killed), Lake.at(whole))
    runs = TableStore(killed / "tables").read("runs").to_pylist()
    assert [r["command"] for r in runs].count("reprocess") == 1, "a resumed run keeps one row per night"


def test_a_bundle_that_fails_is_recorded_and_the_run_goes_on(ingested, tmp_path, monkeypatch):
    from fiberlake.jobs import reduce_worker

    template, _ = ingested
    lake = _copy(template, tmp_path)
    real = reduce_worker.extract_bundle
    victim = {}

    def failing(slab, constants, calib, params):
        if slab.bundle.index == 2 and not victim:
            victim["frame"] = True
            raise FloatingPointError("singular profile")
        return real(slab, constants, calib, params)

    monkeypatch.setattr(reduce_worker, "extract_bundle", failing)
    report = process_night(lake, NIGHT, config=CONFIG)
    assert len(report.done) == 3 and len(report.failed) == 1
    (error,) = report.failed.values()
    assert error == "bundle 2 (fibers 16-23): FloatingPointError: singular profile"
    marker = TableStore(lake.root / "tables").read("reductions").to_pylist()
    assert sorted(m["status"] for m in marker) == ["failed", "ok", "ok", "ok"]
    spectra = TableStore(lake.root / "tables").read("spectra", columns=["expid"]).to_pylist()
    assert len({s["expid"] for s in spectra}) == 3, "the failed frame has no rows, the others all theirs"
