"""Shared fixtures: small hand-built raw frames for the ingest and storage tests."""

from __future__ import annotations

import os

# Under pytest-xdist (.ci/run: 2 workers on the CI machine's 2 cores) each worker gets one thread for
# OpenMP, BLAS and torch, as a Ray actor of one CPU does: two workers each running a 2-thread torch or
# OpenMP loop on 2 cores spin against each other. Set before numpy is imported; a caller's setting wins.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")

import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from astropy.io import fits  # noqa: E402

from fiberlake.schemas.instrument import MINI  # noqa: E402

# Test files that start a local Ray: under pytest-xdist (.ci/run: -n 2 --dist loadgroup) they share
# one worker, so two Ray clusters never start on the same two cores at once.
RAY_TEST_FILES = {"test_ray.py", "test_ray_cleanup.py", "test_object_store.py", "test_ray_stages.py"}
# Test files that share one reduced night (tests/qa_night.py builds it once per worker process).
QA_NIGHT_TEST_FILES = {"test_export.py", "test_qa.py"}
# The longest groups, longest first (seconds of a clean-clone CI run: 595, 351, 201, 106, 101): sent to
# the workers first (.ci/run: --no-loadscope-reorder keeps this order), so that no long group starts last.
LONGEST_GROUPS_FIRST = ("ray", "test_faults.py", "test_end_to_end.py", "test_fluxcal.py", "qa-night")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the markers into the groups it schedules
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist's ``--dist loadgroup``, keep each test file on one worker (its module fixtures
    are built once). The groups are made on the workers, where xdist sets ``option.loadgroup``."""
    if not getattr(config.option, "loadgroup", False):
        return
    groups = {}
    for item in items:
        name = item.path.name
        group = "ray" if name in RAY_TEST_FILES else "qa-night" if name in QA_NIGHT_TEST_FILES else name
        item.add_marker(pytest.mark.xdist_group(group))
        groups[item.nodeid] = group
    rank = {group: i for i, group in enumerate(LONGEST_GROUPS_FIRST)}
    items.sort(key=lambda item: rank.get(groups[item.nodeid], len(rank)))  # stable: file order kept within


def make_raw_header(**overrides) -> fits.Header:
    """A header that satisfies the contract for a MINI b1 frame."""
    ny, nx = MINI.ny, MINI.nx
    cards = {
        "INSTRUME": "mini", "NIGHT": "2026-11-21", "EXPID": 2150001, "OBSTYPE": "SCIENCE",
        "EXPTIME": 1200.0, "DATE-OBS": "2026-11-21T14:00:00", "MJD-OBS": 61365.58, "SPECID": 1,
        "ARM": "b", "CAMERA": "b1", "GAIN": 1.2, "RDNOISE": 3.5,
        "DATASEC": f"[1:{nx},1:{ny}]", "BIASSEC": f"[{nx + 1}:{nx + MINI.n_overscan},1:{ny}]",
    }
    cards.update(overrides)
    header = fits.Header()
    for key, value in cards.items():
        if value is not None:
            header[key] = value
    return header


def write_raw(path: Path, data: np.ndarray | None = None, checksum: bool = True, **overrides) -> Path:
    """Write a MINI-shaped raw frame (uint16 with BZERO) and return its path."""
    if data is None:
        rng = np.random.default_rng(zlib.crc32(path.name.encode()))  # stable across runs (hash() is salted)
        data = (1000 + rng.normal(0, 3, MINI.raw_shape)).astype(np.uint16)
    hdu = fits.PrimaryHDU(data=data, header=make_raw_header(**overrides))
    hdu.writeto(path, checksum=checksum, overwrite=True)
    return path


@pytest.fixture
def raw_frame_path(tmp_path: Path) -> Path:
    night = tmp_path / "2026-11-21"
    night.mkdir()
    return write_raw(night / "fl-02150001-b1.fits")
