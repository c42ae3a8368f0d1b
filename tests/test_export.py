"""Export: files the field's tools open, read back with the real readers and compared with the lake's rows.

* Fast: a small lake written row by row (joined spectra and coadds of the deconvolution, with
  resolution bands) exported and read by specutils' DESI loaders (``SpectrumList.read``, no format
  given) and its ``tabular-fits`` loader (``Spectrum.read``); the resolution order against
  ``scipy.sparse.dia_matrix`` (DESI's storage); bad input (nothing selected, invalid SQL, an
  existing folder, a predicate that tries to end the WHERE clause); the views.
* Slow: a simulated, reduced mini night (tests/qa_night.py) exported and read back.
* desispec's ``read_spectra`` is run on the files when ``FIBERLAKE_DESISPEC_PYTHON`` names a Python
  that has desispec (not a dependency: its install brings numba, llvmlite, healpy, desitarget and
  desimodel, about 400 MB); skipped otherwise.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import warnings
from pathlib import Path

import astropy.units as u
import numpy as np
import polars as pl
import pytest
import scipy.sparse
from astropy.io import fits

from fiberlake.jobs.cli import main
from fiberlake.jobs.export import export, spectrum
from fiberlake.jobs.products import joined_grid_of
from fiberlake.jobs.query import QueryRefused, VIEWS, check_query, select_where, sql
from fiberlake.processors import spectrum_format as sf
from fiberlake.processors.params import ReductionParams
from fiberlake.schemas.instrument import get_instrument
from fiberlake.schemas.maskbits import Mask
from fiberlake.storage.layout import Lake
from fiberlake.storage.products import products_table
from fiberlake.storage.tables import TableStore
from tests.qa_night import reduced_night

specutils = pytest.importorskip("specutils")
from specutils import SpectrumList  # noqa: E402

Spectrum = getattr(specutils, "Spectrum", None) or specutils.Spectrum1D

NIGHT = "2026-11-21"
EXPIDS = (1001, 1002)
TARGETS = {0: 11, 1: 12, 2: 13}
NDIAG = 5
RUN = "2026-11-21-run-a"
CONFIG = {"sky": {"clip_sigma": 3.0}, "extractions": ["deconv"]}
FLAM = u.erg / (u.s * u.cm ** 2 * u.AA)


# --- a small lake written row by row --------------------------------------------------------------------
def _spectrum(rng, nwave: int) -> dict:
    flux = rng.normal(1e-16, 1e-17, nwave).astype(np.float32)
    ivar = rng.uniform(1e32, 4e32, nwave).astype(np.float32)
    mask = np.zeros(nwave, np.uint32)
    gap = slice(nwave // 2 - 40, nwave // 2 + 40)
    ivar[gap], flux[gap], mask[gap] = 0, 0, Mask.NODATA
    mask[nwave // 3: nwave // 3 + 12] |= np.uint32(Mask.TELLURIC)
    res = rng.uniform(0.0, 1.0, (NDIAG, nwave)).astype(np.float32)
    res /= res.sum(axis=0, keepdims=True)
    return {"flam": flux, "flam_ivar": ivar, "flam_mask": mask, "resolution": res.ravel(), "resolution_ndiag": NDIAG}


@pytest.fixture(scope="module")
def small_lake(tmp_path_factory) -> Lake:
    """joined (2 exposures x 3 fibers, deconv, with resolution), coadds (night and all), fibermap, runs."""
    lake = Lake.at(tmp_path_factory.mktemp("export") / "lake")
    lake.ensure("mini")
    grid = joined_grid_of(get_instrument("mini"), ReductionParams())
    rng = np.random.default_rng(18)
    store = TableStore(lake.root / "tables")
    now = dt.datetime(2026, 11, 21, 20, tzinfo=dt.timezone.utc)
    grid_cols = {"loglam_min": grid.loglam_min, "dloglam": grid.dloglam, "nwave": grid.nwave}
    fibermap, joined, coadds = [], [], []
    for expid in EXPIDS:
        for fiber, tid in TARGETS.items():
            fibermap.append({"night": NIGHT, "expid": expid, "spectrograph": 1, "fiber": fiber, "targetid": tid,
                             "ra": 150.0 + fiber, "dec": 2.0 - fiber, "mag": 15.0 + fiber, "objtype": "TGT"})
            joined.append({"night": NIGHT, "expid": expid, "spectrograph": 1, "fiber": fiber, "extraction": "deconv",
                           "targetid": tid, "objtype": "TGT", "obstype": "SCIENCE", "run_id": RUN, "cameras": "b1,r1",
                           "fluxcal_status": "ok", **grid_cols, **_spectrum(rng, grid.nwave)})
    for fiber, tid in TARGETS.items():
        for scope in ("night", "all"):
            coadds.append({"night": NIGHT, "targetid": tid, "extraction": "deconv", "scope": scope, "run_id": RUN,
                           "objtype": "TGT", "ra": 150.0 + fiber, "dec": 2.0 - fiber, "mag": 15.0 + fiber,
                           "healpix": 7, "nside": 64, "n_exp": 2, "expids": list(EXPIDS), "nights": [NIGHT, NIGHT],
                           "n_rejected": 0, "fluxcal_status": "ok", "input_hash": "h", "made_at": now,
                           **grid_cols, **_spectrum(rng, grid.nwave)})
    store.append("fibermap", products_table(fibermap, "fibermap"))
    store.append("joined", products_table(joined, "joined"))
    store.append("coadds", products_table(coadds, "coadds"))
    store.append("runs", products_table([{"run_id": RUN, "night": NIGHT, "command": "process", "code_version": "0.1.0",
                                          "config_json": json.dumps(CONFIG), "config_hash": "c0ffee",
                                          "started_at": now, "finished_at": now, "n_frames": 2, "n_failed": 0}], "runs"))
    return lake


def _lake_rows(lake: Lake, table: str) -> pl.DataFrame:
    return pl.read_delta(str(lake.root / "tables" / table))


def _dense_lake(band: np.ndarray) -> np.ndarray:
    """R (observed = R @ true) from the lake's order: R[i, i + k - h] = O[k, i]."""
    ndiag, n = band.shape
    h = (ndiag - 1) // 2
    dense = np.zeros((n, n))
    for k in range(ndiag):
        for i in range(n):
            if 0 <= i + k - h < n:
                dense[i, i + k - h] = band[k, i]
    return dense


def _dense_desi(band: np.ndarray) -> np.ndarray:
    """R from DESI's stored diagonals, as desispec.resolution.Resolution builds it (scipy dia_matrix)."""
    h = (band.shape[0] - 1) // 2
    return scipy.sparse.dia_matrix((np.asarray(band, np.float64), np.arange(h, -h - 1, -1)),
                                   shape=(band.shape[1],) * 2).toarray()


# --- pure conventions ------------------------------------------------------------------------------------
def test_resolution_in_desi_order_is_the_same_matrix():
    rng = np.random.default_rng(3)
    band = rng.uniform(size=(7, 40))
    desi = sf.resolution_to_desi(band)
    assert np.allclose(_dense_desi(desi), _dense_lake(band))
    kept = sf.resolution_from_desi(desi)
    assert np.allclose(_dense_lake(kept), _dense_lake(band))
    cut = sf.BandCut("b", 10, 25)
    assert np.allclose(_dense_lake(sf.resolution_cut(band, cut)), _dense_lake(band)[10:25, 10:25])


def test_bands_split_at_the_middle_of_the_overlap_and_cover_the_grid():
    wave = np.linspace(4000, 8000, 401)
    cuts = sf.cut_bands(wave, [("r", 5800, 8000), ("b", 4000, 6200)])
    assert [c.name for c in cuts] == ["b", "r"]
    assert cuts[0].start == 0 and cuts[0].stop == cuts[1].start and cuts[1].stop == wave.size
    assert wave[cuts[0].stop - 1] < 6000 <= wave[cuts[1].start]
    assert np.array_equal(sf.uncertainty(np.array([4.0, 0.0], np.float32)), np.array([0.5, np.inf], np.float32))


# --- the small lake through the real readers --------------------------------------------------------------
def _read_desi(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no "unexpected HDU" or unit warnings: the loader knows every HDU
        return SpectrumList.read(str(path))


def _check_desi_file(path: Path, rows: pl.DataFrame, key: list[str]) -> None:
    """Every band of every spectrum in ``path`` equals the lake's row, bin for bin; resolution too."""
    spectra = _read_desi(path)
    fibermap = spectra[0].meta["fibermap"]
    assert len(fibermap) == rows.height
    assert [s.meta["band"] for s in spectra] == ["b", "r"]
    header = spectra[0].meta["header"]
    assert header["RUNID00"] == RUN and json.loads(header["CONFIG00"]) == CONFIG
    for i in range(len(fibermap)):
        lake_key = {"targetid": int(fibermap["TARGETID"][i])}
        if "EXPID" in fibermap.colnames:
            lake_key["expid"] = int(fibermap["EXPID"][i])
        row = rows.filter(*[pl.col(k) == v for k, v in lake_key.items()]).row(0, named=True)
        wave = sf.log_wavelengths(row["loglam_min"], row["dloglam"], row["nwave"])
        flux = np.concatenate([s.flux[i].to_value(FLAM) for s in spectra])
        ivar = np.concatenate([s.uncertainty.array[i] for s in spectra])
        bits = np.concatenate([s.meta["int_mask"][i] if "int_mask" in s.meta else spectra[0].meta["int_mask"][i]
                               for s in spectra])
        assert np.array_equal(np.concatenate([s.spectral_axis.to_value(u.AA) for s in spectra]), wave)
        assert np.array_equal(flux, np.asarray(row["flam"], np.float32))
        assert np.array_equal(ivar, np.asarray(row["flam_ivar"], np.float32))
        assert np.array_equal(bits, np.asarray(row["flam_mask"], np.uint32))
        assert spectra[0].uncertainty.unit == FLAM ** -2
        dense = _dense_lake(np.asarray(row["resolution"], np.float32).reshape(NDIAG, -1))
        start = 0
        for s in spectra:
            n = s.flux.shape[-1]
            block = _dense_desi(s.meta["resolution_data"][i])
            assert np.allclose(block, dense[start:start + n, start:start + n])
            start += n


def test_small_lake_exports_desi_files_that_specutils_reads_equal_to_the_rows(small_lake, tmp_path):
    report = export(small_lake, f"night = '{NIGHT}'", tmp_path / "out")
    assert report.exposures == 6 and report.coadds == 6
    joined, coadds = _lake_rows(small_lake, "joined"), _lake_rows(small_lake, "coadds")
    desi = tmp_path / "out" / "desi"
    assert sorted(p.name for p in desi.iterdir()) == ["coadd-2026-11-21-deconv.fits", "coadd-all-deconv.fits",
                                                      "spectra-2026-11-21-deconv.fits"]
    _check_desi_file(desi / "spectra-2026-11-21-deconv.fits", joined, ["expid", "targetid"])
    _check_desi_file(desi / "coadd-2026-11-21-deconv.fits", coadds.filter(pl.col("scope") == "night"), ["targetid"])
    _check_desi_file(desi / "coadd-all-deconv.fits", coadds.filter(pl.col("scope") == "all"), ["targetid"])
    coadd = _read_desi(desi / "coadd-all-deconv.fits")
    assert "INFIL000" in coadd[0].meta["header"] and len(coadd[0].meta["exp_fibermap"]) == 6
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    assert manifest["runs"][0]["config"] == CONFIG and len(manifest["files"]) == 3 + 12


def test_small_lake_tabular_files_open_with_spectrum_read(small_lake, tmp_path):
    export(small_lake, "targetid = 12", tmp_path / "out", formats="tabular")
    joined = _lake_rows(small_lake, "joined").filter(pl.col("targetid") == 12).sort("expid")
    files = sorted((tmp_path / "out" / "tabular" / "exposures" / NIGHT).glob("*.fits"))
    assert [f.name for f in files] == [f"spec-{NIGHT}-{e}-1-1-deconv.fits" for e in EXPIDS]
    for path, row in zip(files, joined.iter_rows(named=True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            spec = Spectrum.read(str(path))                      # no format, no column_mapping
        ivar = np.asarray(row["flam_ivar"], np.float32)
        assert spec.flux.unit == FLAM and spec.spectral_axis.unit == u.AA
        assert np.array_equal(spec.flux.to_value(FLAM), np.asarray(row["flam"], np.float32))
        assert np.array_equal(spec.uncertainty.array, sf.uncertainty(ivar))
        assert np.array_equal(np.asarray(spec.mask) != 0, np.asarray(row["flam_mask"]) != 0)
        assert np.array_equal(spec.spectral_axis.to_value(u.AA),
                              sf.log_wavelengths(row["loglam_min"], row["dloglam"], row["nwave"]))
        with fits.open(path) as hdus:
            table = hdus["SPECTRUM"].data
            assert np.array_equal(table["ivar"], ivar) and np.array_equal(table["mask"], row["flam_mask"])
            assert np.array_equal(table["resolution"].T, np.asarray(row["resolution"]).reshape(NDIAG, -1))
            assert hdus["FIBERMAP"].data["TARGETID"][0] == 12 and hdus["FIBERMAP"].data["MAG"][0] == 16.0
            assert json.loads(hdus["PROVENANCE"].data["CONFIG_JSON"][0]) == CONFIG
    coadd = Spectrum.read(str(tmp_path / "out" / "tabular" / "coadds" / "coadd-12-all-deconv.fits"))
    row = _lake_rows(small_lake, "coadds").filter((pl.col("targetid") == 12) & (pl.col("scope") == "all")).row(0, named=True)
    assert np.array_equal(coadd.flux.to_value(FLAM), np.asarray(row["flam"], np.float32))


def test_spectrum_returns_arrays_and_specutils_objects(small_lake):
    arrays = spectrum(small_lake, 13)
    row = _lake_rows(small_lake, "coadds").filter((pl.col("targetid") == 13) & (pl.col("scope") == "all")).row(0, named=True)
    assert np.array_equal(arrays.flux, row["flam"]) and arrays.resolution.shape == (NDIAG, row["nwave"])
    assert arrays.meta["scope"] == "all" and arrays.meta["n_exp"] == 2
    spec = spectrum(small_lake, 13, kind="exposures", as_specutils=True)
    assert len(spec) == 2 and spec[0].flux.unit == FLAM and spec[0].meta["expid"] == EXPIDS[0]
    assert np.array_equal(spec[1].meta["int_mask"] != 0, spec[1].mask)
    with pytest.raises(LookupError, match="target 99 has no coadd"):
        spectrum(small_lake, 99)


@pytest.mark.skipif(not os.environ.get("FIBERLAKE_DESISPEC_PYTHON"),
                    reason="set FIBERLAKE_DESISPEC_PYTHON to a Python with desispec to read the files with desispec.io")
def test_desispec_reads_the_files(small_lake, tmp_path):
    export(small_lake, f"night = '{NIGHT}'", tmp_path / "out", formats="desi")
    script = (
        "import sys, json, numpy as np\n"
        "from desispec.io import read_spectra\n"
        "out = {}\n"
        "for path in sys.argv[1:]:\n"
        "    s = read_spectra(path)\n"
        "    out[path] = {'bands': s.bands, 'targetid': [int(t) for t in s.fibermap['TARGETID']],\n"
        "                 'flux': {b: s.flux[b].astype('f4').tolist() for b in s.bands},\n"
        "                 'res': {b: s.resolution_data[b].astype('f4').tolist() for b in s.bands},\n"
        "                 'runid': s.meta['RUNID00'], 'config': s.meta['CONFIG00']}\n"
        "print(json.dumps(out))\n")
    paths = sorted(str(p) for p in (tmp_path / "out" / "desi").glob("*.fits"))
    done = subprocess.run([os.environ["FIBERLAKE_DESISPEC_PYTHON"], "-c", script, *paths], capture_output=True,
                          text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for path in paths:
        mine = _read_desi(Path(path))
        got = result[path]
        assert got["bands"] == ["b", "r"] and got["runid"] == RUN and json.loads(got["config"]) == CONFIG
        for s in mine:
            assert np.array_equal(np.asarray(got["flux"][s.meta["band"]], np.float32), s.flux.value)
            assert np.array_equal(np.asarray(got["res"][s.meta["band"]], np.float32), s.meta["resolution_data"])


# --- bad input ---------------------------------------------------------------------------------------------
def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_predicate_selecting_nothing_says_so_and_writes_nothing(small_lake, tmp_path, capsys):
    code, out, err = _run(capsys, "export", "--lake", small_lake.root, "--where", "mag > 30", "--out", tmp_path / "x")
    assert code == 0 and "selects no exposure spectra (table joined) and no coadds" in out and err == ""
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("where, says", [
    ("mag >", "is not a valid condition on joined_full"),
    ("no_such_column = 1", "unable to find column"),
    ("1=1) UNION SELECT 1 AS night --", "closes a parenthesis it did not open"),
    ("true ORDER BY 1", "not ORDER"),
    ("targetid IN (SELECT 1 FROM read_csv('/etc/passwd'))", "reads files outside the lake"),
    ("", "predicate is empty"),
])
def test_invalid_predicates_are_one_sentence(small_lake, tmp_path, capsys, where, says):
    code, _, err = _run(capsys, "export", "--lake", small_lake.root, "--where", where, "--out", tmp_path / "x")
    assert code == 1 and says in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fiberlake: error: ")
    assert not (tmp_path / "x").exists()


def test_an_existing_folder_is_not_overwritten_silently(small_lake, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, "export", "--lake", small_lake.root, "--where", "targetid = 11", "--out", out)
    assert code == 1 and "exists; give a new --out folder, or --overwrite" in err
    code, _, err = _run(capsys, "export", "--lake", small_lake.root, "--where", "targetid = 11", "--out", out,
                        "--overwrite")
    assert code == 1 and "holds something other than a fiberlake export" in err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    code, text, _ = _run(capsys, "export", "--lake", small_lake.root, "--where", "targetid = 11", "--out", out,
                         "--overwrite", "--kind", "coadds", "--format", "desi")
    assert code == 0 and "2 coadds" in text
    code, text, _ = _run(capsys, "export", "--lake", small_lake.root, "--where", "targetid = 12", "--out", out,
                         "--overwrite", "--kind", "exposures", "--format", "desi")
    assert code == 0 and sorted(p.name for p in (out / "desi").iterdir()) == ["spectra-2026-11-21-deconv.fits"]


# --- views ---------------------------------------------------------------------------------------------------
def test_views_are_tables_to_the_query_prompt(small_lake, tmp_path, capsys):
    check_query("SELECT * FROM spectra_full s JOIN metrics_full m ON s.fiber = m.fiber", [*VIEWS, "spectra"])
    got = sql(small_lake, "SELECT targetid, mag, ra FROM joined_full WHERE expid = 1002 ORDER BY fiber")
    assert got["targetid"].to_list() == [11, 12, 13] and got["mag"].to_list() == [15.0, 16.0, 17.0]
    for name in VIEWS:
        assert sql(small_lake, f"SELECT count(*) AS n FROM {name}")["n"][0] >= 0
    code, out, _ = _run(capsys, "query", "--lake", small_lake.root, "--format", "csv",
                        "SELECT count(*) AS n FROM frames_full")
    assert code == 0 and out.splitlines() == ["n", "0"]
    code, _, err = _run(capsys, "query", "--lake", small_lake.root, "--table", f"spectra_full={tmp_path}/x.csv",
                        "SELECT 1")
    assert code == 1 and "already a table" in err
    code, out, _ = _run(capsys, "tables", "--lake", small_lake.root)
    assert all(name in out for name in VIEWS)
    with pytest.raises(QueryRefused, match="not a valid condition"):
        select_where(small_lake, "coadds", "expid = 1", ["targetid"])


# --- a reduced night ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def night(tmp_path_factory):
    return reduced_night(tmp_path_factory)


@pytest.mark.slow
def test_a_reduced_night_round_trips_through_specutils(night, tmp_path):
    lake = night.lake
    report = export(lake, f"night = '{night.night}' AND objtype = 'TGT' AND mag < 14.5", tmp_path / "out")
    assert report.exposures > 5 and report.coadds > 5
    joined = _lake_rows(lake, "joined")
    coadds = _lake_rows(lake, "coadds")
    files = {
        tmp_path / "out" / "desi" / f"spectra-{night.night}-box.fits": joined,
        tmp_path / "out" / "desi" / f"coadd-{night.night}-box.fits": coadds.filter(pl.col("scope") == "night"),
        tmp_path / "out" / "desi" / "coadd-all-box.fits": coadds.filter(pl.col("scope") == "all"),
    }
    for path, rows in files.items():
        spectra = _read_desi(path)
        fibermap = spectra[0].meta["fibermap"]
        assert np.all(fibermap["MAG"] < 14.5) and set(fibermap["OBJTYPE"]) == {"TGT"}
        assert spectra[0].meta["header"]["RUNID00"] == joined["run_id"][0]
        for i in range(len(fibermap)):
            match = pl.col("targetid") == int(fibermap["TARGETID"][i])
            if "EXPID" in fibermap.colnames:
                match &= pl.col("expid") == int(fibermap["EXPID"][i])
            row = rows.filter(match).row(0, named=True)
            assert np.array_equal(np.concatenate([s.flux[i].to_value(FLAM) for s in spectra]), np.asarray(row["flam"], np.float32))
            assert np.array_equal(np.concatenate([s.uncertainty.array[i] for s in spectra]),
                                  np.asarray(row["flam_ivar"], np.float32))
            assert "resolution_data" not in spectra[0].meta      # box: no resolution
    tabular = sorted((tmp_path / "out" / "tabular" / "exposures" / night.night).glob("*.fits"))
    assert len(tabular) == report.exposures
    spec = Spectrum.read(str(tabular[0]))
    expid, fiber = (int(v) for v in tabular[0].name.split("-")[4:7:2])
    row = joined.filter((pl.col("expid") == expid) & (pl.col("fiber") == fiber)).row(0, named=True)
    assert np.array_equal(spec.flux.to_value(FLAM), np.asarray(row["flam"], np.float32))


@pytest.mark.slow
def test_plot_of_a_target(night, tmp_path, capsys):
    target = _lake_rows(night.lake, "coadds").filter(pl.col("objtype") == "TGT").sort("mag")["targetid"][0]
    code, out, _ = _run(capsys, "plot", "--lake", night.lake.root, "--targetid", target, "--out", tmp_path / "t.png")
    assert code == 0 and (tmp_path / "t.png").stat().st_size > 20_000
    code, _, err = _run(capsys, "plot", "--lake", night.lake.root, "--targetid", 1, "--out", tmp_path / "u.png")
    assert code == 1 and "target 1 has no coadd" in err
