"""A local Ray started by `fiberlake process` ends with it: a killed driver leaves no Ray process.

The run gets a temporary directory of its own for Ray (``RAY_TMPDIR``); Ray's processes are the
ones that name it on their command line (gcs_server, raylet, monitors) or hold a file open under
it (agents and workers write their logs there).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fiberlake.ingest.simulate import simulate_night
from fiberlake.jobs.ingest import ingest_night
from fiberlake.storage.layout import Lake
from tests.stages import LIGHT_PRODUCTS_FLAGS

pytestmark = pytest.mark.slow  # starts a local Ray through the CLI and kills its driver

NIGHT = "2026-11-29"


def _ray_processes(ray_tmp: str) -> dict[int, str]:
    """Live processes that name ``ray_tmp`` on their command line or hold a file under it: pid -> command line.

    The whole command line is kept: a checkout deep in the file system puts the program's name
    (``.../ray/core/src/ray/raylet/raylet``) well past any fixed prefix.
    """
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        proc = Path("/proc") / name
        try:
            if proc.joinpath("stat").read_bytes().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                continue
            cmdline = proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            uses = ray_tmp in cmdline
            if not uses:
                for fd in proc.joinpath("fd").iterdir():
                    try:
                        if os.readlink(fd).startswith(ray_tmp):
                            uses = True
                            break
                    except OSError:
                        continue
        except (OSError, IndexError):
            continue
        if uses:
            found[int(name)] = cmdline
    return found


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    out = tmp_path_factory.mktemp("raycleanup")
    simulate_night("mini", NIGHT, out, seed=57, n_bias=1, n_flat=1, n_arc=1, n_science=2, n_standard=0,
                   cameras=["b1"])
    ingest_night(Lake.at(out / "template"), out / NIGHT)
    return out / "template"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds processes through /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_driver_leaves_no_ray_process(ingested, tmp_path, sig):
    lake = tmp_path / "lake"
    shutil.copytree(ingested, lake)
    ray_tmp = tempfile.mkdtemp(prefix="flk-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")} | {"RAY_TMPDIR": ray_tmp}
    command = [sys.executable, "-m", "fiberlake.jobs.cli", "process", "--night", NIGHT, "--lake", str(lake),
               "--extract", "box", "--no-cosmics", *LIGHT_PRODUCTS_FLAGS, "--actors", "2", "--quiet"]
    survivors: dict[int, str] = {}
    with open(tmp_path / "stderr", "wb") as err:
        driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        seen: dict[int, str] = {}
        while time.monotonic() < deadline and driver.poll() is None:
            seen = _ray_processes(ray_tmp)
            if sum("ray::ReducerHost" in c for c in seen.values()) == 2:  # the actors are up: the whole cluster
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the run ended before its actors were seen"
        programs = [c.split(" ", 1)[0] for c in seen.values()]
        assert any(p.endswith("gcs_server") for p in programs) and any(p.endswith("raylet") for p in programs), \
            {pid: c[:200] for pid, c in seen.items()}
        driver.send_signal(sig)
        driver.wait(30)
        deadline = time.monotonic() + 30
        while (survivors := _ray_processes(ray_tmp)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not survivors, f"Ray processes left {sig.name}: {survivors}"
        while os.listdir(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not os.listdir(ray_tmp), "the run's Ray directory is removed"
        stderr = (tmp_path / "stderr").read_text(errors="replace")
        assert "Token authentication" not in stderr and "RAY_AUTH_MODE" not in stderr, stderr[-2000:]
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in _ray_processes(ray_tmp):  # whatever this test started and left, gone
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
