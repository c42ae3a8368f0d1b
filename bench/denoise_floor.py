"""Diagnostic: the generator's reconstruction floor per subclass (seed 004's isometric autoencoder).

Trains the autoencoder of :mod:`fiberlake.processors.denoise_generator` on the training stars of
``fiberlake train denoise`` (seed 1600) with the settings given on the command line and prints, per
subclass, the median MSE of ``G(E(truth))`` relative to the truth's mean square on held-out stars
(seed 1700, never used in training). Used to find what limits the floor (steps, learning rate,
isometry weight, decoder width, stars per subclass). One torch thread.

Usage::

    python bench/denoise_floor.py --steps 2000 [--lr 2e-3] [--iso-weight 1] [--delta 1]
                                  [--hidden 64] [--channels 4,8,16,32] [--per-subclass 150] [--json OUT]
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--iso-weight", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1.0)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--channels", default="4,8,16,32")
    p.add_argument("--latent", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--per-subclass", type=int, default=150)
    p.add_argument("--heldout", type=int, default=16)
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    import torch

    from fiberlake.ingest import sim_spectra1d as s1d
    from fiberlake.processors.denoise_generator import AEArch, FitSettings, IsometricAE, encode, fit_autoencoder
    from fiberlake.processors.denoise_generator import forward as ae_forward

    torch.set_num_threads(1)
    torch.manual_seed(1600)
    n = s1d.DENOISE_NWAVE
    t0 = time.perf_counter()
    stars = s1d.draw_stars(1600, a.per_subclass)
    test = s1d.draw_stars(1700, a.heldout)
    print(f"stars drawn in {time.perf_counter() - t0:.0f} s", flush=True)
    targets = (stars.truth * n).astype(np.float32)
    arch = AEArch(n_wave=n, latent_dim=a.latent, channels=tuple(int(c) for c in a.channels.split(",")),
                  hidden=a.hidden)
    ae = IsometricAE(arch)
    fit = FitSettings(steps=a.steps, batch=a.batch, lr=a.lr, delta=a.delta, isometry_weight=a.iso_weight, seed=1600)
    t1 = time.perf_counter()
    figs = fit_autoencoder(ae, lambda idx, rng: targets[idx], targets, fit, lambda s: print(s, flush=True))
    secs = time.perf_counter() - t1
    res = {"settings": vars(a), "train_seconds": round(secs, 1), "train": figs, "per_subclass": {}}
    for name, st in (("train", stars), ("heldout", test)):
        scaled = (st.truth * n).astype(np.float32)
        rec = ae_forward(ae, scaled) / n
        rel = ((rec - st.truth) ** 2).mean(-1) / (st.truth ** 2).mean(-1)
        res["per_subclass"][name] = {c: float(np.median(rel[st.subclass == c])) for c in s1d.subclass_names()}
        res[f"median_rel_{name}"] = float(np.median(rel))
    z = encode(ae, targets)
    res["latent_std"] = z.std(0).round(2).tolist()
    print(f"train {secs:.0f} s; median rel MSE train {res['median_rel_train']:.4f} held-out {res['median_rel_heldout']:.4f}")
    print(" ".join(f"{c}:{v:.4f}" for c, v in res["per_subclass"]["heldout"].items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
