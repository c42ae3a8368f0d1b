"""Stellar classification (seed 003): stripes, DRC-Net / RC-Net, template fit, scores, bad input, simulator classes."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from fiberlake.processors import stripes as st
from fiberlake.processors.classify import classify_exposure
from fiberlake.processors.classify_scores import confusion, scores
from fiberlake.processors.drcnet import DRCNet, RCNet, load_state, predict, state_arrays
from fiberlake.processors.template_fit import TemplateGrid, fit_spectra

CLASSES = ("A", "F", "G", "K", "M", "DA", "C")
torch.set_num_threads(1)   # tiny networks: threads cost more than they give on a shared machine


def _frame(n_fibers=4, ny=96, nx=80, seed=0):
    rng = np.random.default_rng(seed)
    rows = np.arange(ny)
    trace_x = 10.0 + 18.0 * np.arange(n_fibers)[:, None] + 0.01 * (rows[None, :] - ny / 2)  # slight tilt
    cols = np.arange(nx)
    image = np.zeros((ny, nx))
    for x in trace_x:
        image += 100.0 * np.exp(-0.5 * ((cols[None, :] - x[:, None]) / 1.5) ** 2)
    image += rng.normal(0.0, 1.0, image.shape)
    ivar = np.ones_like(image)
    return image, ivar, trace_x


def test_stripes_follow_traces_mask_and_zscore():
    image, ivar, trace_x = _frame()
    bad = np.zeros(image.shape, bool)
    bad[40, int(round(trace_x[1, 40]))] = True          # a cosmic ray on fiber 1's trace
    s = st.cut_stripes(image, ivar, bad, trace_x, rows=(8, 88))
    assert s.pixels.shape == (4, 11, 80)
    profile = s.pixels.sum(axis=2)
    assert np.all(np.argmax(profile, axis=1) == st.STRIPE_HALF)          # centred on the trace
    assert not s.good[1, st.STRIPE_HALF, 40 - 8] and s.pixels[1, st.STRIPE_HALF, 40 - 8] == 0
    z, usable = st.zscore_stripes(s.pixels, s.good)
    assert usable.all() and z[1, st.STRIPE_HALF, 40 - 8] == 0
    g = s.good[2]
    ref = (s.pixels[2][g] - s.pixels[2][g].mean()) / s.pixels[2][g].std(ddof=1)
    np.testing.assert_allclose(z[2][g], ref, rtol=1e-5, atol=1e-5)
    flux, fivar = st.aperture_spectra(s)
    np.testing.assert_allclose(flux[0], s.pixels[0].sum(axis=0), rtol=1e-6)
    np.testing.assert_allclose(fivar[0], 1.0 / 11.0, rtol=1e-6)
    assert st.stripe_window(4096) == (500, 3500) and st.stripe_window(1024) == (125, 875)


def test_dead_and_off_ccd_stripes_are_unusable():
    image, ivar, trace_x = _frame()
    ivar[:, 40:60] = 0.0                                   # fiber 2 masked over its whole stripe
    trace_x[3] = np.nan                                    # a fiber without a trace
    inputs = st.arm_inputs(image, ivar, np.zeros(image.shape, bool), trace_x, np.array([1, 0, 0, 0], bool),
                           dead=np.array([False, True, False, False]))
    assert inputs.usable.tolist() == [True, False, False, False]
    assert np.all(np.isfinite(inputs.stripes)) and np.all(np.isfinite(inputs.flux))


def _sky_frame(seed=0, ny=96, nx=100, star=(0.0, 400.0, 0.0, 50.0, 0.0)):
    """Five fibers (tilted traces, sub-pixel phases vary) on a sky with emission lines; fibers 0, 2, 4 are sky."""
    rng = np.random.default_rng(seed)
    rows, cols = np.arange(ny), np.arange(nx)
    trace_x = 10.0 + 19.0 * np.arange(5)[:, None] + 0.023 * rows[None, :]
    sky = 200.0 + 3000.0 * np.exp(-0.5 * ((rows - 40) / 1.2) ** 2) + 1500.0 * np.exp(-0.5 * ((rows - 70) / 1.2) ** 2)
    stars = np.asarray(star)[:, None] * (1.0 + 0.5 * np.sin(rows / 7.0))[None, :]
    truth = np.zeros((ny, nx))
    for x, s in zip(trace_x, stars):
        prof = np.exp(-0.5 * ((cols[None, :] - x[:, None]) / 1.4) ** 2)
        truth += (sky + s)[:, None] * prof / prof.sum(axis=1, keepdims=True)
    var = 9.0 + truth
    image = truth + rng.normal(0.0, 1.0, truth.shape) * np.sqrt(var)
    ivar = 1.0 / (9.0 + np.maximum(image, 0.0))
    return image, ivar, trace_x, stars


def test_stripes_are_sky_subtracted_with_the_fibers_profile():
    image, ivar, trace_x, stars = _sky_frame()
    sky = np.array([1, 0, 1, 0, 1], bool)
    inputs = st.arm_inputs(image, ivar, np.zeros(image.shape, bool), trace_x, sky)
    r0, r1 = st.stripe_window(image.shape[0])
    # the sky lines (rows 40 and 70, 15x and 7.5x the star) are gone from the faint star's aperture spectrum
    resid = inputs.flux[3] - stars[3, r0:r1]
    noise = 1.0 / np.sqrt(inputs.ivar[3])
    assert np.abs(resid / noise).max() < 5.0 and abs(np.mean(resid / noise)) < 0.5
    # ... and from its stripe, pixel by pixel (the profile follows the trace's sub-pixel phase)
    line = 40 - r0
    pix_resid = inputs.signal[3][:, line - 1:line + 2] - inputs.signal[3][:, [line - 8, line + 8]].mean(axis=1,
                                                                                                     keepdims=True)
    assert np.abs(pix_resid / np.sqrt(inputs.var[3][:, line - 1:line + 2])).max() < 5.0
    # the background variance is read noise (9) plus the sky model, whose aperture sum is the sky spectrum
    sky_true = 200.0 + 3000.0 * np.exp(-0.5 * ((np.arange(r0, r1) - 40) / 1.2) ** 2) \
        + 1500.0 * np.exp(-0.5 * ((np.arange(r0, r1) - 70) / 1.2) ** 2)
    sky_model = inputs.background_var[3].sum(axis=0) - 11 * 9.0
    assert np.median(np.abs(sky_model / sky_true - 1.0)) < 0.05


def test_degraded_star_has_the_fainter_stars_noise():
    rng = np.random.default_rng(3)
    n, shape = 400, (11, 200)
    star, bkg = 50.0, 30.0
    signal = star + rng.normal(0.0, np.sqrt(star + bkg), (n, *shape))
    var = np.full((n, *shape), star + bkg)
    good = np.ones((n, *shape), bool)
    good[:, 0, 0] = False
    f = np.full(n, 0.2)
    out, new_var = st.degrade(signal, var, np.full_like(var, bkg), good, f, rng)
    g = good
    assert abs(out[g].mean() - 0.2 * star) < 0.05
    assert abs(out[g].std() / np.sqrt(0.2 * star + bkg) - 1.0) < 0.01          # f*star + B, not f^2 (star + B)
    np.testing.assert_allclose(new_var[g], 0.2 * star + bkg, rtol=1e-5)
    assert out[0, 0, 0] == 0 and new_var[0, 0, 0] == 0
    # the factor that gives a target S/N inverts S/N = f S / sqrt(f S + B)
    fs = st.factor_for_snr(np.array([1e4, 1e4]), np.array([100.0, 100.0]), np.array([5.0, 1e6]))
    assert abs(fs[0] * 1e4 / np.sqrt(fs[0] * 1e4 + 100.0) - 5.0) < 1e-6 and fs[1] == 1.0


def test_optimal_extraction_gain_over_the_aperture_sum():
    x = np.arange(11) - 5.0
    w = 300
    good = np.ones((3, 11, w), bool)
    narrow, broad = np.exp(-0.5 * (x / 1.0) ** 2), np.exp(-0.5 * (x / 2.5) ** 2)
    signal = np.stack([np.repeat(p[:, None], w, axis=1) for p in (narrow, broad, np.ones(11))])
    bkg = np.full((3, 11, w), 10.0)
    gain = st.optimal_extraction_gain(signal, bkg, good)
    for g, p in zip(gain, (narrow, broad, np.ones(11))):     # uniform noise: sqrt(11 sum p^2), p normalised
        assert abs(g - np.sqrt(11 * ((p / p.sum()) ** 2).sum())) < 1e-9
    assert gain[0] > 1.7 and 1.1 < gain[1] < 1.2 and abs(gain[2] - 1.0) < 1e-12
    # noise dominated by the star's own core (bright star): weighting buys nothing
    assert abs(st.optimal_extraction_gain(signal[:1], 1e-6 + 100.0 * signal[:1], good[:1])[0] - 1.0) < 0.05
    dead = good.copy()
    dead[1] = False
    assert np.isnan(st.optimal_extraction_gain(signal, bkg, dead)[1])


def test_training_nights_spread_over_designs_and_validation_never_shares_one():
    from fiberlake.jobs.classify_data import DESIGN_STRIDE, plan_exposures

    specs = plan_exposures(1501, 12, exposures_per_night=2, designs=3)
    nights = {}
    for s in specs:
        nights.setdefault(s.night, set()).add(s.seed)
    assert len(nights) == 6 and all(len(v) == 1 for v in nights.values())          # one design per night
    assert sorted({s.seed for s in specs}) == [1501, 1501 + DESIGN_STRIDE, 1501 + 2 * DESIGN_STRIDE]
    held = plan_exposures(1551, 12, exposures_per_night=2, designs=3)
    assert not {s.seed for s in specs} & {s.seed for s in held}
    assert plan_exposures(1501, 4) == plan_exposures(1501, 4, designs=1)           # one design: the old plan


def test_augmenter_mirrors_and_drops_arms_for_drcnet_only():
    from fiberlake.jobs.train_classify import Augmenter
    from fiberlake.processors.params import ClassifyTrainParams

    rng = np.random.default_rng(0)
    n, w = 6, 40
    data = {"label": np.arange(n) % 7, "snr_r": np.full(n, 50.0)}
    for a in ("b", "r"):
        prof = np.exp(-0.5 * ((np.arange(11) - 4.0) / 1.2) ** 2)[None, :, None]        # off-centre, asymmetric
        data[f"signal_{a}"] = (100.0 * prof * rng.uniform(0.5, 1.5, (n, 1, w))).astype(np.float32)
        data[f"var_{a}"] = np.full((n, 11, w), 50.0, np.float32)
        data[f"bkg_{a}"] = np.full((n, 11, w), 10.0, np.float32)
        data[f"good_{a}"] = np.ones((n, 11, w), bool)
    idx = np.arange(n)
    plain = ClassifyTrainParams(augment_fraction=0.0, arm_dropout=0.0, mirror_fraction=0.0)
    base = Augmenter(data, plain).batch(idx, np.random.default_rng(1))
    mirrored = Augmenter(data, plain.updated({"mirror_fraction": 1.0})).batch(idx, np.random.default_rng(1))
    np.testing.assert_allclose(mirrored["drcnet"][0], base["drcnet"][0][:, ::-1, :])
    np.testing.assert_allclose(mirrored["drcnet"][1], base["drcnet"][1][:, ::-1, :])
    np.testing.assert_allclose(mirrored["rcnet"][0], base["rcnet"][0])             # aperture sums do not change
    dropped = Augmenter(data, plain.updated({"arm_dropout": 0.5})).batch(np.arange(n).repeat(20),
                                                                         np.random.default_rng(2))
    zb, zr = dropped["drcnet"]
    lost_b, lost_r = ~zb.any(axis=(1, 2)), ~zr.any(axis=(1, 2))
    assert not (lost_b & lost_r).any() and 0.3 < (lost_b | lost_r).mean() < 0.7     # one arm, never both
    spec = dropped["rcnet"][0]
    assert (spec[lost_b, :w] == 0).all() and (spec[lost_r, w:] == 0).all()


@pytest.mark.parametrize("width", [64, 3000])
def test_networks_take_sizes_from_the_input(width):
    torch.manual_seed(0)
    drc = DRCNet(11, width, width - 10, 7).eval()
    rc = RCNet(2 * width - 10, 7).eval()
    zb, zr = torch.randn(2, 11, width), torch.randn(2, 11, width - 10)
    assert drc(zb, zr).shape == (2, 7) and rc(torch.randn(2, 2 * width - 10)).shape == (2, 7)
    p = drc.probabilities(zb, zr)
    torch.testing.assert_close(p.sum(1), torch.ones(2))
    with pytest.raises(ValueError):
        DRCNet(7, width, width, 7)


def test_weights_round_trip_through_safetensors(tmp_path):
    from fiberlake.jobs.train_classify import load_classify_models
    from fiberlake.storage import models as store

    torch.manual_seed(1)
    nets = {"drcnet": DRCNet(11, 40, 40, 7).eval(), "rcnet": RCNet(80, 7).eval()}
    tensors = state_arrays(nets["drcnet"], "drcnet.") | state_arrays(nets["rcnet"], "rcnet.")
    card = {"stage": "classify", "architecture": "drcnet+rcnet", "classes": list(CLASSES), "input_shape": [11, 40, 40],
            "prep": {}, "arch_params": {"drcnet": nets["drcnet"].config, "rcnet": nets["rcnet"].config}}
    store.write_artifact(tmp_path / "m", tensors, card)
    loaded, card2 = load_classify_models(str(tmp_path / "m"))
    x = (np.random.default_rng(0).normal(size=(3, 11, 40)).astype(np.float32),) * 2
    ref = load_state(DRCNet(11, 40, 40, 7), tensors, "drcnet.")      # the same float16-rounded weights
    np.testing.assert_allclose(predict(loaded["drcnet"], x), predict(ref, x), atol=1e-6)
    assert np.abs(predict(loaded["drcnet"], x) - predict(nets["drcnet"], x)).max() < 1e-2
    weights = tmp_path / "m" / store.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(store.ArtifactError):
        load_classify_models(str(tmp_path / "m"))


def _arm(n, w, usable, seed):
    rng = np.random.default_rng(seed)
    return st.ArmInputs(stripes=rng.normal(size=(n, 11, w)).astype(np.float32), usable=np.asarray(usable),
                        flux=rng.normal(10.0, 1.0, size=(n, w)).astype(np.float32),
                        ivar=np.ones((n, w), np.float32), snr=np.full(n, 10.0, np.float32))


def test_missing_arm_and_dead_fiber_give_flags_not_crashes():
    torch.manual_seed(0)
    nets = {"drcnet": DRCNet(11, 40, 40, 7).eval(), "rcnet": RCNet(80, 7).eval()}
    blue = _arm(3, 40, [True, False, False], 0)
    red = _arm(3, 40, [True, True, False], 1)
    out = classify_exposure(blue, red, nets, classes=CLASSES, methods=("drcnet", "rcnet"))
    assert out.flag.tolist() == ["ok", "one_arm", "no_stripe"] and out.arms.tolist() == ["br", "r", ""]
    for p in out.probabilities.values():
        assert np.isfinite(p[:2]).all() and np.isnan(p[2]).all()
    only_red = classify_exposure(None, red, nets, classes=CLASSES, methods=("drcnet",))   # a camera quarantined
    assert only_red.flag.tolist() == ["one_arm", "one_arm", "no_stripe"] and only_red.arms.tolist() == ["r", "r", ""]
    assert np.all(only_red.snr_b == 0)
    with pytest.raises(ValueError):
        classify_exposure(None, None, nets, classes=CLASSES)


def test_template_fit_recovers_class_and_velocity():
    wave = np.arange(3800.0, 9000.0, 0.5)
    cont = (wave / 6000.0) ** -1
    lines = {"X": (4861.0, 5890.0), "Y": (5170.0, 6563.0, 8542.0)}
    flux = np.stack([cont * np.prod([1 - 0.6 * np.exp(-0.5 * ((wave - c) / 3.0) ** 2) for c in centres], axis=0)
                     for centres in lines.values()])
    grid = TemplateGrid(wave=wave, flux=flux, classes=np.array(["X", "Y"]), labels=np.zeros((2, 3)), source="test")
    rng = np.random.default_rng(0)
    wb, wr = np.linspace(4000, 5700, 500)[None, :], np.linspace(6000, 8800, 500)[None, :]
    v = 60.0

    def observe(w):
        true = np.interp(w / (1 + v / 299792.458), wave, flux[1]) * (1 + 0.3 * (w - w.mean()) / np.ptp(w))
        return true + rng.normal(0, 0.01, w.shape), np.full(w.shape, 1e4)

    (fb, ib), (fr, ir) = observe(wb), observe(wr)
    probs, vel = fit_spectra(wb, fb, ib, wr, fr, ir, grid, ("X", "Y"), velocities=np.arange(-120.0, 121.0, 20.0))
    assert probs[0].argmax() == 1 and probs[0, 1] > 0.99 and abs(vel[0] - v) <= 20
    dead, _ = fit_spectra(wb, fb, 0 * ib, wr, fr, 0 * ir, grid, ("X", "Y"))
    assert np.isnan(dead).all()


def test_scores_by_snr_bin():
    truth = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, -1])
    snr = np.array([40, 40, 25, 15, 5, 5])
    s = scores(truth, pred, snr, ("A", "B", "C"))
    assert s[">30"]["accuracy"] == 0.5 and s["20-30"]["accuracy"] == 1.0 and s["<10"]["accuracy"] == 0.5
    assert s["all"]["precision"]["B"] == pytest.approx(2 / 3) and s["all"]["precision"]["C"] == 1.0
    assert s[">30"]["precision"]["C"] is None
    assert confusion(truth, pred, 3).sum() == 5


def test_simulator_draws_white_dwarfs_and_carbon_stars_but_never_as_standards():
    from fiberlake.ingest.sim_spectra import FineGrid, stellar_spectra
    from fiberlake.ingest.simulate import target_params

    kinds = [target_params(3, t, "TGT")["spectype"] for t in range(600)]
    assert {"DA", "C"} <= set(kinds) and 0.03 < kinds.count("DA") / 600 < 0.06
    assert {target_params(3, t, "STD")["spectype"] for t in range(200)} == {"F"}
    grid = FineGrid.covering(4000.0, 8000.0, 0.5)
    w = grid.wave
    da, a = stellar_spectra(grid, [12000.0, 9000.0], [8.0, 4.0], [0.0, 0.0], [0.0, 0.0], spectype=["DA", "A"])
    band = lambda f, lo, hi: f[(w > lo) & (w < hi)].mean()  # noqa: E731
    # DA: H-beta broader than in a main-sequence A star (40 A from the core still deep)
    assert band(da, 4895, 4905) / band(da, 5050, 5100) < band(a, 4895, 4905) / band(a, 5050, 5100) - 0.05
    c, m = stellar_spectra(grid, [3600.0, 3600.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], spectype=["C", "M"])
    # carbon: the C2 Swan head at 5165 A absorbs blueward; no TiO head at 7054 A
    assert band(c, 5120, 5160) / band(c, 5170, 5200) < 0.8
    assert band(c, 7060, 7100) / band(c, 7000, 7040) > band(m, 7060, 7100) / band(m, 7000, 7040) + 0.2


def test_labels_target_view_combines_exposures():
    from fiberlake.jobs.query import VIEWS

    row = {"night": "n", "method": "drcnet", "model_id": "m", "snr_r": 5.0}
    probs = {f"p_{c.lower()}": 0.0 for c in CLASSES}
    rows = [row | probs | {"targetid": 1, "class": "K", "p_k": 0.6, "p_g": 0.4},
            row | probs | {"targetid": 1, "class": "G", "p_k": 0.3, "p_g": 0.7},
            row | probs | {"targetid": 2, "class": None}]
    ctx = pl.SQLContext(labels=pl.DataFrame(rows))
    out = ctx.execute(VIEWS["labels_target"][1], eager=True).sort("targetid")
    assert out["targetid"].to_list() == [1] and out["class"][0] == "G" and out["n_exp"][0] == 2
