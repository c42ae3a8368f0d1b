"""Frame typing (seed 001) beyond the paper: per-frame scalars (cosmic-ray hit rate, absolute levels) and the
fused model (image network x scalars' classifier)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fiberlake.jobs import train as tr  # noqa: E402
from fiberlake.processors import spit  # noqa: E402
from fiberlake.processors import typing_prep as tp  # noqa: E402
from fiberlake.processors.params import TypingTrainParams  # noqa: E402
from fiberlake.processors.typing_route import prepare_for_typing, type_frames  # noqa: E402
from fiberlake.schemas.header import OBSTYPES  # noqa: E402
from fiberlake.schemas.instrument import get_instrument  # noqa: E402
from fiberlake.storage import models as store  # noqa: E402


def raw_frame(level: float, n_hits: int, seed: int = 0, shape: tuple[int, int] = (700, 300)) -> np.ndarray:
    """Raw (rows = spectral axis): bias 1000 + 3 ADU noise, 20 fibers at ``level`` ADU, ``n_hits`` cosmic-ray
    spots of 3,000 ADU between the fibers."""
    rng = np.random.default_rng(seed)
    x = np.arange(shape[1])[None, :]
    fibers = sum(np.exp(-0.5 * ((x - c) / 1.5) ** 2) for c in range(10, shape[1] - 10, 14))
    raw = 1000.0 + level * fibers + 3.0 * rng.standard_normal(shape)
    rows = rng.choice(np.arange(5, shape[0] - 5), n_hits, replace=False)
    raw[rows, 17 + 14 * (np.arange(n_hits) % 19)] += 3000.0   # between fibers, distinct pixels
    return raw.astype(np.float32)


def test_scalars_count_hits_per_raw_pixel_and_absolute_levels():
    quiet, busy = raw_frame(500.0, 0), raw_frame(500.0, 40)
    image_q, sq = tp.prepare_with_scalars(quiet)
    image_b, sb = tp.prepare_with_scalars(busy)
    assert sq.dtype == np.float32 and sq.shape == (len(tp.SCALARS),)
    assert sq[0] == 0.0
    assert sb[0] == pytest.approx(np.log10(1 + 1e6 * 40 / busy.size), abs=0.02)     # every hit, per raw pixel
    bright = tp.prepare_with_scalars(raw_frame(20000.0, 0))[1]
    assert sq[3] < bright[3] and sq[3] == pytest.approx(np.log10(1 + 500.0), abs=0.1)  # p99: a fiber's peak
    # the paper's image is untouched (the same bytes as prepare_frame); a subset of the scalars, in its order
    assert np.array_equal(image_b[0], tp.prepare_frame(busy))
    assert np.array_equal(tp.prepare_with_scalars(busy, scalars=("level_p99", "hit_rate"))[1], sb[[3, 0]])
    prepared = prepare_for_typing(busy, scalars=tp.SCALARS)
    assert prepared.image.shape == tp.TARGET_SHAPE and np.array_equal(prepared.scalars, sb)
    assert prepare_for_typing(busy).scalars is None
    with pytest.raises(ValueError, match="frame scalars"):
        tp.check_scalars(["exptime"])


def test_data_sets_compute_scalars_from_their_stored_channels():
    frames = [raw_frame(300.0 * (i + 1), 10 * i, seed=i) for i in range(3)]
    images = np.stack([tp.prepare_channels(f, tp.CHANNELS) for f in frames])
    meta = [{"instrument": "mini"}] * 3
    data = tr.TypingData(images, np.arange(3), meta, []).with_scalars(tp.SCALARS, tp.CHANNELS)
    pixels = int(np.prod(get_instrument("mini").raw_shape))
    assert np.allclose(data.scalars[2], tp.frame_scalars(images[2, 1], images[2, 2], pixels))
    kept = data.select_channels(("zscale",), tp.CHANNELS).subset(np.array([True, False, True]))
    assert kept.images.shape == (2, 1) + tp.TARGET_SHAPE and np.array_equal(kept.scalars, data.scalars[[0, 2]])
    assert kept.without_scalars().scalars is None


def _fused(n_scalars: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    image = spit.build_model("compact", len(OBSTYPES), channels=(2, 2, 2, 2), hidden=4)
    # scalars that tell the classes apart: class k around k
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(OBSTYPES)), 8)
    scalars = (labels[:, None] + 0.1 * rng.standard_normal((labels.size, n_scalars))).astype(np.float32)
    head, info = tr.fit_scalar_head(scalars, labels, len(OBSTYPES), TypingTrainParams(scalar_steps=300, seed=seed),
                                    log=lambda _: None)
    return tr.fuse(image, head, "compact"), info, scalars, labels


def test_the_fused_model_multiplies_the_image_networks_and_the_scalars_probabilities(tmp_path):
    model, info, scalars, labels = _fused()
    assert info["accuracy"] == 1.0 and np.allclose(model.head.mean.numpy(), scalars.mean(0))
    x, s = torch.rand(3, 1, *tp.TARGET_SHAPE), torch.from_numpy(scalars[[0, 20, 47]])
    with torch.no_grad():
        product = torch.softmax(model.image(x), 1) * torch.softmax(model.head(s), 1)
        expected = (product / product.sum(1, keepdim=True)).numpy()
        np.testing.assert_allclose(torch.softmax(model(x, s), 1).numpy(), expected, atol=1e-6)
    with pytest.raises(spit.ModelError, match="scalars"):
        model(x)
    # an artifact: the card names the scalars, ingest's typer reads them
    card = {"stage": "typing", "architecture": "fused", "arch_params": tr.arch_params(model), "classes": list(OBSTYPES),
            "input_shape": list(tp.TARGET_SHAPE),
            "prep": {**tp.prep_config(("zscale",)), **tr.scalar_config(("hit_rate", "level_p50"))}}
    _, path = store.write_artifact_named(tmp_path, spit.state_arrays(model), card, "typing")
    typer = tr.load_typing_model(str(path), device="cpu")
    assert typer.scalars == ("hit_rate", "level_p50") and card["arch_params"]["image"]["architecture"] == "compact"
    images = np.random.default_rng(0).integers(0, 255, (2,) + tp.TARGET_SHAPE, dtype=np.uint8)
    with pytest.raises(spit.ModelError, match="scalars"):
        typer.flip_probabilities(images)
    probs = typer.flip_probabilities(images, scalars[[0, 47]])
    assert probs.shape == (2, 4, len(OBSTYPES)) and probs[0, :, 0].mean() > probs[1, :, 0].mean()
    rows = type_frames(typer, [raw_frame(800.0, 5)], ["SCIENCE"], [{"night": "n", "expid": 1, "camera": "b1"}])
    assert rows[0]["model_id"] == typer.model_id and rows[0]["flips_agreeing"] >= 1
    # a paper-input model (no scalars on its card) still types without them
    assert tr.card_scalars({"prep": tp.prep_config()}) == ()


def test_the_dense_variant_reads_the_scalars_beside_the_pooled_features():
    model = spit.build_model("compact", len(OBSTYPES), channels=(2, 2, 2, 2), hidden=4, n_scalars=3).eval()
    assert tr.arch_params(model)["n_scalars"] == 3 and "n_scalars" not in tr.arch_params(
        spit.build_model("compact", len(OBSTYPES), channels=(2, 2, 2, 2), hidden=4))
    x = torch.rand(2, 1, *tp.TARGET_SHAPE)
    with torch.no_grad():
        a, b = model(x, torch.zeros(2, 3)), model(x, torch.full((2, 3), 5.0))
    assert a.shape == (2, len(OBSTYPES)) and not torch.allclose(a, b)
    with pytest.raises(spit.ModelError, match="scalars"):
        model(x)
    assert tr.input_scalars(TypingTrainParams(scalars="")) == ()
    assert tr.input_scalars(TypingTrainParams(scalars="level_p99, hit_rate")) == ("level_p99", "hit_rate")
