"""Paired held-out comparison of classify models: DRC-Net minus RC-Net (and minus the template fit), per S/N bin.

Usage::

    FIBERLAKE_CANNON_DIR=<Cannon pickles> python bench/classify_heldout.py --cache /tmp/cache \\
        [--exposures 100 --mag 1.0 2.5 --template-stars 500] MODEL [MODEL ...]

The held-out set is ``--exposures`` simulated mini exposures of Cannon stars (the analytic model
when the pickles are missing) over 15 instrument designs (seeds ``1553 + 10000 k``: no training
or other held-out set uses them), plates ``--mag`` fainter than training's so the bin below
S/N 10 is well filled. Every network scores every star; the template fit (templates of the
other star model) runs on ``--template-stars`` random stars below S/N 10 (cached). Prints, per
model, the accuracies and the paired differences with bootstrap 95 % intervals (resampling
stars), and how much more S/N is worth to RC-Net (a logistic fit of its correctness on log S/N):
the yardstick for what a stripe's profile weighting can add
(:func:`fiberlake.processors.stripes.optimal_extraction_gain`). Not a speed benchmark.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):          # run as a script: the package, not bench/, on the path
    sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

import numpy as np

SEED = 1553
DESIGNS = 15
EXTRA_BINS = (("5-10", 5.0, 10.0), ("<5", -np.inf, 5.0))


def interval(diff: np.ndarray, rng: np.random.Generator, n_boot: int = 4000) -> str:
    """Mean of a paired difference (points) with its bootstrap 95 % interval."""
    if diff.size == 0:
        return "-"
    boot = diff[rng.integers(0, diff.size, (n_boot, diff.size))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return f"{100 * diff.mean():+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def snr_worth(snr: np.ndarray, correct: np.ndarray, gains=(1.09, 1.2, 1.5)) -> tuple[float, list[float]]:
    """Fitted accuracy below S/N 10 and its increase (points) if every star had ``gain`` x its S/N."""
    x = np.log(np.clip(snr, 0.5, None))
    design = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    for _ in range(50):                                  # Newton's method for the logistic fit
        p = 1.0 / (1.0 + np.exp(-design @ w))
        hess = design.T @ (design * (p * (1 - p))[:, None])
        w += np.linalg.solve(hess, design.T @ (correct - p))
    faint = snr <= 10

    def acc(g: float) -> float:
        return float((1.0 / (1.0 + np.exp(-(w[0] + w[1] * (x[faint] + np.log(g)))))).mean())

    return acc(1.0), [100 * (acc(g) - acc(1.0)) for g in gains]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="classify artifacts: default, a model id or a folder")
    ap.add_argument("--cache", required=True, help="folder caching the simulated set and the template fit")
    ap.add_argument("--exposures", type=int, default=100)
    ap.add_argument("--mag", type=float, nargs=2, default=(1.0, 2.5), help="plate magnitude offset range")
    ap.add_argument("--template-stars", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    from fiberlake.ingest.sim_spectra import resolve_stellar_model
    from fiberlake.jobs.classify_data import dataset_key, load_or_build, plan_exposures
    from fiberlake.jobs.train_classify import load_classify_models, network_inputs, template_predictions
    from fiberlake.processors.classify_scores import SNR_BINS
    from fiberlake.processors.drcnet import predict

    torch.set_num_threads(args.threads)
    star_model = resolve_stellar_model("cannon")[0]
    specs = plan_exposures(SEED, args.exposures, stellar_model=star_model, mag_offset=tuple(args.mag),
                           exposures_per_night=2, designs=DESIGNS)
    t0 = time.time()
    held, cached = load_or_build(specs, args.cache, 1)
    key, snr, label = dataset_key(specs), held["snr_r"], held["label"]
    faint = np.flatnonzero(snr <= 10)
    print(f"held-out set {key} ({star_model} stars, seeds {SEED} + 10000 k): {snr.size} stars "
          f"({'cache' if cached else f'{time.time() - t0:.0f} s'}); below S/N 10: {faint.size}, median S/N "
          f"{np.median(snr[faint]) if faint.size else float('nan'):.1f}")
    template_ok, source, n_template = np.full(faint.size, np.nan), "-", 0
    if faint.size:
        sub = {k: v[faint] for k, v in held.items()}
        tidx, tpred, source = template_predictions(sub, star_model, args.cache, key + "-below10", args.template_stars)
        template_ok[tidx] = tpred == sub["label"][tidx]
        n_template = tidx.size
    rng = np.random.default_rng(0)
    bins = list(SNR_BINS) + list(EXTRA_BINS)
    for source_name in args.models:
        nets, card = load_classify_models(source_name)
        ok = {k: (predict(nets[k], network_inputs(k, held)).argmax(axis=1) == label).astype(float) for k in nets}
        print(f"\n{card['model_id']} (templates: {source}, on {n_template} stars below S/N 10)\n")
        print("| S/N_r | n | DRC-Net | RC-Net | DRC - RC [95 %] | template (n) | DRC - template [95 %] |")
        print("|---|---|---|---|---|---|---|")
        for name, lo, hi in bins:
            sel = (snr > lo) & (snr <= hi)
            t_cell, dt_cell = "-", "-"
            if hi <= 10:
                tsel = sel[faint] & np.isfinite(template_ok)
                if tsel.any():
                    t_cell = f"{template_ok[tsel].mean():.3f} ({int(tsel.sum())})"
                    dt_cell = interval(ok["drcnet"][faint][tsel] - template_ok[tsel], rng)
            print(f"| {name} | {int(sel.sum())} | {ok['drcnet'][sel].mean():.3f} | {ok['rcnet'][sel].mean():.3f} | "
                  f"{interval(ok['drcnet'][sel] - ok['rcnet'][sel], rng)} | {t_cell} | {dt_cell} |")
        base, gains = snr_worth(snr, ok["rcnet"])
        print(f"\nRC-Net below S/N 10, fitted {base:.3f}; S/N x 1.09 / 1.2 / 1.5 would add "
              + " / ".join(f"{g:+.1f}" for g in gains) + " points")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
