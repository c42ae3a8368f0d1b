"""Cost of the classification stage (seed 003): DRC-Net fibers/s, and its share of a frame's reduction.

Usage::

    fiberlake demo --workdir /tmp/demo            # a mini lake with reduced frames (or any lake)
    python bench/classify.py --lake /tmp/demo/lake [--device cpu|cuda] [--threads 2]
    python bench/classify.py --stripe-gain 8     # what a stripe carries beyond its aperture sum

Prints, measured in this process:

* inference throughput (fibers/s, median of ``--repeat`` runs) of DRC-Net and RC-Net on ``mini``
  stripes (11 x 750 per arm) and on LAMOST-sized ones (11 x 3000, 250 fibers: one frame pair),
  and of the template fit (per fiber), on CPU and on CUDA when present;
* for one science exposure of the lake: the frame stage's reduction of one camera
  (:func:`fiberlake.processors.pipeline.reduce_frame`, the run's extractions) against the
  classification stage's parts for the exposure's two cameras (correction again, stripes,
  DRC-Net, RC-Net, template fit), as ratios to the frame reduction;
* ``--stripe-gain N``: on ``N`` simulated mini exposures of ``N`` instrument designs (seeds
  ``1599 + 10000 k``, Cannon stars when installed), the S/N of a profile-weighted extraction of
  each star's stripe over its aperture sum (:func:`fiberlake.processors.stripes.optimal_extraction_gain`),
  faint (background-limited) and at the star's own brightness: the most S/N the 2D input can add
  over RC-Net's 1D spectrum (not a speed figure).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):          # run as a script: the package, not bench/, on the path
    sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

import numpy as np


def _timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def throughput(device: str, repeat: int) -> list[tuple[str, str, int, float]]:
    """(network, instrument, fibers, fibers per second) of random-weight networks (speed only)."""
    import torch

    from fiberlake.processors.drcnet import DRCNet, RCNet, predict

    rows = []
    rng = np.random.default_rng(0)
    for name, width, n in (("mini", 750, 32), ("lamost", 3000, 250)):
        drc, rc = DRCNet(11, width, width, 7).eval(), RCNet(2 * width, 7).eval()
        zb = rng.normal(size=(n, 11, width)).astype(np.float32)
        spec = rng.normal(size=(n, 2 * width)).astype(np.float32)
        predict(drc, (zb[:2], zb[:2]), device=device)   # warm-up
        t, _ = _timed(lambda: predict(drc, (zb, zb), batch=256, device=device), repeat)
        rows.append(("drcnet", name, n, n / t))
        t, _ = _timed(lambda: predict(rc, (spec,), batch=256, device=device), repeat)
        rows.append(("rcnet", name, n, n / t))
        if device == "cuda":
            torch.cuda.synchronize()
    return rows


def frame_share(lake_path: str, repeat: int) -> list[tuple[str, float]]:
    """Seconds of one camera's reduction and of the classification parts for one exposure."""
    import polars as pl

    from fiberlake.jobs.calibrations import ccd_params_from_row, load_calibration
    from fiberlake.jobs.classify_stage import _models, arm_of_frame
    from fiberlake.jobs.classify_templates import template_grid
    from fiberlake.jobs.process import latest_exposures
    from fiberlake.processors.classify import classify_exposure
    from fiberlake.processors.params import ReductionParams
    from fiberlake.processors.pipeline import reduce_frame
    from fiberlake.schemas.tables import LABEL_CLASSES
    from fiberlake.storage.layout import Lake
    from fiberlake.storage.products import read_rows
    from fiberlake.storage.rawstore import read_raw_frame
    from fiberlake.storage.tables import TableStore

    lake = Lake.at(lake_path)
    tables = TableStore(lake.root / "tables")
    markers = read_rows(tables, "reductions").filter(pl.col("status") == "ok")
    night = markers["night"][0]
    exps = latest_exposures(tables, night).filter(pl.col("obstype") == "SCIENCE")
    expid = int(exps["expid"][0])
    cams = markers.filter(pl.col("expid") == expid).unique(subset=["camera"]).sort("camera").to_dicts()
    config = ReductionParams()
    fm = read_rows(tables, "fibermap", night=night, expid=expid).sort("fiber")
    from fiberlake.schemas.instrument import get_instrument

    sky = np.zeros(get_instrument(lake.instrument).n_fibers, bool)
    sky[fm.filter(pl.col("objtype") == "SKY")["fiber"].to_numpy()] = True
    m = cams[0]
    exp = exps.filter((pl.col("expid") == expid) & (pl.col("camera") == m["camera"])).row(0, named=True)
    calib = load_calibration(lake, m["calib_night"], m["camera"])
    raw = read_raw_frame(lake.root, exp["raw_path"])
    t_reduce, _ = _timed(lambda: reduce_frame(raw, ccd_params_from_row(exp), calib, sky, config), repeat)
    calibs: dict = {}
    arms = {}

    def cut():
        for mk in cams:
            e = exps.filter((pl.col("expid") == expid) & (pl.col("camera") == mk["camera"])).row(0, named=True)
            arms[mk["camera"][0]] = arm_of_frame(lake, e, mk, config, sky, calibs)

    t_cut, _ = _timed(cut, repeat)
    nets, _card = _models("default", str(lake.root), "cpu")
    grid = template_grid("cannon")
    (b, wb), (r, wr) = arms["b"], arms["r"]
    out = []
    for method in ("drcnet", "rcnet", "template"):
        t, _ = _timed(lambda: classify_exposure(b, r, nets, wave_b=wb, wave_r=wr, template_grid=grid,
                                                classes=LABEL_CLASSES, methods=(method,)), repeat)
        out.append((method, t))
    return [("reduce one camera (baseline)", t_reduce), ("correct + cut stripes, both cameras", t_cut)] + out


def stripe_gain(n_designs: int) -> list[tuple[str, str, int, float, float, float]]:
    """(arm, regime, stars, median, 10th, 90th percentile) of the optimal-over-aperture S/N gain."""
    from fiberlake.ingest.sim_spectra import resolve_stellar_model
    from fiberlake.jobs.classify_data import plan_exposures, simulate_exposure
    from fiberlake.processors.stripes import optimal_extraction_gain

    model = resolve_stellar_model("cannon")[0]
    specs = plan_exposures(1599, n_designs, stellar_model=model, exposures_per_night=1, designs=n_designs)
    parts = [simulate_exposure(s, with_raw=True) for s in specs]
    rows = []
    for arm in ("b", "r"):
        sig, var, bkg, good = (np.concatenate([p[f"{k}_{arm}"] for p in parts]) for k in ("signal", "var", "bkg", "good"))
        for regime, noise in (("faint (background-limited)", bkg), ("own brightness", var)):
            g = optimal_extraction_gain(sig, noise, good)
            g = g[np.isfinite(g)]
            rows.append((arm, regime, g.size, *np.percentile(g, [50, 10, 90]).tolist()))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lake", help="a lake with reduced science frames (e.g. fiberlake demo's)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stripe-gain", type=int, default=0, metavar="N",
                    help="only the optimal-over-aperture S/N gain of stripes of N simulated designs")
    args = ap.parse_args(argv)
    if args.stripe_gain:
        print("| arm | regime | stars | optimal / aperture S/N, median | 10 % | 90 % |")
        print("|---|---|---:|---:|---:|---:|")
        for arm, regime, n, med, lo, hi in stripe_gain(args.stripe_gain):
            print(f"| {arm} | {regime} | {n} | {med:.3f} | {lo:.3f} | {hi:.3f} |")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if args.device == "cuda" and torch.cuda.is_available() else [])
    print("| network | instrument | fibers | device | fibers/s | ratio to drcnet cpu |")
    print("|---|---|---:|---|---:|---:|")
    base = {}
    for device in devices:
        for net, inst, n, fps in throughput(device, args.repeat):
            if device == "cpu" and net == "drcnet":
                base[inst] = fps
            print(f"| {net} | {inst} | {n} | {device} | {fps:.0f} | {fps / base[inst]:.2f} |")
    if args.lake:
        parts = frame_share(args.lake, args.repeat)
        ref = parts[0][1]
        print("\n| step (one mini exposure) | seconds | ratio to one camera's reduction |")
        print("|---|---:|---:|")
        for name, t in parts:
            print(f"| {name} | {t:.3f} | {t / ref:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
