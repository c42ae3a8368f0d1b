"""Spectra out of the lake, in files the field's tools open: ``fiberlake export`` and :func:`spectrum`.

:func:`export` selects rows with the user's SQL predicate (through the query prompt's checked path,
:func:`fiberlake.jobs.query.select_where`), then writes

* ``desi/spectra-<night>-<extraction>.fits``: the flux-calibrated exposures (table ``joined``) of
  a night in DESI's spectra layout, and ``desi/coadd-<night|all>-<extraction>.fits``: the coadds
  (table ``coadds``) in DESI's coadd layout. The joined grid is cut into one band per arm at the
  middle of the arms' overlap, so the bands end to end are the lake's row, bin for bin;
* ``tabular/exposures/<night>/spec-<night>-<expid>-<spectrograph>-<fiber>-<extraction>.fits`` and
  ``tabular/coadds/coadd-<targetid>-<night|all>-<extraction>.fits``: one spectrum per file, a
  table with units;
* ``export.json``: the predicate, the files, the table versions read and the runs' parameters.

See :mod:`fiberlake.storage.export_fits` for the layouts.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from astropy.table import Table

from fiberlake.jobs.query import AsOf, When, scan_tables, select_where
from fiberlake.processors import spectrum_format as sf
from fiberlake.schemas.instrument import get_instrument
from fiberlake.storage.export_fits import FLAM, Band, RunRecord, write_desi, write_tabular
from fiberlake.storage.layout import Lake
from fiberlake.storage.tables import TableStore

KINDS = ("exposures", "coadds", "both")
FORMATS = ("desi", "tabular", "both")
EXTRACTION_ORDER = ("optimal", "deconv", "box")
"""Preferred extraction when a target has several and none is asked for."""
JOINED_KEY = ["night", "expid", "spectrograph", "fiber", "extraction"]
COADD_KEY = ["night", "targetid", "extraction", "scope"]
MARKER = "export.json"


@dataclass
class ExportReport:
    """What :func:`export` wrote."""

    out: Path
    exposures: int = 0
    coadds: int = 0
    files: list[str] = field(default_factory=list)
    nothing: str = ""
    """Non-empty when the predicate selected nothing: the sentence saying so (nothing was written)."""

    def summary(self) -> str:
        """One line for people."""
        if self.nothing:
            return self.nothing
        return (f"wrote {len(self.files)} files to {self.out}: {self.exposures} exposure spectra, "
                f"{self.coadds} coadds")


# --- spectra as arrays --------------------------------------------------------------------------------
@dataclass
class SpectrumArrays:
    """One flux-calibrated spectrum of the lake (a ``joined`` or ``coadds`` row) as arrays.

    Attributes
    ----------
    wave : ndarray (nwave,)
        Bin centres, Angstrom (air).
    flux, ivar : ndarray (nwave,)
        erg s^-1 cm^-2 A^-1 and its inverse variance.
    mask : ndarray of uint32 (nwave,)
        Mask bits (``schemas.maskbits.Mask``).
    resolution : ndarray (ndiag, nwave) or None
        The lake's resolution band (deconv only).
    meta : dict
        The row's other columns (targetid, night, expid or expids, run_id, ...).
    """

    wave: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    resolution: np.ndarray | None
    meta: dict

    def to_specutils(self):
        """This spectrum as a ``specutils.Spectrum`` (flux with units, ``InverseVariance``, boolean mask;
        the bits in ``meta['int_mask']``, the resolution band in ``meta['resolution']``)."""
        import astropy.units as u
        from astropy.nddata import InverseVariance

        meta = {**self.meta, "int_mask": self.mask, "resolution": self.resolution}
        return _spectrum_class()(flux=self.flux * FLAM, spectral_axis=self.wave * u.AA,
                                 uncertainty=InverseVariance(self.ivar * FLAM ** -2), mask=self.mask != 0, meta=meta)


def _spectrum_class():
    try:
        from specutils import Spectrum
    except ImportError:  # specutils < 2
        from specutils import Spectrum1D as Spectrum
    return Spectrum


def _arrays(row: dict) -> SpectrumArrays:
    wave = sf.log_wavelengths(row["loglam_min"], row["dloglam"], row["nwave"])
    res = None
    if row.get("resolution") is not None:
        res = np.asarray(row["resolution"], np.float32).reshape(int(row["resolution_ndiag"]), -1)
    meta = {k: v for k, v in row.items() if k not in ("flam", "flam_ivar", "flam_mask", "resolution")}
    return SpectrumArrays(wave, np.asarray(row["flam"], np.float32), np.asarray(row["flam_ivar"], np.float32),
                          np.asarray(row["flam_mask"], np.uint32), res, meta)


def _pick_extraction(frame: pl.DataFrame, extraction: str | None) -> pl.DataFrame:
    if extraction is not None:
        return frame.filter(pl.col("extraction") == extraction)
    present = set(frame["extraction"].to_list())
    for method in EXTRACTION_ORDER:
        if method in present:
            return frame.filter(pl.col("extraction") == method)
    return frame


def spectrum(lake: Lake, targetid: int, *, night: str | None = None, kind: str = "coadd",
             extraction: str | None = None, as_specutils: bool = False):
    """A target's flux-calibrated spectrum from the lake, as arrays or a specutils ``Spectrum``.

    Parameters
    ----------
    lake : Lake
    targetid : int
    night : str, optional
        ``kind='coadd'``: that night's coadd (scope ``night``); default the coadd over every night
        (scope ``all``, or the only night's). ``kind='exposures'``: only that night's exposures.
    kind : {'coadd', 'exposures'}
        The coadd (one spectrum) or every exposure's joined spectrum (a list).
    extraction : str, optional
        ``box``, ``optimal`` or ``deconv``; default the first present of optimal, deconv, box.
    as_specutils : bool
        Return ``specutils.Spectrum`` objects instead of :class:`SpectrumArrays`.

    Returns
    -------
    SpectrumArrays or Spectrum, or a list of them for ``kind='exposures'``

    Raises
    ------
    LookupError
        If the lake has no such spectrum (a sentence saying what it has).
    """
    if kind not in ("coadd", "exposures"):
        raise ValueError(f"kind must be 'coadd' or 'exposures', not {kind!r}")
    tables = scan_tables(lake, arrays=False)
    name = "coadds" if kind == "coadd" else "joined"
    rows = (_coadd_rows(tables, int(targetid)) if kind == "coadd"
            else tables[name].filter(pl.col("targetid") == int(targetid)).collect())
    if kind == "coadd":
        rows = (rows.filter((pl.col("scope") == "night") & (pl.col("night") == night)) if night
                else rows.filter(pl.col("scope") == "all") if (rows["scope"] == "all").any() else rows)
    elif night:
        rows = rows.filter(pl.col("night") == night)
    rows = _pick_extraction(rows, extraction)
    if rows.is_empty():
        where = f" on night {night}" if night else ""
        raise LookupError(f"target {targetid} has no {'coadd' if kind == 'coadd' else 'joined spectra'}{where}"
                          f"{' of extraction ' + extraction if extraction else ''} in the lake (table {name})")
    out = [_arrays(r) for r in rows.sort(*(["night", "expid"] if kind == "exposures" else ["night"])).iter_rows(named=True)]
    if as_specutils:
        out = [s.to_specutils() for s in out]
    return out if kind == "exposures" else out[-1]


def _coadd_rows(tables: dict[str, pl.LazyFrame], targetid: int) -> pl.DataFrame:
    """Every coadds row of a target, reading the row groups of its HEALPix pixel only.

    ``coadds`` is sorted by ``(healpix, targetid)`` (``storage/tables.py``), so a filter on the
    target's pixel skips, by the row groups' min/max statistics, nearly every row group, where a
    filter on ``targetid`` alone reads them all. The pixel comes from the target's position in
    ``fibermap`` (sorted by target: a few row groups), the one the coadd was indexed with. A
    target without a fibermap position, or whose pixel holds no coadd of it, is looked up by
    ``targetid`` alone (the whole table).
    """
    from fiberlake.processors.coadd import healpix_nested  # astropy_healpix on first use only

    coadds = tables["coadds"]
    where = (pl.col("targetid") == targetid) & pl.col("ra").is_not_null() & pl.col("dec").is_not_null()
    position = tables["fibermap"].filter(where).select("ra", "dec").head(1).collect()
    nside = coadds.select("nside").head(1).collect()
    if position.height and nside.height:
        pixel = int(healpix_nested(position["ra"].to_numpy(), position["dec"].to_numpy(), int(nside["nside"][0]))[0])
        rows = coadds.filter((pl.col("healpix") == pixel) & (pl.col("targetid") == targetid)).collect()
        if rows.height:
            return rows
    return coadds.filter(pl.col("targetid") == targetid).collect()


# --- export --------------------------------------------------------------------------------------------
def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; give a new --out folder, or --overwrite to replace an earlier export")
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; not overwriting it")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(f"{out} is a folder that holds something other than a fiberlake export (no {MARKER}); "
                              f"not overwriting it")


def _runs(tables: dict[str, pl.LazyFrame], run_ids: Iterable[str]) -> list[RunRecord]:
    wanted = sorted({r for r in run_ids if r})
    found = {r["run_id"]: r for r in tables["runs"].filter(pl.col("run_id").is_in(wanted)).collect().iter_rows(named=True)}
    out = []
    for run_id in wanted:
        row = found.get(run_id, {})
        out.append(RunRecord(run_id, row.get("code_version") or "", row.get("config_hash") or "",
                             row.get("config_json") or "{}"))
    return out


def _arm_ranges(lake: Lake) -> list[tuple[str, float, float]]:
    inst = get_instrument(lake.instrument)
    out = []
    for arm in inst.arms:
        lo, step, n = inst.wave_grid(arm.name)
        out.append((arm.name, lo, lo + step * (n - 1)))
    return out


def _stack(frame: pl.DataFrame, column: str, dtype) -> np.ndarray:
    return np.stack([np.asarray(v, dtype) for v in frame[column].to_list()])


def _resolution(frame: pl.DataFrame, nwave: int) -> np.ndarray | None:
    if "resolution" not in frame.columns or frame["resolution"].null_count() == frame.height:
        return None
    ndiag = int(frame["resolution_ndiag"].drop_nulls()[0])
    out = np.zeros((frame.height, ndiag, nwave), np.float32)
    for i, band in enumerate(frame["resolution"].to_list()):
        if band is not None:
            out[i] = np.asarray(band, np.float32).reshape(ndiag, nwave)
    return out


def _bands(frame: pl.DataFrame, arms: list[tuple[str, float, float]]) -> tuple[list[Band], np.ndarray, list[sf.BandCut]]:
    first = frame.row(0, named=True)
    wave = sf.log_wavelengths(first["loglam_min"], first["dloglam"], first["nwave"])
    flux, ivar = _stack(frame, "flam", np.float32), _stack(frame, "flam_ivar", np.float32)
    mask, res = _stack(frame, "flam_mask", np.uint32), _resolution(frame, wave.size)
    cuts = sf.cut_bands(wave, arms)
    bands = [Band(c.name, wave[c.slice], flux[:, c.slice], ivar[:, c.slice], mask[:, c.slice],
                  None if res is None else sf.resolution_to_desi(sf.resolution_cut(res, c)))
             for c in cuts]
    return bands, wave, cuts


def _night_int(night: str) -> int:
    return int(night.replace("-", "")) if night and night[:4].isdigit() else 0


def _fibermap_table(frame: pl.DataFrame, columns: dict[str, str]) -> Table:
    """An astropy table of ``frame``'s columns renamed (lake name to FITS name); NIGHT as YYYYMMDD."""
    data = frame.select([pl.col(src).alias(dst) for src, dst in columns.items() if src in frame.columns])
    table = Table()
    for name, dtype in data.schema.items():
        if dtype == pl.String:
            table[name] = np.array([v or "" for v in data[name].to_list()], dtype=str)
        else:
            table[name] = data[name].to_numpy()
    if "NIGHT" in table.colnames:
        table["NIGHT"] = np.array([_night_int(n) for n in frame["night"].to_list()], np.int32)
    return table


_JOINED_FIBERMAP = {"targetid": "TARGETID", "night": "NIGHT", "expid": "EXPID", "spectrograph": "SPECTROGRAPH",
                    "fiber": "FIBER", "ra": "TARGET_RA", "dec": "TARGET_DEC", "mag": "MAG", "objtype": "OBJTYPE",
                    "obstype": "OBSTYPE", "extraction": "EXTRACTION", "cameras": "CAMERAS",
                    "fluxcal_status": "FLUXCAL_STATUS", "run_id": "RUN_ID"}
_COADD_FIBERMAP = {"targetid": "TARGETID", "night": "NIGHT", "ra": "TARGET_RA", "dec": "TARGET_DEC", "mag": "MAG",
                   "objtype": "OBJTYPE", "healpix": "HEALPIX", "nside": "NSIDE", "n_exp": "COADD_NUMEXP",
                   "scope": "SCOPE", "extraction": "EXTRACTION", "n_rejected": "N_REJECTED",
                   "fluxcal_status": "FLUXCAL_STATUS", "run_id": "RUN_ID"}


_CARDS = {"targetid": "TARGETID", "night": "NIGHT", "expid": "EXPID", "spectrograph": "SPECID", "fiber": "FIBER",
          "ra": "RA", "dec": "DEC", "mag": "MAG", "objtype": "OBJTYPE", "extraction": "EXTRACT", "scope": "SCOPE",
          "n_exp": "NEXP", "run_id": "RUNID"}
"""Primary-header cards of a tabular file: lake column to card."""


def _scores(frame: pl.DataFrame, bands: list[Band], prefix: str) -> Table:
    table = Table({"TARGETID": frame["targetid"].to_numpy()})
    for band in bands:
        table[f"{prefix}_{band.name.upper()}"] = sf.median_snr(band.flux, band.ivar).astype(np.float32)
    return table


def _cards(lake: Lake, kind: str, night: str, extraction: str, versions: dict[str, int]) -> dict[str, object]:
    cards: dict[str, object] = {"INSTRUME": lake.instrument, "ORIGIN": "fiberlake", "SPGRP": kind,
                                "NIGHT": night, "EXTRACT": extraction, "FLUXUNIT": FLAM.to_string("fits")}
    for name, version in versions.items():
        cards[f"V_{name.upper()[:6]}"] = (version, f"version of table {name} read")
    return cards


def _exp_fibermap(coadds: pl.DataFrame, tables: dict[str, pl.LazyFrame]) -> Table:
    exploded = (coadds.select("targetid", "expids", "nights").explode(["expids", "nights"])
                .rename({"expids": "expid", "nights": "night"}))
    fibermap = tables["fibermap"].select("night", "expid", "targetid", "spectrograph", "fiber").collect()
    rows = exploded.join(fibermap, on=["night", "expid", "targetid"], how="left").sort("targetid", "night", "expid")
    return _fibermap_table(rows, {"targetid": "TARGETID", "night": "NIGHT", "expid": "EXPID",
                                  "spectrograph": "SPECTROGRAPH", "fiber": "FIBER"})


def _write_group(lake: Lake, out: Path, frame: pl.DataFrame, *, coadd: bool, formats: str, tables, runs, versions,
                 arms) -> list[Path]:
    night, extraction = frame["night"][0], frame["extraction"][0]
    label = "all" if coadd and frame["scope"][0] == "all" else night
    bands, wave, cuts = _bands(frame, arms)
    group_runs = [r for r in runs if r.run_id in set(frame["run_id"].to_list())]
    fmap_cols = _COADD_FIBERMAP if coadd else _JOINED_FIBERMAP
    fibermap = _fibermap_table(frame, fmap_cols)
    exp_fibermap = _exp_fibermap(frame, tables) if coadd else None
    written = []
    if formats in ("desi", "both"):
        (out / "desi").mkdir(parents=True, exist_ok=True)
        prefix = "coadd" if coadd else "spectra"
        inputs = [f"fiberlake table joined, night {n}" for n in sorted({n for ns in frame["nights"].to_list() for n in ns})] \
            if coadd else []
        written.append(write_desi(out / "desi" / f"{prefix}-{label}-{extraction}.fits", bands, fibermap,
                                  _scores(frame, bands, "MEDIAN_COADD_SNR" if coadd else "MEDIAN_CALIB_SNR"),
                                  runs=group_runs, cards=_cards(lake, "coadd" if coadd else "spectra", label,
                                                                extraction, versions),
                                  exp_fibermap=exp_fibermap, inputs=inputs))
    if formats in ("tabular", "both"):
        folder = out / "tabular" / ("coadds" if coadd else f"exposures/{night}")
        folder.mkdir(parents=True, exist_ok=True)
        res = _resolution(frame, wave.size)
        for i, row in enumerate(frame.iter_rows(named=True)):
            name = (f"coadd-{row['targetid']}-{label}-{extraction}.fits" if coadd else
                    f"spec-{night}-{row['expid']}-{row['spectrograph']}-{row['fiber']}-{extraction}.fits")
            run = [r for r in runs if r.run_id == row["run_id"]]
            cards = {card: row[col] for col, card in _CARDS.items() if row.get(col) is not None}
            ivar = np.asarray(row["flam_ivar"], np.float32)
            written.append(write_tabular(
                folder / name, wave, np.asarray(row["flam"], np.float32), ivar, np.asarray(row["flam_mask"], np.uint32),
                uncertainty=sf.uncertainty(ivar), fibermap=fibermap[i:i + 1], runs=run, cards=cards,
                resolution=None if res is None else res[i].T,
                exp_fibermap=exp_fibermap[exp_fibermap["TARGETID"] == row["targetid"]] if coadd else None))
    return written


def export(lake: Lake, where: str, out: str | Path, *, kind: str = "both", formats: str = "both",
           overwrite: bool = False, as_of: AsOf | When | str | None = None) -> ExportReport:
    """Write the spectra that ``where`` selects in files the field's tools open.

    Parameters
    ----------
    lake : Lake
    where : str
        SQL condition over the rows of ``joined_full`` (exposures: joined spectra with ra, dec, mag)
        and of ``coadds`` (coadds), e.g. ``night = '2026-11-21' AND objtype = 'TGT' AND mag < 17``.
    out : path-like
        A folder that does not exist yet (or an earlier export's, with ``overwrite``).
    kind : {'exposures', 'coadds', 'both'}
    formats : {'desi', 'tabular', 'both'}
    overwrite : bool
        Replace an earlier export in ``out`` (a folder holding anything else is never replaced).
    as_of : optional
        Time travel (:func:`fiberlake.jobs.query.parse_as_of`).

    Returns
    -------
    ExportReport
        ``nothing`` says so when the predicate selects no spectrum; then nothing is written.

    Raises
    ------
    QueryRefused
        A predicate that is not one valid SQL condition over the rows.
    FileExistsError
        ``out`` exists and ``overwrite`` is not given (or it holds something else).
    """
    if kind not in KINDS or formats not in FORMATS:
        raise ValueError(f"kind must be one of {KINDS} and formats one of {FORMATS}")
    out = Path(out)
    _check_out(out, overwrite)
    want_exp, want_coadd = kind in ("exposures", "both"), kind in ("coadds", "both")
    keys_exp = select_where(lake, "joined_full", where, JOINED_KEY, as_of=as_of) if want_exp else None
    keys_coadd = select_where(lake, "coadds", where, COADD_KEY, as_of=as_of) if want_coadd else None
    report = ExportReport(out, exposures=0 if keys_exp is None else keys_exp.height,
                          coadds=0 if keys_coadd is None else keys_coadd.height)
    if report.exposures == 0 and report.coadds == 0:
        what = {"exposures": "no exposure spectra (table joined)", "coadds": "no coadds (table coadds)",
                "both": "no exposure spectra (table joined) and no coadds (table coadds)"}[kind]
        report.nothing = f"--where {where!r} selects {what}; nothing was written"
        return report
    tables = scan_tables(lake, as_of=as_of, arrays=False)
    store = TableStore(lake.root / "tables")
    versions = {n: store.version(n) for n in ("joined", "coadds", "fibermap") if store.exists(n)}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    arms = _arm_ranges(lake)
    groups: list[tuple[pl.DataFrame, bool]] = []
    if report.exposures:
        fm = tables["fibermap"].select("night", "expid", "spectrograph", "fiber", "ra", "dec", "mag")
        rows = (tables["joined"].join(keys_exp.lazy(), on=JOINED_KEY, how="semi")
                .join(fm, on=["night", "expid", "spectrograph", "fiber"], how="left").collect()
                .sort("night", "extraction", "expid", "spectrograph", "fiber"))
        groups += [(g, False) for g in rows.partition_by(["night", "extraction", "loglam_min", "dloglam", "nwave"],
                                                         maintain_order=True)]
    if report.coadds:
        rows = (tables["coadds"].join(keys_coadd.lazy(), on=COADD_KEY, how="semi").collect()
                .with_columns(pl.when(pl.col("scope") == "all").then(pl.lit("all")).otherwise(pl.col("night")).alias("_label"))
                .sort("_label", "extraction", "targetid"))
        groups += [(g.drop("_label"), True) for g in rows.partition_by(["_label", "extraction", "loglam_min", "dloglam",
                                                                         "nwave"], maintain_order=True)]
    runs = _runs(tables, (r for g, _ in groups for r in g["run_id"].to_list()))
    for frame, coadd in groups:
        for path in _write_group(lake, out, frame, coadd=coadd, formats=formats, tables=tables, runs=runs,
                                 versions=versions, arms=arms):
            report.files.append(str(path.relative_to(out)))
    manifest = {"where": where, "kind": kind, "formats": formats, "as_of": None if as_of is None else str(as_of),
                "lake": str(lake.root), "instrument": lake.instrument, "table_versions": versions,
                "exposures": report.exposures, "coadds": report.coadds, "files": report.files,
                "runs": [{"run_id": r.run_id, "code_version": r.code_version, "config_hash": r.config_hash,
                          "config": json.loads(r.config_json or "{}")} for r in runs]}
    (out / MARKER).write_text(json.dumps(manifest, indent=2) + "\n")
    return report
