"""Table rows of a reduced frame: per-fiber records from arrays (no I/O).

One row of ``spectra`` and one of ``metrics`` per fiber and extraction, each carrying the full
per-fiber key (night, expid, spectrograph, camera, fiber, targetid, extraction) so that any
per-fiber table joins ``fibermap`` on ``(night, expid, spectrograph, fiber)`` without parsing
camera names.
"""

from __future__ import annotations

import numpy as np

from fiberlake.processors.pipeline import Calibration, ReducedFrame


def fiber_status(mask: np.ndarray) -> np.ndarray:
    """Mask bits set on every wavelength bin of each fiber (AND over the bins), ``(n_fibers,)``."""
    if mask.shape[1] == 0:
        return np.zeros(mask.shape[0], np.int64)
    return np.bitwise_and.reduce(mask, axis=1).astype(np.int64)


def python_value(value):
    """A numpy scalar as a Python value; non-finite floats as None (null in the table)."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def spectra_rows(exp: dict, fibermap: dict[int, dict], method: str, reduced: ReducedFrame,
                 calib: Calibration) -> tuple[list[dict], list[dict]]:
    """Rows of ``spectra`` and ``metrics`` for one frame and extraction (``run_id`` left to the writer).

    Parameters
    ----------
    exp : dict
        The frame's ``exposures`` row.
    fibermap : dict of int to dict
        The exposure's fiber-map rows of this spectrograph, by fiber.
    method : str
        Extraction method.
    reduced : ReducedFrame
    calib : Calibration
        The calibration set used (wavelength grid and solutions).

    Returns
    -------
    list of dict, list of dict
        ``spectra`` rows and ``metrics`` rows, one per fiber.
    """
    spectra, sky = reduced.spectra, reduced.sky
    resolution = reduced.resolution
    grid = calib.grid
    dwave = float(grid[1] - grid[0])
    status = fiber_status(spectra.mask)
    rows, metric_rows = [], []
    for fiber in range(spectra.flux.shape[0]):
        fm = fibermap.get(fiber, {})
        key = {
            "night": exp["night"], "expid": exp["expid"], "spectrograph": exp["spectrograph"],
            "camera": exp["camera"], "fiber": fiber, "targetid": fm.get("targetid", -1),
            "extraction": method, "run_id": "", "objtype": fm.get("objtype", "TGT"),
        }
        rows.append(key | {
            "arm": exp["arm"], "obstype": exp["obstype"], "wave_min": float(grid[0]), "dwave": dwave,
            "nwave": len(grid), "fiber_status": int(status[fiber]),
            "flux": spectra.flux[fiber].astype(np.float32), "ivar": spectra.ivar[fiber].astype(np.float32),
            "mask": spectra.mask[fiber].astype(np.uint32), "sky": sky.flux[0].astype(np.float32),
            "resolution": None if resolution is None else resolution[fiber].ravel().astype(np.float32),
            "resolution_ndiag": None if resolution is None else int(resolution.shape[1]),
            "resolution_wave": None if resolution is None else calib.wave.coeffs[fiber].astype(np.float64),
        })
        metric_rows.append(key | {name: python_value(values[fiber]) for name, values in reduced.metrics.items()})
    return rows, metric_rows
