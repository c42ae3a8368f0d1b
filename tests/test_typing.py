"""Frame typing (seed 001, SPIT): pre-processing, networks, final scheme, routing, artifacts, simulator variety."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fiberlake.ingest import simulate as sim  # noqa: E402
from fiberlake.ingest import typing_dataset as td  # noqa: E402
from fiberlake.ingest.sim_variety import EXPTIME_RANGES, FrameVariant, draw_variant  # noqa: E402
from fiberlake.jobs import train as tr  # noqa: E402
from fiberlake.processors import spit  # noqa: E402
from fiberlake.processors import typing_prep as tp  # noqa: E402
from fiberlake.processors.params import TypingParams, TypingTrainParams  # noqa: E402
from fiberlake.processors.typing_route import header_audit, prepare_for_typing, route, type_frames  # noqa: E402
from fiberlake.schemas.header import OBSTYPES  # noqa: E402
from fiberlake.schemas.instrument import MINI  # noqa: E402
from fiberlake.schemas.parset import ParameterError  # noqa: E402
from fiberlake.schemas.tables import KEYS, SCHEMAS, TABLE_DESCRIPTIONS  # noqa: E402
from fiberlake.storage import models as store  # noqa: E402

NIGHT = "2025-02-03"


def synthetic_frame(ny: int = 300, nx: int = 200, n_over: int = 20, lit: slice = slice(40, 160), seed: int = 0,
                    level: float = 5000.0) -> np.ndarray:
    """A raw-like frame: bias 1000 + noise everywhere, a lit band of columns (fibers), an overscan."""
    rng = np.random.default_rng(seed)
    raw = 1000.0 + 3.0 * rng.standard_normal((ny, nx + n_over))
    cols = np.arange(nx)
    fibers = np.zeros(nx)
    fibers[lit] = level * (0.5 + 0.5 * np.cos(2 * np.pi * (cols[lit] - lit.start) / 8.0))
    raw[:, :nx] += fibers[None, :]
    raw[50, 10] = 60000.0  # a cosmic ray in the blank region
    return np.clip(raw, 0, 65535).astype(np.uint16)


def tiny_typer(seed: int = 0, channels=(2, 2, 2, 2), hidden: int = 4) -> spit.FrameTyper:
    torch.manual_seed(seed)
    model = spit.build_model("compact", len(OBSTYPES), tp.TARGET_SHAPE, channels=channels, hidden=hidden)
    return spit.FrameTyper(model, OBSTYPES, "typing-test", device="cpu", batch=4)


# --- pre-processing ---------------------------------------------------------------------------
def test_orient_puts_the_spectral_axis_along_columns():
    raw = np.zeros((1024, 640))
    assert tp.orient(raw).shape == (640, 1024)
    assert tp.orient(raw, 1).shape == (1024, 640)
    assert tp.orient(np.zeros((100, 300)), None).shape == (100, 300)
    assert tp.orient(np.zeros((300, 100)), None).shape == (100, 300)
    with pytest.raises(ValueError):
        tp.orient(np.zeros((2, 3, 4)))


def test_trim_finds_the_lit_band_despite_a_cosmic_ray_and_keeps_blank_frames_whole():
    raw = synthetic_frame()
    image = tp.orient(raw)  # rows: columns of the raw frame (spatial), including the overscan
    region = tp.trim_region(tp.row_max_profile(image))
    assert 38 <= region.start <= 42 and 152 <= region.stop <= 161
    flat = tp.orient(synthetic_frame(level=0.0))
    assert tp.trim_region(tp.row_max_profile(flat)) == slice(0, flat.shape[0])
    # a region narrower than the minimum is not believed
    assert tp.trim_region(np.array([10.0] * 20 + [30.0] * 3 + [10.0] * 20)) == slice(0, 43)


def test_row_max_profile_equals_the_masked_array_path():
    odd = tp.orient(synthetic_frame(seed=3)).astype(np.float32)
    odd[:, 5] = 7.0                          # a constant column (std 0: nothing inside but the value)
    odd[3, :] = np.nan                       # a row with no finite pixel
    odd[7, ::3] = np.inf                     # infinities, clipped as astropy clips them
    odd[9, :] = 1e9                          # a row clipped in every column: its unclipped maximum
    frames = [tp.orient(synthetic_frame()), tp.orient(synthetic_frame(level=0.0)), odd,
              tp.orient(_frame("SCIENCE", exptime=600.0).raw)]
    for image in frames:
        before = image.copy()
        new, old = tp.row_max_profile(image), tp.row_max_profile_masked(image)
        assert new.dtype == np.float64 and np.array_equal(new, old, equal_nan=True)
        assert np.array_equal(image, before, equal_nan=True)  # the input is not written
    assert tp.row_max_profile(odd)[9] == 1e9


def test_prepare_frame_gives_uint8_210x650_for_small_and_large_frames():
    for raw in (synthetic_frame(), synthetic_frame(ny=1400, nx=900, lit=slice(100, 800))):
        out = tp.prepare_frame(raw)
        assert out.dtype == np.uint8 and out.shape == tp.TARGET_SHAPE
        assert out.min() == 0 or out.max() == 255
    # the spectral axis (raw rows) runs along the output's columns: a row gradient of the raw
    # frame becomes a column gradient
    ramp = (1000 + np.arange(600)[:, None] * 10 + np.zeros((1, 250))).astype(np.uint16)
    out = tp.prepare_frame(ramp).astype(float)
    assert np.all(np.diff(out.mean(axis=0)) >= 0) and np.ptp(out.mean(axis=1)) < 1


def test_resize_averages_blocks_of_large_frames():
    image = np.arange(420 * 1300, dtype=np.float32).reshape(420, 1300)
    out = tp.resize(image)
    assert out.shape == tp.TARGET_SHAPE and out.dtype == np.float32
    assert out[0, 0] == pytest.approx(image[:2, :2].mean())


def test_zscale_matches_astropy_and_maps_constant_images_to_zero():
    from astropy.visualization import ZScaleInterval

    rng = np.random.default_rng(1)
    image = rng.normal(100, 5, (60, 80))
    z1, z2 = ZScaleInterval(contrast=0.25).get_limits(image)
    out = tp.zscale_uint8(image)
    expect = np.round(np.clip((image - z1) / (z2 - z1), 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(out, expect)
    assert not tp.zscale_uint8(np.full((10, 10), 7.0)).any()
    assert not tp.zscale_uint8(np.full((10, 10), np.nan)).any()


def test_frame_defects_and_flips():
    assert tp.frame_defect(np.zeros((50, 40), np.uint16)) == "blank"
    assert tp.frame_defect(np.full((50, 40), 65535, np.uint16)) == "blank"
    sat = np.full((50, 40), 65535, np.uint16)
    sat[:10] = 1000
    assert tp.frame_defect(sat) == "saturated"
    assert tp.frame_defect(np.full((5, 5), np.nan)) == "not finite"
    assert tp.frame_defect(synthetic_frame()) is None
    f = tp.flips(np.arange(6).reshape(2, 3))
    assert f.shape == (4, 2, 3) and f[1, 0, 0] == 2 and f[2, 0, 0] == 3 and f[3, 0, 0] == 5


def test_blank_saturated_and_nan_frames_are_unknown_not_a_crash():
    blank = np.zeros((300, 220), np.uint16)
    saturated = np.full((300, 220), 65535, np.uint16)
    saturated[::7] = 900
    nan = np.full((300, 220), np.nan)
    raws = [blank, saturated, nan, synthetic_frame()]
    keys = [{"night": NIGHT, "expid": i, "camera": "b1", "file_version": 1, "pixel_sha256": "x"} for i in range(4)]
    rows = type_frames(tiny_typer(), raws, ["BIAS", "FLAT", None, "science"], keys)
    assert [r["type_pixels"] for r in rows[:3]] == ["UNKNOWN"] * 3
    assert [r["untypable"] for r in rows[:3]] == ["blank", "saturated", "not finite"]
    assert rows[0]["type_used"] == "BIAS" and rows[0]["type_flag"] == "pixels_unknown"
    assert rows[2]["type_used"] == "UNKNOWN" and rows[2]["type_flag"] == "untypable"
    assert rows[3]["type_header"] == "SCIENCE" and rows[3]["p_bias"] is not None
    assert sum(rows[3][f"p_{c.lower()}"] for c in OBSTYPES) == pytest.approx(1.0, abs=1e-5)
    # the rows fit the frames table
    from fiberlake.storage.tables import conform

    now = dt.datetime.now(dt.timezone.utc)
    table = conform("frames", [{**r, "typed_at": now} for r in rows])
    assert table.num_rows == 4
    # typing off: header types only, no model id
    off = type_frames(None, raws, ["BIAS", "FLAT", None, "SCIENCE"], keys)
    assert [r["type_used"] for r in off] == ["BIAS", "FLAT", "UNKNOWN", "SCIENCE"]
    assert all(r["model_id"] is None and r["type_pixels"] is None for r in off)


# --- networks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(210, 650), (100, 300), (42, 130)])
def test_paper_network_layer_sizes_derive_from_the_input_shape(shape):
    net = spit.SPITNet(6, shape)
    h, w = (shape[0] // 2) // 2, (shape[1] // 2) // 2
    assert net.classifier[1].in_features == 64 * h * w
    assert net.feature_shape == (64, h, w)
    if shape == (210, 650):
        assert net.classifier[1].weight.numel() == 69_009_408  # the paper's 52 x 162 x 64 -> 128
    else:
        assert net(torch.zeros(2, 1, *shape)).shape == (2, 6)


def test_compact_network_is_small_and_shape_independent():
    net = spit.SPITCompact(6)
    assert spit.n_parameters(net) < 60_000
    assert net(torch.zeros(3, 1, 210, 650)).shape == (3, 6)
    other = spit.SPITCompact(5, (64, 200))
    assert other(torch.zeros(1, 1, 64, 200)).shape == (1, 5)
    with pytest.raises(spit.ModelError):
        spit.SPITCompact(6, (8, 8))
    with pytest.raises(spit.ModelError):
        spit.build_model("resnet", 6)


def _trained_looking(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` with random batch-normalisation statistics and affine terms (fresh ones fold trivially)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(0.2 + torch.rand(n, generator=generator))
            module.weight.data.copy_(torch.randn(n, generator=generator))
            module.bias.data.copy_(torch.randn(n, generator=generator))
    return model.eval()


@pytest.mark.parametrize("architecture, arch_params, shape, n_scalars", [
    ("compact", {}, (210, 650), 0),
    ("compact", {"in_channels": 3, "n_scalars": 4}, (210, 650), 4),
    ("paper", {}, (42, 130), 0),
    ("fused", {"image": {"architecture": "compact", "arch_params": {}}, "n_scalars": 4}, (210, 650), 4),
    ("ensemble", {"members": [{"architecture": "compact", "arch_params": {"channels": (4, 8, 8, 8)}},
                              {"architecture": "compact", "arch_params": {}}]}, (210, 650), 0),
])
def test_the_inference_form_computes_the_trained_networks_function(architecture, arch_params, shape, n_scalars):
    from torch import nn

    from fiberlake.processors.spit_inference import channels_last_input, inference_form

    torch.manual_seed(3)
    model = _trained_looking(spit.build_model(architecture, 6, shape, **arch_params), seed=4)
    fast = inference_form(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules()), "every batch normalisation folded"
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == (architecture != "paper")
    for m in fast.modules():                      # pooling first, then the ReLU, wherever both follow
        if isinstance(m, nn.Sequential):
            pairs = list(zip(list(m)[:-1], list(m)[1:]))
            assert not any(isinstance(a, nn.ReLU) and isinstance(b, nn.MaxPool2d) for a, b in pairs)
    n_in = getattr(model, "in_channels", 1)
    x = torch.rand(8, n_in, *shape, generator=torch.Generator().manual_seed(5))
    extra = (torch.randn(8, n_scalars),) if n_scalars else ()
    with torch.no_grad():
        want = torch.softmax(model(x, *extra).float(), dim=1)
        got = torch.softmax(fast(channels_last_input(x), *extra).float(), dim=1)
    assert float((got - want).abs().max()) < 1e-5
    assert float((want.max(dim=1).values - want.min(dim=1).values).min()) > 1e-3, "outputs must differ by class"


def test_the_typer_types_with_the_inference_form_and_keeps_the_trained_model():
    typer = tr.load_typing_model("default", device="cpu")
    assert typer.runner is not typer.model
    images = np.stack([tp.prepare_frame(synthetic_frame(seed=s, level=lv)) for s, lv in ((0, 5000.0), (1, 80.0))])
    scalars = np.array([[1.9, 1.0, 2.0, 3.0], [0.0, 0.5, 1.0, 1.5]], dtype=np.float32)
    got = typer.flip_probabilities(images, scalars)
    with torch.no_grad():
        x = spit.to_input(np.concatenate([tp.flips(im) for im in images]))
        logits = typer.model(x, torch.from_numpy(np.repeat(scalars, 4, axis=0)))
        want = torch.softmax(logits.float(), dim=1).numpy().reshape(2, 4, -1)
    assert np.abs(got - want).max() < 1e-5
    assert "running_mean" in " ".join(spit.state_arrays(typer.model)), "the stored form is the trained one"


def test_final_scheme_votes_over_four_flips():
    p = np.full((4, 4, 3), 0.1)
    p[0, :, 1] = 0.8                       # 4 of 4
    p[1, :3, 2] = 0.8; p[1, 3, 0] = 0.8    # 3 of 4
    p[2, :2, 0] = 0.8; p[2, 2:, 2] = 0.8   # 2-2: unknown
    p[3, 0, 0] = 0.8; p[3, 1, 1] = 0.8; p[3, 2:, 2] = 0.8  # 2-1-1: unknown
    v = spit.vote(p)
    assert v.index.tolist() == [1, 2, -1, -1]
    assert v.flips_agreeing.tolist() == [4, 3, 2, 2]
    assert v.confidence[0] == pytest.approx(0.8)
    assert spit.vote(p, super_majority=4).index.tolist() == [1, -1, -1, -1]


def test_held_out_figures_follow_the_papers_definitions():
    labels = np.array([0, 0, 1, 1])
    p = np.zeros((4, 4, 2))
    p[0, :, 0] = 1; p[1, :, 0] = 1; p[2, :, 1] = 1
    p[3, :2, 0] = 1; p[3, 2:, 1] = 1       # a 2-2 frame of class 1
    fig = spit.evaluate_votes(p, labels, ("A", "B"))
    assert fig["normalized_accuracy"] == pytest.approx((1.0 + 6 / 8) / 2)
    assert fig["final_accuracy"] == 0.75 and fig["unknown_rate"] == 0.25 and fig["misclassified_rate"] == 0
    assert fig["confusion"] == [[2, 0, 0], [0, 1, 1]]
    assert "UNKNOWN" in spit.format_confusion(fig, ("A", "B"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_and_cpu_give_the_same_types():
    images = np.random.default_rng(0).integers(0, 255, (3,) + tp.TARGET_SHAPE, dtype=np.uint8)
    cpu = tiny_typer()
    gpu = spit.FrameTyper(cpu.model, OBSTYPES, device="cuda")
    assert np.allclose(cpu.flip_probabilities(images), gpu.flip_probabilities(images), atol=1e-4)


# --- routing ----------------------------------------------------------------------------------
def test_routing_modes():
    assert route("ARC", "BIAS", 4, 0.99) == route("arc", "BIAS", 4, 0.99)
    assert route("ARC", "BIAS", 4, 0.99).flag == "header_overridden"
    assert route("ARC", "BIAS", 4, 0.5).type_used == "ARC"                       # not confident
    assert route("ARC", "BIAS", 4, 0.99, mode="header").type_used == "ARC"
    assert route("ARC", "BIAS", 3, 0.6, mode="pixels").type_used == "BIAS"
    assert route("ARC", "ARC", 4, 0.99).flag is None
    assert route("", "FLAT", 3, 0.5).type_used == "FLAT"                          # missing header
    assert route("LAMP", "FLAT", 3, 0.5).flag == "header_missing"                 # not a known type
    assert route(None, "UNKNOWN", 2, 0.4).type_used == "UNKNOWN"
    assert route(None, "FLAT", 4, 0.99, mode="header").type_used == "UNKNOWN"
    assert route("SCIENCE", "UNKNOWN", 2, 0.5).type_used == "SCIENCE"
    with pytest.raises(ValueError):
        route("ARC", "ARC", 4, 1.0, mode="vote")


def test_header_audit_with_a_perfect_and_a_useless_model():
    labels = np.repeat(np.arange(6), 20)
    perfect = np.zeros((labels.size, 4, 6))
    perfect[np.arange(labels.size), :, labels] = 1.0
    groups = np.arange(labels.size) // 30
    good = header_audit(perfect, labels, OBSTYPES, groups, trials=20)
    assert good["caught"] == 1.0 and good["corrected"] == 1.0 and good["false_alarm"] == 0.0
    assert good["calib_equal_routing"] == 1.0 and good["calib_equal_header"] < 1.0
    useless = np.full((labels.size, 4, 6), 1 / 6)
    bad = header_audit(useless, labels, OBSTYPES, groups, trials=20)
    assert bad["false_alarm"] == 0.0 and bad["caught"] < 1.0


# --- parameters and tables --------------------------------------------------------------------
def test_typing_parameters_are_declared_and_validated():
    assert TypingParams().routing == "auto"
    assert "batch" not in TypingParams().science_dict()
    with pytest.raises(ParameterError, match="--typing-routing"):
        TypingParams(routing="vote")
    with pytest.raises(ParameterError, match="--typing-min-flips"):
        TypingParams(min_flips=2)
    assert all(row["description"] for row in TypingTrainParams.describe())


def test_train_flags_come_from_the_declarations():
    import argparse

    parser = argparse.ArgumentParser()
    tr.add_train_flags(parser)
    args = parser.parse_args(["--train-epochs", "3", "--train-arch", "paper", "--train-lr", "0.01"])
    params = tr.train_params_from_args(args)
    assert (params.epochs, params.arch, params.lr, params.batch) == (3, "paper", 0.01, TypingTrainParams().batch)
    with pytest.raises(ParameterError, match="--train-epochs"):
        tr.train_params_from_args(parser.parse_args(["--train-epochs", "0"]))
    # the ingest stage's set gets its flags the same way
    ingest = argparse.ArgumentParser()
    tr.add_parset_flags(ingest, TypingParams, "typing")
    typing = tr.parset_from_args(ingest.parse_args(["--no-typing", "--typing-routing", "header"]), TypingParams, "typing")
    assert (typing.enabled, typing.routing, typing.model) == (False, "header", "default")


def test_frames_and_models_tables_are_declared():
    for name in ("frames", "models"):
        assert name in SCHEMAS and name in KEYS and name in TABLE_DESCRIPTIONS
        assert "night" in SCHEMAS[name].names
        assert all(f.metadata and f.metadata[b"description"] for f in SCHEMAS[name])
    assert {f"p_{c.lower()}" for c in OBSTYPES} <= set(SCHEMAS["frames"].names)


def test_balanced_oversampling_and_flips():
    labels = np.array([0] * 7 + [1] * 3 + [2])
    idx = tr.balanced_indices(labels, np.random.default_rng(0))
    assert np.bincount(labels[idx]).tolist() == [7, 7, 7]
    assert set(idx[labels[idx] == 1]) == {7, 8, 9}
    image = np.arange(6).reshape(2, 3)
    assert all(np.array_equal(tr.flip_image(image, k), tp.flips(image)[k]) for k in range(4))


# --- artifacts --------------------------------------------------------------------------------
def _write_tiny(tmp_path, channels=(2, 2, 2, 2)):
    typer = tiny_typer(channels=channels)
    card = {"stage": "typing", "architecture": "compact", "arch_params": {"channels": list(channels), "hidden": 4},
            "classes": list(OBSTYPES), "input_shape": list(tp.TARGET_SHAPE), "prep": tp.prep_config()}
    card = store.write_artifact(tmp_path / "m", spit.state_arrays(typer.model), card)
    return typer, card, tmp_path / "m"


def test_artifact_round_trip_through_safetensors(tmp_path):
    typer, card, folder = _write_tiny(tmp_path)
    assert card["model_id"].startswith("typing-") and (folder / "weights.safetensors").exists()
    loaded = tr.load_typing_model(str(folder), device="cpu")
    assert loaded.model_id == card["model_id"]
    images = np.random.default_rng(2).integers(0, 255, (2,) + tp.TARGET_SHAPE, dtype=np.uint8)
    assert np.allclose(loaded.flip_probabilities(images), typer.flip_probabilities(images), atol=1e-6)
    # the same weights and definition give the same id
    assert store.write_artifact(tmp_path / "again", spit.state_arrays(typer.model), card)["model_id"] == card["model_id"]


def test_missing_truncated_corrupt_and_mis_shaped_artifacts_are_clear_errors(tmp_path):
    _, card, folder = _write_tiny(tmp_path)
    with pytest.raises(store.ArtifactError, match="no card.json"):
        tr.load_typing_model(str(tmp_path))          # a folder without an artifact
    with pytest.raises(store.ArtifactError, match="no typing model"):
        tr.load_typing_model(str(tmp_path / "nowhere"))
    weights = folder / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(store.ArtifactError, match="truncated"):
        tr.load_typing_model(str(folder))
    weights.write_bytes(data[:5])
    with pytest.raises(store.ArtifactError, match="truncated"):
        tr.load_typing_model(str(folder))
    corrupt = bytearray(data)
    corrupt[-1] ^= 0xFF
    weights.write_bytes(bytes(corrupt))
    with pytest.raises(store.ArtifactError, match="changed or corrupt"):
        tr.load_typing_model(str(folder))
    weights.write_bytes(data)
    (folder / "card.json").write_text("{not json")
    with pytest.raises(store.ArtifactError, match="not JSON"):
        tr.load_typing_model(str(folder))
    # weights of another shape under a card (and hash) that claims this architecture
    other = tiny_typer(channels=(3, 2, 2, 2))
    bad = {k: v for k, v in card.items() if k not in ("model_id", "weights_sha256", "size_bytes")}
    store.write_artifact(tmp_path / "bad", spit.state_arrays(other.model), bad)
    with pytest.raises(spit.ModelError, match="shape"):
        tr.load_typing_model(str(tmp_path / "bad"))
    (tmp_path / "bad" / "weights.safetensors").unlink()
    with pytest.raises(store.ArtifactError, match="no weights.safetensors"):
        tr.load_typing_model(str(tmp_path / "bad"))


def test_register_model_in_a_lake(tmp_path):
    from fiberlake.storage.layout import Lake
    from fiberlake.storage.tables import TableStore

    _, card, folder = _write_tiny(tmp_path)
    lake = Lake.at(tmp_path / "lake")
    lake.ensure("mini")
    tr.register_model(lake, folder)
    tr.register_model(lake, folder)  # idempotent
    rows = TableStore(lake.root / "tables").read("models").to_pylist()
    assert len(rows) == 1 and rows[0]["model_id"] == card["model_id"]
    assert json.loads(rows[0]["card_json"])["architecture"] == "compact"
    typer = tr.load_typing_model(card["model_id"], lake_root=lake.root, device="cpu")
    assert typer.model_id == card["model_id"]


def test_the_shipped_default_model_loads():
    folder = store.shipped_dir("typing")
    typer = tr.load_typing_model("default", device="cpu")
    card = json.loads((folder / "card.json").read_text())
    assert typer.model_id == card["model_id"] == folder.name
    assert (folder / "weights.safetensors").stat().st_size < 1_000_000
    assert card["heldout"]["final_accuracy"] > 0.9 and "confusion" in card["heldout"]


# --- simulator variety ------------------------------------------------------------------------
def _frame(obstype, variant=None, exptime=None, seq=3, camera="r1"):
    return sim.simulate_frame(MINI, camera, obstype, night=NIGHT, expid=sim.make_expid(NIGHT, seq), seed=21,
                              exptime=exptime, variant=variant)


def test_a_default_variant_changes_no_byte():
    for obstype in ("ARC", "SCIENCE", "FLAT"):
        assert np.array_equal(_frame(obstype).raw, _frame(obstype, FrameVariant()).raw)


def test_variants_change_lamps_sky_and_bias_as_declared():
    def light(frame):
        return frame.raw[:, :MINI.nx].astype(float).sum() - frame.raw[:, MINI.nx:].astype(float).mean() * MINI.ny * MINI.nx

    full, no_ne = _frame("ARC"), _frame("ARC", FrameVariant(lamps_off=("Ne",)))
    assert light(no_ne) < 0.7 * light(full)
    dark, moon = _frame("SCIENCE"), _frame("SCIENCE", FrameVariant(moon=30.0))
    assert moon.truth["SKY_ROWS"].sum() > 10 * dark.truth["SKY_ROWS"].sum()
    assert np.array_equal(moon.truth["OBJ_ROWS"], dark.truth["OBJ_ROWS"])
    twilight = _frame("FLAT", FrameVariant(twilight_peak_adu=20000.0), exptime=5.0)
    assert twilight.header["LAMP"] == "twilight" and twilight.truth["VARIANT"]["twilight_peak_adu"] == 20000.0
    rows = twilight.truth["LAMP_ROWS"].sum(axis=1)
    assert rows.min() > 0.5 * np.median(rows)  # every fiber lit
    shifted = _frame("BIAS", FrameVariant(bias_offset_adu=40.0))
    assert np.median(shifted.raw) - np.median(_frame("BIAS").raw) == pytest.approx(40.0, abs=2)
    with pytest.raises(ValueError):
        FrameVariant(lamps_off=("Xe",))


def test_drawn_variants_span_the_declared_exposure_ranges():
    rng = np.random.default_rng(0)
    for obstype in OBSTYPES:
        for _ in range(30):
            exptime, variant = draw_variant(rng, obstype)
            key = "TWILIGHT" if variant.twilight_peak_adu > 0 else obstype
            lo, hi = EXPTIME_RANGES[key]
            assert lo <= exptime <= hi


def test_typing_nights_are_reproducible_and_split_by_seed():
    assert not set(td.TRAIN_SEEDS) & set(td.HELDOUT_SEEDS)
    a = td.plan_nights("mini", td.HELDOUT_SEEDS[:3], 1)
    assert a == td.plan_nights("mini", td.HELDOUT_SEEDS[:3], 1)
    assert {s.camera for s in td.plan_nights("mini", td.TRAIN_SEEDS[:20], 1)} == {"b1", "r1"}
    frames = list(td.simulate_night_frames(a[0]))
    assert [f.label for f in frames] == list(OBSTYPES)
    assert all(f.raw.shape == MINI.raw_shape and f.raw.dtype == np.uint16 for f in frames)
    again = next(td.simulate_night_frames(a[0], ("ARC",)))
    assert np.array_equal(again.raw, frames[3].raw) or again.expid != frames[3].expid


# --- slow: the shipped model on held-out frames, and the train command ------------------------
@pytest.mark.slow
def test_the_shipped_model_types_held_out_frames_of_every_class():
    typer = tr.load_typing_model("default", device="cpu")
    specs = td.plan_nights("mini", td.HELDOUT_SEEDS[-2:], 1)
    frames = list(td.iter_frames(specs))
    prepared = [prepare_for_typing(f.raw, channels=typer.channels, scalars=typer.scalars) for f in frames]
    images = np.stack([p.image for p in prepared])
    types, _ = typer.type_images(images, 3, np.stack([p.scalars for p in prepared]) if typer.scalars else None)
    truth = [f.label for f in frames]
    correct = [t == y for t, y in zip(types, truth)]
    assert sum(correct) >= len(correct) - 1, list(zip(truth, types))
    for obstype in OBSTYPES:
        assert any(c for c, y in zip(correct, truth) if y == obstype), obstype


def _member_artifact(out, seed: int, epochs: int = 6):
    """A randomly initialised compact network written as a trained member would be."""
    torch.manual_seed(seed)
    model = spit.build_model("compact", len(OBSTYPES))
    params = TypingTrainParams(seed=seed, epochs=epochs).to_dict()
    card = {"stage": "typing", "architecture": "compact", "arch_params": tr.arch_params(model),
            "classes": list(OBSTYPES), "input_shape": list(tp.TARGET_SHAPE), "prep": tp.prep_config(),
            "training": {"params": params}, "heldout": {"final_accuracy": 0.9, "unknown_rate": 0.01}}
    return store.write_artifact_named(out, spit.state_arrays(model), card, "typing")[1]


def test_an_ensemble_types_with_its_members_mean_probabilities(tmp_path):
    members = [tr.load_typing_model(str(_member_artifact(tmp_path, seed)), device="cpu").model for seed in (0, 1)]
    ensemble = tr.ensemble_of(members)
    assert set(ensemble.state_dict()) == {f"members.{i}.{k}" for i in (0, 1) for k in members[0].state_dict()}
    x = torch.rand(3, 1, *tp.TARGET_SHAPE)
    with torch.no_grad():
        mean = torch.stack([torch.softmax(m.eval()(x), 1) for m in members]).mean(0)
        np.testing.assert_allclose(torch.softmax(ensemble(x), 1).numpy(), mean.numpy(), atol=1e-6)
    # written and read back as one artifact: the same network
    _, path = store.write_artifact_named(tmp_path / "ens", spit.state_arrays(ensemble), {
        "stage": "typing", "architecture": "ensemble", "arch_params": tr.arch_params(ensemble),
        "classes": list(OBSTYPES), "input_shape": list(tp.TARGET_SHAPE), "prep": tp.prep_config()}, "typing")
    loaded = tr.load_typing_model(str(path), device="cpu")
    with torch.no_grad():
        np.testing.assert_allclose(loaded.model(x).numpy(), ensemble(x).numpy(), atol=1e-6)


def test_an_ensemble_refuses_members_trained_differently(tmp_path):
    a, b = _member_artifact(tmp_path, 0), _member_artifact(tmp_path, 1, epochs=12)
    with pytest.raises(spit.ModelError, match="different data"):
        tr.assemble_typing_ensemble([str(a), str(b)], cache=tmp_path)
    with pytest.raises(spit.ModelError, match="at least two"):
        tr.assemble_typing_ensemble([str(a)])
    with pytest.raises(spit.ModelError, match="single networks"):
        spit.build_model("ensemble", len(OBSTYPES), members=[{"architecture": "ensemble"}])


@pytest.mark.slow
def test_train_command_writes_an_artifact_that_loads(tmp_path):
    from fiberlake.jobs.cli import main

    rc = main(["train", "typing", "--out", str(tmp_path / "models"), "--quiet", "--train-mini-nights", "1",
               "--train-per-class", "1", "--train-lamost-nights", "0", "--train-heldout-mini-nights", "1",
               "--train-heldout-lamost-nights", "0", "--train-heldout-per-class", "1", "--train-epochs", "1"])
    assert rc == 0
    (folder,) = [p for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")]
    card = json.loads((folder / "card.json").read_text())
    assert card["data"]["train"]["frames"] == 6 and card["data"]["heldout"]["seeds"][0] in td.HELDOUT_SEEDS
    assert card["command"].startswith("fiberlake train typing") and card["training"]["params"]["epochs"] == 1
    assert tr.load_typing_model(str(folder), device="cpu").model_id == folder.name
    shutil.rmtree(tmp_path / "models")
    # two members (seeds 0 and 1) averaged as one ensemble artifact
    rc = main(["train", "typing", "--out", str(tmp_path / "models"), "--quiet", "--train-mini-nights", "1",
               "--train-per-class", "1", "--train-lamost-nights", "0", "--train-heldout-mini-nights", "1",
               "--train-heldout-lamost-nights", "0", "--train-heldout-per-class", "1", "--train-epochs", "1",
               "--train-members", "2"])
    assert rc == 0
    (folder,) = [p for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")]
    card = json.loads((folder / "card.json").read_text())
    assert card["architecture"] == "ensemble" and len(card["training"]["members"]) == 2
    assert len(tr.load_typing_model(str(folder), device="cpu").model.members) == 2
