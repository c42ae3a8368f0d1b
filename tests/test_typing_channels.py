"""Frame typing (seed 001) input channels beyond the paper: asinh stretch, cosmic-ray hits, multi-channel models."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fiberlake.jobs import train as tr  # noqa: E402
from fiberlake.processors import spit  # noqa: E402
from fiberlake.processors import typing_prep as tp  # noqa: E402
from fiberlake.processors.params import TypingTrainParams  # noqa: E402
from fiberlake.processors.typing_route import prepare_for_typing  # noqa: E402
from fiberlake.schemas.header import OBSTYPES  # noqa: E402
from fiberlake.storage import models as store  # noqa: E402


def oriented_frame(seed: int = 0, n_spatial: int = 120, n_spectral: int = 400) -> np.ndarray:
    """``image[spatial, spectral]``: bias 1000 + 3 ADU noise, fibers every 8 rows (PSF sigma 1.5) crossed by
    two emission lines (LSF sigma 1.4) up to 40,000 ADU."""
    rng = np.random.default_rng(seed)
    y = np.arange(n_spatial)[:, None]
    x = np.arange(n_spectral)[None, :]
    fibers = sum(np.exp(-0.5 * ((y - c) / 1.5) ** 2) for c in range(8, n_spatial - 4, 8))
    spectrum = 2000.0 + 38000.0 * np.exp(-0.5 * ((x - 150) / 1.4) ** 2) + 9000.0 * np.exp(-0.5 * ((x - 300) / 1.4) ** 2)
    return (1000.0 + fibers * spectrum + 3.0 * rng.standard_normal((n_spatial, n_spectral))).astype(np.float32)


def test_cosmic_hits_finds_spots_and_tracks_but_no_fiber_or_line():
    image = oriented_frame()
    assert not tp.cosmic_hits(image).any()                      # fibers, lines, noise: no hit
    spots = [(4, 40), (36, 220), (60, 390), (100, 12)]          # between fibers
    for y, x in spots:
        image[y, x] += 1500.0
    image[16, 100] += 30000.0                                   # on a fiber's centre (2,000 ADU)
    image[20:30, 330] += 3000.0                                 # a track across the fibers (along the spatial axis)
    hits = tp.cosmic_hits(image)
    expected = {(y, x) for y, x in spots} | {(16, 100)} | {(y, 330) for y in range(20, 30)}
    assert set(zip(*np.nonzero(hits))) == expected
    # counted on a coarser grid: every hit once
    counts = tp.count_map(hits, (30, 50))
    assert counts.sum() == len(expected) and counts[5, 330 * 50 // 400] == 4         # rows 20-23


def test_asinh_channel_keeps_what_zscale_clips():
    image = 1000.0 + 3.0 * np.random.default_rng(0).standard_normal(tp.TARGET_SHAPE)
    image[50:60] += 200.0          # a faint fiber
    image[100:110] += 20000.0      # a bright fiber, 100 times brighter
    image[150:160] += 40000.0      # twice brighter still
    z = tp.zscale_uint8(image)
    a = tp.asinh_uint8(image)
    assert z[105, 0] == z[155, 0] == z[55, 0] == 255            # ZSCALE: all three clipped alike
    assert a[0, 0] < 40 < a[55, 0] < a[105, 0] < a[155, 0] < 255
    assert a.dtype == np.uint8 and not tp.asinh_uint8(np.full((4, 4), np.nan)).any()


def test_prepare_channels_adds_channels_to_the_papers_image():
    raw = np.transpose(oriented_frame(1, 300, 700)).copy()      # raw frames disperse along rows
    raw[100, 50] += 20000.0
    out = tp.prepare_channels(raw, tp.CHANNELS)
    assert out.shape == (3,) + tp.TARGET_SHAPE and out.dtype == np.uint8
    assert np.array_equal(out[0], tp.prepare_frame(raw))
    assert out[2].sum() == tp.COSMIC_COUNT_SCALE                # the one hit
    assert np.array_equal(tp.prepare_channels(raw, ("cosmics", "zscale")), out[[2, 0]])
    for bad in ((), ("zscale", "zscale"), ("log",)):
        with pytest.raises(ValueError, match="input channels"):
            tp.prepare_channels(raw, bad)
    assert prepare_for_typing(raw.astype(np.uint16), channels=("zscale", "asinh")).image.shape == (2,) + tp.TARGET_SHAPE
    assert prepare_for_typing(raw.astype(np.uint16)).image.shape == tp.TARGET_SHAPE
    assert tp.flips(out)[3][1].tolist() == out[1][::-1, ::-1].tolist()


def test_a_three_channel_model_round_trips_and_refuses_other_inputs(tmp_path):
    torch.manual_seed(0)
    model = spit.build_model("compact", len(OBSTYPES), tp.TARGET_SHAPE, channels=(2, 2, 2, 2), hidden=4, in_channels=3)
    card = {"stage": "typing", "architecture": "compact", "arch_params": tr.arch_params(model), "classes": list(OBSTYPES),
            "input_shape": list(tp.TARGET_SHAPE), "prep": tp.prep_config(tp.CHANNELS)}
    assert card["arch_params"]["in_channels"] == 3 and card["prep"]["channels"] == list(tp.CHANNELS)
    store.write_artifact(tmp_path / "m", spit.state_arrays(model), card)
    typer = tr.load_typing_model(str(tmp_path / "m"), device="cpu")
    assert typer.channels == tp.CHANNELS
    images = np.random.default_rng(0).integers(0, 255, (2, 3) + tp.TARGET_SHAPE, dtype=np.uint8)
    assert typer.flip_probabilities(images).shape == (2, 4, len(OBSTYPES))
    with pytest.raises(spit.ModelError, match="reads 3 channel"):
        typer.flip_probabilities(images[:, 0])
    # the first models' cards (no channels, no in_channels) still load as one-channel models
    assert tr.card_channels({"prep": tp.prep_config()}) == tp.PAPER_CHANNELS
    assert tr.input_channels(TypingTrainParams(channels="zscale, cosmics")) == ("zscale", "cosmics")
    data = tr.TypingData(images, np.zeros(2, np.int64), [{}, {}], [])
    assert np.array_equal(data.select_channels(("cosmics",), tp.CHANNELS).images, images[:, 2:3])
