"""Processing on Ray actors: same tables as in-process, and exact after an actor is killed."""

from __future__ import annotations

import os
import shutil

import pytest
import ray

from fiberlake.ingest.simulate import simulate_night
from fiberlake.jobs.ingest import ingest_night
from fiberlake.jobs.process import Executor, process_night
from fiberlake.processors.pipeline import ReductionParams
from fiberlake.storage.layout import Lake
from tests.lakecompare import assert_lakes_equal

NIGHT = "2026-11-26"
CONFIG = ReductionParams(extractions=("box",), cosmics=False)


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
