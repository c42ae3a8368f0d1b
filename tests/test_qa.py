"""The nightly QA page: every figure rendered from a reduced night's tables, a missing camera named,
what the lake says escaped, the page opened in headless Chromium where the machine has it.

Fast: a lake written row by row (a night whose r1 camera never arrived). Slow: the simulated,
reduced mini night shared with the export tests (tests/qa_night.py).
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from matplotlib.image import imread

from fiberlake.jobs.cli import main
from fiberlake.jobs.qa import build_qa
from fiberlake.processors import qa_figures as qf
from fiberlake.processors import qa_stats as qs
from fiberlake.storage.layout import Lake
from fiberlake.storage.products import products_table
from fiberlake.storage.tables import TableStore
from tests.qa_night import reduced_night

NIGHT = "2026-11-21"


def _looks_like_a_figure(path: Path) -> None:
    image = imread(path)
    assert image.shape[0] > 250 and image.shape[1] > 400, (path, image.shape)
    assert float(np.std(image[..., :3])) > 0.05, f"{path} is (nearly) blank"


# --- pure pieces -----------------------------------------------------------------------------------------
def test_snr_model_recovers_the_photon_noise_relation():
    truth = qs.SnrModel(5.0e4, 2.0e3, 0)
    mag = np.linspace(11, 19, 40)
    rng = np.random.default_rng(1)
    fit = qs.fit_snr_model(mag, truth(mag) * rng.lognormal(0, 0.03, mag.size))
    assert fit.signal == pytest.approx(truth.signal, rel=0.1)
    assert fit.background == pytest.approx(truth.background, rel=0.3)
    assert qs.fit_snr_model(mag[:2], truth(mag[:2])) is None


def test_confusion_counts_and_sky_residuals():
    counts, rows, cols = qs.confusion(["ARC", "ARC", "FLAT", None], ["ARC", "FLAT", "FLAT", "UNKNOWN"], ["arc", "flat"])
    assert rows == ["ARC", "FLAT", "none"] and cols == ["ARC", "FLAT", "UNKNOWN"]
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    rng = np.random.default_rng(2)
    flux, ivar = rng.normal(0, 2, (400, 50)), np.full((400, 50), 0.25)
    ivar[:, 7] = 0
    stats = qs.sky_residuals(flux, ivar)
    assert np.isnan(stats.median[7]) and np.nanmedian(stats.rms) == pytest.approx(1.0, abs=0.05)


def test_spectrum_plot_shades_masked_and_flagged_bins(tmp_path):
    wave = np.linspace(4000, 5000, 500)
    flux = np.ones_like(wave)
    ivar = np.full_like(wave, 100.0)
    mask = np.zeros(wave.size, np.uint32)
    ivar[100:150], mask[100:150], mask[300:320] = 0, 1 << 15, 1 << 14
    fig = qf.spectrum_plot(wave, flux, ivar, mask, title="t", sky=[(wave, 50 + wave * 0, "b1")])
    labels = [t.get_text() for a in fig.axes if a.get_legend() for t in a.get_legend().get_texts()]
    assert "masked (ivar 0)" in labels and "flagged (mask bits)" in labels, labels
    assert len(fig.axes) == 2                     # the sky on its own axis
    fig.savefig(tmp_path / "s.png")
    _looks_like_a_figure(tmp_path / "s.png")


# --- a night whose r1 never arrived (rows written directly) ---------------------------------------------------
@pytest.fixture
def half_night(tmp_path) -> Lake:
    lake = Lake.at(tmp_path / "lake")
    lake.ensure("mini")
    store = TableStore(lake.root / "tables")
    now = dt.datetime(2026, 11, 21, 20, tzinfo=dt.timezone.utc)
    store.append("exposures", products_table([
        {"night": NIGHT, "expid": e, "camera": "b1", "spectrograph": 1, "arm": "b", "obstype": t, "file_version": 1,
         "filename": f"fl-{e}-b1.fits", "ingested_at": now} for e, t in ((1, "BIAS"), (2, "SCIENCE"))], "exposures"))
    store.append("quarantine", products_table([
        {"night": NIGHT, "filename": "fl-3-r1.fits<script>alert(1)</script>", "file_sha256": "ab", "file_size": 10,
         "reason": "truncated: the file ends before the header's END card", "error_class": "truncated",
         "stored_path": "quarantine/x", "quarantined_at": now}], "quarantine"))
    return lake


def test_a_missing_camera_is_named_and_the_lake_text_is_escaped(half_night, tmp_path, capsys):
    code = main(["qa", "--lake", str(half_night.root), "--night", NIGHT, "--out", str(tmp_path / "qa")])
    out = capsys.readouterr().out
    assert code == 0 and "no figures for b1" in out and "r1 (no frames of this camera" in out
    page = (tmp_path / "qa" / "index.html").read_text()
    assert "<b>camera r1 missing</b>: no frames of this camera this night" in page
    assert "<b>camera b1 missing</b>: 1 science/standard frames, none reduced (not processed yet)" in page
    assert "truncated: the file ends before the header&#x27;s END card" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "no typing for this night" in page and "no reductions this night" in page


def test_a_night_with_nothing_is_an_error(half_night, tmp_path, capsys):
    code = main(["qa", "--lake", str(half_night.root), "--night", "2026-11-22", "--out", str(tmp_path / "qa")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("fiberlake: error: night 2026-11-22 has no frames in the lake")


# --- the reduced night -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def night(tmp_path_factory):
    night = reduced_night(tmp_path_factory)
    store = TableStore(night.lake.root / "tables")
    exposures = pl.read_delta(str(night.lake.root / "tables" / "exposures")).filter(pl.col("night") == night.night)
    if pl.read_delta(str(night.lake.root / "tables" / "frames")).is_empty():
        # ingest types every frame; where it did not (typing off), rows as it writes them: header types,
        # one frame the pixels call a FLAT
        rows = [{"night": r["night"], "expid": r["expid"], "camera": r["camera"], "file_version": r["file_version"],
                 "type_header": r["obstype"], "type_pixels": r["obstype"] if i else "FLAT", "confidence": 0.97,
                 "flips_agreeing": 4, "type_agree": bool(i), "type_used": r["obstype"], "routed_by": "header",
                 "type_flag": None if i else "disagree", "routing": "auto", "model_id": "typing-test"}
                for i, r in enumerate(exposures.sort("expid", "camera").iter_rows(named=True))]
        store.append("frames", products_table(rows, "frames"))
    return night


FIGURES = [f"figures/{cam}-{name}.png" for cam in ("b1", "r1") for name in ("snr", "sky", "fibers", "response")] + [
    "figures/processing-times.png", "figures/typing-confusion.png"]


@pytest.fixture(scope="module")
def qa_page(night, tmp_path_factory):
    """The night's QA page, built once for the tests below."""
    return build_qa(night.lake, night.night, tmp_path_factory.mktemp("qa"))


@pytest.mark.slow
def test_the_qa_page_renders_every_figure_from_the_night(night, qa_page):
    report = qa_page
    assert sorted(report.figures) == sorted(FIGURES) and not report.missing, report.summary()
    page = report.page.read_text()
    for rel in FIGURES:
        assert f'src="{rel}"' in page
        _looks_like_a_figure(report.page.parent / rel)
    frames = pl.read_delta(str(night.lake.root / "tables" / "frames")).filter(pl.col("night") == night.night)
    flagged = frames.filter(pl.col("type_flag").is_not_null()).height
    assert f"{flagged} frames flagged for a person to look at" in page
    assert "no file was quarantined this night" in page and "no reduction failed" in page
    assert night.lake.root.name in page or str(night.lake.root) in page


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="no chromium on this machine (apt-get install chromium)")
def test_the_qa_page_in_headless_chromium(qa_page, tmp_path):
    shot = tmp_path / "qa-page.png"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1600,4200", qa_page.page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = imread(shot)
    assert image.shape[:2] == (4200, 1600)
    # the figures were loaded: many distinct colours in the upper part of the page (a page of broken
    # images is text on white)
    top = (image[:2400, :, :3] * 255).astype(np.uint8).reshape(-1, 3)
    assert len(np.unique(top, axis=0)) > 500
