"""Streaming ingest: frames landing over time, files still being written, calibrations from an
earlier night, and a clean stop on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fiberlake.ingest.simulate import simulate_night
from fiberlake.jobs.query import sql
from fiberlake.jobs.watch import watch_night
from fiberlake.processors.params import ReductionParams
from fiberlake.storage.layout import Lake
from tests.stages import LIGHT_PRODUCTS

pytestmark = pytest.mark.slow  # watches and reduces simulated nights

CONFIG = ReductionParams().updated({"extractions": ("box",), "cosmics.enabled": False} | LIGHT_PRODUCTS)
NIGHT_A, NIGHT_B = "2026-11-24", "2026-11-25"


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    """Two simulated nights (b1 only), staged outside the directories being watched."""
    out = tmp_path_factory.mktemp("staged")
    for seed, night in ((21, NIGHT_A), (22, NIGHT_B)):
        simulate_night("mini", night, out, seed=seed, n_bias=1, n_flat=1, n_arc=1, n_science=2, n_standard=0,
                       cameras=["b1"])
    return out


def _by_type(night_dir: Path) -> tuple[list[Path], list[Path]]:
    from astropy.io import fits

    calib, science = [], []
    for path in sorted(night_dir.glob("*.fits")):
        obstype = fits.getheader(path).get("OBSTYPE", "FIBERMAP")
        (calib if obstype in ("BIAS", "FLAT", "ARC") else science).append(path)
    return calib, science


def test_watch_takes_frames_as_they_land(staged, tmp_path):
    calib, science = _by_type(staged / NIGHT_A)
    night_dir = tmp_path / NIGHT_A
    night_dir.mkdir()
    lake = Lake.at(tmp_path / "lake")
    stop = threading.Event()
    lines: list[str] = []
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("report", watch_night(
        lake, night_dir, poll=0.2, settle=0.3, stale_after=60, config=CONFIG, stop=stop, log=lines.append)))
    thread.start()
    try:
        for path in calib + [p for p in science if "fibermap" in p.name]:
            shutil.copyfile(path, night_dir / path.name)
        frames = [p for p in science if "fibermap" not in p.name]
        shutil.copyfile(frames[0], night_dir / frames[0].name)
        # the last frame arrives slowly: half, a pause longer than `settle`, then the rest
        content = frames[1].read_bytes()
        with open(night_dir / frames[1].name, "wb") as handle:
            handle.write(content[: len(content) // 2 // 2880 * 2880 + 1000])
            handle.flush()
            time.sleep(1.5)
            handle.write(content[len(content) // 2 // 2880 * 2880 + 1000:])
        deadline = time.time() + 240
        while time.time() < deadline:
            if (lake.root / "tables" / "reductions").exists():
                done = sql(lake, "SELECT count(*) AS n FROM reductions WHERE status = 'ok'")["n"][0]
                if done == 2:
                    break
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=120)
    report = result["report"]
    assert report.ingest.quarantined == [], "a frame still being written must not be quarantined"
    assert len(report.ingest.ingested) == len(calib) + len(frames)
    assert sorted(report.reduced) == sorted(f"{int(p.name[3:11])}/b1" for p in frames)
    reductions = sql(lake, "SELECT * FROM reductions")
    assert reductions["calib_night"].to_list() == [NIGHT_A, NIGHT_A]
    assert (reductions["reduced_at"] > reductions["landed_at"]).all()
    outcomes = sql(lake, "SELECT outcome, count(*) AS n FROM deliveries GROUP BY outcome")
    assert dict(zip(outcomes["outcome"], outcomes["n"])) == {"ingested": len(calib) + len(frames), "fibermap": 2}


def test_science_without_its_calibrations_uses_the_earlier_night_then_its_own(staged, tmp_path):
    lake = Lake.at(tmp_path / "lake")
    shutil.copytree(staged / NIGHT_A, tmp_path / NIGHT_A, ignore=shutil.ignore_patterns("truth"))
    watch_night(lake, tmp_path / NIGHT_A, once=True, config=CONFIG)
    calib_b, science_b = _by_type(staged / NIGHT_B)
    night_b = tmp_path / NIGHT_B
    night_b.mkdir()
    for path in science_b:
        shutil.copyfile(path, night_b / path.name)
    first = watch_night(lake, night_b, once=True, config=CONFIG)
    assert len(first.reduced) == 2 and not first.failed
    rows = sql(lake, f"SELECT calib_night FROM reductions WHERE night = '{NIGHT_B}'")
    assert rows["calib_night"].to_list() == [NIGHT_A, NIGHT_A]
    n_spectra = sql(lake, f"SELECT count(*) AS n FROM spectra WHERE night = '{NIGHT_B}'")["n"][0]
    for path in calib_b:  # the night's own calibrations arrive late
        shutil.copyfile(path, night_b / path.name)
    second = watch_night(lake, night_b, once=True, config=CONFIG)
    assert len(second.reduced) == 2
    rows = sql(lake, f"SELECT calib_night FROM reductions WHERE night = '{NIGHT_B}'")
    assert rows["calib_night"].to_list() == [NIGHT_B, NIGHT_B]
    assert sql(lake, f"SELECT count(*) AS n FROM spectra WHERE night = '{NIGHT_B}'")["n"][0] == n_spectra
    # night A was not touched by night B's runs
    runs = sql(lake, "SELECT night, count(*) AS n FROM runs GROUP BY night").sort("night")
    assert runs.rows() == [(NIGHT_A, 1), (NIGHT_B, 2)]
    third = watch_night(lake, night_b, once=True, config=CONFIG)
    assert third.reduced == [] and third.ingest.ingested == []


def test_watch_stops_cleanly_on_sigterm(tmp_path):
    night_dir = tmp_path / NIGHT_A
    night_dir.mkdir()
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fiberlake.jobs.cli", "watch", str(night_dir), "--lake", str(tmp_path / "lake"),
         "--instrument", "mini", "--poll", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "lake" / ".writer.lock").exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert "stopped by SIGTERM" in out.decode()
