"""Ingest's fast paths give exactly what the paths they replace give.

- frame typing's pre-processing on uint16 frames (processors/typing_kernels.py) against the float32
  path through astropy's ``sigma_clip`` that the shipped model was trained with: profile, trim
  region and the uint8 image, bit for bit, on simulated mini frames of every type, adversarial
  arrays and (slow) a full-size LAMOST frame.
"""

from __future__ import annotations

import numpy as np
import pytest

from fiberlake.ingest import simulate as sim
from fiberlake.processors import typing_kernels as tk
from fiberlake.processors import typing_prep as tp
from fiberlake.schemas.instrument import LAMOST, MINI

NIGHT = "2026-11-21"


def _old_and_new(raw: np.ndarray) -> None:
    """The float32 (astropy) path and the integer path agree on profile and image."""
    image = tp.orient(raw)
    new = tp.row_max_profile(image)
    old = tp.row_max_profile(image.astype(np.float32))         # float input: astropy's sigma_clip
    assert new.dtype == np.float64 and np.array_equal(new, old)
    assert tk.row_max_profile_uint(image, tp.TRIM_SIGMA) is not None  # the integer path ran
    assert np.array_equal(tp.prepare_frame(raw), tp.prepare_frame(raw.astype(np.float32)))


def _adversarial() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    frames = []
    x = (1000 + rng.normal(0, 3, (301, 64))).astype(np.uint16)   # odd column length
    x[:, 3] = 1234                                              # constant column: bounds are integers
    x[:, 4] = 0
    x[:, 5] = 65535
    x[:150, 6], x[150:, 6] = 10, 11                             # two values
    x[17, :] = 65535                                            # a row clipped in most columns
    frames.append(x)
    y = rng.integers(0, 65536, (64, 300), dtype=np.uint16)      # uniform: bounds beyond the range
    y[:, :10] = rng.choice([0, 65535], (64, 10)).astype(np.uint16)
    frames.append(y)
    frames.append((rng.poisson(3.0, (400, 50))).astype(np.uint16))   # small integers: many ties
    frames.append(rng.integers(0, 256, (90, 40), dtype=np.uint8))
    for n in (1, 2, 3):
        frames.append(rng.integers(0, 9, (n, 12), dtype=np.uint16))
    return frames


def test_integer_profile_equals_astropy_path_on_adversarial_arrays():
    for image in _adversarial():
        new = tp.row_max_profile(image)
        old = tp.row_max_profile(image.astype(np.float32))
        assert np.array_equal(new, old), image.shape


def test_every_column_through_astropys_bounds_gives_the_same(monkeypatch):
    monkeypatch.setattr(tk, "_guard", lambda n, centre, spread: np.full(np.shape(centre), 1.0))
    for image in _adversarial()[:3]:
        assert np.array_equal(tp.row_max_profile(image), tp.row_max_profile(image.astype(np.float32)))


def test_block_means_equal_the_float_path():
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 65536, (430, 1303), dtype=np.uint16)
    for image in (raw, raw.T, raw[3:, 5:]):
        for fy, fx in ((2, 2), (19, 6), (1, 3)):
            view = np.asarray(image, dtype=np.float32)
            assert np.array_equal(tk.block_mean_uint(image, fy, fx), tp._block_mean(view, fy, fx))
    assert tk.block_mean_uint(raw.astype(np.float32), 2, 2) is None


def test_mini_frames_of_every_type_prepare_identically():
    for seq, obstype in enumerate(("BIAS", "DARK", "FLAT", "ARC", "SCIENCE", "STANDARD")):
        frame = sim.simulate_frame(MINI, "b1", obstype, night=NIGHT, expid=sim.make_expid(NIGHT, seq + 1), seed=seq)
        _old_and_new(frame.raw)


@pytest.mark.slow
def test_lamost_frame_prepares_identically():
    frame = sim.simulate_frame(LAMOST, "r3", "SCIENCE", night=NIGHT, expid=sim.make_expid(NIGHT, 1), seed=4)
    _old_and_new(frame.raw)
