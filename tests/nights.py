"""Simulated nights with bad deliveries, shared by the fault and object-store tests."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from fiberlake.ingest.simulate import simulate_night


def night_with_bad_deliveries(out: Path, night: str, seed: int) -> Path:
    """A mini night (b1: one bias, flat, arc, science and standard frame) plus a duplicate under
    another name and a truncated delivery that stopped arriving an hour ago.

    Returns
    -------
    Path
        The night directory.
    """
    simulate_night("mini", night, out, seed=seed, n_bias=1, n_flat=1, n_arc=1, n_science=1, n_standard=1,
                   cameras=["b1"])
    night_dir = out / night
    frames = sorted(night_dir.glob("fl-*.fits"))
    shutil.copyfile(frames[-1], night_dir / "redelivered-copy.fits")
    cut = night_dir / "fl-09999999-b1.fits"
    cut.write_bytes(frames[0].read_bytes()[: 2880 * 40])
    os.utime(cut, (time.time() - 3600, time.time() - 3600))
    return night_dir

