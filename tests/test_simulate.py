"""Tests of the instrument simulator (MINI only; each test runs in well under a second or two)."""

from __future__ import annotations

import io
import warnings
from functools import lru_cache

import numpy as np
import pytest
from astropy.io import fits
from scipy import ndimage

from fiberlake.ingest import simulate as sim
from fiberlake.ingest.sim_optics import pixel_weights
from fiberlake.ingest.sim_spectra import FineGrid, R_BAND, stellar_spectra
from fiberlake.schemas.header import REQUIRED_KEYWORDS, parse_section
from fiberlake.schemas.instrument import MINI
from fiberlake.schemas.truth import camera_truth_name, fibermap_name, raw_frame_name, spectra_truth_name

NIGHT = "2024-03-01"
SEED = 7


def expid(seq: int, night: str = NIGHT) -> int:
    return sim.make_expid(night, seq)


@lru_cache(maxsize=None)
def frame(camera: str, obstype: str, seq: int, seed: int = SEED) -> sim.SimulatedFrame:
    return sim.simulate_frame(MINI, camera, obstype, night=NIGHT, expid=expid(seq), seed=seed)


def bias_subtracted(f: sim.SimulatedFrame) -> np.ndarray:
    """Data section minus the per-row overscan median, in electrons (an independent reduction)."""
    raw = f.raw.astype(float)
    over = np.median(raw[:, MINI.nx:], axis=1, keepdims=True)
    return (raw[:, :MINI.nx] - over - f.detector.pattern) * f.detector.gain


# --- determinism and file format ---------------------------------------------------------------
def test_same_seed_same_bytes_different_seed_different(tmp_path):
    a = sim.simulate_frame(MINI, "r1", "SCIENCE", night=NIGHT, expid=expid(9), seed=3)
    b = sim.simulate_frame(MINI, "r1", "SCIENCE", night=NIGHT, expid=expid(9), seed=3)
    c = sim.simulate_frame(MINI, "r1", "SCIENCE", night=NIGHT, expid=expid(9), seed=4)
    pa, pb = a.write(tmp_path / "a.fits"), b.write(tmp_path / "b.fits")
    assert pa.read_bytes() == pb.read_bytes()
    assert np.array_equal(a.truth["OBJ_ROWS"], b.truth["OBJ_ROWS"])
    assert not np.array_equal(a.raw, c.raw)
    assert np.mean(a.raw != c.raw) > 0.5


def test_frame_does_not_depend_on_call_order():
    sim.camera_truth.cache_clear()
    first = sim.simulate_frame(MINI, "b1", "ARC", night=NIGHT, expid=expid(6), seed=11).raw
    sim.simulate_frame(MINI, "r1", "FLAT", night=NIGHT, expid=expid(4), seed=11)
    again = sim.simulate_frame(MINI, "b1", "ARC", night=NIGHT, expid=expid(6), seed=11).raw
    assert np.array_equal(first, again)


def test_raw_dtype_shape_and_fits_storage(tmp_path):
    f = frame("b1", "FLAT", 4)
    assert f.raw.dtype == np.uint16 and f.raw.shape == MINI.raw_shape
    path = f.write(tmp_path / raw_frame_name(expid(4), "b1"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fits.open(path, checksum=True, do_not_scale_image_data=True) as hdul:
            h = hdul[0].header
            assert h["BITPIX"] == 16 and h["BZERO"] == 32768
            assert "CHECKSUM" in h and "DATASUM" in h
    with fits.open(path) as hdul:
        assert hdul[0].data.dtype == np.uint16
        assert np.array_equal(hdul[0].data, f.raw)


@pytest.mark.parametrize("obstype", ["BIAS", "FLAT", "ARC", "SCIENCE", "STANDARD"])
def test_header_contract(obstype):
    f = frame("r1", obstype, {"BIAS": 1, "FLAT": 4, "ARC": 6, "SCIENCE": 7, "STANDARD": 9}[obstype])
    h = f.header
    for kw in REQUIRED_KEYWORDS:
        assert kw.name in h, kw.name
        value = h[kw.name]
        assert isinstance(value, kw.kind) or (kw.kind is float and isinstance(value, int)), kw.name
    for key in ("TELESCOP", "OBJECT", "CCDTEMP", "SATURATE"):
        assert key in h
    if obstype in ("SCIENCE", "STANDARD"):
        assert -90 <= h["DEC"] <= 90 and 0 <= h["RA"] < 360
    assert h["CAMERA"] == f"{h['ARM']}{h['SPECID']}"
    assert h["EXPTIME"] == sim.DEFAULT_EXPTIME[obstype]
    assert parse_section(h["DATASEC"]) == (slice(0, MINI.ny), slice(0, MINI.nx))
    assert parse_section(h["BIASSEC"]) == (slice(0, MINI.ny), slice(MINI.nx, MINI.nx + MINI.n_overscan))
    # GAIN / RDNOISE vary per camera within 5 % of nominal and equal the truth.
    assert abs(h["GAIN"] / MINI.gain - 1) <= 0.05 and abs(h["RDNOISE"] / MINI.read_noise - 1) <= 0.05
    assert h["GAIN"] == pytest.approx(f.detector.gain, abs=1e-4)


def test_frames_pass_the_ingest_reader(tmp_path):
    from fiberlake.ingest import fitsreader

    for obstype, seq in (("BIAS", 1), ("SCIENCE", 7)):
        f = frame("b1", obstype, seq)
        path = f.write(tmp_path / raw_frame_name(expid(seq), "b1"))
        read = fitsreader.read_frame(path, MINI)
        assert np.array_equal(read.pixels, f.raw)


# --- detector ---------------------------------------------------------------------------------
def test_overscan_has_no_light_and_follows_bias():
    bias, flat = frame("b1", "BIAS", 1), frame("b1", "FLAT", 4)
    g, rn = flat.detector.gain, flat.detector.read_noise
    for f in (bias, flat):
        over = f.raw[:, MINI.nx:].astype(float)
        assert abs(over.mean() - f.detector.bias_adu) < 5
        # per-row overscan scatter is read noise only (no light, no cosmics)
        resid = over - over.mean(axis=1, keepdims=True)
        assert resid.std() == pytest.approx(rn / g, rel=0.1)
    # the flat's data section has light, its overscan none
    assert np.median(flat.raw[:, :MINI.nx]) > np.median(flat.raw[:, MINI.nx:]) + 1000
    assert abs(np.median(flat.raw[:, MINI.nx:]) - np.median(bias.raw[:, MINI.nx:])) < 5


def test_fixed_bias_pattern_removed_by_master_bias():
    biases = [frame("r1", "BIAS", s) for s in (1, 2, 3)]
    det = biases[0].detector
    stack = np.stack([b.raw[:, :MINI.nx].astype(float) - np.median(b.raw[:, MINI.nx:], axis=1, keepdims=True)
                      for b in biases])
    master = stack.mean(axis=0) - (det.bias_adu - det.bias_adu)  # overscan already removed the level
    master -= master.mean()
    resid = master - (det.pattern - det.pattern.mean())
    expected = det.read_noise / det.gain / np.sqrt(len(biases))
    assert resid.std() == pytest.approx(expected, rel=0.15)
    assert np.corrcoef(master.ravel(), det.pattern.ravel())[0, 1] > 0.2


def test_cosmic_rays_counted_and_masked():
    f = frame("r1", "SCIENCE", 7)
    mask = f.truth["CRMASK"]
    assert mask.dtype == np.uint8 and mask.shape == (MINI.ny, MINI.nx)
    n_events = ndimage.label(mask > 0)[1]
    area = MINI.ny * MINI.nx * (15e-4) ** 2
    expected = 1.0 * area * 1200 / 60
    assert 0.4 * expected < n_events < 1.6 * expected + 10
    # strong-hit pixels stand far above the noiseless expectation
    noiseless = sim.frame_electrons(f.camera, f.truth)
    resid = bias_subtracted(f) - noiseless
    strong = (mask & 2) > 0
    assert np.median(resid[strong]) > 10 * f.detector.read_noise
    assert abs(np.median(resid[mask == 0])) < 1.0
    assert frame("r1", "BIAS", 1).truth["CRMASK"].sum() == 0


# --- geometry and PSF -----------------------------------------------------------------------
def test_traces_bend_more_at_edges_and_outward():
    cam = frame("b1", "FLAT", 4).camera
    rows = np.arange(MINI.ny)
    u = 2 * rows / (MINI.ny - 1) - 1
    curv = np.array([np.polyfit(u, x, 2)[0] for x in cam.trace_x])  # x = a u^2 + ...
    nf = MINI.n_fibers
    centre = np.abs(curv[nf // 2 - 2: nf // 2 + 2]).max()
    assert abs(curv[0]) > 5 * centre and abs(curv[-1]) > 5 * centre
    # pincushion: right-hand traces bow right (a > 0), left-hand traces bow left
    assert curv[-1] > 0 > curv[0]
    # and the bending grows monotonically toward the edges on each side
    half = curv[nf // 2:]
    assert np.all(np.diff(half) > -1e-3)


def test_psf_grows_toward_corners():
    cam = frame("b1", "FLAT", 4).camera
    nf, ny = MINI.n_fibers, MINI.ny
    centre = cam.sigma_x[nf // 2, ny // 2]
    corner = cam.sigma_x[0, 0]
    assert centre == pytest.approx(MINI.profile_sigma_px, rel=0.05)
    assert 1.1 < corner / centre < 1.35
    assert cam.wing_frac.min() >= 0.1 - 1e-9 and cam.wing_frac.max() <= 0.2 + 1e-9
    assert cam.wing_dx[0, 0] < 0 < cam.wing_dx[-1, -1]  # wings point radially outward


def test_pixel_weights_centroid_and_width():
    rel = np.arange(-12, 13, dtype=float) - 0.3
    w = pixel_weights(rel, np.array(2.4), np.array(0.2), np.array(2.0), 1.5, dtype=np.float64)
    assert w.sum() == pytest.approx(1.0)
    assert (w * rel).sum() == pytest.approx(0.0, abs=1e-4)
    # second moment: mixture variance plus the pixel box (1/12)
    frac, sep, s = 0.2, 2.0, 2.4
    var = (1 - frac) * s**2 + frac * (1.5 * s) ** 2 + frac * (1 - frac) * sep**2 + 1 / 12
    assert (w * rel**2).sum() == pytest.approx(var, rel=0.02)


def test_rendering_conserves_flux_and_matches_reference():
    f = frame("r1", "SCIENCE", 7)
    cam = f.camera
    truth_rows = cam.throughput[:, None] * (f.truth["OBJ_ROWS"].astype(float) + f.truth["SKY_ROWS"])
    image = sim.frame_electrons(cam, f.truth)
    assert image.sum() == pytest.approx(truth_rows.sum(), rel=5e-3)
    # independent scatter with np.add.at on random rows
    rng = np.random.default_rng(0)
    rows = rng.uniform(0, 100, size=truth_rows.shape)
    weights, start = cam.profile
    ref = np.zeros((MINI.ny, MINI.nx + 40))
    r = np.broadcast_to(np.arange(MINI.ny), start.shape)
    for j in range(weights.shape[0]):
        np.add.at(ref, (r, start + j + 20), rows * weights[j])
    assert np.allclose(cam.render(rows), ref[:, 20:20 + MINI.nx], rtol=1e-6, atol=1e-6)


def test_flat_light_centred_on_trace_x():
    f = frame("r1", "FLAT", 4)
    img = bias_subtracted(f)
    cam = f.camera
    errs = []
    for row in (20, 300, 512, 800, 1000):
        for fib in np.flatnonzero(~cam.dead):
            x = cam.trace_x[fib, row]
            c = np.arange(int(round(x)) - 7, int(round(x)) + 8)
            band = img[row - 2:row + 3, c].sum(axis=0)
            assert c[np.argmax(band)] == pytest.approx(x, abs=1.0)
            errs.append((band * c).sum() / band.sum() - x)
    errs = np.array(errs)
    # a +-7 px window clips the asymmetric wings and catches the neighbours' (measured on the
    # noiseless image: 90 % within 0.06 px); a trace off by 0.1 px fails this
    assert abs(np.median(errs)) < 0.03 and np.percentile(np.abs(errs), 90) < 0.1


def test_dead_fibers_dark_and_throughputs_normalised():
    f = frame("b1", "FLAT", 4)
    cam = f.camera
    live = ~cam.dead
    assert cam.throughput[live].mean() == pytest.approx(1.0)
    assert np.all(cam.throughput[cam.dead] == 0)
    assert np.all((cam.throughput[live] > 0.8) & (cam.throughput[live] < 1.2))
    # box-extracted flat counts follow the throughputs
    img = bias_subtracted(f)
    rows = np.arange(300, 700)
    box = np.array([[img[r, int(round(cam.trace_x[i, r])) - 6: int(round(cam.trace_x[i, r])) + 7].sum()
                     for r in rows[::20]] for i in range(MINI.n_fibers)]).sum(axis=1)
    model = cam.throughput * f.truth["LAMP_ROWS"][:, rows[::20]].sum(axis=1)
    ok = live
    assert np.corrcoef(box[ok], model[ok])[0, 1] > 0.98
    if cam.dead.any():
        assert np.all(box[cam.dead] < 0.1 * np.median(box[ok]))


# --- wavelengths -----------------------------------------------------------------------------
@pytest.mark.parametrize("camera", ["b1", "r1"])
def test_arc_lines_land_where_wave_says(camera):
    f = frame(camera, "ARC", 6)
    cam = f.camera
    lines = f.truth["ARCLINES"]
    line_row = f.truth["LINE_ROW"]
    # truth files agree with each other
    for i in range(MINI.n_fibers):
        assert np.allclose(np.interp(lines["WAVE"], cam.wave[i], np.arange(MINI.ny)), line_row[i], atol=1e-6)
    # isolated, unsaturated, bright lines measured on the raw frame (box extraction along TRACE_X)
    img = bias_subtracted(f)
    rows = np.arange(MINI.ny)
    dw = np.abs(np.subtract.outer(lines["WAVE"], lines["WAVE"]))
    np.fill_diagonal(dw, np.inf)
    isolated = dw.min(axis=1) > 12.0
    errs = []
    for fib in np.flatnonzero(~cam.dead):
        cols = np.rint(cam.trace_x[fib]).astype(int)
        spec = np.array([img[r, cols[r] - 7: cols[r] + 8].sum() for r in rows])
        for k in np.flatnonzero(isolated):
            y = line_row[fib, k]
            if not 10 < y < MINI.ny - 10:
                continue
            win = np.arange(int(round(y)) - 5, int(round(y)) + 6)
            s = spec[win]
            if s.sum() < 2e4 or f.raw[win, :MINI.nx].max() >= MINI.saturation:
                continue
            centroid = (s * win).sum() / s.sum()
            errs.append(np.interp(centroid, rows, cam.wave[fib]) - lines["WAVE"][k])
    errs = np.array(errs)
    dispersion = MINI.arm(camera[0]).dispersion
    assert errs.size >= 20
    assert abs(np.median(errs)) < 0.03 * dispersion
    assert np.sqrt(np.mean(errs**2)) < 0.08 * dispersion


def test_wavelength_solution_is_smooth_and_nonlinear():
    cam = frame("r1", "ARC", 6).camera
    arm = MINI.arm("r")
    w = cam.wave
    assert np.all(np.diff(w, axis=1) > 0)
    disp = np.diff(w, axis=1)
    assert disp.mean() == pytest.approx(arm.dispersion, rel=0.03)
    assert disp.max() / disp.min() > 1.002  # not linear
    lo, hi = MINI.wavelengths("r")[[0, -1]]
    assert w[:, 0].max() < lo and w[:, -1].min() > hi  # the output grid is covered by every fiber


# --- spectra, fiber maps, signal-to-noise -------------------------------------------------------
def test_stellar_spectra_normalised_and_class_dependent():
    grid = FineGrid.covering(3800.0, 9000.0, 0.1)
    teff = np.array([9000.0, 6500.0, 5000.0, 3500.0])
    s = stellar_spectra(grid, teff, np.full(4, 4.3), np.zeros(4), np.zeros(4))
    w = grid.wave
    band = (w >= R_BAND[0]) & (w <= R_BAND[1])
    assert np.allclose(s[:, band].mean(axis=1), 1.0, rtol=0.01)

    def depth(i, centre):
        core = s[i, np.abs(w - centre) < 1.0].min()
        cont = np.percentile(s[i, np.abs(w - centre) < 40], 95)
        return 1 - core / cont
    assert depth(0, 4861.3) > depth(2, 4861.3) + 0.2  # Balmer strongest in A stars
    assert depth(2, 5890.0) > depth(1, 5890.0)        # Na D stronger in cooler stars
    tio = np.abs(w - 7080) < 20
    assert s[3, tio].mean() < 0.7 * s[3, np.abs(w - 7040) < 8].mean()  # TiO band in the M star
    # blackbody slope: the hot star is bluer
    blue, red = np.abs(w - 4500) < 50, np.abs(w - 8000) < 50
    assert s[0, blue].mean() / s[0, red].mean() > 3 * s[3, blue].mean() / s[3, red].mean()


def test_fibermap_contract_and_magnitude_range():
    fm = sim.make_fibermap(MINI, NIGHT, SEED, "SCIENCE", 0)
    assert fm.colnames == ["SPECID", "FIBER", "TARGETID", "RA", "DEC", "MAG", "OBJTYPE"]
    assert len(fm) == MINI.n_fibers * MINI.n_spectrographs
    assert fm["SPECID"].dtype == np.int16 and fm["FIBER"].dtype == np.int16 and fm["TARGETID"].dtype == np.int64
    sky = np.flatnonzero(fm["OBJTYPE"] == "SKY")
    assert len(sky) == round(MINI.sky_fiber_fraction * MINI.n_fibers)
    assert np.diff(np.concatenate([[-1], sky, [MINI.n_fibers]])).max() < 0.5 * MINI.n_fibers  # spread
    mags = fm["MAG"][fm["OBJTYPE"] == "TGT"]
    assert mags.min() < 13 and mags.max() > 18
    std = sim.make_fibermap(MINI, NIGHT, SEED, "STANDARD", 1)
    assert (std["OBJTYPE"] == "STD").mean() > 0.6


def test_fibermap_photometry_is_the_true_spectrum_through_its_bands():
    """MAG_G and MAG_I: photon-counting AB of the flux above the atmosphere (integrated here independently,
    from absolute_flux), plus a catalogue error of PHOT_ERROR; NaN for sky; the other columns unchanged."""
    from fiberlake.ingest.sim_spectra import G_BAND, I_BAND, ab_photon_flux, absolute_flux
    from fiberlake.ingest.sim_spectra import HC_ERG_ANGSTROM as HC

    fm = sim.make_fibermap(MINI, NIGHT, SEED, "STANDARD", 1, photometry=True)
    bare = sim.make_fibermap(MINI, NIGHT, SEED, "STANDARD", 1)
    assert fm.colnames == bare.colnames + ["MAG_G", "MAG_I"]
    for name in bare.colnames:
        assert np.array_equal(np.asarray(bare[name]), np.asarray(fm[name])), name
    sky = np.asarray(fm["OBJTYPE"]) == "SKY"
    assert np.all(np.isnan(fm["MAG_G"][sky])) and np.all(np.isnan(fm["MAG_I"][sky]))
    star = np.flatnonzero(~sky)
    grid = FineGrid.covering(G_BAND[0], I_BAND[1], 0.1)
    wave = grid.wave
    params = [sim.target_params(SEED, int(fm["TARGETID"][i]), str(fm["OBJTYPE"][i])) for i in star]
    shape = stellar_spectra(grid, *(np.array([p[k] for p in params]) for k in ("teff", "logg", "feh", "rv")),
                            spectype=np.array([p["spectype"] for p in params]))
    flam = absolute_flux(wave, shape, np.asarray(fm["MAG"], float)[star], 2000.0)
    residual = {}
    for name, (lo, hi) in (("MAG_G", G_BAND), ("MAG_I", I_BAND)):
        band = (wave >= lo) & (wave <= hi)
        photons = (flam[:, band] * wave[band] / HC).mean(axis=1)
        true = -2.5 * np.log10(photons / ab_photon_flux(wave[band], 0.0).mean())
        residual[name] = np.asarray(fm[name], float)[star] - true
        assert np.all(np.abs(residual[name]) < 5 * sim.PHOT_ERROR), name
    both = np.concatenate(list(residual.values()))
    assert abs(np.mean(both)) < 0.01 and 0.6 * sim.PHOT_ERROR < np.std(both) < 1.5 * sim.PHOT_ERROR
    std = np.asarray(fm["OBJTYPE"]) == "STD"        # F stars: g - r 0.2-0.6, r - i 0-0.2
    g_r = np.asarray(fm["MAG_G"] - fm["MAG"])[std]
    assert 0.15 < np.median(g_r) < 0.6 and 0.0 < np.median(np.asarray(fm["MAG"] - fm["MAG_I"])[std]) < 0.25


def test_snr_spans_faint_to_bright_and_mag16_calibration():
    f = frame("r1", "SCIENCE", 7)
    t = f.truth["TARGETS"]
    obj, sky = f.truth["OBJ_ROWS"].astype(float), f.truth["SKY_ROWS"].astype(float)
    weights, _ = f.camera.profile
    rn = f.detector.read_noise
    thr = f.camera.throughput[:, None]
    var = 1.0 / np.sum(weights**2 / (thr * (obj + sky) * weights + rn**2), axis=0)  # optimal extraction
    snr = np.median(thr * obj / np.sqrt(var), axis=1)
    star = (t["OBJTYPE"] != "SKY") & ~f.camera.dead
    assert snr[star].min() < 5 and snr[star].max() > 50
    # SNR scales with brightness: per fiber, log SNR vs mag slope ~ -0.2 (bright) to -0.4 (faint)
    assert np.corrcoef(t["MAG"][star], np.log(snr[star]))[0, 1] < -0.9
    # a 16th-magnitude star gives SNR ~ 20-30 per row in 1200 s (r arm)
    fit = np.polyfit(t["MAG"][star], np.log(snr[star]), 2)
    assert 15 < np.exp(np.polyval(fit, 16.0)) < 40
    assert np.all(obj[t["OBJTYPE"] == "SKY"] == 0) and np.all(sky > 0)


def test_sky_lines_in_every_fiber_at_the_same_wavelength():
    f = frame("r1", "SCIENCE", 7)
    cam = f.camera
    sky = f.truth["SKY_ROWS"].astype(float)
    rows = np.arange(MINI.ny)
    meas = []
    for fib in range(MINI.n_fibers):
        y = np.interp(6363.776, cam.wave[fib], rows)
        win = np.arange(int(round(y)) - 5, int(round(y)) + 6)
        s = sky[fib, win] - np.median(sky[fib, win[0] - 20: win[0]])
        meas.append(np.interp((s * win).sum() / s.sum(), rows, cam.wave[fib]))
    assert np.ptp(meas) < 0.1 and abs(np.mean(meas) - 6363.776) < 0.1


# --- a night on disk -------------------------------------------------------------------------
def test_simulate_night_writes_the_contract(tmp_path):
    paths = sim.simulate_night(MINI, NIGHT, tmp_path, seed=SEED, n_bias=1, n_flat=1, n_arc=1,
                               n_science=1, n_standard=1)
    night_dir = tmp_path / NIGHT
    plan = sim.plan_night(MINI, NIGHT, SEED, n_bias=1, n_flat=1, n_arc=1, n_science=1, n_standard=1)
    assert [p.obstype for p in plan] == ["BIAS", "FLAT", "ARC", "SCIENCE", "STANDARD"]
    assert len(paths) == len(plan) * len(MINI.cameras)
    assert all(p.exists() for p in paths)
    dates, expids = [], []
    for exp in plan:
        for cam in MINI.cameras:
            h = fits.getheader(night_dir / raw_frame_name(exp.expid, cam))
            assert h["EXPID"] == exp.expid and h["OBSTYPE"] == exp.obstype and h["CAMERA"] == cam
            dates.append(h["DATE-OBS"])
            if exp.obstype != "BIAS":
                assert (night_dir / spectra_truth_name(exp.expid, cam)).exists()
        expids.append(exp.expid)
        if exp.obstype in ("SCIENCE", "STANDARD"):
            with fits.open(night_dir / fibermap_name(exp.expid)) as hdul:
                table = hdul["FIBERMAP"].data
                assert set(np.char.strip(table["OBJTYPE"])) <= {"TGT", "SKY", "STD"}
                assert len(table) == MINI.n_fibers * MINI.n_spectrographs
                star = np.char.strip(table["OBJTYPE"]) != "SKY"
                assert np.all(np.isfinite(table["MAG_G"][star])) and np.all(np.isfinite(table["MAG_I"][star]))
    assert dates == sorted(dates)
    assert len(set(expids)) == len(expids)
    assert expids[0] == (np.datetime64(NIGHT) - np.datetime64("2020-01-01")).astype(int) * 1000 + 1
    with fits.open(night_dir / camera_truth_name("r1")) as hdul:
        for name in ("TRACE_X", "WAVE", "PSF_SIGMA_X", "PSF_SIGMA_Y"):
            assert hdul[name].data.shape == (MINI.n_fibers, MINI.ny)
        assert hdul["THROUGHPUT"].data.shape == (MINI.n_fibers,)
        for key in ("DISTK", "DISTCX", "DISTCY", "DISTR", "GAIN", "RDNOISE"):
            assert key in hdul[0].header
    # frames on disk equal the in-memory frames with the same arguments (same bytes), the catalogue
    # photometry of the night's fiber maps (MAG_G, MAG_I) left out: it changes no frame
    exp = plan[3]
    again = sim.simulate_frame(MINI, "b1", exp.obstype, night=NIGHT, expid=exp.expid, seed=SEED,
                               exptime=exp.exptime, date_obs=exp.date_obs,
                               fibermap=sim.make_fibermap(MINI, NIGHT, SEED, exp.obstype, exp.plate, exp.expid))
    buf = io.BytesIO()
    hdu = fits.PrimaryHDU(again.raw, again.header.copy())
    hdu.add_checksum(when=sim.CHECKSUM_NOTE)
    hdu.writeto(buf)
    assert buf.getvalue() == (night_dir / raw_frame_name(exp.expid, "b1")).read_bytes()
    # truth spectra file round-trips
    with fits.open(night_dir / spectra_truth_name(exp.expid, "b1")) as hdul:
        assert np.array_equal(hdul["OBJ_ROWS"].data, again.truth["OBJ_ROWS"])
        assert np.array_equal(hdul["CRMASK"].data, again.truth["CRMASK"])
        assert set(hdul["TARGETS"].columns.names) >= {"FIBER", "TARGETID", "OBJTYPE", "SPECTYPE", "TEFF",
                                                       "LOGG", "FEH", "MAG"}


def test_stellar_model_selection_and_fallback():
    """The analytic model is the default; asking for the Cannon model without its data falls back."""
    from fiberlake.ingest.sim_cannon import find_cannon_dir
    from fiberlake.ingest.sim_spectra import resolve_stellar_model

    assert resolve_stellar_model("analytic") == ("analytic", None)
    with pytest.raises(ValueError):
        resolve_stellar_model("phoenix")
    if find_cannon_dir() is None:
        assert resolve_stellar_model("cannon")[0] == "analytic"  # the documented fallback
