"""Extraction profiles kept per calibration set (processors/profile_cache.py): the spectra with a
kept profile are those computed without it, bit for bit; a hit does not recompute; another
trace set is another entry; the least recently used go first beyond the byte budget."""

from __future__ import annotations

import numpy as np
import pytest

from fiberlake.processors import extract, profile_cache
from fiberlake.schemas.containers import ProfileModel
from fiberlake.schemas.maskbits import Mask

from synthetic_extract import make_traces, observe, render

NF, NY = 7, 200
NX = NF * 16 + 24


@pytest.fixture(autouse=True)
def empty_cache():
    profile_cache.clear()
    yield
    profile_cache.clear()


def _frame(seed: int):
    rng = np.random.default_rng(seed)
    tr = make_traces(NF, NY, NX, sigma=2.0)
    flux = 3000.0 * rng.uniform(0.3, 1.5, (NF, 1)) * np.ones((1, NY))
    image, ivar = observe(render(tr, flux, NX, wing_fraction=0.08, wing_sigma=5.0, wing_offset=0.3), rng,
                          read_noise=3.5)
    mask = np.zeros(image.shape, np.uint32)
    mask[rng.integers(0, NY, 60), rng.integers(0, NX, 60)] = Mask.BADPIX
    ivar[mask != 0] = 0
    for f, r in zip(rng.integers(0, NF, 15), rng.integers(0, NY, 15)):  # hits: rejections
        image[r, int(round(tr.x()[f, r]))] += 5000.0
    profile = ProfileModel(sigma=np.full(NF, 2.0), wing_fraction=np.full(NF, 0.08), wing_offset=np.full(NF, 0.3),
                           wing_ratio=2.5)
    return image, ivar, mask, tr, profile


def _same(a, b):
    for k in ("flux", "ivar", "mask", "chi2", "npix"):
        x, y = getattr(a, k), getattr(b, k)
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=k)


@pytest.mark.parametrize("method", ["box", "optimal"])
def test_kept_profile_gives_the_same_spectra(method, monkeypatch):
    run = extract.box_extract if method == "box" else extract.optimal_extract
    image, ivar, mask, tr, profile = _frame(3)
    plain = run(image, ivar, mask, tr, profile=profile)
    first = run(image, ivar, mask, tr, profile=profile, cache_profile=True)
    assert profile_cache.nbytes() > 0
    built = profile_cache.nbytes()
    # the next frame of the same calibration: the kept profile, not a new evaluation
    image2, ivar2, mask2, _, _ = _frame(4)
    calls = []
    original = extract._profile_cdf
    monkeypatch.setattr(extract, "_profile_cdf", lambda *a: calls.append(1) or original(*a))
    second = run(image2, ivar2, mask2, tr, profile=profile, cache_profile=True)
    assert not calls and profile_cache.nbytes() == built
    _same(plain, first)
    _same(run(image2, ivar2, mask2, tr, profile=profile), second)
    # another profile is another entry
    other = ProfileModel(sigma=np.full(NF, 2.1), wing_fraction=np.full(NF, 0.08), wing_offset=np.full(NF, 0.3),
                         wing_ratio=2.5)
    run(image2, ivar2, mask2, tr, profile=other, cache_profile=True)
    assert calls and profile_cache.nbytes() > built


def test_least_recently_used_go_first(monkeypatch):
    entry = [{"a": np.zeros(1000)}]  # 8000 bytes
    monkeypatch.setattr(profile_cache._cache, "max_bytes", 20_000)
    for name in ("x", "y"):
        profile_cache.cached(name, lambda: [{"a": np.zeros(1000)}])
    profile_cache.cached("x", lambda: entry)  # a hit: x is now the most recent
    profile_cache.cached("z", lambda: [{"a": np.zeros(1000)}])  # 24000 bytes: y goes
    assert profile_cache.nbytes() == 16_000
    rebuilt = []
    profile_cache.cached("x", lambda: rebuilt.append(1) or entry)
    assert not rebuilt
    profile_cache.cached("y", lambda: rebuilt.append(1) or entry)
    assert rebuilt
    with pytest.raises(ValueError):  # kept arrays are read-only
        profile_cache.cached("z", lambda: entry)[0]["a"][0] = 1.0
