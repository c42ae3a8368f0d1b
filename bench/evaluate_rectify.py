"""Before/after evaluation of the aberration correction (seed 000) on simulated cameras.

For each simulated case (seed, distortion strength ``k``, PSF model, camera) the frames of a
night are simulated in memory, a calibration set is built without the map (the old path) and
with each map variant, and the same science frames are reduced with each. Reported, per case
and variant:

* ``map`` table: trace straightness on the master flat before (raw traces about their TLS
  lines) and after (traces re-measured on the rectified flat); the map against the *true*
  distortion: ``true_label_px`` (rms distance of the mapped true traces from the feet on the
  TLS lines of the true traces) and ``iso_column_px`` (rms deviation from a straight line of the
  images of the true undistorted columns every 2 px across the slit, i.e. also between the
  fibers) and ``spacing_px`` (rms deviation of those lines' positions from equal spacing:
  what ``slit`` labels remove); trace and wavelength errors against the truth moved into the
  calibration's frame; the fit and rectification times.
* ``psf`` table: adaptive second moments and weighted skewness of isolated, unsaturated arc
  lines on the master arc before and after rectification (the same lines), and their spread
  over the CCD: ``std/mean`` of the widths, ``std`` of the ellipticities and skewnesses.
* ``spectra`` table: the paper's Tables 2-3 comparison, per fiber and extraction: SNR (eq. 15,
  11-pixel median continuum) and variance (eq. 14) after vs before, the fraction of fibers
  improved, and flux accuracy against the truth (binned by 8 so that the resampling's pixel
  correlations cannot make it look better).

Run it from the repository root: ``python bench/evaluate_rectify.py [--seeds 31,32] [--out DIR]``;
seeds used by no test are the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from fiberlake.ingest.sim_params import SimParams
from fiberlake.ingest.simulate import make_fibermap, plan_night, simulate_frame
from fiberlake.processors import accuracy, pipeline, rectify
from fiberlake.processors.rectify_accuracy import (arc_spots, binned_residual, iso_column_residual, match_spots,
                                                   spot_spread, true_label_error)
from fiberlake.processors.ccd import CCDParams
from fiberlake.processors.params import ReductionParams
from fiberlake.processors.pipeline import build_calibration, reduce_frame
from fiberlake.processors.rectify_map import MapConfig
from fiberlake.schemas.instrument import Instrument, get_instrument, parse_camera

NIGHT = "2026-12-10"


@dataclass(frozen=True)
class Variant:
    """One way to reduce: no map, or a map kind with a sampling scheme."""

    name: str
    rectify: bool = True
    map: str = "legendre"
    sampling: str = "semicircle"
    residual: bool = True
    """MLP predicts displacements (True) or the target coordinates (the paper's direct form)."""
    labels: str = "tls"
    """Target lines: each trace's TLS line (the paper) or parallel equally spaced ``slit`` lines."""
    map_only: bool = False
    """Report the map figures only (no calibration and reduction with it)."""


# names without "slit" use the paper's labels (each trace's own TLS line)
VARIANTS = {v.name: v for v in (
    Variant("none", rectify=False),
    Variant("legendre"),
    Variant("legendre-slit", labels="slit"),
    Variant("mlp-slit", map="mlp", labels="slit"),
    Variant("legendre-uniform", sampling="uniform"),
    Variant("mlp", map="mlp"),
    Variant("mlp-uniform", map="mlp", sampling="uniform"),
    Variant("mlp-direct", map="mlp", residual=False, map_only=True),
)}


def simulate_camera(instrument: Instrument, camera: str, seed: int, params: SimParams, night: str = NIGHT) -> dict:
    """Every frame of a simulated night for one camera, in memory, keyed by obstype."""
    frames: dict[str, list] = {}
    for e in plan_night(instrument, night, seed):
        fm = make_fibermap(instrument, night, seed, e.obstype, e.plate, e.expid) if e.obstype in ("SCIENCE", "STANDARD") else None
        frames.setdefault(e.obstype, []).append(simulate_frame(
            instrument, camera, e.obstype, night=night, expid=e.expid, seed=seed, exptime=e.exptime, fibermap=fm,
            params=params))
    return frames


def _params(variant: Variant, extractions: tuple[str, ...]) -> ReductionParams:
    return ReductionParams().updated({
        "extractions": extractions, "rectify.enabled": variant.rectify, "rectify.map": variant.map,
        "rectify.sampling": variant.sampling, "rectify.labels": variant.labels})


def _config(variant: Variant) -> rectify.RectifyConfig:
    return rectify.RectifyConfig(sampling=variant.sampling, labels=variant.labels,
                                 map=MapConfig(kind=variant.map, residual=variant.residual))


def evaluate_case(instrument: Instrument, camera: str, seed: int, psf_model: str, variants: list[Variant],
                  extractions: tuple[str, ...] = ("box", "optimal")) -> dict[str, list[dict]]:
    """All figures of one simulated camera (module notes); rows for the three tables."""
    params = SimParams(psf_model=psf_model)
    frames = simulate_camera(instrument, camera, seed, params)
    arm = parse_camera(camera)[0]
    head = {"seed": seed, "k": instrument.distortion_k, "psf": psf_model, "camera": camera}
    cam = frames["FLAT"][0].camera
    live = ~cam.dead
    ccdp = CCDParams.from_header(frames["FLAT"][0].header)
    raws = {k: [f.raw for f in v] for k, v in frames.items()}
    science = frames.get("SCIENCE", []) + frames.get("STANDARD", [])
    out: dict[str, list[dict]] = {"map": [], "psf": [], "spectra": []}

    base_params = _params(VARIANTS["none"], extractions)
    t0 = time.perf_counter()
    base = build_calibration(raws["BIAS"], raws["FLAT"], raws["ARC"], ccdp, instrument, arm, base_params)
    t_base = time.perf_counter() - t0
    arc_raw = pipeline._master_frame(raws["ARC"], ccdp, base.master_bias)
    lsf = instrument.arm(arm).lsf_sigma_px
    spots_raw = arc_spots(arc_raw, base.traces, lsf)
    x0 = np.arange(instrument.nominal_fiber_columns()[0], instrument.nominal_fiber_columns()[-1], 2.0)
    iso_before, spacing_before = iso_column_residual(None, cam.distortion, x0, instrument.ny, instrument.nx)
    straight_raw = rectify.trace_straightness(base.traces)

    reduced_base, t_red_base = {}, 0.0
    for fr in science:
        sky = np.array([t == "SKY" for t in fr.truth["TARGETS"]["OBJTYPE"]])
        t0 = time.perf_counter()
        reduced_base[fr.header["EXPID"]] = reduce_frame(fr.raw, CCDParams.from_header(fr.header), base, sky, base_params)
        t_red_base += time.perf_counter() - t0
    base_trace = accuracy.trace_error(base.traces.x(), cam.trace_x, live)
    base_wave = accuracy.wavelength_error(base.wave.wave(), cam.wave, live)
    out["map"].append(head | {
        "variant": "none", "straight_before_px": float(np.nanmedian(straight_raw)),
        "straight_after_px": float(np.nanmedian(straight_raw)), "true_label_px": np.nan,
        "iso_column_px": iso_before, "iso_column_before_px": iso_before, "spacing_px": spacing_before,
        "trace_err_px": base_trace["trace_rms_px"], "wave_err_A": base_wave["wave_rms_A"],
        "label_rms_px": np.nan, "fit_s": 0.0, "rectify_s": 0.0, "calib_s": t_base,
        "reduce_s": t_red_base / max(len(science), 1)})

    for v in variants:
        if not v.rectify:
            continue
        if v.map_only:
            t0 = time.perf_counter()
            rect = rectify.fit_rectification(base.traces, instrument.nx, _config(v), instrument.nominal_fiber_columns())
            iso, spacing = iso_column_residual(rect.map, cam.distortion, x0, instrument.ny, instrument.nx)
            out["map"].append(head | {
                "variant": v.name, "straight_before_px": float(np.nanmedian(straight_raw)),
                "straight_after_px": np.nan,
                "true_label_px": true_label_error(rect.map, cam.trace_x, live) if v.labels == "tls" else np.nan,
                "iso_column_px": iso, "iso_column_before_px": iso_before, "spacing_px": spacing,
                "trace_err_px": np.nan, "wave_err_A": np.nan,
                "label_rms_px": rect.info["label_rms"], "fit_s": time.perf_counter() - t0, "rectify_s": np.nan,
                "calib_s": np.nan, "reduce_s": np.nan})
            continue
        vp = _params(v, extractions)
        if v.map == "mlp" and not v.residual:
            raise ValueError("the direct MLP form is map-only")
        t0 = time.perf_counter()
        cal = build_calibration(raws["BIAS"], raws["FLAT"], raws["ARC"], ccdp, instrument, arm, vp)
        t_cal = time.perf_counter() - t0
        rect = cal.rectification
        tx, tw = rectify.truth_in_frame(rect.map, cam.trace_x, cam.wave)
        t0 = time.perf_counter()
        arc_rect = rectify.rectify_image(arc_raw.image, arc_raw.ivar, arc_raw.mask, rect.map)
        t_rect = time.perf_counter() - t0
        spots_rect = arc_spots(arc_rect, cal.traces, lsf)
        iso, spacing = iso_column_residual(rect.map, cam.distortion, x0, instrument.ny, instrument.nx)
        out["map"].append(head | {
            "variant": v.name, "straight_before_px": float(np.nanmedian(rect.straightness_raw)),
            "straight_after_px": float(np.nanmedian(rectify.trace_straightness(cal.traces))),
            "true_label_px": true_label_error(rect.map, cam.trace_x, live) if v.labels == "tls" else np.nan,
            "iso_column_px": iso, "iso_column_before_px": iso_before, "spacing_px": spacing,
            "trace_err_px": accuracy.trace_error(cal.traces.x(), tx, live)["trace_rms_px"],
            "wave_err_A": accuracy.wavelength_error(cal.wave.wave(), tw, live)["wave_rms_A"],
            "label_rms_px": rect.info["label_rms"], "fit_s": rect.info["fit_seconds"], "rectify_s": t_rect,
            "calib_s": t_cal})
        a, b = match_spots(spots_raw, spots_rect)
        sa, sb = spot_spread(a), spot_spread(b)
        out["psf"].append(head | {"variant": v.name} | {f"{k}_before": x for k, x in sa.items()}
                          | {f"{k}_after": x for k, x in sb.items() if k != "n_spots"})
        t_red = 0.0
        for fr in science:
            expid = fr.header["EXPID"]
            sky = np.array([t == "SKY" for t in fr.truth["TARGETS"]["OBJTYPE"]])
            t0 = time.perf_counter()
            red = reduce_frame(fr.raw, CCDParams.from_header(fr.header), cal, sky, vp)
            t_red += time.perf_counter() - t0
            stars = np.flatnonzero(~sky & live)
            truth = accuracy.truth_on_grid(fr.truth["OBJ_ROWS"], cam.wave, cal.grid) * float(np.median(cam.throughput[live]))
            for method in extractions:
                before, after = reduced_base[expid][method], red[method]
                s0, s1 = before.metrics["snr_eq15"][stars], after.metrics["snr_eq15"][stars]
                v0, v1 = before.metrics["variance_eq14"][stars], after.metrics["variance_eq14"][stars]
                fa0 = accuracy.flux_accuracy(before.spectra, truth, stars)
                fa1 = accuracy.flux_accuracy(after.spectra, truth, stars)
                out["spectra"].append(head | {
                    "variant": v.name, "expid": int(expid), "obstype": fr.header["OBSTYPE"], "extraction": method,
                    "n_fibers": int(stars.size),
                    "snr15_before": float(np.nanmedian(s0)), "snr15_after": float(np.nanmedian(s1)),
                    "snr15_frac_up": float(np.mean(s1 > s0)),
                    "var14_ratio": float(np.nanmedian(v1 / v0)), "var14_frac_down": float(np.mean(v1 < v0)),
                    "flux_ratio_before": float(np.nanmedian(fa0["ratio"])), "flux_ratio_after": float(np.nanmedian(fa1["ratio"])),
                    "pull_std_before": float(np.nanmedian(fa0["pull_std"])), "pull_std_after": float(np.nanmedian(fa1["pull_std"])),
                    "resid8_before": float(np.nanmedian(binned_residual(before.spectra, truth, stars))),
                    "resid8_after": float(np.nanmedian(binned_residual(after.spectra, truth, stars))),
                    "_snr15_pairs": np.column_stack([s0, s1]).tolist(), "_var14_pairs": np.column_stack([v0, v1]).tolist(),
                })
        out["map"][-1]["reduce_s"] = t_red / max(len(science), 1)
    return out


def evaluate_rectification(*, instrument: str = "mini", seeds=(31, 32), ks=(0.012, 0.03, 0.05),
                           psf_models=("distortion", "radial"), cameras=("b1", "r1"),
                           variants=("none", "legendre"), extractions=("box", "optimal"),
                           progress: bool = True) -> dict[str, pl.DataFrame]:
    """Run :func:`evaluate_case` over a grid of cases and collect the three tables.

    Returns
    -------
    dict of str to polars.DataFrame
        ``map``, ``psf``, ``spectra`` (per case and variant) and ``summary`` (the Tables 2-3
        figures pooled over every fiber of every case, per variant and extraction).
    """
    base = get_instrument(instrument)
    chosen = [VARIANTS[v] for v in variants]
    rows: dict[str, list[dict]] = {"map": [], "psf": [], "spectra": []}
    for seed in seeds:
        for k in ks:
            inst = dataclasses.replace(base, distortion_k=float(k))
            for psf in psf_models:
                for camera in cameras:
                    t0 = time.perf_counter()
                    res = evaluate_case(inst, camera, int(seed), psf, chosen, tuple(extractions))
                    for name in rows:
                        rows[name] += res[name]
                    if progress:
                        print(f"case seed={seed} k={k} psf={psf} camera={camera}: {time.perf_counter() - t0:.0f} s", flush=True)
    tables = {name: pl.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rs])
              for name, rs in rows.items() if rs}
    summary = []
    for (variant, method), group in _groupby(rows["spectra"], ("variant", "extraction")).items():
        s = np.concatenate([np.asarray(r["_snr15_pairs"]) for r in group])
        v = np.concatenate([np.asarray(r["_var14_pairs"]) for r in group])
        ok_s = np.all(np.isfinite(s), axis=1)
        ok_v = np.all(np.isfinite(v), axis=1)
        summary.append({"variant": variant, "extraction": method, "n_fiber_frames": int(ok_s.sum()),
                        "snr15_median_ratio": float(np.median(s[ok_s, 1] / s[ok_s, 0])),
                        "snr15_frac_up": float(np.mean(s[ok_s, 1] > s[ok_s, 0])),
                        "var14_median_ratio": float(np.median(v[ok_v, 1] / v[ok_v, 0])),
                        "var14_frac_down": float(np.mean(v[ok_v, 1] < v[ok_v, 0]))})
    if summary:
        tables["summary"] = pl.DataFrame(summary)
    return tables


def _groupby(rows: list[dict], keys: tuple[str, ...]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def format_tables(tables: dict[str, pl.DataFrame]) -> str:
    """Human-readable report of :func:`evaluate_rectification`."""
    titles = {"map": "trace straightness and map error against the true distortion (px), times (s)",
              "psf": "PSF shape on isolated arc lines, before -> after rectification (same lines)",
              "spectra": "Tables 2-3 on our data: SNR eq. 15 and variance eq. 14 per fiber, after vs before",
              "summary": "pooled over every fiber of every case"}
    lines = []
    with pl.Config(tbl_rows=200, tbl_cols=-1, tbl_width_chars=400, float_precision=4):
        for name in ("map", "psf", "spectra", "summary"):
            if name in tables:
                lines += [titles[name], str(tables[name])]
    return "\n".join(lines)


def write_tables(tables: dict[str, pl.DataFrame], out_dir: str | Path) -> None:
    """Write each table as CSV (and all of them as one JSON) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        df.write_csv(out / f"rectify_{name}.csv")
    (out / "rectify_eval.json").write_text(json.dumps({k: v.to_dicts() for k, v in tables.items()}, indent=1))


def main(argv: list[str] | None = None) -> int:
    """Command line of the evaluation: simulate, reduce with each variant, print (and write) the tables."""
    p = argparse.ArgumentParser(description="aberration correction before/after on simulated cameras "
                                            "(map, PSF, Tables 2-3)")
    p.add_argument("--instrument", default="mini", choices=["mini", "lamost"])
    p.add_argument("--seeds", default="31,32", help="comma-separated simulation seeds (default: seeds no test uses)")
    p.add_argument("--k", default="0.012,0.02,0.03", help="comma-separated pincushion coefficients")
    p.add_argument("--psf", default="distortion,radial", help="simulator PSF models: distortion, radial")
    p.add_argument("--cameras", default="b1,r1")
    p.add_argument("--variants", default="none,legendre,legendre-slit",
                   help="none, legendre, legendre-uniform, legendre-slit, mlp, mlp-uniform, mlp-slit, mlp-direct")
    p.add_argument("--extract", default="box,optimal")
    p.add_argument("--out", help="directory for the tables as CSV and JSON")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    def values(text: str, kind=str):
        return tuple(kind(v) for v in text.split(",") if v)

    tables = evaluate_rectification(
        instrument=args.instrument, seeds=values(args.seeds, int), ks=values(args.k, float),
        psf_models=values(args.psf), cameras=values(args.cameras), variants=values(args.variants),
        extractions=values(args.extract), progress=not args.quiet)
    print(format_tables(tables))
    if args.out:
        write_tables(tables, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
