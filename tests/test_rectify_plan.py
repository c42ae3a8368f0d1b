"""The resampling plan (the geometry of a calibration set's rectification, kept between frames)
gives the rectified frame of the geometry computed per frame."""

from __future__ import annotations

import numpy as np
import pytest

from fiberlake.processors import rectify
from fiberlake.processors.rectify_map import Frame, LegendreMap, MapConfig
from fiberlake.schemas.maskbits import Mask


def _map(ny: int, nx: int) -> LegendreMap:
    c = np.zeros((2, 4, 4))
    c[0, 0, 2], c[0, 1, 1], c[0, 2, 0], c[1, 1, 0], c[1, 0, 1] = 2.5, 1.5, -1.0, 0.8, 0.4
    return LegendreMap(Frame(ny, nx), MapConfig(kind="legendre", deg=3), {}, fwd=c, inv=-c)


def _frame(ny: int, nx: int):
    rng = np.random.default_rng(4)
    cols = np.arange(nx)
    image = (sum(3000.0 * np.exp(-0.5 * ((cols - c) / 1.8) ** 2) for c in range(10, nx, 16))[None, :]
             * (1 + 0.3 * np.sin(np.arange(ny) / 7.0))[:, None]).astype(np.float32)
    image += rng.normal(0, 5, image.shape).astype(np.float32)
    ivar = (1.0 / (25 + np.clip(image, 0, None))).astype(np.float32)
    mask = np.zeros(image.shape, np.uint32)
    mask[rng.integers(0, ny, 40), rng.integers(0, nx, 40)] = Mask.COSMIC
    ivar[mask != 0] = 0
    mask[30, 50:60] |= np.uint32(Mask.SATURATED)
    ivar[30, 50:60] = 0
    return image, ivar, mask


@pytest.mark.parametrize("col0,width,out", [(0, 150, (0, 150)), (40, 70, (52, 96))])
def test_plan_matches_the_geometry_per_frame(col0, width, out):
    ny, nx = 180, 150
    rmap = _map(ny, nx)
    image, ivar, mask = _frame(ny, nx)
    cols = slice(col0, col0 + width)
    args = (image[:, cols], ivar[:, cols], mask[:, cols], rmap)
    plan = rectify.resample_plan(rmap, col0, width, out)
    assert rectify.resample_plan(rmap, col0, width, out) is plan  # kept for the next frame
    ref = rectify.rectify_columns(*args, col0=col0, out=out)
    new = rectify.rectify_columns(*args, col0=col0, out=out, plan=plan)
    np.testing.assert_array_equal(new.mask, ref.mask)
    np.testing.assert_array_equal(new.ivar > 0, ref.ivar > 0)
    good = ref.ivar > 0
    # float32 fractions of the input positions (6e-8 px): a few float32 roundings of the output
    # (3e-5 sigma), 1e-6 relative variance
    assert float(np.max(np.abs(new.image - ref.image)[good] * np.sqrt(ref.ivar[good]))) < 3e-5
    np.testing.assert_allclose(new.ivar, ref.ivar, rtol=1e-6)
    assert np.count_nonzero(ref.mask & np.uint32(Mask.COSMIC)) > 10
    with pytest.raises(ValueError, match="plan for columns"):
        rectify.rectify_columns(*args, col0=col0, out=(out[0], out[1] - 1), plan=plan)


def test_plans_are_kept_within_their_bytes(monkeypatch):
    monkeypatch.setattr(rectify, "_plans", rectify._plans.empty_copy())
    rmap = _map(64, 64)
    first = rectify.resample_plan(rmap, 0, 64, (0, 64))
    monkeypatch.setattr(rectify._plans, "max_bytes", first.nbytes)
    rectify.resample_plan(rmap, 0, 32, (0, 20))
    assert len(rectify._plans) == 1 and rectify.resample_plan(rmap, 0, 64, (0, 64)) is not first
    other = _map(64, 64)
    other.fwd = other.fwd * 1.1  # another calibration set: another plan, even for the same columns
    assert rectify.resample_plan(other, 0, 64, (0, 64)) is not rectify.resample_plan(rmap, 0, 64, (0, 64))
