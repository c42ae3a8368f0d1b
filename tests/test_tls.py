"""Tests of processors/tls.py: Total Least Squares lines (seed 000 eqs. 8-12) and feet of perpendiculars."""

from __future__ import annotations

import numpy as np
import pytest

from fiberlake.processors.tls import (fit_lines, ols_line, perpendicular_distance, perpendicular_feet,
                                      tls_line)


def orthogonal_regression(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Independent reference: the line through the centroid along the principal axis."""
    xm, ym = x.mean(), y.mean()
    cov = np.cov(np.vstack([x - xm, y - ym]), bias=True)
    vals, vecs = np.linalg.eigh(cov)
    d = vecs[:, np.argmax(vals)]  # direction of the line
    a = d[1] / d[0]
    return a, ym - a * xm


def test_exact_line_is_recovered():
    x = np.linspace(0, 4095, 50)
    for a, b in ((0.0, 300.0), (0.013, -2.0), (-3.5, 1e4), (25.0, 7.0)):
        fa, fb, s2 = tls_line(x, a * x + b)
        assert fa == pytest.approx(a, rel=1e-10, abs=1e-12)
        assert fb == pytest.approx(b, rel=1e-9, abs=1e-8)
        assert s2 == pytest.approx(0.0, abs=1e-8 * (1 + abs(b)))


def test_equals_orthogonal_regression():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = rng.normal(0, 2), rng.normal(0, 100)
        t = rng.uniform(-50, 50, 40)
        x = t + rng.normal(0, 3, t.size)
        y = a * t + b + rng.normal(0, 3, t.size)
        fa, fb, s2 = tls_line(x, y)
        ra, rb = orthogonal_regression(x, y)
        assert fa == pytest.approx(ra, rel=1e-8, abs=1e-10)
        assert fb == pytest.approx(rb, rel=1e-8, abs=1e-8)
        # s2^2 is the smallest eigenvalue of the scatter matrix: the sum of squared perpendicular distances
        assert s2**2 == pytest.approx(np.sum(perpendicular_distance(x, y, fa, fb) ** 2), rel=1e-8)


def test_tls_is_unbiased_where_ols_is_attenuated():
    # errors in both coordinates (equal variance): OLS slope shrinks by var(t) / (var(t) + s^2)
    rng = np.random.default_rng(1)
    a_true, s = 0.8, 4.0
    t = rng.uniform(-10, 10, 200_000)
    x = t + rng.normal(0, s, t.size)
    y = a_true * t + 3.0 + rng.normal(0, s, t.size)
    a_tls, _, _ = tls_line(x, y)
    a_ols, _ = ols_line(x, y)
    shrink = np.var(t) / (np.var(t) + s**2)
    assert a_tls == pytest.approx(a_true, rel=0.02)
    assert a_ols == pytest.approx(a_true * shrink, rel=0.02)
    assert abs(a_ols - a_true) > 10 * abs(a_tls - a_true)


def test_feet_lie_on_the_line_at_the_perpendicular():
    rng = np.random.default_rng(2)
    a, b = 0.37, -12.0
    x, y = rng.uniform(-100, 100, 30), rng.uniform(-100, 100, 30)
    xf, yf = perpendicular_feet(x, y, a, b)
    np.testing.assert_allclose(yf, a * xf + b, atol=1e-10)
    # the segment point -> foot is normal to the line direction (1, a)
    np.testing.assert_allclose((x - xf) + a * (y - yf), 0.0, atol=1e-9)
    np.testing.assert_allclose(np.hypot(x - xf, y - yf), np.abs(perpendicular_distance(x, y, a, b)), rtol=1e-10)
    # a point on the line is its own foot
    xf, yf = perpendicular_feet(5.0, a * 5.0 + b, a, b)
    assert (xf, yf) == pytest.approx((5.0, a * 5.0 + b))


def test_fit_lines_batches_and_flags_unusable_sets():
    rows = np.arange(100, dtype=float)
    y = np.vstack([0.01 * rows + 5, -0.02 * rows + 40, np.full(100, np.nan), 0.5 * rows])
    use = np.ones_like(y, bool)
    use[3, 2:] = False  # only two points left
    lines = fit_lines(rows, y, use)
    np.testing.assert_allclose(lines.slope[:2], [0.01, -0.02], atol=1e-12)
    np.testing.assert_allclose(lines.intercept[:2], [5, 40], atol=1e-9)
    assert np.isnan(lines.slope[2:]).all() and list(lines.n_points) == [100, 100, 0, 2]
    np.testing.assert_allclose(lines(rows)[:2], y[:2], atol=1e-9)


def test_degenerate_inputs_raise():
    with pytest.raises(ValueError):
        tls_line([1.0], [2.0])
    with pytest.raises(ValueError):
        tls_line(np.full(10, 3.0), np.arange(10.0))  # vertical: x = const
