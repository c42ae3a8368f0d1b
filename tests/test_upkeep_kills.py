"""SIGKILL inside the upkeep commands (compact, vacuum), then a plain re-run: the lake equals a clean run's.

Each attempt runs ``fiberlake compact`` or ``fiberlake vacuum`` in a child process (forked from a
server that imported the libraries once, ``tests/forkworker.py``) armed with
``FIBERLAKE_FAILPOINT=*:n`` (:mod:`fiberlake.storage.failpoints`): it kills itself at its n-th
failpoint (before and after each table's compaction, before each table's vacuum, before each
removal of an unreferenced array). The re-run must converge to the lake a clean run leaves.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import write_raw
from lakecompare import assert_lakes_equal

from fiberlake.jobs.ingest import ingest_night
from fiberlake.jobs.upkeep import verify
from fiberlake.storage.layout import Lake
from fiberlake.storage.rawstore import write_raw_frame
from tests.forkworker import run_cli

pytestmark = pytest.mark.slow  # dozens of child-process runs

NIGHT = "2026-11-21"
COMMANDS = {"compact": ["compact"], "vacuum": ["vacuum", "--retention-hours", "0"]}


@pytest.fixture(scope="module")
def many_commits(tmp_path_factory) -> Path:
    """Four frames ingested one per run (four small files per table) and an array no row references."""
    root = tmp_path_factory.mktemp("upkeep")
    night = root / NIGHT
    night.mkdir()
    lake = Lake.at(root / "lake")
    for i in range(4):
        write_raw(night / f"fl-0215000{i}-b1.fits", EXPID=2150000 + i)
        ingest_night(lake, night, instrument="mini")
    write_raw_frame(lake.root, f"raw/{NIGHT}/00000042/b1", np.arange(12, dtype=np.uint16).reshape(3, 4), {})
    return lake.root


def _run(lake: Path, argv: list[str], failpoint: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIBERLAKE_FAILPOINT")}
    if failpoint:
        env["FIBERLAKE_FAILPOINT"] = failpoint
    rc, err = run_cli([*argv, "--lake", str(lake)], env, lake.with_name(lake.name + ".stderr"))
    assert rc in (0, -signal.SIGKILL), f"{argv} failed (rc {rc}): {err[-2000:]}"
    return rc


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_sigkill_in_upkeep_then_rerun_equals_a_clean_run(many_commits, tmp_path, command):
    argv = COMMANDS[command]
    clean = tmp_path / "clean"
    shutil.copytree(many_commits, clean)
    assert _run(clean, argv, None) == 0
    kills, n = 0, 1
    while True:
        lake = tmp_path / f"killed-{n}"
        shutil.copytree(many_commits, lake)
        if _run(lake, argv, f"*:{n}") == 0:
            break  # past the last failpoint: the run finished
        kills += 1
        assert _run(lake, argv, None) == 0
        assert_lakes_equal(Lake.at(lake), Lake.at(clean))
        assert verify(Lake.at(lake)).ok
        shutil.rmtree(lake)
        n += 3  # every third failpoint: each table's before/after and the removals are all reached
    assert kills >= 4, f"only {kills} kill points reached in {command}"
    orphan = clean / "raw" / NIGHT / "00000042" / "b1"
    assert orphan.exists() == (command == "compact"), "vacuum removes the unreferenced array, compact keeps it"
