"""Reading and writing the products above the frame (tables ``fluxcal``, ``joined``, ``coadds``).

Rows of one exposure's cameras become per-camera arrays (every fiber of the spectrograph, in
fiber order; a fiber without a row is all ivar 0), and product rows become Arrow tables with the
declared schemas (list columns of any length, nullable ones included).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from fiberlake.schemas.containers import Spectra1D
from fiberlake.schemas.maskbits import MASK_DTYPE, Mask
from fiberlake.schemas.tables import SCHEMAS
from fiberlake.storage.tables import TableStore


@dataclass
class CameraRows:
    """One camera's spectra of an exposure, as arrays.

    Attributes
    ----------
    wave : ndarray, shape (nwave,)
        The camera's linear grid.
    spectra : Spectra1D
        Shape ``(n_fibers, nwave)``; fibers without a row have ivar 0 and ``DEADFIBER``.
    resolution : ndarray or None
        ``deconv``: ``(n_fibers, ndiag, ny)`` bands on the CCD rows (zeros for fibers without).
    resolution_wave : ndarray or None
        ``deconv``: ``(n_fibers, deg + 1)`` Legendre coefficients of the rows' wavelengths.
    """

    wave: np.ndarray
    spectra: Spectra1D
    resolution: np.ndarray | None = None
    resolution_wave: np.ndarray | None = None


def camera_arrays(rows: pl.DataFrame, n_fibers: int) -> CameraRows:
    """Arrays of one camera's ``spectra`` rows (one exposure, one extraction)."""
    rows = rows.sort("fiber")
    nwave = int(rows["nwave"][0])
    wave = float(rows["wave_min"][0]) + float(rows["dwave"][0]) * np.arange(nwave)
    flux = np.zeros((n_fibers, nwave), np.float32)
    ivar = np.zeros_like(flux)
    mask = np.full((n_fibers, nwave), MASK_DTYPE(Mask.DEADFIBER), MASK_DTYPE)
    fibers = rows["fiber"].to_numpy().astype(int)
    flux[fibers] = np.stack(rows["flux"].to_numpy())
    ivar[fibers] = np.stack(rows["ivar"].to_numpy())
    mask[fibers] = np.stack(rows["mask"].to_numpy())
    res = res_wave = None
    if "resolution" in rows.columns and rows["resolution"].null_count() < rows.height:
        ndiag = int(rows["resolution_ndiag"].drop_nulls()[0])
        bands = [np.asarray(v, np.float32) if v is not None else None for v in rows["resolution"].to_list()]
        ny = next(b.size for b in bands if b is not None) // ndiag
        res = np.zeros((n_fibers, ndiag, ny), np.float32)
        coeffs = [np.asarray(v, float) for v in rows["resolution_wave"].to_list() if v is not None]
        res_wave = np.zeros((n_fibers, coeffs[0].size))
        for f, band, cw in zip(fibers, bands, rows["resolution_wave"].to_list()):
            if band is not None:
                res[f] = band.reshape(ndiag, ny)
                res_wave[f] = np.asarray(cw, float)
    return CameraRows(wave, Spectra1D(flux, ivar, mask), res, res_wave)


def products_table(rows: list[dict], name: str) -> pa.Table:
    """Arrow table of product rows with the declared schema of table ``name`` (list columns of any
    length; ``None`` for a null list)."""
    schema = SCHEMAS[name]
    columns = {}
    for field_ in schema:
        values = [r.get(field_.name) for r in rows]
        if pa.types.is_list(field_.type):
            vtype = field_.type.value_type
            lengths = np.array([0 if v is None else len(v) for v in values], np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            parts = [np.asarray(v) for v in values if v is not None and len(v)]
            flat = (pa.array(np.concatenate(parts), type=vtype) if parts else pa.array([], type=vtype))
            valid = pa.array([v is not None for v in values], type=pa.bool_())
            arr = pa.ListArray.from_arrays(pa.array(offsets), flat, mask=pc.invert(valid))
            columns[field_.name] = arr.cast(field_.type)
        else:
            columns[field_.name] = pa.array(values, type=field_.type)
    return pa.table(columns, schema=schema)


def read_rows(tables: TableStore, name: str, **equal: object) -> pl.DataFrame:
    """Rows of table ``name`` whose columns equal the given values (``night="2026-11-21"``)."""
    scan = tables.scan(name)
    for column, value in equal.items():
        scan = scan.filter(pl.col(column) == value)
    return scan.collect()


def read_rows_in(tables: TableStore, name: str, column: str, values: list, **equal: object) -> pl.DataFrame:
    """Rows of table ``name`` whose ``column`` is one of ``values`` (and other columns equal)."""
    scan = tables.scan(name).filter(pl.col(column).is_in(values))
    for col, value in equal.items():
        scan = scan.filter(pl.col(col) == value)
    return scan.collect()
