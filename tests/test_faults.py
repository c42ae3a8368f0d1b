"""Fault injection: SIGKILL the ingest+process worker at seeded points, run again, compare.

The worker is ``fiberlake watch NIGHT --once`` (ingest, calibration, reduction) in a child process,
forked from a server that imported the libraries once (``tests/forkworker.py``: each attempt costs
its own work, not ~6 s of imports).
Each attempt is armed with ``FIBERLAKE_FAILPOINT=*:n``: it kills itself with SIGKILL at its n-th
failpoint (between publishing pixels and committing rows, before and after every table commit,
before swapping a calibration set in). The next attempt starts from whatever the dead one left.
A further episode kills the worker at seeded random times instead, landing anywhere (inside a
Parquet write, a Zarr write, a numpy loop). After each episode the lake must equal a clean run's:
every table's rows and every raw array's bytes.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest

from fiberlake.jobs.watch import watch_night
from fiberlake.processors.params import ReductionParams
from fiberlake.storage import failpoints
from fiberlake.storage.layout import Lake
from tests.forkworker import run_cli
from tests.lakecompare import assert_lakes_equal
from tests.nights import night_with_bad_deliveries
from tests.stages import LIGHT_PRODUCTS, LIGHT_PRODUCTS_FLAGS

pytestmark = pytest.mark.slow  # SIGKILLs ingest/process workers at seeded points over a whole night

NIGHT = "2026-11-23"
# two standards per exposure and spectrograph (LIGHT_PRODUCTS, of four): the flux calibration's commits are crossed
# all the same, at half its stellar fits, which every attempt that reaches the products repeats
CONFIG = ReductionParams().updated({"extractions": ("box",), "cosmics.enabled": False} | LIGHT_PRODUCTS)
WORKER = ["watch", "--once", "--instrument", "mini", "--extract", "box",
          "--no-cosmics", *LIGHT_PRODUCTS_FLAGS]


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Path:
    return night_with_bad_deliveries(tmp_path_factory.mktemp("faults"), NIGHT, seed=11)


@pytest.fixture(scope="module")
def clean_lake(night, tmp_path_factory) -> tuple[Lake, int]:
    """The reference lake, and how many failpoints a clean run crosses."""
    lake = Lake.at(tmp_path_factory.mktemp("clean") / "lake")
    os.environ["FIBERLAKE_FAILPOINT"] = "*:0"  # count, never fire
    try:
        report = watch_night(lake, night, once=True, config=CONFIG)
    finally:
        del os.environ["FIBERLAKE_FAILPOINT"]
    crossings = failpoints.reached()["*"]
    assert len(report.reduced) == 2 and not report.failed
    assert len(report.ingest.quarantined) == 1
    return lake, crossings


def _attempt(night: Path, lake: Path, env: dict, kill_after: float | None = None) -> int:
    rc, err = run_cli([*WORKER, str(night), "--lake", str(lake)], env, lake.with_name(lake.name + ".stderr"),
                      kill_after=kill_after)
    assert rc in (0, -signal.SIGKILL), f"worker failed (rc {rc}): {err[-2000:]}"
    return rc


def test_sigkill_anywhere_then_rerun_equals_a_clean_run(night, clean_lake, tmp_path):
    reference, crossings = clean_lake
    assert crossings >= 25, "the clean run should cross every failpoint of ingest and processing"
    rng = random.Random(20261123)
    env = {k: v for k, v in os.environ.items() if k != "FIBERLAKE_FAILPOINT"}
    kills = 0
    # Episodes with failpoint kills: each attempt dies at its n-th failpoint, and the kills walk
    # through ingest, calibration and reduction as the earlier attempts' work persists. n goes up
    # to 10 because reducing one frame crosses 6 failpoints before its marker is committed: with
    # n <= 5 no attempt could ever finish a frame (a livelock, not a lake inconsistency).
    episode = 0
    while kills < 17:
        lake = tmp_path / f"lake-{episode}"
        for _ in range(40):
            rc = _attempt(night, lake, env | {"FIBERLAKE_FAILPOINT": f"*:{rng.randint(1, 10)}"})
            if rc == 0:
                break
            kills += 1
        assert rc == 0, "the worker never finished"
        assert_lakes_equal(Lake.at(lake), reference)
        episode += 1
    # One episode with kills at random times (anywhere, including inside library writes): the
    # worker no longer spends its first seconds importing, so each kill lands in its work.
    lake = tmp_path / "lake-timed"
    timed = sum(_attempt(night, lake, env, kill_after=rng.uniform(1.0, 4.0)) != 0 for _ in range(3))
    assert _attempt(night, lake, env) == 0
    assert_lakes_equal(Lake.at(lake), reference)
    assert kills >= 17 and timed >= 1, f"only {kills} failpoint kills and {timed} timed kills"
