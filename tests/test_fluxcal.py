"""Flux calibration: stellar models, response and telluric recovery, propagation, fallbacks; a mini night end to end."""

from __future__ import annotations

import numpy as np
import pytest

from fiberlake.processors import fluxcal as fc
from fiberlake.processors import stellar_models as sm
from fiberlake.processors.telluric import band_mask, telluric_from_ratios
from fiberlake.schemas.containers import Spectra1D
from fiberlake.schemas.maskbits import Mask
from bench.stellar_fit import synthetic_standard
from tests.stages import WITHOUT_LABELS_AND_DENOISING

SETTINGS = fc.FluxCalSettings(max_standards=3)
EXPTIME = 600.0


def test_hydrogen_lines_and_air_wavelengths():
    wave, loggf, upper = sm.hydrogen_lines(2, 5)
    assert wave[0] == pytest.approx(6562.80, abs=0.02)       # H-alpha in air
    assert wave[1] == pytest.approx(4861.33, abs=0.02)
    assert loggf[0] == pytest.approx(0.71, abs=0.03)           # Kramers' formula vs the NIST value
    assert list(upper) == [3, 4, 5]


@pytest.mark.parametrize("step", [0.05, 0.25])
def test_hydrogen_wings_on_a_coarse_grid_match_the_fine_grid(step):
    k_h = sm._scales()[1]
    for rest in (np.linspace(3700.0, 5900.0, 1200), np.linspace(5700.0, 9000.0, 1800)):
        sigma = np.full(rest.shape, 1.5)
        for teff, logg in ((4500.0, 2.5), (6500.0, 4.2), (8500.0, 5.5)):
            labels = sm.StarLabels(teff, logg, -0.5, 30.0)
            fast = sm._hydrogen_absorption(rest, labels, sigma, k_h, step)
            np.testing.assert_allclose(fast, sm.hydrogen_absorption_reference(rest, labels, sigma, k_h, step),
                                       atol=3e-5 if step == 0.05 else 3e-4)


def test_smoothing_only_where_needed_equals_smoothing_everything():
    from scipy.ndimage import gaussian_filter1d

    grid = np.arange(0.0, 100.0, 0.05)
    values = np.random.default_rng(3).normal(size=grid.size).cumsum()
    x = np.sort(np.random.default_rng(4).uniform(grid[0], grid[-1], 300))
    for sigma_px in (0.6, 8.0, 30.0):
        np.testing.assert_allclose(sm.smoothed_at(x, grid, values, sigma_px),
                                   np.interp(x, grid, gaussian_filter1d(values, sigma_px, mode="nearest")), atol=1e-10)


def test_models_are_calibrated_on_the_sun_and_positive():
    wave = np.arange(5240.0, 5300.0, 0.05)
    sun = sm.StarLabels(*sm.SOLAR)
    ratio = sm.model_spectrum(wave, sun, 0.75) / sm.continuum(wave, sun)
    line = np.abs(wave - 5269.54) < 5.0
    assert np.sum(1 - ratio[line]) * 0.05 == pytest.approx(sm.FE_5269_SUN_EW, rel=0.15)
    # hotter F stars: stronger Balmer lines, weaker metal lines
    wave = np.arange(4700.0, 5300.0, 0.5)
    depth = {}
    for teff in (6000.0, 7000.0):
        lab = sm.StarLabels(teff, 4.2, -0.5)
        r = sm.model_spectrum(wave, lab, 0.75) / sm.continuum(wave, lab)
        depth[teff] = (1 - r[np.abs(wave - 4861.3) < 1].min(), 1 - r[np.abs(wave - 5183.6) < 1].min())
        assert np.all(np.isfinite(r)) and np.all(r > 0) and np.all(r <= 1.0 + 1e-9)
    assert depth[7000.0][0] > depth[6000.0][0] and depth[7000.0][1] < depth[6000.0][1]


def test_band_scale_is_the_ab_magnitude():
    wave = np.arange(5600.0, 6901.0, 1.0)
    flat_fnu = 3.0e-15 * (6000.0 / wave) ** 2                  # f_lambda of a flat f_nu source
    scale = fc.band_scale(wave, flat_fnu, 16.0)
    fnu = scale * flat_fnu * wave**2 / fc.C_ANGSTROM_S
    assert -2.5 * np.log10(fnu.mean()) - 48.6 == pytest.approx(16.0, abs=1e-6)


def _truth_response(wave):
    return 2.0e14 * np.exp(-0.5 * ((wave - 6000.0) / 1500.0) ** 2) * (1.0 + 0.05 * np.sin(wave / 180.0))


def _telluric(wave):
    return 1.0 - 0.6 * np.exp(-0.5 * ((wave - 6885.0) / 6.0) ** 2)


def _exposure(rng, labels, mags, n_targets=2, drop=None):
    """Model-consistent synthetic exposure: stars of the model grid through a known response."""
    arms = {}
    truth = {}
    stars = list(labels) + [sm.StarLabels(6200.0, 4.4, -0.2, 10.0)] * n_targets
    all_mags = list(mags) + [15.5] * n_targets
    band = np.arange(5600.0, 6901.0, 1.0)
    for cam, (w0, dw, n, sig) in {"b1": (4700.0, 0.54, 930, 0.75), "r1": (6300.0, 0.81, 990, 1.13)}.items():
        if cam == drop:
            continue
        wave = w0 + dw * np.arange(n)
        flux = np.stack([fc.band_scale(band, sm.model_spectrum(band, s, 1.0), m) * sm.model_spectrum(wave, s, sig)
                         for s, m in zip(stars, all_mags)])
        counts = flux * EXPTIME * _truth_response(wave) * _telluric(wave)
        var = counts + 20.0
        obs = counts + rng.normal(size=counts.shape) * np.sqrt(var)
        arms[cam] = fc.Arm(wave, Spectra1D(obs, 1.0 / var, np.zeros(obs.shape, np.uint32)), sig)
        truth[cam] = flux
    return arms, truth


STARS = [sm.StarLabels(6400.0, 4.1, -0.6, 25.0), sm.StarLabels(6700.0, 4.3, -0.3, -40.0),
         sm.StarLabels(6150.0, 4.0, -0.9, 5.0)]


@pytest.fixture(scope="module")
def calibrated():
    rng = np.random.default_rng(7)
    mags = np.array([13.0, 13.5, 14.0])
    arms, truth = _exposure(rng, STARS, mags)
    colours = np.array([fc.model_colours(s, SETTINGS) for s in STARS])     # the catalogue's, exact
    mags_g, mags_i = mags + colours[:, 0], np.where([True, False, True], mags - colours[:, 1], np.nan)
    cal = fc.calibrate_exposure(arms, np.arange(3), mags, EXPTIME, SETTINGS, mags_g=mags_g, mags_i=mags_i)
    return arms, truth, cal


def test_standards_fitted_and_response_recovered(calibrated):
    arms, truth, cal = calibrated
    assert cal.status == "ok" and len(cal.fits) == 3 and all(f.ok for f in cal.fits)
    for f in cal.fits:
        star = STARS[f.fiber]
        assert abs(f.labels.teff - star.teff) < 150 and abs(f.labels.rv - star.rv) < 5
        assert np.isfinite(f.colours[0]) and np.isfinite(f.colours[1]) == (f.fiber != 1)
        np.testing.assert_allclose(f.model_colours[np.isfinite(f.colours)], f.colours[np.isfinite(f.colours)],
                                   atol=0.01)
    for cam, arm in arms.items():
        c = cal.cameras[cam]
        ratio = c.response / _truth_response(arm.wave)
        inner = slice(20, -20)
        assert np.median(np.abs(ratio[inner] - 1)) < 0.01, cam
        assert np.all(c.response_ivar[inner] > 0)
        pull = (c.response - _truth_response(arm.wave)) * np.sqrt(c.response_ivar)
        assert np.median(np.abs(pull[inner])) < 5
    # telluric: the O2 B band's depth is measured, 1 outside the bands
    r = cal.cameras["r1"]
    band = np.abs(arms["r1"].wave - 6885.0) < 3
    assert np.allclose(r.telluric[band], _telluric(arms["r1"].wave)[band], atol=0.05)
    assert np.all(r.telluric[~band_mask(arms["r1"].wave)] == 1.0)


def test_targets_calibrated_to_absolute_flux(calibrated):
    arms, truth, cal = calibrated
    for cam, arm in arms.items():
        out = fc.apply_calibration(arm.spectra, cal.cameras[cam], EXPTIME, fallback=False, settings=SETTINGS)
        tgt = slice(3, None)
        ratio = np.median(out.flux[tgt, 20:-20] / truth[cam][tgt, 20:-20], axis=1)
        assert np.all(np.abs(ratio - 1) < 0.02), (cam, ratio)
        pull = (out.flux[tgt] - truth[cam][tgt]) * np.sqrt(out.ivar[tgt])
        assert 0.8 < np.std(pull[:, 20:-20]) < 1.3
        assert np.all(np.isfinite(out.flux)) and np.all(np.isfinite(out.ivar))
        assert np.any(out.mask & Mask.TELLURIC) == (cam == "r1")


def test_apply_propagates_ivar_and_flags():
    flux = np.array([[100.0, 200.0, 300.0]])
    ivar = np.array([[0.01, 0.0, 0.04]])
    cal = fc.CameraCalibration(np.array([2.0, 2.0, 0.0]), np.array([400.0, 400.0, 0.0]), np.array([0.5, 1.0, 1.0]),
                               np.array([1e4, 0.0, 0.0]))
    out = fc.apply_calibration(Spectra1D(flux, ivar, np.zeros((1, 3), np.uint32)), cal, 10.0, fallback=True,
                               settings=SETTINGS)
    f0 = 100.0 / (10.0 * 2.0 * 0.5)
    var0 = (1 / 0.01) / (10.0 * 2.0 * 0.5) ** 2 + f0**2 * (1 / (400.0 * 4.0) + 1 / (1e4 * 0.25))
    assert out.flux[0, 0] == pytest.approx(f0) and out.ivar[0, 0] == pytest.approx(1 / var0, rel=1e-5)
    assert out.ivar[0, 1] == 0 and out.ivar[0, 2] == 0 and out.flux[0, 2] == 0
    assert out.mask[0, 2] & Mask.NOFLUXCAL and np.all(out.mask & Mask.FLUXFALLBACK)
    assert out.mask[0, 0] & Mask.TELLURIC and not out.mask[0, 1] & Mask.TELLURIC
    none = fc.apply_calibration(Spectra1D(flux, ivar, np.zeros((1, 3), np.uint32)), None, 10.0, fallback=False,
                                settings=SETTINGS)
    assert np.all(none.flux == 0) and np.all(none.ivar == 0) and np.all(none.mask & Mask.NOFLUXCAL)


def test_no_standards_and_missing_camera_are_flagged_not_crashes():
    rng = np.random.default_rng(8)
    arms, _ = _exposure(rng, STARS[:1], [13.0], drop="r1")      # one standard, red camera missing
    none = fc.calibrate_exposure(arms, np.array([], int), np.array([]), EXPTIME, SETTINGS)
    assert none.status == "too_few" and none.cameras == {}
    one = fc.calibrate_exposure(arms, np.array([0]), np.array([13.0]), EXPTIME, SETTINGS)
    assert one.status == "too_few" and set(one.cameras) == {"b1"}   # min_standards is 2
    # every standard's spectrum masked: no fit, no NaN
    masked = fc.Arm(arms["b1"].wave, Spectra1D(arms["b1"].spectra.flux, np.zeros_like(arms["b1"].spectra.ivar),
                                               arms["b1"].spectra.mask), 0.75)
    bad = fc.calibrate_exposure({"b1": masked}, np.array([0]), np.array([13.0]), EXPTIME, SETTINGS)
    assert bad.status == "too_few" and not bad.fits[0].ok


def test_night_mean_and_telluric_combination():
    a = fc.CameraCalibration(np.full(4, 2.0), np.full(4, 1.0), np.ones(4), np.zeros(4), 3)
    b = fc.CameraCalibration(np.full(4, 4.0), np.full(4, 3.0), np.ones(4), np.zeros(4), 2)
    empty = fc.CameraCalibration(np.zeros(4), np.zeros(4), np.ones(4), np.zeros(4), 0)
    mean = fc.mean_calibration([a, b, empty])
    np.testing.assert_allclose(mean.response, 3.5)
    np.testing.assert_allclose(mean.response_ivar, 4.0)
    assert mean.n_used == 5 and fc.mean_calibration([empty]) is None
    wave = np.array([6000.0, 6880.0, 6890.0])
    ratio = np.array([[2.0, 1.0, 1.5], [2.0, 1.2, 1.3]])
    t, tivar = telluric_from_ratios(wave, ratio, np.ones_like(ratio), np.full(3, 2.0))
    np.testing.assert_allclose(t, [1.0, 0.55, 0.7])
    assert tivar[0] == 0 and tivar[1] > 0


# --------------------------------------------------------------------------- colours
BANDS = ((4000.0, 5500.0), (5600.0, 6900.0), (7000.0, 8500.0))


def test_synthetic_colours_are_the_full_resolution_models():
    """sm.band_magnitudes (1 A grid, coarse hydrogen) against the full-resolution model integrated here."""
    from scipy.integrate import trapezoid

    wave = np.arange(3990.0, 8510.0, 0.05)
    for labels in (sm.StarLabels(6400.0, 4.1, -0.6, 25.0), sm.StarLabels(7600.0, 4.0, 0.0),
                   sm.StarLabels(5500.0, 4.6, -1.5)):
        photons = sm.model_spectrum(wave, labels, 0.5) * wave
        ref = [-2.5 * np.log10(trapezoid(photons[(wave >= lo) & (wave <= hi)], wave[(wave >= lo) & (wave <= hi)])
                               / trapezoid(1.0 / wave[(wave >= lo) & (wave <= hi)], wave[(wave >= lo) & (wave <= hi)]))
               for lo, hi in BANDS]
        np.testing.assert_allclose(np.diff(sm.band_magnitudes(labels, BANDS)), np.diff(ref), atol=1e-3)
    # hotter is bluer
    assert fc.model_colours(sm.StarLabels(7000.0, 4.2, -0.5), SETTINGS)[0] < fc.model_colours(
        sm.StarLabels(6000.0, 4.2, -0.5), SETTINGS)[0] - 0.1
    np.testing.assert_allclose(fc.catalogue_colours(14.0, 14.4, 13.9), [0.4, 0.1])
    assert np.isnan(fc.catalogue_colours(14.0, None, np.nan)).all()
    no_g = fc.catalogue_colours(14.0, 99.0, 13.9)                     # 99: no magnitude
    assert np.isnan(no_g[0]) and no_g[1] == pytest.approx(0.1)


def test_colours_recover_teff_where_the_lines_mislead():
    """As the simulator's F stars look to these models (their Balmer lines are those of a model ~1000 K cooler):
    a standard with the continuum of a 6400 K model and the lines of a 5600 K one. The spectrum alone (its
    continuum free) fits the lines' Teff; the catalogue colours of the 6400 K model bring it back."""
    true = sm.StarLabels(6400.0, 4.1, -0.6, 25.0)
    arms = synthetic_standard(true, sm.StarLabels(5600.0, 4.1, -0.6, 25.0), np.random.default_rng(3))
    blind = fc.fit_standard(arms, 0, 14.0, SETTINGS)
    assert blind.labels.teff < 5900.0 and blind.model_colours is None
    colours = fc.model_colours(true, SETTINGS)
    fit = fc.fit_standard(arms, 0, 14.0, SETTINGS, colours)
    assert abs(fit.labels.teff - true.teff) < 100.0, fit.labels
    assert abs(fit.labels.rv - true.rv) < 5.0 and 3.5 < fit.labels.logg < 5.0
    np.testing.assert_allclose(fit.model_colours, colours, atol=0.02)
    np.testing.assert_array_equal(fit.colours, colours)


def test_fibermap_magnitudes_read_checked_and_optional():
    """MAG_G and MAG_I: read when present (NaN -> null), null when the fiber map predates them, refused when
    not finite numbers."""
    from astropy.io import fits

    from fiberlake.ingest.fitsreader import FrameRejected
    from fiberlake.ingest.fibermap import read_fibermap
    from fiberlake.schemas.instrument import MINI
    from fiberlake.schemas.tables import FIBERMAP

    n = MINI.n_fibers

    def fibermap(**extra) -> bytes:
        cols = [fits.Column("SPECID", "I", array=np.ones(n, np.int16)), fits.Column("FIBER", "I", array=np.arange(n)),
                fits.Column("TARGETID", "K", array=np.arange(n) + 100), fits.Column("RA", "D", array=np.full(n, 10.0)),
                fits.Column("DEC", "D", array=np.full(n, 5.0)), fits.Column("MAG", "E", array=np.full(n, 15.0)),
                fits.Column("OBJTYPE", "3A", array=["STD"] * n)]
        cols += [fits.Column(k, "E" if np.asarray(v).dtype.kind == "f" else "4A", array=v) for k, v in extra.items()]
        hdu = fits.BinTableHDU.from_columns(cols, name="FIBERMAP")
        hdu.header["NIGHT"] = "2026-12-09"
        buf = __import__("io").BytesIO()
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf)
        return buf.getvalue()

    g = np.full(n, 15.4, np.float32)
    g[3] = np.nan
    rows = read_fibermap(fibermap(MAG_G=g, MAG_I=np.full(n, 14.9, np.float32)), "2026-12-09", MINI,
                         name="fibermap-00000007.fits")
    assert set(rows[0]) == set(FIBERMAP.names)
    assert rows[0]["mag_g"] == pytest.approx(15.4) and rows[3]["mag_g"] is None
    assert rows[3]["mag_i"] == pytest.approx(14.9)
    old = read_fibermap(fibermap(), "2026-12-09", MINI, name="fibermap-00000007.fits")
    assert set(old[0]) == set(FIBERMAP.names) and all(r["mag_g"] is None and r["mag_i"] is None for r in old)
    bad = np.full(n, 15.0, np.float32)
    bad[5] = np.inf
    for extra in ({"MAG_G": bad}, {"MAG_I": np.array(["x"] * n)}):
        with pytest.raises(FrameRejected, match=next(iter(extra))):
            read_fibermap(fibermap(**extra), "2026-12-09", MINI, name="fibermap-00000007.fits")


# --------------------------------------------------------------------------- a mini night end to end
def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "fluxcal.py"
    spec = importlib.util.spec_from_file_location("bench_fluxcal", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_mini_night_calibrated_joined_and_coadded_exactly_once(tmp_path):
    """Held-out seed 1401: streaming (two deliveries), figures against the truth, nothing redone."""
    import shutil

    import polars as pl

    from fiberlake.ingest.simulate import simulate_night
    from fiberlake.jobs.ingest import ingest_night
    from fiberlake.jobs.process import process_night
    from fiberlake.jobs.query import scan_tables
    from fiberlake.processors.params import ReductionParams
    from fiberlake.storage.layout import Lake

    night = "2026-12-11"
    sim = tmp_path / "sim"
    simulate_night("mini", night, sim, seed=1401, n_bias=1, n_flat=1, n_arc=1, n_science=3, n_standard=1,
                   std_per_spectrograph=4)
    frames = sorted((sim / night).glob("fl-*.fits"))
    last_science = sorted({p.name.split("-")[1] for p in frames})[-2]      # the third science exposure
    delivered = tmp_path / "delivered" / night
    delivered.mkdir(parents=True)
    for p in (sim / night).iterdir():
        if p.is_file() and last_science not in p.name:
            shutil.copy(p, delivered / p.name)
    lake = Lake.at(tmp_path / "lake")
    config = ReductionParams().updated({"extractions": ("box",)} | WITHOUT_LABELS_AND_DENOISING)
    ingest_night(lake, delivered)
    first = process_night(lake, night, config=config)
    assert not first.products.failed, first.products.failed
    coadds = scan_tables(lake)["coadds"].collect()
    science = coadds.filter((pl.col("scope") == "night") & (pl.col("objtype") == "TGT") & (pl.col("n_exp") == 2))
    assert science.height > 10

    for p in (sim / night).iterdir():                      # the third exposure arrives
        if p.is_file() and last_science in p.name:
            shutil.copy(p, delivered / p.name)
    ingest_night(lake, delivered)
    second = process_night(lake, night, config=config)
    assert [k.split("/")[0] for k in second.products.exposures] == [str(int(last_science))]
    tables = scan_tables(lake)
    coadds = tables["coadds"].collect()
    assert coadds.group_by(["night", "targetid", "extraction", "scope"]).len()["len"].max() == 1
    grown = coadds.filter(pl.col("targetid").is_in(science["targetid"].to_list()) & (pl.col("scope") == "night"))
    assert set(grown["n_exp"].to_list()) == {3}
    versions = {name: lake_table_version(lake, name) for name in ("joined", "fluxcal", "coadds")}
    third = process_night(lake, night, config=config)     # nothing new: nothing written
    assert third.products.exposures == [] and third.products.coadds == 0
    assert {name: lake_table_version(lake, name) for name in versions} == versions

    for table in ("joined", "coadds"):
        frame = tables[table].collect()
        for col in ("flam", "flam_ivar"):
            values = np.concatenate(frame[col].to_numpy())
            assert np.all(np.isfinite(values))
    figures = _bench().evaluate(lake, night, sim / night, "box")
    raw = figures["raw"]
    for camera in ("b1", "r1"):
        assert 0.7 < raw[f"ratio_{camera}"] < 1.3, figures
    # the blue/red colour of the response (issue 14: <= 2 % rms): the standards fitted with their catalogue colours
    assert abs(figures["aperture_corrected"]["colour_median"]) < 0.02, figures
    assert figures["colour"]["exposure_rms"] < 0.03 and figures["colour"]["bright_rms"] < 0.03, figures
    assert figures["standards"]["n"] >= 8 and figures["standards"]["teff_rms"] < 300.0, figures
    assert figures["coadd"]["n_targets"] > 5
    # 0.97-0.98 on seeds 1401, 1409, 1417, 1433 since the standards' colours fix the calibration's 15 % colour error
    # (0.98-1.02 before: that error, common to the exposures, inflated the part of the residuals the figure subtracts
    # as common, from ~0.14 to ~0.26 of a single exposure's noise variance); the goal is 3 %
    assert figures["coadd"]["median_snr_over_expected"] == pytest.approx(1.0, abs=0.04), figures
    assert figures["ripple"]["joined"] < 0.3 * min(figures["ripple"]["frame_spectra"].values()), figures


def lake_table_version(lake, name: str) -> int:
    from fiberlake.storage.tables import TableStore

    return TableStore(lake.root / "tables").version(name)
