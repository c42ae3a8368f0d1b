"""``fiberlake qa``: one HTML page per night with PNG figures per camera.

For every camera of the instrument the page shows S/N against magnitude with the expected
photon-noise relation, the sky fibers' residuals by wavelength, the wavelength RMS and trace offset
per fiber, and the flux-calibration response of each exposure; a camera with no frames, or none
reduced, is named as such. Night-wide: processing times (``reductions.seconds``), frame typing
(header against pixels, when the ``frames`` table has rows for the night), the quarantine list with
reasons, failed reductions and the runs. Everything read comes from the lake's tables; every text
from them is HTML-escaped.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from fiberlake.jobs.export import EXTRACTION_ORDER
from fiberlake.jobs.query import scan_tables
from fiberlake.processors import qa_figures as qf
from fiberlake.processors import qa_stats as qs
from fiberlake.processors.spectrum_format import linear_wavelengths
from fiberlake.schemas.instrument import get_instrument
from fiberlake.schemas.tables import TYPE_CLASSES
from fiberlake.storage.layout import Lake

PAGE = "index.html"
FIGURES = "figures"


@dataclass
class QaReport:
    """What :func:`build_qa` wrote and what it found missing."""

    page: Path
    figures: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    """Camera to why it has no figures."""
    notes: list[str] = field(default_factory=list)
    """Sections left out, and why (no standards, no typing, ...)."""

    def summary(self) -> str:
        """One line for people."""
        text = f"wrote {self.page} with {len(self.figures)} figures"
        if self.missing:
            text += "; no figures for " + ", ".join(f"{c} ({why})" for c, why in self.missing.items())
        return text


@dataclass
class _Night:
    night: str
    extraction: str | None
    exposures: pl.DataFrame
    reductions: pl.DataFrame
    metrics: pl.DataFrame
    fluxcal: pl.DataFrame
    quarantine: pl.DataFrame
    frames: pl.DataFrame
    runs: pl.DataFrame
    tables: dict[str, pl.LazyFrame]


def _is(extraction: str | None) -> pl.Expr:
    """Rows of ``extraction`` (none when no extraction was reduced)."""
    return pl.col("extraction") == extraction if extraction else pl.lit(False)


def _load(lake: Lake, night: str, extraction: str | None) -> _Night:
    tables = scan_tables(lake, arrays=False)
    on_night = pl.col("night") == night
    exposures = tables["exposures"].filter(on_night).drop("header_json").collect()
    reductions = tables["reductions"].filter(on_night).collect()
    quarantine = tables["quarantine"].filter(on_night).collect()
    if exposures.is_empty() and quarantine.is_empty():
        raise LookupError(f"night {night} has no frames in the lake (nothing ingested or quarantined); "
                          f"'fiberlake query \"SELECT DISTINCT night FROM exposures\"' lists the nights")
    present = set(reductions.filter(pl.col("status") == "ok")["extraction"].to_list())
    if extraction is None:
        extraction = next((m for m in EXTRACTION_ORDER if m in present), None)
    fibermap = tables["fibermap"].filter(on_night).select("night", "expid", "spectrograph", "fiber", "mag")
    metrics = (tables["metrics"].filter(on_night & _is(extraction))
               .join(fibermap, on=["night", "expid", "spectrograph", "fiber"], how="left").collect())
    fluxcal = tables["fluxcal"].filter(on_night & _is(extraction)).collect()
    frames = tables["frames"].filter(on_night).collect()
    runs = tables["runs"].filter(on_night).select("run_id", "command", "code_version", "started_at", "finished_at",
                                                  "n_frames", "n_failed").collect()
    return _Night(night, extraction, exposures, reductions, metrics, fluxcal, quarantine, frames, runs, tables)


# --- figures ---------------------------------------------------------------------------------------------
def _save(fig, out: Path, name: str, report: QaReport) -> str:
    rel = f"{FIGURES}/{name}.png"
    fig.savefig(out / rel)
    report.figures.append(rel)
    return rel


def _snr_figure(n: _Night, camera: str):
    rows = n.metrics.filter((pl.col("camera") == camera) & (pl.col("objtype") != "SKY"))
    if rows.is_empty():
        return None
    mag = rows["mag"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    snr = rows["median_snr"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    expid = rows["expid"].to_numpy()
    models = {int(e): qs.fit_snr_model(mag[expid == e], snr[expid == e]) for e in np.unique(expid)}
    return qf.snr_vs_mag(mag, snr, expid, rows["objtype"].to_list(), models,
                         title=f"{camera}: S/N per bin against magnitude ({n.extraction})")


def _sky_figure(n: _Night, camera: str):
    rows = (n.tables["spectra"].filter((pl.col("night") == n.night) & (pl.col("camera") == camera)
                                       & _is(n.extraction) & (pl.col("objtype") == "SKY"))
            .select("wave_min", "dwave", "nwave", "flux", "ivar", "sky").collect())
    if rows.is_empty():
        return None
    wave = linear_wavelengths(rows["wave_min"][0], rows["dwave"][0], rows["nwave"][0])
    flux = np.stack([np.asarray(v, np.float32) for v in rows["flux"].to_list()])
    ivar = np.stack([np.asarray(v, np.float32) for v in rows["ivar"].to_list()])
    sky = np.median(np.stack([np.asarray(v, np.float32) for v in rows["sky"].to_list()]), axis=0)
    return qf.sky_residuals(wave, sky, qs.sky_residuals(flux, ivar), title=f"{camera}: sky fibers after sky subtraction")


def _fiber_figure(n: _Night, camera: str):
    rows = n.metrics.filter(pl.col("camera") == camera).sort("expid", "fiber")
    if rows.is_empty():
        return None
    num = lambda c: rows[c].cast(pl.Float64).fill_null(np.nan).to_numpy()  # noqa: E731
    return qf.fiber_diagnostics(rows["fiber"].to_numpy(), num("wave_rms"), num("trace_offset"), rows["expid"].to_numpy(),
                                title=f"{camera}: wavelength solution and trace per fiber")


def _response_figure(n: _Night, camera: str):
    rows = n.fluxcal.filter((pl.col("camera") == camera) & pl.col("response").is_not_null()).sort("expid")
    rows = rows.filter(pl.col("response").list.len() > 0)
    if rows.is_empty():
        return None
    first = rows.row(0, named=True)
    wave = linear_wavelengths(first["wave_min"], first["dwave"], first["nwave"])
    curves, telluric = {}, {}
    for r in rows.iter_rows(named=True):
        label = "mean of the night" if r["expid"] == 0 else f"{r['expid']} ({r['status']}, {r['n_used']} std)"
        curves[label] = np.asarray(r["response"], float)
        if r.get("telluric") is not None:
            telluric[label] = np.asarray(r["telluric"], float)
    return qf.response_curves(wave, curves, telluric, title=f"{camera}: flux-calibration response per exposure")


def _typing_figure(n: _Night):
    if n.frames.is_empty():
        return None
    counts, rows, cols = qs.confusion(n.frames["type_header"].to_list(), n.frames["type_pixels"].to_list(),
                                      [c.upper() for c in TYPE_CLASSES])
    return qf.confusion_matrix(counts, rows, cols, title=f"frame typing, {n.night}: {n.frames.height} frames")


def _times_figure(n: _Night):
    rows = n.reductions.filter(pl.col("seconds").is_not_null()).sort("camera", "expid", "extraction")
    if rows.is_empty():
        return None
    labels = [f"{r['expid']} {r['camera']} {r['extraction']}" for r in rows.iter_rows(named=True)]
    total = float(rows["seconds"].sum())
    return qf.processing_times(labels, rows["seconds"].to_numpy(), rows["camera"].to_list(),
                               title=f"reduction wall time per frame ({rows.height} reductions, {total:.1f} s in all)")


# --- the page --------------------------------------------------------------------------------------------
def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _table(frame: pl.DataFrame, columns: Iterable[str]) -> str:
    columns = [c for c in columns if c in frame.columns]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(r[c]))}</td>" for c in columns) + "</tr>"
                   for r in frame.iter_rows(named=True))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: object) -> object:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return value


def _img(rel: str, alt: str) -> str:
    return f'<figure><img src="{_e(rel)}" alt="{_e(alt)}"><figcaption>{_e(alt)}</figcaption></figure>'


_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1600px}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}figure img{max-width:760px;width:100%;border:1px solid #ddd}
figcaption{font-size:.8em;color:#555}table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}th{background:#f0f0f0}
.missing{background:#fff3cd;border:1px solid #e0c060;padding:.5em 1em;margin:.5em 0}
.ok{color:#276b27}.bad{color:#a01818;font-weight:bold}.note{color:#666;font-style:italic}"""


def _camera_status(n: _Night, camera: str) -> str | None:
    """Why a camera has no figures, or None when it has reduced science frames."""
    frames = n.exposures.filter(pl.col("camera") == camera)
    if frames.is_empty():
        return "no frames of this camera this night (none delivered, or every one quarantined)"
    science = frames.filter(pl.col("obstype").is_in(["SCIENCE", "STANDARD"]))
    if science.is_empty():
        return f"{frames.height} frames ingested, but no science or standard frame"
    done = n.reductions.filter((pl.col("camera") == camera) & (pl.col("status") == "ok")
                               & _is(n.extraction))
    if done.is_empty():
        failed = n.reductions.filter((pl.col("camera") == camera) & (pl.col("status") == "failed"))
        return (f"{science.height} science/standard frames, none reduced"
                + (f" ({failed.height} failed: see below)" if failed.height else " (not processed yet)"))
    return None


def build_qa(lake: Lake, night: str, out: str | Path, *, extraction: str | None = None) -> QaReport:
    """Write the night's QA page ``out/index.html`` and its figures ``out/figures/*.png``.

    Parameters
    ----------
    lake : Lake
    night : str
    out : path-like
        Folder (created); an earlier page and its figures there are replaced.
    extraction : str, optional
        Extraction whose spectra the figures show (default: the first reduced of optimal, deconv, box).

    Returns
    -------
    QaReport

    Raises
    ------
    LookupError
        If the lake has no frame of that night.
    """
    n = _load(lake, night, extraction)
    out = Path(out)
    (out / FIGURES).mkdir(parents=True, exist_ok=True)
    for old in (out / FIGURES).glob("*.png"):
        old.unlink()
    report = QaReport(out / PAGE)
    inst = get_instrument(lake.instrument)
    parts = [f"<h1>fiberlake QA: night {_e(night)}</h1>",
             f"<p>lake {_e(lake.root)} &middot; instrument {_e(inst.name)} &middot; extraction shown: "
             f"{_e(n.extraction or 'none reduced')} &middot; made {_e(dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'))}</p>"]
    summary = []
    for camera in inst.cameras:
        frames = n.exposures.filter(pl.col("camera") == camera)
        red = n.reductions.filter(pl.col("camera") == camera)
        why = _camera_status(n, camera)
        report.missing.update({camera: why} if why else {})
        summary.append({"camera": camera, "frames": frames.height,
                        "science": frames.filter(pl.col("obstype").is_in(["SCIENCE", "STANDARD"])).height,
                        "reduced": red.filter(pl.col("status") == "ok").height,
                        "failed": red.filter(pl.col("status") == "failed").height, "status": why or "ok"})
    parts.append("<h2>Cameras</h2>" + _table(pl.DataFrame(summary), ["camera", "frames", "science", "reduced", "failed",
                                                                     "status"]))
    if report.missing:
        parts.append("".join(f'<div class="missing"><b>camera {_e(c)} missing</b>: {_e(w)}</div>'
                             for c, w in report.missing.items()))
    for camera in inst.cameras:
        parts.append(f'<h2 id="{_e(camera)}">Camera {_e(camera)}</h2>')
        if camera in report.missing:
            parts.append(f'<div class="missing">no figures: {_e(report.missing[camera])}</div>')
            continue
        figs = []
        for name, make, what in (("snr", _snr_figure, "S/N against magnitude, with the expected relation"),
                                 ("sky", _sky_figure, "sky residuals by wavelength"),
                                 ("fibers", _fiber_figure, "wavelength RMS and trace offset per fiber"),
                                 ("response", _response_figure, "flux-calibration response per exposure")):
            fig = make(n, camera)
            if fig is None:
                figs.append(f'<p class="note">{_e(what)}: no data ({_no_data(name)})</p>')
                report.notes.append(f"{camera} {name}: {_no_data(name)}")
                continue
            figs.append(_img(_save(fig, out, f"{camera}-{name}", report), f"{camera}: {what}"))
        parts.append('<div class="grid">' + "".join(figs) + "</div>")
    parts += _night_sections(n, out, report)
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>fiberlake QA {_e(night)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")
    report.page.write_text(page, encoding="utf-8")
    return report


def _no_data(name: str) -> str:
    return {"snr": "no metrics of target or standard fibers", "sky": "no sky fibers",
            "fibers": "no metrics", "response": "no flux calibration: no standards this night"}[name]


def _night_sections(n: _Night, out: Path, report: QaReport) -> list[str]:
    parts = ["<h2>Processing times</h2>"]
    fig = _times_figure(n)
    parts.append(_img(_save(fig, out, "processing-times", report), "reduction wall time per frame") if fig
                 else '<p class="note">no reductions this night</p>')
    parts.append("<h2>Frame typing</h2>")
    fig = _typing_figure(n)
    if fig is None:
        parts.append('<p class="note">no typing for this night (table frames has no rows for it)</p>')
        report.notes.append("typing: no frames rows")
    else:
        parts.append(_img(_save(fig, out, "typing-confusion", report), "frame typing: header against pixels"))
        flagged = n.frames.filter(pl.col("type_flag").is_not_null()).sort("expid", "camera")
        parts.append(f"<p>{flagged.height} frames flagged for a person to look at</p>" + (
            _table(flagged, ["expid", "camera", "type_header", "type_pixels", "confidence", "type_used", "routed_by",
                             "type_flag", "untypable"]) if flagged.height else ""))
    parts.append("<h2>Quarantine</h2>")
    parts.append(_table(n.quarantine.sort("filename"), ["filename", "error_class", "reason", "file_size", "stored_path"])
                 if n.quarantine.height else '<p class="ok">no file was quarantined this night</p>')
    failed = n.reductions.filter(pl.col("status") == "failed")
    parts.append("<h2>Failed reductions</h2>")
    parts.append(_table(failed.sort("expid", "camera"), ["expid", "camera", "extraction", "error_kind", "error"])
                 if failed.height else '<p class="ok">no reduction failed</p>')
    parts.append("<h2>Runs</h2>" + (_table(n.runs.sort("started_at"), n.runs.columns) if n.runs.height
                                    else '<p class="note">no processing run for this night</p>'))
    return parts
