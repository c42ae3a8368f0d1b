"""Tests of the aberration map's samples (eq. 13) and of the MLP and Legendre coordinate maps."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.polynomial import legendre

from fiberlake.processors.rectify_map import Frame, LegendreMap, MapConfig, fit_map, map_from_arrays
from fiberlake.processors.rectify_sampling import (build_training_set, points_per_fiber, sample_rows,
                                                   semicircle_positions)
from fiberlake.processors.tls import perpendicular_distance
from fiberlake.schemas.containers import TraceSet

NY, NX, NF = 512, 320, 18


def pincushion_traces(ny=NY, nx=NX, nf=NF, k=0.03, dead=()) -> TraceSet:
    """Traces of fibers at a 16 px pitch through a pincushion about the CCD centre, as Legendre series."""
    r = 0.5 * max(nx, ny)
    x0 = (nx - 1) / 2 + (np.arange(nf) - (nf - 1) / 2) * 16.0
    y0 = np.linspace(-40, ny + 40, 2000)
    dx, dy = x0[:, None] - (nx - 1) / 2, y0[None, :] - (ny - 1) / 2
    s = 1 + k * (dx**2 + dy**2) / r**2
    X, Y = (nx - 1) / 2 + dx * s, (ny - 1) / 2 + dy * s
    rows = np.arange(ny, dtype=float)
    x = np.stack([np.interp(rows, Y[f], X[f]) for f in range(nf)])
    u = 2 * rows / (ny - 1) - 1
    coeffs = legendre.legfit(u, x.T, 7).T
    d = np.zeros(nf, bool)
    d[list(dead)] = True
    return TraceSet(coeffs=coeffs, ny=ny, dead=d, rms=np.zeros(nf))


def test_semicircle_positions_eq13():
    p = semicircle_positions(9, 100.0)
    assert p[0] == 0.0 and p[-1] == pytest.approx(200.0) and p[4] == pytest.approx(100.0)
    np.testing.assert_allclose(p + p[::-1], 200.0)  # symmetric about the centre
    gaps = np.diff(p)
    assert np.all(np.diff(gaps[:4]) > 0)  # sparse in the middle, dense at both ends
    rows = sample_rows(200, 1000, "semicircle")
    assert rows.min() == 0 and rows.max() == 999
    assert np.sum(rows < 100) > 2.5 * np.sum((rows >= 450) & (rows < 550))
    rows_u = sample_rows(200, 1000, "uniform")
    assert abs(np.sum(rows_u < 100) - np.sum((rows_u >= 450) & (rows_u < 550))) <= 1


def test_points_per_fiber_edge_weighted():
    live = np.ones(11, bool)
    live[3] = False
    n = points_per_fiber(3000, live, "semicircle", edge_ratio=3.0)
    assert n[3] == 0 and abs(n.sum() - 3000) < 11
    assert n[0] == pytest.approx(3 * n[5], rel=0.01) and n[-1] == n[0]
    u = points_per_fiber(3000, live, "uniform")
    assert u[3] == 0 and len(set(u[live])) == 1


def test_training_set_labels_are_feet_on_tls_lines():
    traces = pincushion_traces(dead=(4,))
    ts = build_training_set(traces, 6000, "semicircle")
    assert 5000 < ts.n <= 6000 and 4 not in ts.fiber
    a, b = ts.lines.slope[ts.fiber], ts.lines.intercept[ts.fiber]
    # targets on their lines, inputs on the traces, and the input->target segment normal to the line
    np.testing.assert_allclose(perpendicular_distance(ts.row_target, ts.col_target, a, b), 0.0, atol=1e-9)
    np.testing.assert_allclose(ts.col, traces.x(np.arange(NY))[ts.fiber, ts.row.astype(int)])
    np.testing.assert_allclose((ts.row - ts.row_target) + a * (ts.col - ts.col_target), 0.0, atol=1e-9)
    # the pincushion bows the edge traces by pixels, so the labels move them
    edge = ts.fiber == 0
    assert np.abs(ts.col - ts.col_target)[edge].max() > 1.0


def test_slit_labels_are_parallel_and_equally_spaced():
    traces = pincushion_traces(k=0.05, dead=(7,))
    nominal = (NX - 1) / 2 + (np.arange(NF) - (NF - 1) / 2) * 16.0
    ts = build_training_set(traces, 6000, "uniform", labels="slit", nominal_x=nominal)
    assert np.ptp(ts.lines.slope) == 0
    mid = ts.lines(np.array((NY - 1) / 2.0))
    np.testing.assert_allclose(np.diff(np.diff(mid)), 0.0, atol=1e-9)  # equally spaced
    tls = build_training_set(traces, 6000, "uniform")
    tls_mid = tls.lines(np.array((NY - 1) / 2.0))
    assert np.ptp(np.diff(tls_mid[~traces.dead])) > 0.5  # the pincushion spreads the edge fibers
    m = fit_map(ts.inputs(), ts.targets(), Frame(NY, NX), MapConfig(kind="legendre"))
    rows = np.full(NF, (NY - 1) / 2.0)
    fc, _ = m.forward(traces.x(np.array([(NY - 1) / 2.0]))[:, 0], rows)
    live = ~traces.dead
    fit = np.polyval(np.polyfit(nominal[live], fc[live], 1), nominal[live])
    assert np.abs(fc[live] - fit).max() < 0.01
    with pytest.raises(ValueError):
        build_training_set(traces, 600, "uniform", labels="slit")


def _dense_label_error(m, traces, ts):
    rows = np.arange(NY, dtype=float)
    x = traces.x(rows)
    live = ~traces.dead
    fc, fr = m.forward(x[live], np.broadcast_to(rows, x[live].shape))
    d = perpendicular_distance(fr, fc, ts.lines.slope[live, None], ts.lines.intercept[live, None])
    return float(np.sqrt(np.mean(d**2)))


def test_legendre_map_straightens_the_traces_and_inverts():
    traces = pincushion_traces()
    ts = build_training_set(traces, 6000, "semicircle")
    m = fit_map(ts.inputs(), ts.targets(), Frame(NY, NX), MapConfig(kind="legendre", deg=5))
    assert m.info["fwd_rms"] < 0.005 and m.info["roundtrip_rms"] < 0.005
    assert _dense_label_error(m, traces, ts) < 0.005
    # inverse(forward(p)) = p over the whole CCD
    cc, rr = np.meshgrid(np.linspace(0, NX - 1, 25), np.linspace(0, NY - 1, 25))
    bc, br = m.inverse(*m.forward(cc, rr))
    assert np.max(np.hypot(bc - cc, br - rr)) < 0.02
    # grid evaluation (separable fast path) agrees with pointwise evaluation
    gc, gr = m.forward_grid(np.arange(0, NX, 7.0), np.arange(0, NY, 11.0))
    pc, pr = m.forward(*np.meshgrid(np.arange(0, NX, 7.0), np.arange(0, NY, 11.0)))
    np.testing.assert_allclose(gc, pc, atol=1e-9)
    np.testing.assert_allclose(gr, pr, atol=1e-9)


def test_legendre_map_reproduces_a_known_polynomial_warp():
    rng = np.random.default_rng(3)
    frame = Frame(200, 100)
    pts = np.column_stack([rng.uniform(0, 99, 3000), rng.uniform(0, 199, 3000)])
    u, v = frame.normalise(pts[:, 0], pts[:, 1])
    disp = np.column_stack([1.5 * u * v**2 - 0.3, 0.2 * u**2])
    m = fit_map(pts, pts + disp, frame, MapConfig(kind="legendre", deg=3))
    fc, fr = m.forward(pts[:, 0], pts[:, 1])
    np.testing.assert_allclose(fc, pts[:, 0] + disp[:, 0], atol=1e-9)
    np.testing.assert_allclose(fr, pts[:, 1] + disp[:, 1], atol=1e-9)


def test_map_persistence_roundtrip():
    traces = pincushion_traces()
    ts = build_training_set(traces, 3000, "uniform")
    m = fit_map(ts.inputs(), ts.targets(), Frame(NY, NX), MapConfig(kind="legendre", deg=4))
    back = map_from_arrays(m.to_arrays())
    assert isinstance(back, LegendreMap) and back.config == m.config and back.info == m.info
    p = np.array([[3.0, 7.0], [300.0, 500.0]])
    np.testing.assert_array_equal(np.column_stack(back.forward(p[:, 0], p[:, 1])),
                                  np.column_stack(m.forward(p[:, 0], p[:, 1])))


def test_mlp_map_learns_the_labels_and_is_reproducible():
    pytest.importorskip("torch")
    traces = pincushion_traces()
    ts = build_training_set(traces, 6000, "semicircle")
    cfg = MapConfig(kind="mlp", epochs=50, seed=5)
    m1 = fit_map(ts.inputs(), ts.targets(), Frame(NY, NX), cfg)
    assert m1.fwd["w1"].shape == (20, 2) and m1.fwd["w2"].shape == (2, 20)
    # the paper's 2-20-2 ReLU net straightens a 2.5 px bow to a small fraction of a pixel
    assert np.abs(ts.col - ts.col_target).max() > 2.0
    err = _dense_label_error(m1, traces, ts)
    bow = np.sqrt(np.mean((ts.col - ts.col_target) ** 2))
    assert err < 0.2 and err < 0.25 * bow, (err, bow)
    assert m1.info["inv_rms"] < 0.3
    # same samples and seed -> identical weights (CPU); another seed -> other weights
    m2 = fit_map(ts.inputs(), ts.targets(), Frame(NY, NX), cfg)
    for k in ("w1", "b1", "w2", "b2"):
        np.testing.assert_array_equal(m1.fwd[k], m2.fwd[k])
        np.testing.assert_array_equal(m1.inv[k], m2.inv[k])
    m3 = fit_map(ts.inputs(), ts.targets(), Frame(NY, NX), MapConfig(kind="mlp", epochs=2, seed=6))
    assert not np.array_equal(m1.fwd["w1"], m3.fwd["w1"])
    back = map_from_arrays(m1.to_arrays())
    p = ts.inputs()[:50]
    np.testing.assert_array_equal(np.column_stack(back.forward(p[:, 0], p[:, 1])),
                                  np.column_stack(m1.forward(p[:, 0], p[:, 1])))


def test_config_validation():
    with pytest.raises(ValueError):
        MapConfig(kind="spline")
    with pytest.raises(ValueError):
        points_per_fiber(10, np.ones(3, bool), "random")
    with pytest.raises(ValueError):
        fit_map(np.zeros((5, 3)), np.zeros((5, 3)), Frame(10, 10), MapConfig())
