"""Denoising stage (seed 004): the night's joined spectra and coadds through the Bayesian denoiser.

Runs after the products above the frame (:func:`fiberlake.jobs.products.run_after_frames` calls
:func:`run_after_products`), in the driver, committing through the same single writer. Exactly once:

* a group of rows (one exposure and spectrograph of ``joined``; one ``coadds`` row) is identified by
  a hash of its source (the ``fluxcal`` marker's ``input_hash`` of the exposure, the coadd's own
  ``input_hash``), the model id and the stage's science parameters;
* a group whose stored ``spectra_denoised`` rows carry that hash is skipped; otherwise its rows are
  denoised and replaced in one commit. A crash leaves hashes that do not match; the next run
  redoes exactly the rest. A new model or new parameters redo everything they touch.

Sky fibers are not denoised (no star). Bad input gives a row with a status, never an exception.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from fiberlake.processors.denoise_map import BayesianDenoiser, MapSettings
from fiberlake.processors.denoise_prep import NWAVE, WAVE_MAX, WAVE_MIN, to_denoise_grid
from fiberlake.processors.params import DENOISE_PREFERENCE, DenoiseParams, ReductionParams
from fiberlake.schemas.maskbits import MASK_DTYPE, Mask
from fiberlake.schemas.parset import digest_of
from fiberlake.storage.layout import Lake
from fiberlake.storage.products import products_table, read_rows
from fiberlake.storage.tables import TableStore

TABLE = "spectra_denoised"


@dataclass
class DenoiseReport:
    """What :func:`denoise_night` did."""

    model_id: str = ""
    joined: int = 0
    coadds: int = 0
    flagged: dict[str, int] = field(default_factory=dict)
    skipped_groups: int = 0
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"denoised {self.joined} exposure spectra and {self.coadds} coadds"
        if self.model_id:
            text += f" ({self.model_id})"
        if self.flagged:
            text += ", flagged: " + ", ".join(f"{k} {v}" for k, v in sorted(self.flagged.items()))
        if self.failed:
            text += f", {len(self.failed)} failed: " + "; ".join(f"{k}: {v}" for k, v in self.failed.items())
        return text


_LOADED: dict[tuple[str, str, str], BayesianDenoiser] = {}


def _denoiser(model: str, lake_root, device: str) -> BayesianDenoiser:
    """The model, loaded once per process (a model id is looked up in the lake's models/)."""
    from fiberlake.jobs.train_denoise import load_denoiser

    key = (model, str(lake_root), device)
    if key not in _LOADED:
        _LOADED[key] = load_denoiser(model, lake_root, device)
    return _LOADED[key]


def extractions_to_denoise(run_extractions: tuple[str, ...], choice: str) -> tuple[str, ...]:
    """The run's extractions the stage denoises (``denoise.extraction``; see :data:`DENOISE_EXTRACTIONS`).

    One extraction by default: the MAP is the night's most expensive stage on a CPU (about 1 s per
    spectrum on one core), and box and optimal spectra of one star give the same denoised star.
    """
    if choice == "all":
        return tuple(run_extractions)
    if choice == "best":
        return next(((m,) for m in DENOISE_PREFERENCE if m in run_extractions), ())
    return (choice,) if choice in run_extractions else ()


def map_settings(params: DenoiseParams) -> MapSettings:
    """The MAP's settings from the stage's parameters."""
    return MapSettings(steps=params.steps, lr=params.lr, refine_classes=params.refine_classes,
                       min_observed_fraction=params.min_observed_fraction, prior_margin=params.prior_margin,
                       max_residual_rms=params.max_residual_rms)


def denoise_rows(denoiser: BayesianDenoiser, source: pl.DataFrame, params: DenoiseParams) -> list[dict]:
    """Denoise product rows (``flam``, ``flam_ivar``, ``flam_mask``, grid columns); one output dict each
    (without the key columns). Rows may come from grids of different lengths."""
    out: list[dict] = []
    if source.is_empty():
        return out
    fluxes, observed = [], []
    for row in source.select("loglam_min", "dloglam", "flam", "flam_ivar", "flam_mask").iter_rows(named=True):
        flam = np.asarray(row["flam"] if row["flam"] is not None else [], np.float64)
        ivar = np.asarray(row["flam_ivar"] if row["flam_ivar"] is not None else [], np.float64)
        mask = np.asarray(row["flam_mask"] if row["flam_mask"] is not None else [], np.uint32)
        if flam.size == 0 or ivar.size != flam.size or mask.size != flam.size or row["dloglam"] is None:
            fluxes.append(np.zeros(NWAVE))
            observed.append(np.zeros(NWAVE, bool))
            continue
        f, o = to_denoise_grid(float(row["loglam_min"]), float(row["dloglam"]), flam, ivar, mask)
        fluxes.append(f[0])
        observed.append(o[0])
    flux = np.stack(fluxes)
    obs = np.stack(observed)
    result = denoiser.denoise(flux, obs, map_settings(params), batch=params.batch)
    scale = np.where(obs, np.where(np.isfinite(flux), flux, 0.0), 0.0).sum(-1)
    for i in range(flux.shape[0]):
        fitted = result.class_index[i] >= 0
        out.append({
            "model_id": denoiser.model_id, "status": result.status[i],
            "wave_min": WAVE_MIN, "wave_max": WAVE_MAX, "nwave": NWAVE,
            "flux": result.flux[i].astype(np.float32),
            "flux_scale": float(scale[i]) if np.isfinite(scale[i]) else 0.0,
            "mask": np.where(result.imputed[i], MASK_DTYPE(Mask.NODATA), MASK_DTYPE(0)).astype(np.uint32),
            "n_observed": int(obs[i].sum()),
            "latent": result.latent[i].astype(np.float32),
            "subclass": denoiser.classes[int(result.class_index[i])] if fitted else None,
            "class_posterior": result.posterior[i].astype(np.float32),
            "objective": float(result.objective[i]), "log_prior": float(result.log_prior[i]),
            "residual_rms": float(result.residual_rms[i]),
        })
    return out


def _stored_hashes(tables: TableStore, night: str, source: str, method: str) -> dict[tuple, str]:
    rows = read_rows(tables, TABLE, night=night, source=source, extraction=method)
    out = {}
    for r in rows.select("scope", "expid", "spectrograph", "targetid", "input_hash").iter_rows(named=True):
        key = (r["expid"], r["spectrograph"]) if source == "joined" else (r["targetid"], r["scope"])
        out.setdefault(key, r["input_hash"])
    return out


def denoise_night(lake: Lake, night: str, config: ReductionParams, params: DenoiseParams, *, run_id: str,
                  reprocess: bool = False, stop: Callable[[], bool] | None = None) -> DenoiseReport:
    """Denoise (or bring up to date) the night's joined spectra and coadds of every extraction."""
    import torch

    stop = stop or (lambda: False)
    report = DenoiseReport()
    if not params.enabled:
        return report
    torch.set_num_threads(params.cpu_threads)
    denoiser = _denoiser(params.model, lake.root, params.device)
    report.model_id = denoiser.model_id
    tables = TableStore(lake.root / "tables")
    science = params.science_dict()
    now = dt.datetime.now(dt.timezone.utc)
    for method in extractions_to_denoise(config.extractions, params.extraction):
        if "joined" in params.sources:
            _joined(tables, night, method, denoiser, params, science, run_id, reprocess, now, report, stop)
        if "coadds" in params.sources and not stop():
            _coadds(tables, night, method, denoiser, params, science, run_id, reprocess, now, report)
    return report


def _count(report: DenoiseReport, rows: list[dict]) -> None:
    for r in rows:
        if r["status"] != "ok":
            report.flagged[r["status"]] = report.flagged.get(r["status"], 0) + 1


def _joined(tables, night, method, denoiser, params, science, run_id, reprocess, now, report, stop) -> None:
    cal = read_rows(tables, "fluxcal", night=night, extraction=method).filter(pl.col("expid") > 0)
    if cal.is_empty():
        return
    src_hash = {}
    for r in cal.sort("camera").iter_rows(named=True):
        src_hash.setdefault((int(r["expid"]), int(r["spectrograph"])), r["input_hash"])
    stored = _stored_hashes(tables, night, "joined", method)
    for (expid, spec), h in sorted(src_hash.items()):
        if stop():
            return
        wanted = digest_of({"source": h, "model": denoiser.model_id, "params": science})
        if stored.get((expid, spec)) == wanted and not reprocess:
            report.skipped_groups += 1
            continue
        try:
            rows = read_rows(tables, "joined", night=night, expid=expid, spectrograph=spec, extraction=method)
            rows = rows.filter(pl.col("objtype").is_null() | (pl.col("objtype") != "SKY")).sort("fiber")
            if rows.is_empty():
                continue
            outs = denoise_rows(denoiser, rows, params)
            full = []
            for src, out in zip(rows.iter_rows(named=True), outs):
                full.append({"night": night, "source": "joined", "extraction": method, "scope": "exposure",
                             "expid": expid, "spectrograph": spec, "fiber": int(src["fiber"]),
                             "targetid": int(src["targetid"]) if src["targetid"] is not None else -1,
                             "run_id": run_id, "input_hash": wanted, "made_at": now} | out)
            tables.replace_keys(TABLE, products_table(full, TABLE),
                                {"night": night, "source": "joined", "extraction": method, "expid": expid,
                                 "spectrograph": spec})
            report.joined += len(full)
            _count(report, full)
        except Exception as err:  # recorded; the night goes on
            report.failed[f"joined {expid}/{spec}/{method}"] = f"{type(err).__name__}: {err}"


def _coadds(tables, night, method, denoiser, params, science, run_id, reprocess, now, report) -> None:
    rows = read_rows(tables, "coadds", night=night, extraction=method)
    if rows.is_empty():
        return
    rows = rows.filter(pl.col("objtype").is_null() | (pl.col("objtype") != "SKY"))
    stored = _stored_hashes(tables, night, "coadds", method)
    wanted = [digest_of({"source": r["input_hash"], "model": denoiser.model_id, "params": science})
              for r in rows.select("input_hash").iter_rows(named=True)]
    todo = [i for i, (r, w) in enumerate(zip(rows.select("targetid", "scope").iter_rows(named=True), wanted))
            if reprocess or stored.get((r["targetid"], r["scope"])) != w]
    report.skipped_groups += rows.height - len(todo)
    if not todo:
        return
    try:
        sel = rows[todo]
        outs = denoise_rows(denoiser, sel, params)
        full = []
        for k, (src, out) in enumerate(zip(sel.iter_rows(named=True), outs)):
            full.append({"night": night, "source": "coadds", "extraction": method, "scope": src["scope"],
                         "expid": 0, "spectrograph": -1, "fiber": -1, "targetid": int(src["targetid"]),
                         "run_id": run_id, "input_hash": wanted[todo[k]], "made_at": now} | out)
        tables.replace_keys(TABLE, products_table(full, TABLE),
                            [{"night": night, "source": "coadds", "extraction": method, "scope": r["scope"],
                              "targetid": r["targetid"]} for r in full])
        report.coadds += len(full)
        _count(report, full)
    except Exception as err:  # recorded; the night goes on
        report.failed[f"coadds {night}/{method}"] = f"{type(err).__name__}: {err}"


def run_after_products(lake: Lake, night: str, config: ReductionParams, report, fixed_run_id: str | None,
                       stop: Callable[[], bool] | None = None) -> DenoiseReport | None:
    """The hook after the products: denoise under the run's id; failures are recorded, never raised."""
    params = getattr(config, "denoise", None) or DenoiseParams()
    try:
        result = denoise_night(lake, night, config, params, run_id=report.run_id,
                               reprocess=fixed_run_id is not None, stop=stop)
    except Exception as err:
        result = DenoiseReport(failed={"denoise": f"{type(err).__name__}: {err}"})
    return result
