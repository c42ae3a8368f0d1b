"""The windowed L.A.Cosmic flags exactly what astroscrappy.detect_cosmics flags."""

from __future__ import annotations

import astroscrappy
import numpy as np
import pytest

from fiberlake.processors import cosmics


def _frame(seed: int, ny: int = 220, nx: int = 170):
    """Fiber-like stripes, sky, Poisson noise, cosmic-ray hits and tracks (some at the edges, some
    touching each other, some on bright fibers), a few masked pixels."""
    rng = np.random.default_rng(seed)
    cols = np.arange(nx)
    stripes = sum(800.0 * np.exp(-0.5 * ((cols - c) / 1.6) ** 2) for c in range(8, nx, 16))
    image = rng.poisson(np.broadcast_to(stripes + 40.0, (ny, nx))).astype(np.float32)
    for _ in range(60):
        r, c = int(rng.integers(0, ny)), int(rng.integers(0, nx))
        length = int(rng.integers(1, 6))
        rr = np.clip(r + np.arange(length), 0, ny - 1)
        cc = np.clip(c + np.arange(length) // 2, 0, nx - 1)
        image[rr, cc] += rng.uniform(300, 5000)
    for r, c in ((0, 0), (1, nx - 2), (ny - 1, 5), (ny - 3, nx - 1), (130, 0), (5, 95)):  # edges
        image[r, c] += 4000
    image[180:187, 60:66] += 3000  # a blob
    mask = np.zeros((ny, nx), bool)
    mask[rng.integers(0, ny, 30), rng.integers(0, nx, 30)] = True
    mask[100:104, 40:42] = True
    return image / np.float32(1.3), mask


@pytest.mark.parametrize("seed,niter,satlevel", [(1, 4, np.inf), (2, 2, np.inf), (4, 6, 2000.0)])
def test_flags_equal_astroscrappy(seed, niter, satlevel):
    image, mask = _frame(seed)
    kw = dict(sigclip=5.0, sigfrac=0.3, objlim=5.0, gain=1.3, readnoise=3.5, niter=niter, satlevel=satlevel)
    ref, _ = astroscrappy.detect_cosmics(image, inmask=mask, sepmed=True, cleantype="meanmask", **kw)
    new = cosmics.detect_cosmics(image, mask, **kw)
    assert ref.sum() > 50
    np.testing.assert_array_equal(new, ref)


def test_later_iterations_find_more_and_nothing_to_flag():
    image, mask = _frame(5)
    kw = dict(sigclip=4.0, sigfrac=0.3, objlim=2.0, gain=1.3, readnoise=3.5)
    one = cosmics.detect_cosmics(image, mask, niter=1, **kw)
    four = cosmics.detect_cosmics(image, mask, niter=4, **kw)
    assert np.all(four[one]) and four.sum() > one.sum()  # the cleaned image reveals more of each hit
    flat = np.full((64, 64), 100.0, np.float32)
    assert not cosmics.detect_cosmics(flat, None, niter=4, **kw).any()
    assert not cosmics.detect_cosmics(flat, np.ones((64, 64), bool), niter=4, **kw).any()


def test_clean_without_neighbours_takes_the_background():
    arr = np.arange(49, dtype=np.float32).reshape(7, 7)
    crmask = np.zeros((7, 7), bool)
    crmask[3, 3] = crmask[2, 2] = True
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = mask[2, 2] = False
    ys, xs = np.array([3, 2]), np.array([3, 2])
    cosmics._clean_meanmask(arr, crmask, mask, ys, xs, lambda: -1.0)
    assert arr[3, 3] == -1.0  # every neighbour flagged or masked
    assert arr[2, 2] == np.float32(np.mean([0, 1, 2, 3, 4, 7, 14, 21, 28]))
