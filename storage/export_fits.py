"""FITS files that the field's tools open with no extra arguments.

Two layouts, both written with :mod:`astropy.io.fits`:

* **DESI spectra / coadd files** (:func:`write_desi`), the layout of desispec's ``write_spectra``:
  an empty primary HDU with the provenance, ``FIBERMAP`` (one row per spectrum), for coadds
  ``EXP_FIBERMAP`` (one row per exposure combined), then per band ``<B>_WAVELENGTH`` (Angstrom),
  ``<B>_FLUX``, ``<B>_IVAR``, ``<B>_MASK`` and, where the spectra have one, ``<B>_RESOLUTION``
  (``[nspec, ndiag, nwave]`` in DESI's diagonal order), and ``SCORES``. ``desispec.io.read_spectra``
  reads them, and so do specutils' ``DESI spectra`` / ``DESI coadd`` loaders
  (``SpectrumList.read(path)``): they recognise the file by its ``FIBERMAP`` and ``SCORES`` HDUs,
  a coadd by the ``INFIL000`` card of its primary header.
* **Tabular spectra** (:func:`write_tabular`), one spectrum per file: HDU 1 is a table with columns
  ``wavelength`` (Angstrom), ``flux``, ``uncertainty`` (same unit, a standard deviation), ``ivar``,
  ``mask`` (bits) and, where it exists, ``resolution``; specutils' ``tabular-fits`` loader finds
  each column from its unit (``Spectrum.read(path)``). ``FIBERMAP`` (and ``EXP_FIBERMAP``) and
  ``PROVENANCE`` follow.

Every file records its provenance: the runs that made the rows (``RUNIDnn``, ``CFGHSnn``,
``CODEVnn`` and the run's whole parameter set as JSON in ``CONFIGnn``, long-string cards) in the
primary header, the table versions read, and the mask bit names (``MASKBnn``) on the mask HDU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.table import Table

from fiberlake.schemas.maskbits import Mask

FLAM = u.erg / (u.s * u.cm ** 2 * u.AA)
"""Unit of the flux-calibrated spectra (``joined``, ``coadds``)."""


@dataclass(frozen=True)
class Band:
    """One band of a DESI file: every spectrum's values on one wavelength grid.

    Attributes
    ----------
    name : str
        Band letter (``b``, ``r``); HDUs are named ``<NAME>_FLUX`` and so on.
    wave : ndarray, shape (nwave,)
        Bin centres (Angstrom, air).
    flux, ivar : ndarray, shape (nspec, nwave)
    mask : ndarray of uint32, shape (nspec, nwave)
    resolution : ndarray, shape (nspec, ndiag, nwave), optional
        DESI's diagonal order (see :mod:`fiberlake.processors.spectrum_format`).
    """

    name: str
    wave: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    resolution: np.ndarray | None = None


@dataclass(frozen=True)
class RunRecord:
    """The provenance of one run: its id, code version and parameters (a ``runs`` row)."""

    run_id: str
    code_version: str
    config_hash: str
    config_json: str


def _provenance_cards(header: fits.Header, runs: Sequence[RunRecord]) -> None:
    header["NRUNS"] = (len(runs), "runs that made the rows (table runs)")
    for i, run in enumerate(runs):
        header[f"RUNID{i:02d}"] = run.run_id             # fiberlake run id (table runs)
        header[f"CODEV{i:02d}"] = run.code_version or ""  # code version of the run
        header[f"CFGHS{i:02d}"] = run.config_hash or ""   # hash of the run's science parameters
        header[f"CONFIG{i:02d}"] = run.config_json or "{}"  # every parameter of the run, JSON


def _mask_header(header: fits.Header) -> None:
    for m in Mask:
        header[f"MASKB{int(m).bit_length() - 1:02d}"] = (m.name, "fiberlake mask bit (schemas.maskbits)")


def _primary(cards: Mapping[str, object], runs: Sequence[RunRecord]) -> fits.PrimaryHDU:
    hdu = fits.PrimaryHDU()
    for key, value in cards.items():
        hdu.header[key] = value
    _provenance_cards(hdu.header, runs)
    return hdu


def _table_hdu(table: Table, name: str) -> fits.BinTableHDU:
    hdu = fits.table_to_hdu(table)
    hdu.name = name
    return hdu


def _image(data: np.ndarray, name: str, unit: str | None = None) -> fits.ImageHDU:
    hdu = fits.ImageHDU(data=data, name=name)
    if unit is not None:
        hdu.header["BUNIT"] = unit
    return hdu


def write_desi(path: str | os.PathLike, bands: Sequence[Band], fibermap: Table, scores: Table, *,
               runs: Sequence[RunRecord], cards: Mapping[str, object], exp_fibermap: Table | None = None,
               inputs: Sequence[str] = (), flux_unit: u.UnitBase = FLAM) -> Path:
    """Write a DESI-layout spectra file (``inputs`` empty) or coadd file (``inputs`` given).

    Parameters
    ----------
    path : path-like
        The file; its folder must exist. Written to a temporary name, then renamed.
    bands : sequence of Band
        In wavelength order; every band holds the same spectra (rows of ``fibermap``).
    fibermap : astropy.table.Table
        One row per spectrum (``TARGETID`` first).
    scores : astropy.table.Table
        One row per spectrum (``TARGETID`` and S/N summaries).
    runs : sequence of RunRecord
        Provenance: the runs that made the rows.
    cards : mapping
        More primary-header cards (``INSTRUME``, ``SPGRP``, ...).
    exp_fibermap : astropy.table.Table, optional
        Coadds: one row per exposure combined.
    inputs : sequence of str
        Coadds: what was combined (``INFILnnn`` cards; at least one makes the file a coadd to
        specutils).
    flux_unit : astropy.units.Unit

    Returns
    -------
    Path
    """
    path = Path(path)
    primary = _primary(cards, runs)
    for i, text in enumerate(inputs):
        primary.header[f"INFIL{i:03d}"] = text
    hdus: list[fits.hdu.base.ExtensionHDU] = [_table_hdu(fibermap, "FIBERMAP")]
    if exp_fibermap is not None:
        hdus.append(_table_hdu(exp_fibermap, "EXP_FIBERMAP"))
    ivar_unit = (flux_unit ** -2).to_string("fits")
    for band in bands:
        key = band.name.upper()
        wave = _image(np.asarray(band.wave, np.float64), f"{key}_WAVELENGTH", "Angstrom")
        wave.header["AIRORVAC"] = ("air", "wavelengths in air")
        hdus += [wave,
                 _image(np.asarray(band.flux, np.float32), f"{key}_FLUX", flux_unit.to_string("fits")),
                 _image(np.asarray(band.ivar, np.float32), f"{key}_IVAR", ivar_unit)]
        mask = _image(np.asarray(band.mask, np.uint32), f"{key}_MASK")
        _mask_header(mask.header)
        hdus.append(mask)
        if band.resolution is not None:
            hdus.append(_image(np.asarray(band.resolution, np.float32), f"{key}_RESOLUTION"))
    hdus.append(_table_hdu(scores, "SCORES"))
    _write(fits.HDUList([primary, *hdus]), path)
    return path


def write_tabular(path: str | os.PathLike, wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray, *,
                  uncertainty: np.ndarray, fibermap: Table, runs: Sequence[RunRecord], cards: Mapping[str, object],
                  resolution: np.ndarray | None = None, exp_fibermap: Table | None = None,
                  flux_unit: u.UnitBase = FLAM) -> Path:
    """Write one spectrum as a table with units (specutils' ``tabular-fits``).

    Parameters
    ----------
    path : path-like
    wave, flux, ivar, mask, uncertainty : ndarray, shape (nwave,)
        ``uncertainty`` is ``1 / sqrt(ivar)`` (``inf`` where masked).
    fibermap : astropy.table.Table
        The spectrum's fiber-map row (coadds: the target's row).
    runs : sequence of RunRecord
    cards : mapping
        Primary-header cards (``TARGETID``, ``NIGHT``, ...).
    resolution : ndarray, shape (nwave, ndiag), optional
        Row ``i``: weights of true bins ``i - h .. i + h`` in observed bin ``i`` (the lake's order).
    exp_fibermap : astropy.table.Table, optional
    flux_unit : astropy.units.Unit

    Returns
    -------
    Path
    """
    table = Table()
    table["wavelength"] = np.asarray(wave, np.float64) * u.AA
    table["flux"] = np.asarray(flux, np.float32) * flux_unit
    table["uncertainty"] = np.asarray(uncertainty, np.float32) * flux_unit
    table["ivar"] = np.asarray(ivar, np.float32) * flux_unit ** -2
    table["mask"] = np.asarray(mask, np.uint32)
    if resolution is not None:
        table["resolution"] = np.asarray(resolution, np.float32)
    spectrum = _table_hdu(table, "SPECTRUM")
    spectrum.header["AIRORVAC"] = ("air", "wavelengths in air")
    _mask_header(spectrum.header)
    hdus = [_primary(cards, runs), spectrum, _table_hdu(fibermap, "FIBERMAP")]
    if exp_fibermap is not None:
        hdus.append(_table_hdu(exp_fibermap, "EXP_FIBERMAP"))
    hdus.append(_table_hdu(Table(rows=[(r.run_id, r.code_version, r.config_hash, r.config_json) for r in runs],
                                 names=("RUN_ID", "CODE_VERSION", "CONFIG_HASH", "CONFIG_JSON"),
                                 dtype=(str, str, str, str)), "PROVENANCE"))
    path = Path(path)
    _write(fits.HDUList(hdus), path)
    return path


def _write(hdulist: fits.HDUList, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    hdulist.writeto(tmp, overwrite=True, checksum=True)
    os.replace(tmp, path)
