"""Flux calibration and coadds against the simulator's truth, on a held-out simulated night.

    python bench/fluxcal.py [--seed 1409] [--extraction box] [--out DIR] [--std 4]

Simulates a mini night (3 science exposures of one plate with ``--std`` standards per
spectrograph, one standard-star exposure), ingests and processes it (products included), then
prints per camera the median ratio of calibrated to true flux and its scatter over the fibers
(raw, and with each fiber's own aperture loss divided out, which no calibration can know), the
blue/red colour error (over every star, which the faint ones' own noise widens; per exposure; over
the stars brighter than r = 17), the standards' fitted Teff, log g and [Fe/H] against their true
ones, the response's residual shape, the telluric residuals (O2 B and gamma bands), the coadds'
S/N against the quadrature sum of their exposures' (sqrt(N) for equal exposures), and the
inverse-variance ripple of the frame spectra and of the joined spectra. ``--evaluate DIR`` prints
the figures of a night this script processed before (its ``--out``), without redoing it.
Seeds 1401-1499 are held out from everything the flux calibration was developed on (issues 11,
14: the colour fit was tuned on seeds 1301-1303).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as ``python bench/fluxcal.py`` (or from bench/), this folder comes first on the path, and a bench script
# named like a standard module (bench/typing.py) would shadow it for numpy: take the folder off the path, and
# forget any module already imported from it under a standard name
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
for _name, _module in list(sys.modules.items()):
    if _name in sys.stdlib_module_names and Path(getattr(_module, "__file__", None) or "/").resolve().parent == _HERE:
        del sys.modules[_name]

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from astropy.io import fits  # noqa: E402

from fiberlake.ingest.simulate import simulate_night  # noqa: E402
from fiberlake.jobs.ingest import ingest_night  # noqa: E402
from fiberlake.jobs.process import latest_exposures, process_night  # noqa: E402
from fiberlake.jobs.products import joined_grid_of  # noqa: E402
from fiberlake.processors import coadd as co  # noqa: E402
from fiberlake.processors import fluxcal_accuracy as fa  # noqa: E402
from fiberlake.processors.accuracy import truth_on_grid  # noqa: E402
from fiberlake.processors.params import ReductionParams  # noqa: E402
from fiberlake.processors.telluric import TELLURIC_BANDS  # noqa: E402
from fiberlake.schemas.containers import Spectra1D  # noqa: E402
from fiberlake.schemas.instrument import get_instrument  # noqa: E402
from fiberlake.schemas.truth import camera_truth_name, spectra_truth_name  # noqa: E402
from fiberlake.storage.layout import Lake  # noqa: E402
from fiberlake.storage.tables import TableStore  # noqa: E402

NIGHT = "2026-12-09"


def _truth_joined(truth_dir: Path, expid: int, cameras: list[str], inst, grid: co.LogGrid) -> tuple[np.ndarray, dict, dict]:
    """True flux above the atmosphere on the joined grid, the TARGETS table, and each camera's range."""
    parts, ranges, targets = [], {}, {}
    for camera in cameras:
        with fits.open(truth_dir / camera_truth_name(camera)) as h:
            wave_rows = h["WAVE"].data.astype(float)
        with fits.open(truth_dir / spectra_truth_name(expid, camera)) as h:
            flam = h["FLAM_ROWS"].data.astype(np.float32)
            targets = {k: np.asarray(h["TARGETS"].data[k])
                       for k in ("FIBER", "OBJTYPE", "MAG", "FLUXFRAC", "TARGETID", "TEFF", "LOGG", "FEH")}
        wave = inst.wavelengths(camera[0])
        on_cam = truth_on_grid(flam, wave_rows, wave)
        parts.append((wave, Spectra1D(on_cam, np.ones_like(on_cam), np.zeros(on_cam.shape, np.uint32))))
        ranges[camera] = (grid.wave > wave[0] + 5) & (grid.wave < wave[-1] - 5)
    return co.join_arms(parts, grid).flux.astype(float), ranges, targets


def evaluate(lake: Lake, night: str, truth_dir: Path, extraction: str) -> dict:
    """Figures of a processed night's products against its truth (see the module's description)."""
    tables = TableStore(lake.root / "tables")
    inst = get_instrument(lake.instrument)
    grid = joined_grid_of(inst, ReductionParams())
    exposures = latest_exposures(tables, night).filter(pl.col("obstype").is_in(["SCIENCE", "STANDARD"]))
    joined = tables.scan("joined").filter((pl.col("night") == night) & (pl.col("extraction") == extraction)).collect()
    cal = tables.scan("fluxcal").filter((pl.col("night") == night) & (pl.col("extraction") == extraction)).collect()
    raw, corrected, shapes, tell_in, labels, colours = {}, {}, {}, [], [], []
    truth_of: dict[int, np.ndarray] = {}
    for expid in sorted(exposures["expid"].unique().to_list()):
        cameras = sorted(exposures.filter(pl.col("expid") == expid)["camera"].to_list())
        truth, ranges, targets = _truth_joined(truth_dir, expid, cameras, inst, grid)
        rows = joined.filter(pl.col("expid") == expid).sort("fiber")
        if rows.is_empty():
            continue
        flux = np.stack(rows["flam"].to_numpy()).astype(float)
        ivar = np.stack(rows["flam_ivar"].to_numpy()).astype(float)
        fibers = rows["fiber"].to_numpy()
        objtype = np.array([str(t).strip() for t in targets["OBJTYPE"]])[fibers]
        stars = objtype != "SKY"
        ratios = fa.fiber_ratios(flux[stars], ivar[stars], truth[fibers][stars], ranges)
        # the calibration divides out the mean aperture loss of the standards it used
        used = cal.filter((pl.col("expid") == expid))["calib_expids"].to_list()
        used = sorted({int(e) for lst in used for e in (lst or [])}) or [expid]
        fluxfrac_std = []
        for e in used:
            with fits.open(truth_dir / spectra_truth_name(e, cameras[0])) as h:
                t = h["TARGETS"].data
                fluxfrac_std.extend(np.asarray(t["FLUXFRAC"])[np.char.strip(np.asarray(t["OBJTYPE"]).astype(str)) == "STD"])
        aperture = targets["FLUXFRAC"][fibers][stars] / np.mean(fluxfrac_std)
        labels.extend(_standard_labels(cal.filter(pl.col("expid") == expid), targets))
        first, second = list(ratios)[:2]
        colours.append((expid, ratios[first] / ratios[second] - 1.0, targets["MAG"][fibers][stars]))
        for camera, vals in ratios.items():
            raw.setdefault(camera, []).append(vals)
            corrected.setdefault(camera, []).append(vals / aperture)
            shapes.setdefault(camera, []).append(fa.shape_error(flux[stars], ivar[stars], truth[fibers][stars], ranges[camera]))
        for lo, hi in TELLURIC_BANDS:
            inside = (grid.wave > lo) & (grid.wave < hi)
            if not inside.any():
                continue
            for i in np.flatnonzero(stars):
                good_in = inside & (ivar[i] > 0) & (truth[fibers[i]] > 0)
                near = (np.abs(grid.wave - 0.5 * (lo + hi)) < 150) & ~inside & (ivar[i] > 0) & (truth[fibers[i]] > 0)
                if good_in.sum() > 20 and near.sum() > 20:
                    level = np.median(flux[i, near] / truth[fibers[i], near])
                    tell_in.append(np.median(flux[i, good_in] / truth[fibers[i], good_in]) / level - 1.0)
        for i, tid in zip(fibers[stars], rows["targetid"].to_numpy()[stars]):
            truth_of.setdefault(int(tid), truth[i])
    figures = {"raw": fa.summary({k: np.concatenate(v) for k, v in raw.items()}),
               "aperture_corrected": fa.summary({k: np.concatenate(v) for k, v in corrected.items()}),
               "shape_rms": {k: float(np.nanmedian(v)) for k, v in shapes.items()},
               "telluric_band_residual_median": float(np.median(tell_in)) if tell_in else float("nan"),
               "telluric_band_residual_rms": float(np.sqrt(np.mean(np.square(tell_in)))) if tell_in else float("nan"),
               "colour": _colour_figures(colours),
               "standards": _label_summary(labels)}
    figures["coadd"] = _coadd_figures(tables, night, extraction, joined, truth_of)
    figures["ripple"] = _ripple(lake, tables, night, extraction, joined)
    figures["status"] = cal.group_by("status").len().sort("status").to_dicts()
    return figures


BRIGHT = 17.0
"""Stars brighter than this (r) have a blue/red ratio free of their own noise (fainter ones scatter by ~8 %)."""


def _colour_figures(colours: list[tuple[int, np.ndarray, np.ndarray]]) -> dict:
    """The blue/red colour error of the calibration itself: per exposure (the median over its stars, one
    response per exposure) and over the stars brighter than :data:`BRIGHT` (each its own ratio)."""
    per_exposure = {int(e): float(np.nanmedian(c)) for e, c, _ in colours if np.isfinite(c).any()}
    bright = np.concatenate([c[(m < BRIGHT) & np.isfinite(c)] for _, c, m in colours]) if colours else np.array([])
    values = np.array(list(per_exposure.values()))
    return {"per_exposure": per_exposure,
            "exposure_rms": float(np.sqrt(np.mean(values**2))) if values.size else float("nan"),
            "bright_median": float(np.median(bright)) if bright.size else float("nan"),
            "bright_rms": float(np.sqrt(np.mean(bright**2))) if bright.size else float("nan"),
            "n_bright": int(bright.size)}


def _standard_labels(cal: pl.DataFrame, targets: dict) -> list[tuple[float, ...]]:
    """(fitted - true) Teff, log g, [Fe/H] of the standards an exposure's calibration fitted and used."""
    if cal.is_empty():
        return []
    row = cal.sort("camera").row(0, named=True)
    if row["status"] != "ok" or not row["std_fiber"]:
        return []
    where = {int(f): i for i, f in enumerate(targets["FIBER"])}
    out = []
    for k, fiber in enumerate(row["std_fiber"]):
        i = where.get(int(fiber))
        if i is not None and row["std_ok"][k]:
            out.append((row["std_teff"][k] - float(targets["TEFF"][i]), row["std_logg"][k] - float(targets["LOGG"][i]),
                        row["std_feh"][k] - float(targets["FEH"][i])))
    return out


def _label_summary(labels: list[tuple[float, ...]]) -> dict:
    if not labels:
        return {"n": 0}
    d = np.array(labels)
    return {"n": len(d), "teff_median": float(np.median(d[:, 0])), "teff_rms": float(np.sqrt(np.mean(d[:, 0] ** 2))),
            "logg_median": float(np.median(d[:, 1])), "feh_median": float(np.median(d[:, 2]))}


def _coadd_figures(tables: TableStore, night: str, extraction: str, joined: pl.DataFrame,
                   truth_of: dict[int, np.ndarray]) -> dict:
    coadds = tables.scan("coadds").filter((pl.col("night") == night) & (pl.col("extraction") == extraction)
                                          & (pl.col("scope") == "night") & (pl.col("n_exp") >= 3)).collect()
    gains, mags = [], []
    for row in coadds.iter_rows(named=True):
        truth = truth_of.get(int(row["targetid"]))
        if truth is None:
            continue
        singles = joined.filter(pl.col("targetid") == row["targetid"])
        ivars = np.stack([np.asarray(v) for v in singles["flam_ivar"].to_list()])
        good = (np.asarray(row["flam_ivar"]) > 0) & np.all(ivars > 0, axis=0) & (truth > 0)
        gain = fa.coadd_noise_gain(np.stack([np.asarray(f) for f in singles["flam"].to_list()]),
                                   np.asarray(row["flam"]), truth, good)
        if np.isfinite(gain):
            gains.append(gain)
            mags.append(row["mag"])
    gains, mags = np.array(gains), np.array(mags, float)
    faint = mags >= 15.0
    return {"n_targets": int(gains.size), "median_snr_over_expected": float(np.median(gains)) if gains.size else float("nan"),
            "faint_median_snr_over_expected": float(np.median(gains[faint])) if faint.any() else float("nan"),
            "n_exp": 3}


def _ripple(lake: Lake, tables: TableStore, night: str, extraction: str, joined: pl.DataFrame) -> dict:
    """Ripple that follows the bins' phase: in the frame spectra, and in the joined spectra."""
    from fiberlake.jobs.calibrations import load_calibration
    from fiberlake.processors.resample import ripple_factor

    spectra = tables.scan("spectra").filter((pl.col("night") == night) & (pl.col("extraction") == extraction)
                                            & (pl.col("objtype") != "SKY")).collect()
    markers = tables.scan("reductions").filter((pl.col("night") == night) & (pl.col("extraction") == extraction)
                                               & (pl.col("status") == "ok")).collect()
    inst = get_instrument(lake.instrument)
    grid = joined_grid_of(inst, ReductionParams())
    before, q_joined = {}, []
    for camera in sorted(spectra["camera"].unique().to_list()):
        m = markers.filter(pl.col("camera") == camera).row(0, named=True)
        calib = load_calibration(lake, m["calib_night"], camera)
        q = ripple_factor(calib.wave_rows, calib.grid)
        rows = spectra.filter(pl.col("camera") == camera)
        fibers = rows["fiber"].to_numpy()
        before[camera] = fa.phase_ripple(np.stack(rows["ivar"].to_numpy())[:, 30:-30], q[fibers][:, 30:-30])
        q_joined.append((calib.grid, Spectra1D(q, np.ones_like(q), np.zeros(q.shape, np.uint32))))
    qj = co.join_arms(q_joined, grid).flux
    rows = joined.filter(pl.col("objtype") != "SKY")
    after = fa.phase_ripple(np.stack(rows["flam_ivar"].to_numpy()), qj[rows["fiber"].to_numpy()])
    return {"frame_spectra": before, "joined": after}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1409)
    parser.add_argument("--extraction", default="box", choices=("box", "optimal", "deconv"))
    parser.add_argument("--std", type=int, default=4, help="standards per spectrograph on the science plate")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--evaluate", type=Path, default=None, metavar="DIR",
                        help="only the figures of a night processed before into DIR (an earlier --out)")
    args = parser.parse_args(argv)
    if args.evaluate is not None:
        figures = evaluate(Lake.at(args.evaluate / "lake"), NIGHT, args.evaluate / NIGHT, args.extraction)
        print(json.dumps(figures, indent=2, default=float))
        return 0
    out = args.out or Path(tempfile.mkdtemp(prefix="fluxcal-bench-"))
    t0 = time.perf_counter()
    simulate_night("mini", NIGHT, out, seed=args.seed, n_bias=1, n_flat=1, n_arc=1, n_science=3, n_standard=1,
                   std_per_spectrograph=args.std)
    lake = Lake.at(out / "lake")
    ingest_night(lake, out / NIGHT)
    config = ReductionParams().updated({"extractions": (args.extraction,)})
    report = process_night(lake, NIGHT, config=config)
    t1 = time.perf_counter()
    figures = evaluate(lake, NIGHT, out / NIGHT, args.extraction)
    figures["seed"], figures["seconds"] = args.seed, round(t1 - t0, 1)
    figures["products"] = report.products.summary()
    print(json.dumps(figures, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
