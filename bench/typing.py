"""Frame typing (seed 001, SPIT): accuracy of the paper's network and the shipped variant, and costs.

Usage: ``python bench/typing.py [--paper-minutes 10] [--cache DIR] [--out DIR] [--skip-paper]``

In one run, on the same frames:

* the held-out nights of ``fiberlake train typing``'s defaults (seeds no training run uses):
  the shipped compact model and the paper's network (:class:`~fiberlake.processors.spit.SPITNet`,
  69 M weights) trained here on the same training nights with the paper's Adam 1e-4 for as long
  as ``--paper-minutes`` allows; for each: the paper's normalized accuracy (every flip alone,
  classes weighted equally), the final scheme's accuracy, unknown and misclassified rates, the
  confusion matrix, and the wrong-header audit (5 % of the headers wrong or missing: fraction
  caught, false alarms on good headers, calibration sets equal to the true ones with the routing
  rule and with the header rules alone);
* costs on CPU (and CUDA when present): pre-processing frames/s for mini and lamost frames,
  inference frames/s (4 flips each) of both networks, and typing's share of the ingest time of
  a simulated mini night ingested here (``jobs.ingest.ingest_night``).

Prints a table and writes ``typing.json`` to ``--out``.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path, where its own name would shadow the
# standard library's ``typing``: move the folder to the end (bench/timing.py is still found).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from timing import best_of  # noqa: E402  (bench/timing.py)


def accuracy_rows(name: str, figures: dict, n_params: int, train: dict | None) -> dict:
    audit = figures["wrong_headers"]
    return {"network": name, "parameters": n_params, "normalized": figures["normalized_accuracy"],
            "final": figures["final_accuracy"], "unknown": figures["unknown_rate"],
            "misclassified": figures["misclassified_rate"], "caught": audit["caught"],
            "false_alarm": audit["false_alarm"], "calib_equal_routing": audit["calib_equal_routing"],
            "calib_equal_header": audit["calib_equal_header"],
            "train_minutes": None if train is None else round(train["seconds"] / 60, 1),
            "epochs": None if train is None else train["epochs"], "updates": None if train is None else train["updates"]}


def preprocessing_rate(instrument: str, n: int, baseline: bool = False) -> dict:
    """Frames per second of :func:`prepare_frame` on simulated raw frames of ``instrument``.

    With ``baseline``, also with the former masked-array row-maximum profile
    (:func:`~fiberlake.processors.typing_prep.row_max_profile_masked`) on the same frames, alternating, and checks both give the
    same images: ``{"fps": ..., "fps_baseline": ..., "speedup": ..., "identical": ...}``.
    """
    from fiberlake.ingest import typing_dataset as td
    from fiberlake.processors import typing_prep as tp

    spec = td.plan_nights(instrument, td.HELDOUT_SEEDS[:1], 1)[0]
    raws = [f.raw for f in td.simulate_night_frames(spec)][:n]
    seconds, images = best_of(lambda: [tp.prepare_frame(r) for r in raws], 2)
    out = {"fps": len(raws) / seconds}
    for name, channels in (("asinh", ("zscale", "asinh")), ("cosmics", ("zscale", "cosmics")), ("all", tp.CHANNELS)):
        ch_s, _ = best_of(lambda: [tp.prepare_channels(r, channels) for r in raws], 2)
        out[f"fps_{name}"] = len(raws) / ch_s
        out[f"cost_{name}"] = ch_s / seconds
    if baseline:
        current = tp.row_max_profile
        tp.row_max_profile = tp.row_max_profile_masked
        try:
            base_s, base_images = best_of(lambda: [tp.prepare_frame(r) for r in raws], 2)
        finally:
            tp.row_max_profile = current
        profile_s, _ = best_of(lambda: [current(tp.orient(r).astype(np.float32)) for r in raws], 2)
        base_profile_s, _ = best_of(lambda: [tp.row_max_profile_masked(tp.orient(r).astype(np.float32)) for r in raws], 2)
        out.update({"fps_baseline": len(raws) / base_s, "speedup": base_s / seconds,
                    "profile_speedup": base_profile_s / profile_s,
                    "profile_s_per_frame": profile_s / len(raws),
                    "profile_s_per_frame_baseline": base_profile_s / len(raws),
                    "identical": all(np.array_equal(a, b) for a, b in zip(images, base_images))})
        all_s, stacks = best_of(lambda: [tp.prepare_channels(r, tp.CHANNELS) for r in raws], 2)
        float_s, float_stacks = best_of(lambda: [tp.prepare_channels(r.astype(np.float32), tp.CHANNELS)
                                                 for r in raws], 2)
        out.update({"channels_s_per_frame": all_s / len(raws), "channels_s_per_frame_float": float_s / len(raws),
                    "channels_speedup": float_s / all_s,
                    "channels_identical": all(np.array_equal(a, b) for a, b in zip(stacks, float_stacks))})
    return out


def inference_rate(typer, n: int = 32) -> float:
    """Frames per second (each frame: 4 flips) of a typer on random uint8 frames (its input channels)."""
    from fiberlake.processors.typing_prep import TARGET_SHAPE

    images = np.random.default_rng(0).integers(0, 255, (n, len(typer.channels)) + TARGET_SHAPE, dtype=np.uint8)
    scalars = np.random.default_rng(1).uniform(0, 3, (n, len(typer.scalars))).astype(np.float32) if typer.scalars else None
    seconds, _ = best_of(lambda: typer.flip_probabilities(images, scalars), 2)
    return n / seconds


def ingest_share(typer, workdir: Path) -> dict:
    """Ingest a simulated mini night and type its frames: seconds per frame of each, measured here."""
    from fiberlake.ingest.simulate import simulate_night
    from fiberlake.jobs.ingest import ingest_night
    from fiberlake.processors.typing_route import prepare_for_typing
    from fiberlake.storage.layout import Lake

    paths = simulate_night("mini", "2026-01-05", workdir / "nights", seed=9050, n_science=4)
    lake = Lake.at(workdir / "lake")
    lake.ensure("mini")
    t0 = time.perf_counter()
    ingest_night(lake, workdir / "nights" / "2026-01-05", instrument="mini")
    ingest_s = time.perf_counter() - t0
    from astropy.io import fits

    raws = [fits.getdata(p) for p in paths]
    t0 = time.perf_counter()
    prepared = [prepare_for_typing(r, channels=typer.channels, scalars=typer.scalars) for r in raws]
    images = np.stack([p.image for p in prepared])
    scalars = np.stack([p.scalars for p in prepared]) if typer.scalars else None
    prep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    typer.type_images(images, 3, scalars)
    infer_s = time.perf_counter() - t0
    n = len(paths)
    return {"frames": n, "ingest_s_per_frame": ingest_s / n, "prep_s_per_frame": prep_s / n,
            "inference_s_per_frame": infer_s / n, "typing_share_of_ingest": (prep_s + infer_s) / ingest_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper-minutes", type=float, default=10.0, help="training budget of the paper's network")
    parser.add_argument("--skip-paper", action="store_true", help="the shipped model only")
    parser.add_argument("--cache", default="bench_out/typing_cache", help="simulated, pre-processed frames")
    parser.add_argument("--out", default="bench_out", help="where typing.json goes")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--prep-only", action="store_true",
                        help="pre-processing frames/s only, against the former masked-array profile, in one run")
    args = parser.parse_args()
    if args.prep_only:
        print("pre-processing (prepare_frame), CPU, against the former masked-array row-maximum profile:")
        print("instrument | frames/s | frames/s before | speedup | profile s/frame | before | profile speedup "
              "| identical")
        rates = {}
        for instrument, n in (("mini", 12), ("lamost", 4)):
            r = rates[instrument] = preprocessing_rate(instrument, n, baseline=True)
            print(f"{instrument} | {r['fps']:.2f} | {r['fps_baseline']:.2f} | {r['speedup']:.2f} | "
                  f"{r['profile_s_per_frame']:.3f} | {r['profile_s_per_frame_baseline']:.3f} | "
                  f"{r['profile_speedup']:.2f} | {r['identical']}")
        print("\nextra input channels (prepare_channels), time per frame relative to the paper's prepare_frame:")
        print("instrument | zscale+asinh | zscale+cosmics | zscale+asinh+cosmics")
        for instrument, r in rates.items():
            print(f"{instrument} | {r['cost_asinh']:.2f} | {r['cost_cosmics']:.2f} | {r['cost_all']:.2f}")
        print("\nevery channel (prepare_channels), raw uint16 pixels (the integer kernels) against the same "
              "frames as float32 (the general path):")
        print("instrument | s/frame | s/frame float32 | speedup | identical")
        for instrument, r in rates.items():
            print(f"{instrument} | {r['channels_s_per_frame']:.3f} | {r['channels_s_per_frame_float']:.3f} | "
                  f"{r['channels_speedup']:.2f} | {r['channels_identical']}")
        return

    import torch

    from fiberlake.jobs.train import evaluate, fit, load_typing_model, night_specs, prepare_dataset
    from fiberlake.processors.typing_prep import CHANNELS, PAPER_CHANNELS
    from fiberlake.processors.params import TypingTrainParams
    from fiberlake.processors.spit import FrameTyper, SPITNet, format_confusion, n_parameters
    from fiberlake.storage.models import shipped_dir

    torch.set_num_threads(args.threads)
    from fiberlake.schemas.header import OBSTYPES as CLASSES

    shipped = load_typing_model("default", device="cpu", batch=16)
    card = json.loads((shipped_dir("typing") / "card.json").read_text())
    params = TypingTrainParams.from_dict(card["training"]["params"])
    held_all = prepare_dataset(night_specs(params, heldout=True), args.cache, progress=True, label="held-out nights")
    held = held_all.with_scalars(shipped.scalars, CHANNELS).select_channels(shipped.channels, CHANNELS)
    results: dict = {"heldout": held.summary(), "shipped_model": card["model_id"]}
    rows = []
    fig = evaluate(shipped, held)
    results["compact"] = fig
    rows.append(accuracy_rows(f"compact (shipped {card['model_id']})", fig, n_parameters(shipped.model),
                              card["training"]))
    print("compact, final scheme on held-out frames:\n" + format_confusion(fig, CLASSES))
    if not args.skip_paper:
        train = prepare_dataset(night_specs(params, heldout=False), args.cache, progress=True, label="training nights")
        train = train.select_channels(PAPER_CHANNELS, CHANNELS)   # the paper's network reads the paper's input
        paper_params = params.updated({"arch": "paper", "lr": 1e-4, "max_minutes": args.paper_minutes,
                                       "cpu_threads": args.threads, "device": "auto"})
        model = SPITNet(len(CLASSES))
        training = fit(model, train, paper_params)
        typer = FrameTyper(model, CLASSES, device="auto", batch=8)
        fig = evaluate(typer, held_all.select_channels(PAPER_CHANNELS, CHANNELS))
        results["paper"] = {**fig, "training": training}
        rows.append(accuracy_rows("paper (SPITNet, Adam 1e-4, zscale)", fig, n_parameters(model), training))
        print("paper, final scheme on held-out frames:\n" + format_confusion(fig, CLASSES))
        results["paper_inference_fps_cpu"] = inference_rate(FrameTyper(model, CLASSES, device="cpu", batch=8), 16)
    results["accuracy"] = rows
    rates = {"mini": preprocessing_rate("mini", 12), "lamost": preprocessing_rate("lamost", 4)}
    results["prep_fps"] = {name: r["fps"] for name, r in rates.items()}
    results["prep_fps_all_channels"] = {name: r["fps_all"] for name, r in rates.items()}
    results["prep_cost_all_channels"] = {name: r["cost_all"] for name, r in rates.items()}
    cpu_typer = FrameTyper(shipped.model, CLASSES, device="cpu", batch=16, channels=shipped.channels,
                           scalars=shipped.scalars)
    results["compact_inference_fps_cpu"] = inference_rate(cpu_typer)
    trained_form = FrameTyper(shipped.model, CLASSES, device="cpu", batch=16, channels=shipped.channels,
                              scalars=shipped.scalars)
    trained_form.runner = trained_form.model       # the layers as trained: batch norms apart, ReLU before pooling
    results["compact_inference_fps_cpu_trained_form"] = inference_rate(trained_form)
    sample = held.images[:64]
    sample_scalars = held.scalars[:64] if shipped.scalars else None
    results["inference_form_max_abs_dp"] = float(np.abs(cpu_typer.flip_probabilities(sample, sample_scalars)
                                                        - trained_form.flip_probabilities(sample, sample_scalars)).max())
    if torch.cuda.is_available():
        results["compact_inference_fps_cuda"] = inference_rate(FrameTyper(shipped.model, CLASSES, device="cuda",
                                                                          batch=64, channels=shipped.channels,
                                                                          scalars=shipped.scalars), 256)
    with tempfile.TemporaryDirectory() as tmp:
        results["ingest"] = ingest_share(shipped, Path(tmp))

    print()
    head = ["network", "parameters", "normalized", "final", "unknown", "misclassified", "caught", "false_alarm",
            "calib_equal_routing", "calib_equal_header", "train_minutes", "epochs"]
    print(" | ".join(head))
    for row in rows:
        print(" | ".join(f"{row[h]:.4f}" if isinstance(row[h], float) else str(row[h]) for h in head))
    print(f"pre-processing frames/s (CPU): mini {results['prep_fps']['mini']:.1f}, "
          f"lamost {results['prep_fps']['lamost']:.2f}; with every extra channel (zscale, asinh, cosmics): "
          f"mini {results['prep_fps_all_channels']['mini']:.1f}, lamost {results['prep_fps_all_channels']['lamost']:.2f} "
          f"({results['prep_cost_all_channels']['lamost']:.2f} times the time per lamost frame)")
    print(f"inference frames/s (4 flips, CPU): compact {results['compact_inference_fps_cpu']:.1f} "
          f"(the trained layers unfused: {results['compact_inference_fps_cpu_trained_form']:.1f}, "
          f"{results['compact_inference_fps_cpu'] / results['compact_inference_fps_cpu_trained_form']:.2f}x; "
          f"probabilities within {results['inference_form_max_abs_dp']:.1e} on 64 held-out frames)"
          + (f", paper {results['paper_inference_fps_cpu']:.2f}" if "paper_inference_fps_cpu" in results else "")
          + (f"; CUDA compact {results['compact_inference_fps_cuda']:.0f}" if "compact_inference_fps_cuda" in results
             else ""))
    ing = results["ingest"]
    print(f"ingest of a mini night: {ing['ingest_s_per_frame'] * 1e3:.0f} ms/frame; typing "
          f"{(ing['prep_s_per_frame'] + ing['inference_s_per_frame']) * 1e3:.0f} ms/frame "
          f"= {100 * ing['typing_share_of_ingest']:.0f}% of it")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "typing.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out / 'typing.json'}")


if __name__ == "__main__":
    main()
