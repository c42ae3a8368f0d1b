"""Tests of processors/wavecal.py: box extraction, line detection, wavelength solutions."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.polynomial import legendre
from synthetic import (arc_spectra, distorted_traces, fiber_image, nominal_columns, pixel_gauss, wave_at_rows,
                       wave_solutions)

from fiberlake.processors.wavecal import FAILED_RMS, calibrate_wavelength, detect_lines, extract_boxcar
from fiberlake.schemas.containers import TraceSet, WaveSolution
from fiberlake.schemas.instrument import MINI
from fiberlake.schemas.linelists import arc_lines

NY, NX, NF = 1024, 304, 16


def traceset(xt: np.ndarray, dead=()) -> TraceSet:
    u = 2 * np.arange(xt.shape[1]) / (xt.shape[1] - 1) - 1
    coeffs = np.stack([legendre.legfit(u, x, 5) for x in xt])
    d = np.zeros(xt.shape[0], bool)
    d[list(dead)] = True
    return TraceSet(coeffs=coeffs, ny=xt.shape[1], dead=d, rms=np.zeros(len(d)), sigma=np.full(len(d), 2.4))


def arc_frame(arm: str, seed: int, *, offset_px: float = 4.0, quad_px: float = 6.0, cubic_px: float = 3.0,
              dead=(), weak=(), brightness: float = 50.0):
    """A noisy synthetic arc (MINI arm centre and dispersion) and its truth."""
    rng = np.random.default_rng(seed)
    spec = MINI.arm(arm)
    nom = nominal_columns(NX, NF)
    xt = distorted_traces(NY, NX, nom)
    wcoef = wave_solutions(NF, NY, spec.wave_center, spec.dispersion, rng, offset_px, quad_px, cubic_px)
    wave = wave_at_rows(wcoef, NY)
    lines = arc_lines()
    rows_flux, _ = arc_spectra(wave, lines["wave_air"], lines["relative_intensity"] * brightness)
    rows_flux[list(dead)] = 0.0
    rows_flux[list(weak)] *= 0.01
    img = fiber_image(xt, NX, 2.4, rows_flux)
    img = img + rng.normal(0, 1, img.shape) * np.sqrt(3.5 ** 2 + img)
    ivar = 1.0 / (3.5 ** 2 + np.maximum(img, 0))
    return img, ivar, traceset(xt, dead), wave, spec


def test_extract_boxcar_matches_direct_sums():
    rng = np.random.default_rng(0)
    img = rng.normal(10, 1, (50, 40))
    ivar = np.full_like(img, 0.5)
    ivar[7, 12] = 0.0  # a masked pixel inside fiber 0's aperture
    xt = np.stack([np.full(50, 12.0), np.full(50, 25.0)])  # integer centres: whole pixels
    flux, fiv = extract_boxcar(img, ivar, traceset(xt), half_width=3.5)
    np.testing.assert_allclose(flux[0], img[:, 9:16].sum(axis=1))
    np.testing.assert_allclose(flux[1], img[:, 22:29].sum(axis=1))
    assert fiv[0, 7] == 0 and np.all(np.delete(fiv[0], 7) == pytest.approx(0.5 / 7))
    # fractional centre: the aperture takes half of each edge pixel
    xt2 = np.full((1, 50), 12.3)  # aperture [9.3, 15.3]: 0.2 of pixel 9, 0.8 of pixel 15
    flux2, _ = extract_boxcar(img, np.ones_like(img), traceset(xt2), half_width=3.0)
    np.testing.assert_allclose(flux2[0], img[:, 10:15].sum(axis=1) + 0.2 * img[:, 9] + 0.8 * img[:, 15])


def test_detect_lines_centroids():
    rng = np.random.default_rng(1)
    rows = np.arange(600, dtype=float)
    true = np.sort(rng.uniform(20, 580, 12))
    true = true[np.r_[True, np.diff(true) > 8] & np.r_[np.diff(true) > 8, True]]
    spec = 50.0 + (5e4 * pixel_gauss(rows[None, :], true[:, None], 1.4)).sum(axis=0)
    noisy = spec + rng.normal(0, 1, spec.shape) * np.sqrt(spec)
    lines = detect_lines(noisy[None, :], 1.0 / spec[None, :])
    assert lines.row.size == true.size
    np.testing.assert_allclose(lines.row, true, atol=0.03)
    assert np.all(np.abs(lines.row - true) < 4 * np.sqrt(lines.row_err ** 2 + 0.005 ** 2))
    np.testing.assert_allclose(lines.amp, 5e4, rtol=0.03)


@pytest.mark.parametrize("arm", ["b", "r"])
def test_calibrate_wavelength_recovers_solutions(arm):
    img, ivar, ts, wave, spec = arc_frame(arm, 2, dead=[5], weak=[11])
    ws = calibrate_wavelength(img, ivar, ts, arc_lines()["wave_air"], spec.wave_center, spec.dispersion)
    assert isinstance(ws, WaveSolution) and ws.coeffs.shape == (NF, 5) and ws.ny == NY
    err = ws.wave() - wave
    mid = slice(NY // 4, 3 * NY // 4)
    good = np.setdiff1d(np.arange(NF), [5, 11])
    rms_mid = np.sqrt(np.mean(err[good][:, mid] ** 2, axis=1))
    assert rms_mid.max() < 0.02  # target: < 0.02 A in the middle of the arm
    assert np.abs(err[good]).max() < 0.15  # ends: extrapolation beyond the last lines
    assert np.all(ws.rms[good] < 0.05) and np.all(ws.n_lines[good] >= 10)
    assert np.all(ws.row_range[good, 0] < 100) and np.all(ws.row_range[good, 1] > NY - 100)
    # the dead fiber: interpolated from neighbours (its own zero point is unknowable)
    assert ws.rms[5] == FAILED_RMS and ws.n_lines[5] == 0
    assert np.abs(err[5]).max() < 15 * spec.dispersion
    # the weak fiber (1 % of the light): its own fit if enough lines, else the neighbours' prior
    # plus an offset from its few lines, flagged
    assert (ws.rms[11] == FAILED_RMS and ws.n_lines[11] < 7) or (ws.n_lines[11] >= 7 and ws.rms[11] < 0.3)
    assert np.abs(err[11][mid]).max() < 0.5


def test_calibrate_wavelength_large_offsets_and_curvature():
    # per-fiber zero points of ~10 px rms, 15 px of curvature: found by voting, not by the nominal guess
    img, ivar, ts, wave, spec = arc_frame("b", 3, offset_px=10.0, quad_px=15.0, cubic_px=6.0)
    ws = calibrate_wavelength(img, ivar, ts, arc_lines()["wave_air"], spec.wave_center, spec.dispersion)
    err = ws.wave() - wave
    mid = slice(NY // 4, 3 * NY // 4)
    assert np.all(ws.rms < 0.05)
    assert np.sqrt(np.mean(err[:, mid] ** 2, axis=1)).max() < 0.02


def test_calibrate_wavelength_without_lines_warns_and_flags():
    rng = np.random.default_rng(4)
    img = rng.normal(0, 3.5, (NY, NX))
    ivar = np.full_like(img, 1 / 3.5 ** 2)
    ts = traceset(distorted_traces(NY, NX, nominal_columns(NX, NF)))
    spec = MINI.arm("b")
    with pytest.warns(RuntimeWarning):
        ws = calibrate_wavelength(img, ivar, ts, arc_lines()["wave_air"], spec.wave_center, spec.dispersion)
    assert np.all(ws.rms == FAILED_RMS) and np.all(ws.n_lines == 0)
    centre = ws.wave(np.array([(NY - 1) / 2.0]))
    np.testing.assert_allclose(centre, spec.wave_center)


@pytest.mark.slow  # three stages on simulated mini frames against the simulator's truth
def test_ccd_tracing_wavecal_on_simulated_mini_frames():
    """The three stages on the instrument simulator's MINI frames, against its truth."""
    from fiberlake.ingest import simulate as sim
    from fiberlake.processors.ccd import CCDParams, combine_frames, overscan_subtract, preprocess
    from fiberlake.processors.tracing import trace_fibers

    night, cam = "2026-01-10", "b1"
    flat = sim.simulate_frame(MINI, cam, "FLAT", night=night, expid=2200001, seed=7)
    kw = dict(night=night, seed=7, camera_model=flat.camera, detector=flat.detector)
    arc = sim.simulate_frame(MINI, cam, "ARC", expid=2200002, **kw)
    biases = [sim.simulate_frame(MINI, cam, "BIAS", expid=2200003 + i, **kw).raw for i in range(3)]
    params = CCDParams.from_header(flat.header)
    master_bias = combine_frames([overscan_subtract(b, params.datasec, params.biassec) for b in biases])
    fl = preprocess(flat.raw, params, master_bias)
    ar = preprocess(arc.raw, params, master_bias)

    ts = trace_fibers(fl.image, fl.ivar, MINI.nominal_fiber_columns())
    truth = flat.camera
    assert np.array_equal(ts.dead, truth.dead)
    live = ~truth.dead
    err = ts.x() - truth.trace_x
    assert np.sqrt(np.mean(err[live] ** 2)) < 0.01  # measured 0.0016 px
    assert np.sqrt(np.mean(err ** 2, axis=1)).max() < 0.05

    arm = MINI.arm(cam[0])
    ws = calibrate_wavelength(ar.image, ar.ivar, ts, arc_lines()["wave_air"], arm.wave_center, arm.dispersion)
    werr = ws.wave() - truth.wave
    mid = slice(MINI.ny // 4, 3 * MINI.ny // 4)
    assert np.sqrt(np.mean(werr[live][:, mid] ** 2, axis=1)).max() < 0.02  # measured ~0.003 A
    assert np.all(ws.rms[truth.dead] == FAILED_RMS)
