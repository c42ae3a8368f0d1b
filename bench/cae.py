"""PSF-conditioned CAE deconvolution (seed 002): the paper's tables on our chunks, spectra against
spectro-perfectionism and optimal extraction, and speed.

Usage::

    python bench/cae.py table   [--minutes 2.5] [--combos PSF-iPSF-iPSF1,PSF-iPSF1,iPSF1,PSF] [--seed 92017]
    python bench/cae.py spectra [--model default] [--seed 93017]
    python bench/cae.py speed   [--model default] [--bundles 2]

``table`` trains one model per input combination with the same budget (seeds of
``CAETrainParams``), then scores every model, scikit-image Wiener and Richardson-Lucy
(``clip=False``; their delta-PSF estimates re-convolved with the target Gaussian, so all methods
aim at the same truth) on the same held-out chunks (``--seed``): PSNR and 1-SSIM (paper Table 1),
moment differences (flux, centroid, size; Table 2), blank chunks and their false detections,
and the afterburner's flux bias (eq. 2 alone, then with the quadratic).

``spectra`` extracts held-out chunks rendered with a Gaussian PSF (so that the optimal
extraction's profile and the deconvolution's PSF model are exact) with optimal, deconv
(spectro-perfectionism) and cae, and prints pulls, flux ratio to truth, line FWHM, crosstalk
into empty neighbours of bright fibers, and S/N.

``speed`` times a full-size LAMOST-like rectified frame (4096 x 4096, 250 fibers, bundles of 25
+ 2 margin fibers): CAE vs spectro-perfectionism on the same bundles in the same run; chunks/s and
seconds per frame (scaled from ``--bundles`` bundles when fewer than all), CUDA when torch sees one.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/typing.py would shadow the standard module for numpy: take this folder off the path, and
# forget any module already imported from it under a standard name
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
for _name, _module in list(sys.modules.items()):
    if _name in sys.stdlib_module_names and Path(getattr(_module, "__file__", None) or "/").resolve().parent == _HERE:
        del sys.modules[_name]

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from fiberlake.ingest.sim_chunks import simulate_chunks  # noqa: E402
from fiberlake.jobs.train_cae import (amplitudes, chunk_tiles, load_deconvolve_model, predict,  # noqa: E402
                                      robust_std, train_deconvolve)
from fiberlake.processors.cae_afterburner import flux_bias_factor  # noqa: E402
from fiberlake.processors.cae_inputs import gaussian_kernel  # noqa: E402
from fiberlake.processors.params import CAETrainParams  # noqa: E402


# ----------------------------------------------------------------------------- table 1 / 2
def moments(img: np.ndarray) -> tuple[float, float, float, float]:
    """Flux, centroid (row, col) and size ``sqrt(<r^2>)`` of the positive part of an image."""
    p = np.clip(img, 0, None)
    m0 = p.sum()
    if m0 <= 0:
        return 0.0, np.nan, np.nan, np.nan
    r, c = np.indices(p.shape)
    yc, xc = (p * r).sum() / m0, (p * c).sum() / m0
    size = np.sqrt((p * ((r - yc) ** 2 + (c - xc) ** 2)).sum() / m0)
    return float(img.sum()), float(yc), float(xc), float(size)


def scores(pred_e: np.ndarray, data, label: str) -> dict:
    """PSNR / 1-SSIM (max-scaled) and moment differences of predictions in electrons."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    lit = np.flatnonzero(~data.scene.blank & (data.truth.sum(axis=(1, 2)) > 100))
    psnr, dssim, dm = [], [], []
    for i in lit:
        t = data.truth[i].astype(float)
        p = pred_e[i].astype(float)
        ts = t / t.max()
        ps = p / p.max() if p.max() > 0 else p
        psnr.append(peak_signal_noise_ratio(ts, np.clip(ps, -1, 2), data_range=1.0))
        dssim.append(1 - structural_similarity(ts, ps, data_range=1.0))
        mt, mp = moments(t), moments(p)
        dm.append([100 * (mp[0] / mt[0] - 1), mp[1] - mt[1], mp[2] - mt[2], mp[3] - mt[3]])
    dm = np.array(dm)
    blank = np.flatnonzero(data.scene.blank)
    noise = np.sqrt((1.0 / data.ivar).sum(axis=(1, 2)))
    false = int(sum(pred_e[i].sum() > 5 * noise[i] for i in blank))
    row = {"method": label, "psnr_mean": np.mean(psnr), "psnr_median": np.median(psnr),
           "dssim_mean": np.mean(dssim), "dssim_median": np.median(dssim), "n_lit": len(lit), "n_blank": len(blank),
           "blank_false_5sigma": false,
           "blank_flux_rms_over_noise": float(np.sqrt(np.mean([(pred_e[i].sum() / noise[i]) ** 2 for i in blank])))
           if len(blank) else float("nan")}
    for k, name in enumerate(("flux_pct", "cen_row_px", "cen_col_px", "size_px")):
        v = dm[:, k][np.isfinite(dm[:, k])]
        row[f"d_{name}_mean"] = float(np.mean(v))
        row[f"d_{name}_rms"] = float(np.sqrt(np.mean(v**2)))
    return row


def classical(scene, tile: int, target_sigma: float) -> dict[str, np.ndarray]:
    """Wiener and Richardson-Lucy (scikit-image, clip=False) of each chunk, re-convolved with the
    target Gaussian, central tile."""
    from scipy.signal import fftconvolve
    from skimage.restoration import richardson_lucy, wiener

    g = gaussian_kernel(target_sigma)
    n, H, _ = scene.noisy.shape
    m = (H - tile) // 2
    out = {"Wiener": np.zeros((n, tile, tile)), "Richardson-Lucy": np.zeros((n, tile, tile))}
    for i in range(n):
        img = scene.noisy[i].astype(float)
        k = scene.kernel[i]
        w = wiener(img, k, balance=0.05, clip=False)
        rl = richardson_lucy(np.clip(img, 0, None), k, num_iter=30, clip=False)
        for name, est in (("Wiener", w), ("Richardson-Lucy", rl)):
            out[name][i] = fftconvolve(est, g, mode="same")[m:m + tile, m:m + tile]
    return out


def table(args) -> None:
    combos = args.combos.split(",")
    base = CAETrainParams()
    rows, bias_rows = [], []
    held_scene = simulate_chunks(args.chunks, args.seed, (base.tile + 2 * base.margin,) * 2, pitch=base.pitch,
                                 target_sigma=base.target_sigma)
    print(f"held-out chunks: seed {args.seed}, {args.chunks} chunks ({int(held_scene.blank.sum())} blank)")
    cache: dict = {}
    for combo in combos:
        budget = {"max_minutes": args.minutes} if not args.epochs else {"max_minutes": 1000.0, "epochs": args.epochs}
        p = base.updated({"combination": combo, "chunks": args.train_chunks, "heldout_chunks": 64} | budget)
        t0 = time.perf_counter()
        card, path = train_deconvolve(p, out=args.out, command=f"bench/cae.py table ({combo})", log=lambda s: None,
                                      scene_cache=cache)
        model = load_deconvolve_model(str(path), device="cpu")
        data = chunk_tiles(held_scene, combo, p.tile, reg=p.reg, sigma1=p.sigma1)
        out = predict(model.network, data.inputs)
        amp = amplitudes(out, data)
        rec = amp * out.sum(axis=(1, 2))
        fac = flux_bias_factor(rec, model.bias_coeffs, model.bias_range)
        pred = out * (amp * fac)[:, None, None]
        row = scores(pred, data, f"CAE {combo}") | {"train_steps": card["training"]["steps"],
                                                    "train_s": round(time.perf_counter() - t0)}
        rows.append(row)
        true = data.truth.sum(axis=(1, 2))
        lit = ~held_scene.blank & (true > 100)
        terc = np.quantile(true[lit], [1 / 3, 2 / 3])
        for name, sel in (("low", lit & (true < terc[0])), ("mid", lit & (true >= terc[0]) & (true < terc[1])),
                          ("high", lit & (true >= terc[1])), ("all", lit)):
            bias_rows.append({"combo": combo, "bin": name, "n": int(sel.sum()),
                              "eq2_bias_pct": 100 * float(np.median(rec[sel] / true[sel] - 1)),
                              "corrected_bias_pct": 100 * float(np.median(rec[sel] * fac[sel] / true[sel] - 1)),
                              "corrected_scatter_pct": 100 * robust_std(rec[sel] * fac[sel] / true[sel])})
        print(_fmt(row), flush=True)
    data = chunk_tiles(held_scene, combos[0], base.tile, reg=base.reg, sigma1=base.sigma1)
    for name, pred in classical(held_scene, base.tile, base.target_sigma).items():
        rows.append(scores(pred, data, name))
        print(_fmt(rows[-1]), flush=True)
    print("\nTable 1 (PSNR dB, 1-SSIM; max-scaled tiles, lit chunks)")
    print("| method | PSNR mean | PSNR median | 1-SSIM mean | 1-SSIM median |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['psnr_mean']:.2f} | {r['psnr_median']:.2f} | {r['dssim_mean']:.4f} | "
              f"{r['dssim_median']:.4f} |")
    print("\nTable 2 (moment differences prediction - truth, lit chunks: mean / RMS)")
    print("| method | flux % | centroid row px | centroid col px | size px | blank false det. (5 sigma) | "
          "blank flux rms / noise |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['d_flux_pct_mean']:+.2f} / {r['d_flux_pct_rms']:.2f} | "
              f"{r['d_cen_row_px_mean']:+.3f} / {r['d_cen_row_px_rms']:.3f} | "
              f"{r['d_cen_col_px_mean']:+.3f} / {r['d_cen_col_px_rms']:.3f} | "
              f"{r['d_size_px_mean']:+.3f} / {r['d_size_px_rms']:.3f} | {r['blank_false_5sigma']}/{r['n_blank']} | "
              f"{r['blank_flux_rms_over_noise']:.2f} |")
    print("\nAfterburner: median flux bias (eq. 2 amplitude alone -> with the quadratic), robust scatter after")
    print("| combination | flux tercile | n | eq. 2 bias % | corrected bias % | corrected scatter % |")
    print("|---|---|---|---|---|---|")
    for b in bias_rows:
        print(f"| {b['combo']} | {b['bin']} | {b['n']} | {b['eq2_bias_pct']:+.2f} | {b['corrected_bias_pct']:+.2f} | "
              f"{b['corrected_scatter_pct']:.2f} |")


def _fmt(row: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


# ----------------------------------------------------------------------------- spectra
def _traces(x: np.ndarray, ny: int, sigma: float):
    from fiberlake.schemas.containers import TraceSet

    coeffs = np.zeros((len(x), 1))
    coeffs[:, 0] = x
    return TraceSet(coeffs=coeffs, ny=ny, dead=np.zeros(len(x), bool), rms=np.zeros(len(x)),
                    sigma=np.full(len(x), sigma))


def _fwhm(y: np.ndarray, r: float, half: int = 8) -> float:
    """FWHM (rows) of a line from its second moment above the local continuum."""
    i0 = int(np.rint(r))
    if i0 - 3 * half < 0 or i0 + 3 * half >= y.size:
        return np.nan
    seg = y[i0 - half:i0 + half + 1].astype(float)
    side = np.r_[y[i0 - 3 * half:i0 - half], y[i0 + half + 1:i0 + 3 * half + 1]]
    seg = seg - np.median(side)
    if seg.sum() <= 0:
        return np.nan
    t = np.arange(-half, half + 1)
    mu = (seg * t).sum() / seg.sum()
    var = (np.clip(seg, 0, None) * (t - mu) ** 2).sum() / np.clip(seg, 0, None).sum()
    return float(2.3548 * np.sqrt(max(var, 0)))


def spectra(args) -> None:
    from fiberlake.processors import deconv, extract
    from fiberlake.processors.cae_extract import cae_extract
    from fiberlake.schemas.containers import PSFModel

    model = load_deconvolve_model(args.model, device="cpu")
    sx, sy = 2.4, 1.4
    H, W = args.rows, args.cols
    scene = simulate_chunks(args.chunks, args.seed, (H, W), fixed_psf={"sigma_cols": sx, "sigma_rows": sy,
                            "frac": 0.0, "dx": 0.0, "dy": 0.0}, with_sky=False, empty_fiber_fraction=0.3,
                            level=(1.5, 4.0), target_sigma=model.target_sigma)
    print(f"held-out spectral chunks: seed {args.seed}, {args.chunks} chunks of {H} x {W}, Gaussian PSF "
          f"sigma {sx} (cols) x {sy} (rows), model {model.model_id}")
    psf = PSFModel.gaussian(sy, sx, H, W)
    acc = {m: {"pull": [], "ratio": [], "fwhm": [], "xtalk": [], "snr_claim": [], "snr_true": [], "t": 0.0}
           for m in ("optimal", "deconv", "cae", "cae_fibers")}
    for i in range(len(scene)):
        if scene.blank[i]:
            continue
        x = scene.fiber_x[i]
        keep = (x > 14) & (x < W - 15)
        tr = _traces(x[keep], H, sx)
        img, iv = scene.noisy[i], scene.ivar[i]
        mask = np.zeros(img.shape, np.uint32)
        t0 = time.perf_counter()
        opt = extract.optimal_extract(img, iv, mask, tr, halfwidth=7.0, read_noise=scene.read_noise)
        t1 = time.perf_counter()
        dec = deconv.deconv_extract(img, iv, mask, tr, psf, read_noise=scene.read_noise)
        t2 = time.perf_counter()
        cae = cae_extract(img, iv, mask, tr, psf, model)
        t3 = time.perf_counter()
        cae_f = cae_extract(img, iv, mask, tr, psf, model, amplitude="fibers")
        acc["cae_fibers"]["t"] += time.perf_counter() - t3
        acc["optimal"]["t"] += t1 - t0
        acc["deconv"]["t"] += t2 - t1
        acc["cae"]["t"] += t3 - t2
        F = scene.rows_flux[i][keep]
        truths = {"optimal": scene.rows_inst[i][keep],
                  "deconv": deconv.apply_resolution(dec.resolution, F.astype(float)),
                  "cae": scene.rows_target[i][keep], "cae_fibers": scene.rows_target[i][keep]}
        lines = [(f, r) for f, r, _ in scene.line_rows[i]]
        fib_index = np.cumsum(keep) - 1
        near_line = np.zeros(F.shape, bool)
        for f, r in lines:
            if keep[f]:
                near_line[fib_index[f], max(0, int(r) - 8):int(r) + 9] = True
        inner = np.zeros(F.shape, bool)
        inner[:, 16:-16] = True
        for name, s in (("optimal", opt), ("deconv", dec), ("cae", cae), ("cae_fibers", cae_f)):
            a = acc[name]
            good = (s.ivar > 0) & inner
            cont = good & ~near_line
            lit = F.sum(axis=1) > 0
            resid = s.flux - truths[name]
            pull = resid * np.sqrt(s.ivar)
            a["pull"].append(pull[cont & lit[:, None]])
            for f in np.flatnonzero(lit):
                sel = inner[f]
                a["ratio"].append(s.flux[f][sel].sum() / max(F[f][sel].sum(), 1e-9))
                c = cont[f]
                if c.sum() > 20:
                    a["snr_claim"].append(np.median(s.flux[f][c] * np.sqrt(s.ivar[f][c])))
                    a["snr_true"].append(np.median(truths[name][f][c]) / max(np.std(resid[f][c]), 1e-9))
            for f, r in lines:
                if keep[f] and 24 < r < H - 24:
                    a["fwhm"].append(_fwhm(s.flux[fib_index[f]], r))
            for f in np.flatnonzero(~lit):  # empty fiber: crosstalk from its brighter neighbour
                nb = [g for g in (f - 1, f + 1) if 0 <= g < len(lit) and lit[g]]
                if nb:
                    g = max(nb, key=lambda k: F[k].sum())
                    a["xtalk"].append(s.flux[f][inner[f]].sum() / max(s.flux[g][inner[g]].sum(), 1e-9))
    print("\n| extraction | pull robust sd | pull mean | flux / truth (median) | line FWHM rows (median) | "
          "crosstalk from bright neighbour (median abs) | S/N claimed (median) | S/N true (median) | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, a in acc.items():
        pull = np.concatenate(a["pull"])
        print(f"| {name} | {robust_std(pull):.3f} | {np.mean(pull):+.3f} | {np.median(a['ratio']):.4f} | "
              f"{np.nanmedian(a['fwhm']):.2f} | {np.median(np.abs(a['xtalk'])):.2e} | "
              f"{np.median(a['snr_claim']):.1f} | {np.median(a['snr_true']):.1f} | {a['t']:.1f} |")
    print(f"(truths: optimal vs instrument-LSF rows; deconv vs R F; cae vs target-LSF rows of sigma "
          f"{model.target_sigma} px; input LSF FWHM {2.3548 * sy:.2f} rows, target {2.3548 * model.target_sigma:.2f})")


# ----------------------------------------------------------------------------- speed
def speed(args) -> None:
    import torch

    from fiberlake.processors import deconv
    from fiberlake.processors.cae_extract import cae_extract
    from fiberlake.processors.chunks import bundle_columns, plan_bundles, subset_psf, subset_traces
    from fiberlake.schemas.containers import PSFModel

    torch.set_num_threads(2)
    ny = nx = 4096
    nf, pitch = 250, 16.0
    x = (nx - 1) / 2 + (np.arange(nf) - (nf - 1) / 2) * pitch
    tr = _traces(x, ny, 2.4)
    psf = PSFModel.gaussian(1.4, 2.4, ny, nx)
    rng = np.random.default_rng(7)
    flux = 10 ** rng.uniform(2, 4, (nf, 1)) * np.ones((1, ny))
    from scipy.ndimage import gaussian_filter1d
    img = np.zeros((ny, nx))
    cols = np.arange(nx)
    for f in range(nf):
        w = np.exp(-0.5 * ((cols - x[f]) / 2.4) ** 2)
        img += gaussian_filter1d(flux[f], 1.4)[:, None] * (w / w.sum())[None, :]
    img = rng.poisson(img) + rng.normal(0, 3.5, img.shape)
    ivar = 1.0 / (3.5**2 + np.clip(img, 0, None))
    bundles = plan_bundles(nf, 25, 2)
    use = bundles[:args.bundles]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"full-size frame {ny} x {nx}, {nf} fibers, {len(bundles)} bundles (25 + 2 margin fibers); timing "
          f"{len(use)} bundles, scaled to the frame")
    res = {}
    for dev in devices:
        model = load_deconvolve_model(args.model, device=dev)
        t = 0.0
        for b in use:
            c0, c1 = bundle_columns(tr, b, 13, nx)
            t0 = time.perf_counter()
            cae_extract(img[:, c0:c1], ivar[:, c0:c1], None, subset_traces(tr, b.fibers, c0),
                        subset_psf(psf, b.fibers, c0), model)
            t += time.perf_counter() - t0
        res[f"cae ({dev})"] = t / len(use)
    for dev in devices:
        t = 0.0
        for b in use:
            c0, c1 = bundle_columns(tr, b, 13, nx)
            t0 = time.perf_counter()
            deconv.deconv_extract(img[:, c0:c1], ivar[:, c0:c1], None, subset_traces(tr, b.fibers, c0),
                                  subset_psf(psf, b.fibers, c0), deconv.DeconvParams(device=dev, cpu_threads=2),
                                  read_noise=3.5)
            t += time.perf_counter() - t0
        res[f"spectro-perfectionism ({dev})"] = t / len(use)
    ref = res["spectro-perfectionism (cpu)"]
    print("| extraction | s per chunk | chunks/s | s per frame | time / spectro-perfectionism (cpu) |")
    print("|---|---|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v:.2f} | {1 / v:.3f} | {v * len(bundles):.1f} | {v / ref:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("table")
    t.add_argument("--minutes", type=float, default=2.5)
    t.add_argument("--epochs", type=int, default=0, help="same number of updates for every combination (overrides "
                   "--minutes, which a shared machine makes unequal)")
    t.add_argument("--combos", default="PSF-iPSF-iPSF1,PSF-iPSF1,iPSF1,PSF")
    t.add_argument("--seed", type=int, default=92017)
    t.add_argument("--chunks", type=int, default=300)
    t.add_argument("--train-chunks", type=int, default=1500)
    t.add_argument("--out", default="/tmp/cae_table_models")
    s = sub.add_parser("spectra")
    s.add_argument("--model", default="default")
    s.add_argument("--seed", type=int, default=93017)
    s.add_argument("--chunks", type=int, default=10)
    s.add_argument("--rows", type=int, default=512)
    s.add_argument("--cols", type=int, default=160)
    p = sub.add_parser("speed")
    p.add_argument("--model", default="default")
    p.add_argument("--bundles", type=int, default=2)
    args = ap.parse_args()
    {"table": table, "spectra": spectra, "speed": speed}[args.what](args)


if __name__ == "__main__":
    main()
