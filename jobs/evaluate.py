"""Evaluate a processed night against the simulator's truth files.

Reads the calibration sets and the ``spectra`` table of a night and the truth written by
``fiberlake simulate`` beside the raw frames, and reports, per camera and extraction: trace
centroid error, wavelength error, flux ratio and scatter against the truth, pulls, empirical SNR
of optimal vs box on faint targets, and sky residuals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from astropy.io import fits

from fiberlake.jobs.calibrations import load_calibration
from fiberlake.jobs.process import latest_exposures
from fiberlake.processors import accuracy, rectify
from fiberlake.schemas.containers import Spectra1D
from fiberlake.schemas.truth import camera_truth_name, spectra_truth_name
from fiberlake.storage.layout import Lake
from fiberlake.storage.tables import TableStore


def _spectra_from_table(frame: pl.DataFrame, n_fibers: int) -> tuple[Spectra1D, np.ndarray]:
    frame = frame.sort("fiber")
    nwave = int(frame["nwave"][0])
    flux = np.zeros((n_fibers, nwave), np.float32)
    ivar = np.zeros_like(flux)
    mask = np.zeros((n_fibers, nwave), np.uint32)
    fibers = frame["fiber"].to_numpy()
    flux[fibers] = np.stack(frame["flux"].to_numpy())
    ivar[fibers] = np.stack(frame["ivar"].to_numpy())
    mask[fibers] = np.stack(frame["mask"].to_numpy())
    sky = np.asarray(frame["sky"][0].to_numpy(), np.float32)
    return Spectra1D(flux, ivar, mask), sky


def evaluate_night(lake: Lake, night: str, truth_dir: str | Path) -> dict:
    """Accuracy figures of a processed night against its truth.

    Parameters
    ----------
    lake : Lake
        Lake holding the processed night.
    night : str
        Night, ``YYYY-MM-DD``.
    truth_dir : path
        The simulated night directory (holding ``truth/``).

    Returns
    -------
    dict
        ``calibration``: per camera trace and wavelength errors; ``spectra``: per camera and
        extraction the medians of the per-fiber figures, for all targets and the faint third;
        ``sky``: residual figures per camera and extraction.
    """
    truth_dir = Path(truth_dir)
    tables = TableStore(lake.root / "tables")
    exposures = latest_exposures(tables, night)
    spectra_all = tables.scan("spectra").filter(pl.col("night") == night).collect()
    results: dict = {"calibration": {}, "spectra": [], "sky": []}
    for camera in sorted(spectra_all["camera"].unique().to_list()):
        calib = load_calibration(lake, night, camera)
        with fits.open(truth_dir / camera_truth_name(camera)) as hdul:
            true_x, true_wave = hdul["TRACE_X"].data.astype(float), hdul["WAVE"].data.astype(float)
            throughput = hdul["THROUGHPUT"].data
            live = throughput > 0
            # fiber flats are normalised to a median live-fiber response of 1, the simulator's
            # throughputs to a mean of 1: the expected flux scale is the median throughput
            flat_scale = float(np.median(throughput[live]))
        cal_x, cal_wave = true_x, true_wave
        if calib.rectification is not None:  # the calibration lives in the rectified frame: move the truth there
            cal_x, cal_wave = rectify.truth_in_frame(calib.rectification.map, true_x, true_wave)
        results["calibration"][camera] = (
            accuracy.trace_error(calib.traces.x(), cal_x, live)
            | accuracy.wavelength_error(calib.wave.wave(), cal_wave, live)
            | {"dead_found": int(calib.traces.dead.sum()), "dead_true": int((~live).sum()),
               "dead_agree": bool(np.array_equal(calib.traces.dead, ~live))}
        )
        science = exposures.filter((pl.col("camera") == camera) & pl.col("obstype").is_in(["SCIENCE", "STANDARD"]))
        for exp in science.to_dicts():
            with fits.open(truth_dir / spectra_truth_name(exp["expid"], camera)) as hdul:
                obj_rows = hdul["OBJ_ROWS"].data.astype(np.float32)
                targets = {name: np.asarray(hdul["TARGETS"].data[name]) for name in ("FIBER", "OBJTYPE", "MAG")}
            truth = accuracy.truth_on_grid(obj_rows, true_wave, calib.grid) * flat_scale
            objtype = np.array([str(t).strip() for t in targets["OBJTYPE"]])
            stars = np.flatnonzero((objtype != "SKY") & live)
            sky_fibers = (objtype == "SKY") & live
            mags = targets["MAG"][stars]
            faint = stars[mags >= np.percentile(mags, 67)] if stars.size else stars
            per_method = {}
            for method in sorted(spectra_all["extraction"].unique().to_list()):
                rows = spectra_all.filter((pl.col("expid") == exp["expid"]) & (pl.col("camera") == camera) & (pl.col("extraction") == method))
                if rows.is_empty():
                    continue
                spectra, sky = _spectra_from_table(rows, len(objtype))
                per_method[method] = accuracy.flux_accuracy(spectra, truth, faint)
                figures = accuracy.flux_accuracy(spectra, truth, stars)
                results["spectra"].append({
                    "camera": camera, "expid": exp["expid"], "obstype": exp["obstype"], "extraction": method,
                    "n_fibers": int(stars.size),
                    **{f"median_{k}": float(np.nanmedian(v)) for k, v in figures.items()},
                })
                if sky_fibers.sum():
                    results["sky"].append({"camera": camera, "expid": exp["expid"], "extraction": method,
                                           **accuracy.sky_residual(spectra, sky, sky_fibers)})
            if {"box", "optimal"} <= per_method.keys() and faint.size:
                gain = per_method["optimal"]["snr_empirical"] / per_method["box"]["snr_empirical"]
                results.setdefault("faint", []).append({
                    "camera": camera, "expid": exp["expid"], "n_faint": int(faint.size),
                    "faint_mag_min": float(np.percentile(mags, 67)),
                    "box_snr": float(np.nanmedian(per_method["box"]["snr_empirical"])),
                    "optimal_snr": float(np.nanmedian(per_method["optimal"]["snr_empirical"])),
                    "median_gain": float(np.nanmedian(gain)),
                    "frac_optimal_better": float(np.nanmean(gain > 1)),
                })
    return results


def format_report(results: dict) -> str:
    """Human-readable tables of :func:`evaluate_night` results."""
    lines = ["calibration vs truth (interior rows, live fibers)"]
    lines.append(pl.DataFrame([{"camera": k, **v} for k, v in results["calibration"].items()]).__str__())
    if results["spectra"]:
        lines.append("extracted flux vs truth (per-fiber medians)")
        lines.append(pl.DataFrame(results["spectra"]).__str__())
    if results.get("faint"):
        lines.append("faint third of the targets: empirical SNR, optimal vs box")
        lines.append(pl.DataFrame(results["faint"]).__str__())
    if results["sky"]:
        lines.append("sky fibers after sky subtraction")
        lines.append(pl.DataFrame(results["sky"]).__str__())
    return "\n".join(lines)
