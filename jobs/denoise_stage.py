"""Denoising stage (seed 004): the night's joined spectra and coadds through the Bayesian denoiser.

Runs after the products above the frame (:func:`fiberlake.jobs.products.run_after_frames` calls
:func:`run_after_products`). The driver decides the work and commits through the same single writer;
the MAP runs on the run's reducers (Ray actors, CUDA when they have a GPU; in this process with
``--no-ray``), one :class:`DenoiseChunk` of at most ``execution.denoise_chunk`` spectra per call,
each reducer loading the model once and keeping it. Exactly once:

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
from fiberlake.storage import models as store
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


@dataclass
class DenoiseChunk:
    """Spectra rows to denoise on one reducer (:meth:`FrameReducer.denoise_chunk`)."""

    group: int
    """Which of the driver's groups (an exposure and spectrograph of ``joined``; a night's coadds) it is of."""
    start: int
    """Its first row in the group."""
    source: pl.DataFrame
    """``loglam_min``, ``dloglam``, ``flam``, ``flam_ivar``, ``flam_mask`` of its rows."""
    params: DenoiseParams
    model_id: str


def denoise_unit(lake: Lake, unit: DenoiseChunk, max_threads: int | None = None) -> list[dict]:
    """:func:`denoise_rows` of one chunk with this process's model (loaded once), on at most ``max_threads``
    torch CPU threads (``denoise.cpu_threads`` when None)."""
    import torch

    params = unit.params
    torch.set_num_threads(params.cpu_threads if max_threads is None else max(1, min(params.cpu_threads, max_threads)))
    denoiser = _denoiser(params.model, lake.root, params.device)
    if denoiser.model_id != unit.model_id:
        raise LookupError(f"denoise model {params.model} is {denoiser.model_id} here, {unit.model_id} in the driver")
    return denoise_rows(denoiser, unit.source, params)


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
    return MapSettings(steps=params.steps, start_iterations=params.start_iterations, lr=params.lr,
                       refine_classes=params.refine_classes,
                       min_observed_fraction=params.min_observed_fraction, prior_margin=params.prior_margin,
                       max_residual_rms=params.max_residual_rms, posterior_mean=params.posterior_mean)


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
                  reprocess: bool = False, stop: Callable[[], bool] | None = None, pool=None) -> DenoiseReport:
    """Denoise (or bring up to date) the night's joined spectra and coadds of every extraction.

    The spectra of each group to do are cut into chunks of ``config.execution.denoise_chunk`` rows
    that run on ``pool`` (the run's reducers; in this process when None); a group is committed
    here once all its chunks are back (a ``joined`` group only whole; the coadds without a failed
    chunk's rows). ``stop`` is checked between groups. Failures are recorded per chunk, never raised.
    """
    from fiberlake.jobs.executors import pool_or_local

    stop = stop or (lambda: False)
    report = DenoiseReport()
    if not params.enabled:
        return report
    model_id = store.stage_card(params.model, "denoise", lake.root)["model_id"]
    report.model_id = model_id
    tables = TableStore(lake.root / "tables")
    science = params.science_dict()
    now = dt.datetime.now(dt.timezone.utc)

    def groups():
        for method in extractions_to_denoise(config.extractions, params.extraction):
            if "joined" in params.sources:
                yield from _joined(tables, night, method, model_id, science, run_id, reprocess, now, report)
            if "coadds" in params.sources:
                yield from _coadds(tables, night, method, model_id, science, run_id, reprocess, now, report)

    with pool_or_local(pool, str(lake.root), config.to_dict()) as workers:
        _run_groups(workers, groups(), config.execution.denoise_chunk, params, model_id, stop, report)
    return report


@dataclass
class _Group:
    """Rows of one commit to denoise: their source rows, and how to commit their outputs."""

    name: str
    """Its key in :attr:`DenoiseReport.failed`."""
    source: pl.DataFrame
    commit: Callable[[list[dict | None]], None]
    """Commits the outputs, one per source row (None: the row's chunk failed)."""
    whole: bool
    """Committed only when every chunk succeeded."""
    outs: list = field(default_factory=list)
    pending: int = 0
    failed: bool = False


_CHUNK_COLUMNS = ("loglam_min", "dloglam", "flam", "flam_ivar", "flam_mask")


def _run_groups(workers, groups, chunk: int, params: DenoiseParams, model_id: str, stop: Callable[[], bool],
                report: DenoiseReport) -> None:
    """Send every group's chunks to the reducers (``stop`` is checked between groups); commit each group
    when its last chunk is back."""
    open_groups: dict[int, _Group] = {}

    def calls():
        for index, group in enumerate(groups):
            if stop():
                return
            n = group.source.height
            group.outs = [None] * n
            starts = range(0, n, chunk)
            group.pending = len(starts)
            open_groups[index] = group
            source = group.source.select(_CHUNK_COLUMNS)
            for start in starts:
                yield (DenoiseChunk(group=index, start=start, source=source.slice(start, chunk), params=params,
                                    model_id=model_id),)

    for (unit,), result in workers.map("denoise_chunk", calls()):
        group = open_groups[unit.group]
        n = unit.source.height
        name = group.name if group.source.height <= n else f"{group.name} rows {unit.start}-{unit.start + n - 1}"
        if isinstance(result, Exception):  # the reducer died for good
            report.failed[name] = f"worker lost: {type(result).__name__}: {str(result)[:300]}"
            group.failed = True
        elif result.error is not None or len(result.rows) != n:
            report.failed[name] = result.error or f"{len(result.rows)} outputs for {n} spectra"
            group.failed = True
        else:
            group.outs[unit.start:unit.start + n] = result.rows
        group.pending -= 1
        if group.pending:
            continue
        del open_groups[unit.group]
        if group.failed and group.whole:
            continue
        try:
            group.commit(group.outs)
        except Exception as err:  # recorded; the night goes on
            report.failed[group.name] = f"{type(err).__name__}: {err}"


def _count(report: DenoiseReport, rows: list[dict]) -> None:
    for r in rows:
        if r["status"] != "ok":
            report.flagged[r["status"]] = report.flagged.get(r["status"], 0) + 1


def _joined(tables, night, method, model_id, science, run_id, reprocess, now, report):
    """The exposure groups (expid, spectrograph) of ``joined`` whose denoised rows are missing or stale."""
    cal = read_rows(tables, "fluxcal", night=night, extraction=method).filter(pl.col("expid") > 0)
    if cal.is_empty():
        return
    src_hash = {}
    for r in cal.sort("camera").iter_rows(named=True):
        src_hash.setdefault((int(r["expid"]), int(r["spectrograph"])), r["input_hash"])
    stored = _stored_hashes(tables, night, "joined", method)
    for (expid, spec), h in sorted(src_hash.items()):
        wanted = digest_of({"source": h, "model": model_id, "params": science})
        if stored.get((expid, spec)) == wanted and not reprocess:
            report.skipped_groups += 1
            continue
        name = f"joined {expid}/{spec}/{method}"
        try:
            rows = read_rows(tables, "joined", night=night, expid=expid, spectrograph=spec, extraction=method)
            rows = rows.filter(pl.col("objtype").is_null() | (pl.col("objtype") != "SKY")).sort("fiber")
        except Exception as err:  # recorded; the night goes on
            report.failed[name] = f"{type(err).__name__}: {err}"
            continue
        if rows.is_empty():
            continue

        def commit(outs, rows=rows, expid=expid, spec=spec, wanted=wanted):
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

        yield _Group(name=name, source=rows, commit=commit, whole=True)


def _coadds(tables, night, method, model_id, science, run_id, reprocess, now, report):
    """The night's coadds of ``method`` whose denoised rows are missing or stale, as one group."""
    rows = read_rows(tables, "coadds", night=night, extraction=method)
    if rows.is_empty():
        return
    rows = rows.filter(pl.col("objtype").is_null() | (pl.col("objtype") != "SKY"))
    stored = _stored_hashes(tables, night, "coadds", method)
    wanted = [digest_of({"source": r["input_hash"], "model": model_id, "params": science})
              for r in rows.select("input_hash").iter_rows(named=True)]
    todo = [i for i, (r, w) in enumerate(zip(rows.select("targetid", "scope").iter_rows(named=True), wanted))
            if reprocess or stored.get((r["targetid"], r["scope"])) != w]
    report.skipped_groups += rows.height - len(todo)
    if not todo:
        return
    sel = rows[todo]

    def commit(outs):
        full = []
        for k, (src, out) in enumerate(zip(sel.iter_rows(named=True), outs)):
            if out is None:  # its chunk failed (recorded): the next run does it
                continue
            full.append({"night": night, "source": "coadds", "extraction": method, "scope": src["scope"],
                         "expid": 0, "spectrograph": -1, "fiber": -1, "targetid": int(src["targetid"]),
                         "run_id": run_id, "input_hash": wanted[todo[k]], "made_at": now} | out)
        if not full:
            return
        tables.replace_keys(TABLE, products_table(full, TABLE),
                            [{"night": night, "source": "coadds", "extraction": method, "scope": r["scope"],
                              "targetid": r["targetid"]} for r in full])
        report.coadds += len(full)
        _count(report, full)

    yield _Group(name=f"coadds {night}/{method}", source=sel, commit=commit, whole=False)


def run_after_products(lake: Lake, night: str, config: ReductionParams, report, fixed_run_id: str | None,
                       stop: Callable[[], bool] | None = None, pool=None) -> DenoiseReport | None:
    """The hook after the products: denoise under the run's id on the run's reducers (``pool``);
    failures are recorded, never raised."""
    params = getattr(config, "denoise", None) or DenoiseParams()
    try:
        result = denoise_night(lake, night, config, params, run_id=report.run_id,
                               reprocess=fixed_run_id is not None, stop=stop, pool=pool)
    except Exception as err:
        result = DenoiseReport(failed={"denoise": f"{type(err).__name__}: {err}"})
    return result
