"""Deconvolution extraction (spectro-perfectionism): speed on a full-size frame, accuracy on
held-out simulated frames.

Usage::

    python bench/deconv.py speed [--camera b1] [--reference-patches N] [--no-shapes] [--before REV,...]
    python bench/deconv.py accuracy [--seed 4242]

``speed`` simulates a full-size LAMOST camera (250 fibers x 4096 rows: flat, arc, science),
traces the flat and fits the PSF, then extracts the science frame with the torch path on CPU
and the numpy/scipy reference (each in a child process, for its own peak memory), and on CUDA
when torch sees a GPU. It prints seconds per frame, peak memory, the agreement of the two
paths, the floor (flops of the patch solves at this machine's measured float64 GEMM rate;
bytes of the frame and products at its measured copy bandwidth) and a study of patch shapes.
``--reference-patches N`` times the reference on the first N patches only (and scales it to
the frame; the table says so). ``--before REV,...`` also runs ``processors/deconv.py`` as it
was at each git revision (read with ``git show``, imported as a module of its own) on the same
inputs in the same run, and compares its products with this tree's: the before/after figures.

``accuracy`` runs the mini instrument's two cameras through the pipeline's calibration path
(raw frames -> CCD -> traces -> wavelengths -> PSF) on a seed no test uses, then measures:
held-out arc lines (chi^2 per degree of freedom of 2D stamps of a second arc exposure) for
the fitted PSF, an invariant PSF, a Gaussian and the simulator's true PSF; pulls
``(flux - R F_true) / sigma`` per fiber on frames rendered from known pre-LSF spectra; the
FWHM of isolated lines after deconvolution vs optimal and box extraction; the crosstalk from
bright fibers into dark neighbours; and the behaviour at masked pixels, dead fibers and the
CCD edges.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where bench/typing.py would shadow the
# standard library's typing module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import tempfile
import time

import numpy as np

# ----------------------------------------------------------------------------- shared helpers


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def patch_flops(nfp: int, nb: int, nc: int, wy: int) -> dict[str, float]:
    """Floating-point operations of one patch of the torch path (multiply-add = 2).

    Assembly ``L^T diag(K) L`` as dense GEMMs (``2 nb^3`` per block product, ``2 m - 1`` of
    them); Schur sweeps (per step: Cholesky ``nb^3 / 3``, triangular solve ``nb^3``, product
    ``2 nb^3``); eigen-decomposition ``9 nb^3`` (tridiagonal reduction + vectors, the usual
    LAPACK estimate) and the square root ``2 nb^3`` per core fiber.
    """
    n3 = float(nb) ** 3
    m = nfp
    back = m - (nfp - nc) // 2                              # steps of the backward sweep
    return {
        "assembly": (2 * m - 1) * 2 * n3,
        "sweeps": (m + back) * (n3 / 3 + n3 + 2 * n3),
        "eigh": nc * (9 * n3 + 2 * n3),
    }


def _gemm_gflops() -> float:
    """float64 GEMM rate of one thread (the runs use one thread)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(2048, 2048, dtype=torch.float64)
        a @ a
        t0 = time.perf_counter()
        for _ in range(3):
            a @ a
        return 3 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(old)


def _copy_gbs() -> float:
    a = np.ones(64 * 1024 * 1024)                           # 512 MB
    b = np.empty_like(a)
    np.copyto(b, a)
    t0 = time.perf_counter()
    for _ in range(3):
        np.copyto(b, a)
    return 3 * 2 * a.nbytes / (time.perf_counter() - t0) / 1e9


# ----------------------------------------------------------------------------- speed


def _build_inputs(camera: str, out: Path) -> dict:
    from fiberlake.ingest.simulate import simulate_frame
    from fiberlake.processors import ccd, tracing
    from fiberlake.processors.psf import fit_psf
    from fiberlake.schemas.instrument import LAMOST

    night, seed = "2026-09-09", 77
    t = {}
    t0 = time.perf_counter()
    fr = {k: simulate_frame(LAMOST, camera, k, night=night, expid=2500001 + i, seed=seed)
          for i, k in enumerate(("FLAT", "ARC", "SCIENCE"))}
    params = ccd.CCDParams.from_header(fr["SCIENCE"].header)
    img = {k: ccd.preprocess(v.raw, params) for k, v in fr.items()}
    t["simulate+ccd"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    traces = tracing.trace_fibers(img["FLAT"].image, img["FLAT"].ivar, LAMOST.nominal_fiber_columns())
    t["trace"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    psf = fit_psf(img["FLAT"].image, img["FLAT"].ivar, img["FLAT"].mask, img["ARC"].image, img["ARC"].ivar,
                  img["ARC"].mask, traces)
    t["psf_fit"] = time.perf_counter() - t0
    sci = img["SCIENCE"]
    np.savez(out, image=sci.image, ivar=sci.ivar, mask=sci.mask,
             **{f"traces/{k}": v for k, v in traces.to_arrays().items()},
             **{f"psf/{k}": v for k, v in psf.to_arrays().items()})
    return {"times": t, "psf_info": psf.info}


def _load_inputs(path: Path):
    from fiberlake.schemas.containers import PSFModel, TraceSet

    z = dict(np.load(path))
    traces = TraceSet.from_arrays({k[7:]: v for k, v in z.items() if k.startswith("traces/")})
    psf = PSFModel.from_arrays({k[4:]: v for k, v in z.items() if k.startswith("psf/")})
    return z["image"], z["ivar"], z["mask"], traces, psf


def _deconv_module(rev: str):
    """``processors/deconv.py`` of this tree (``rev`` empty) or as it was at git revision ``rev``."""
    if not rev:
        from fiberlake.processors import deconv
        return deconv
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:processors/deconv.py"], capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="fl-deconv-rev-")) / f"deconv_{rev}.py"
    path.write_text(src)
    name = f"fiberlake_deconv_at_{rev}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _interleaved(args) -> None:
    """Every revision's ``deconv_extract`` in one process, interleaved, timed in CPU seconds.

    On a shared machine the wall time of runs made one after the other varies by tens of per
    cent with the other jobs; here each round runs every revision once, the stage timers of
    each module read ``time.process_time`` (this process's CPU time), and the best of the
    rounds after the first (the next frames of a calibration set) is reported. Code without
    the per-set PSF-sample cache runs two rounds only (every frame is its first).
    """
    import types

    import torch

    revs = args.rev.split(",")
    mods = {rev: _deconv_module(rev) for rev in revs}
    cpu_clock = types.SimpleNamespace(perf_counter=time.process_time)
    for D in mods.values():
        D.time = cpu_clock                                  # the modules' stage timers in CPU seconds
    image, ivar, mask, traces, psf = _load_inputs(Path(args.inputs))
    res: dict = {"what": "interleaved", "threads": torch.get_num_threads(),
                 "runs": {rev: {"cpu": [], "info": []} for rev in revs}}
    for rnd in range(args.rounds):
        for rev, D in mods.items():
            if rnd >= 2 and not hasattr(D, "psf_samples"):
                continue
            params = D.DeconvParams(device="cpu")
            t0 = time.process_time()
            out = D.deconv_extract(image, ivar, mask, traces, psf, params)
            res["runs"][rev]["cpu"].append(time.process_time() - t0)
            res["runs"][rev]["info"].append(out.info)
            if rnd == 0:
                np.savez(Path(args.inputs).with_name(f"out-torch{rev}.npz"), flux=out.flux, ivar=out.ivar,
                         res=out.resolution, mask=out.mask, chi2=out.chi2)
    print("RESULT " + json.dumps(res))


def _child(args) -> None:
    """Run one extraction on the saved inputs; print a JSON line."""
    import torch

    from fiberlake.processors.deconv_reference import solve_patches_reference

    D = _deconv_module(args.rev)
    image, ivar, mask, traces, psf = _load_inputs(Path(args.inputs))
    base = _rss_mb()
    params = D.DeconvParams(device="cuda" if args.what == "cuda" else "cpu")
    res: dict = {"what": args.what, "rev": args.rev, "threads": torch.get_num_threads()}
    if args.what == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.what == "numpy" and args.patches:
        # the reference on the first N patches only (same tables as the full run)
        t0 = time.perf_counter()
        tab = D.prepare(image, ivar, mask, traces, psf, params.pad_rows)
        D.set_model_weights(tab, D.row_fit(tab), D.read_noise_variance(tab.img, tab.w))
        plan = D.plan_patches(traces.n_fibers, image.shape[0], params)
        t1 = time.perf_counter()
        sel = np.arange(min(args.patches, plan.n_patches))
        solve_patches_reference(tab, plan, sel, regularize=params.regularize, halfwidth=params.resolution_halfwidth)
        t2 = time.perf_counter()
        res.update(seconds=(t1 - t0) + (t2 - t1) * plan.n_patches / sel.size, measured_patches=int(sel.size),
                   n_patches=plan.n_patches, t_solve_measured=t2 - t1, t_prepare=t1 - t0)
    else:
        t0 = time.perf_counter()
        backend = "numpy" if args.what == "numpy" else "torch"
        out = D.deconv_extract(image, ivar, mask, traces, psf, params, backend=backend)
        res["seconds"] = time.perf_counter() - t0
        res["info"] = out.info
        if args.what != "numpy" and not hasattr(D, "psf_samples"):
            # code without the per-set PSF samples does the same work on every frame
            res.update(seconds_next=res["seconds"], info_next=out.info, same_next="no cache: the first frame's")
        elif args.what != "numpy":
            # the next frame of the same calibration set: its PSF samples are reused
            t0 = time.perf_counter()
            again = D.deconv_extract(image, ivar, mask, traces, psf, params, backend=backend)
            res["seconds_next"] = time.perf_counter() - t0
            res["info_next"] = again.info
            res["same_next"] = bool(np.array_equal(again.flux, out.flux) and np.array_equal(again.mask, out.mask))
        np.savez(Path(args.inputs).with_name(f"out-{args.what}{args.rev}.npz"), flux=out.flux, ivar=out.ivar,
                 res=out.resolution, mask=out.mask, chi2=out.chi2)
    res["peak_mb"] = _rss_mb() - base
    if args.what == "cuda":
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(res))


def _spawn(what: str, inputs: Path, patches: int = 0, rev: str = "", rounds: int = 3) -> dict:
    cmd = [sys.executable, __file__, "_run", "--what", what, "--inputs", str(inputs), "--patches", str(patches),
           "--rev", rev, "--rounds", str(rounds)]
    # one thread for every path (BLAS of numpy/scipy included): on a shared 2-core machine more
    # threads than free cores make batched small-matrix LAPACK calls 4-40x slower
    env = os.environ.copy() | {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{what} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def _shapes(inputs: Path, n_fibers: int = 50) -> list[dict]:
    """Time the torch path for several patch shapes on the first ``n_fibers`` fibers, and the
    change of the fluxes against a 30-row pad (rms in sigma, away from ``BAD2DFIT`` bins)."""
    from scipy.ndimage import binary_dilation

    from fiberlake.processors import deconv as D
    from fiberlake.schemas.containers import TraceSet

    image, ivar, mask, traces, psf = _load_inputs(inputs)
    order = np.argsort(np.median(traces.x(), axis=1))[:n_fibers]
    sub = TraceSet(traces.coeffs[order], traces.ny, traces.dead[order], traces.rms[order], traces.sigma[order])
    ncol = int(np.ceil(traces.x()[order].max())) + 20
    img, iv, msk = image[:, :ncol], ivar[:, :ncol], mask[:, :ncol]
    ny = image.shape[0]
    ref = D.deconv_extract(img, iv, msk, sub, psf, D.DeconvParams(pad_rows=30, device="cpu"))
    away = ~binary_dilation((ref.mask & 2048) > 0, structure=np.ones((1, 41))) & (ref.ivar > 0)
    rows = []
    for nc, nbc, pad in ((5, 50, 10), (25, 50, 10), (10, 30, 10), (5, 20, 10), (25, 25, 8), (50, 30, 10)):
        p = D.DeconvParams(fibers_per_patch=nc, rows_per_patch=nbc, pad_rows=pad, device="cpu")
        t0 = time.perf_counter()
        out = D.deconv_extract(img, iv, msk, sub, psf, p)
        dt = time.perf_counter() - t0
        plan = D.plan_patches(n_fibers, ny, p)
        fl = patch_flops(plan.fibers.shape[1], plan.nb, nc, psf.lsf.halfwidth)
        z = ((out.flux - ref.flux) * np.sqrt(ref.ivar))[away & (out.ivar > 0)]
        rows.append({"shape": f"{nc}(+{p.overlap_fibers}) x {nbc}(+{pad})", "unknowns": plan.fibers.shape[1] * plan.nb,
                     "patches": plan.n_patches, "seconds": dt, "solve_s": out.info["t_solve"],
                     "unknowns_per_s": n_fibers * ny / dt,
                     "gflop": plan.n_patches * sum(fl.values()) / 1e9, "rms_sigma": float(np.sqrt(np.mean(z**2)))})
    return rows


def _eigh_us(nb: int, n: int = 640) -> float:
    """Microseconds per batched float64 eigen-decomposition (values and vectors) of ``nb x nb``
    matrices with a deconvolution-like spectrum (1e-10 .. 1), one thread."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        q, _ = np.linalg.qr(rng.normal(size=(n, nb, nb)))
        a = torch.as_tensor((q * np.logspace(-10, 0, nb)) @ q.transpose(0, 2, 1))
        torch.linalg.eigh(a[:64])
        t0 = time.perf_counter()
        torch.linalg.eigh(a)
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        torch.set_num_threads(old)


def speed(args) -> None:
    import torch

    from fiberlake.processors import deconv as D

    tmp = Path(tempfile.mkdtemp(prefix="fl-deconv-bench-"))
    inputs = tmp / "inputs.npz"
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__} threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}; CUDA: {torch.cuda.is_available()}")
    built = _build_inputs(args.camera, inputs)
    print("inputs: " + ", ".join(f"{k} {v:.1f} s" for k, v in built["times"].items())
          + f"; PSF from {built['psf_info']['n_lsf_lines']} arc lines, "
          f"{built['psf_info']['n_xsf_samples']} flat profiles")
    gemm, copy = _gemm_gflops(), _copy_gbs()
    p = D.DeconvParams()
    image = np.load(inputs)["image"]
    ny, nx = image.shape
    plan = D.plan_patches(250, ny, p)
    nfp, nb = plan.fibers.shape[1], plan.nb
    eigh_us = _eigh_us(nb)
    revs = [r for r in args.before.split(",") if r]
    if revs:
        # before/after: every revision in one process, interleaved, in CPU seconds (see _interleaved)
        inter = _spawn("interleaved", inputs, rev=",".join([args.after] + revs), rounds=args.rounds)
        runs = []
        for rev, r in inter["runs"].items():
            cached = "t_psf_samples" in r["info"][0]         # else every frame is a first frame
            nxt = int(np.argmin(r["cpu"][1:])) + 1 if cached else int(np.argmin(r["cpu"]))
            runs.append({"what": "torch", "rev": rev, "seconds": r["cpu"][0], "info": r["info"][0],
                         "seconds_next": r["cpu"][nxt], "info_next": r["info"][nxt], "peak_mb": float("nan"),
                         "same_next": f"CPU s, best of rounds {2 if cached else 1}-{len(r['cpu'])}: "
                                      + ", ".join(f"{c:.1f}" for c in r["cpu"])})
    else:
        runs = [_spawn("torch", inputs, rev=args.after)]
    runs.append(_spawn("numpy", inputs, args.reference_patches))
    if torch.cuda.is_available():
        runs.append(_spawn("cuda", inputs))
    gemm_end = _gemm_gflops()
    eigh_us = min(eigh_us, _eigh_us(nb))
    gemm = max(gemm, gemm_end)                              # the less disturbed of the two: a lower floor
    fl = patch_flops(nfp, nb, p.fibers_per_patch, 8)
    total_flop = plan.n_patches * sum(fl.values())
    bytes_moved = ny * nx * (4 + 4 + 4) + 250 * ny * (4 + 4 + 4 + 4 * (2 * p.resolution_halfwidth + 1))
    floor_s = total_flop / (gemm * 1e9) + bytes_moved / (copy * 1e9)
    n_eigh = plan.n_patches * p.fibers_per_patch
    print(f"\nfull frame 250 fibers x {ny} rows, {plan.n_patches} patches of {nfp} x {nb} = {nfp * nb} unknowns "
          f"(core {p.fibers_per_patch} x {p.rows_per_patch}); load average {os.getloadavg()[0]:.1f} at the end")
    print(f"floor (one thread): {total_flop / 1e9:.0f} GFLOP of patch solves "
          f"(assembly {plan.n_patches * fl['assembly'] / 1e9:.0f}, "
          f"sweeps {plan.n_patches * fl['sweeps'] / 1e9:.0f}, eigh+sqrt {plan.n_patches * fl['eigh'] / 1e9:.0f}) at the "
          f"measured float64 GEMM rate {gemm:.1f} GFLOP/s (the better of before and after the runs) = "
          f"{total_flop / gemm / 1e9:.2f} s, plus {bytes_moved / 1e6:.0f} MB in and out (frame f32 x3, products) "
          f"at {copy:.1f} GB/s = {bytes_moved / copy / 1e9:.2f} s: floor {floor_s:.2f} s")
    print(f"the {n_eigh} eigen-decompositions ({nb} x {nb}, LAPACK syevd through torch, batched) alone take "
          f"{eigh_us:.0f} us each = {n_eigh * eigh_us / 1e6:.1f} s = {n_eigh * eigh_us / 1e6 / floor_s:.1f}x the floor "
          f"(the floor counts them at {plan.n_patches * fl['eigh'] / gemm / 1e9:.1f} s)")

    def label(r):
        name = {"torch": "torch CPU (1 thread)", "cuda": "torch CUDA", "numpy": "numpy/scipy reference (1 thread)"}[r["what"]]
        if r.get("rev") and r["rev"] != args.after:
            name += f" @ {r['rev']} (before)"
        elif r["what"] == "torch":
            name += f" @ {args.after} (after)" if args.after else ", this tree (after)"
        if r.get("measured_patches"):
            name += f" [{r['measured_patches']} patches, scaled]"
        return name
    width = max(len(label(r)) for r in runs) + 2
    print(f"\n{'path':<{width}}{'s/frame':>9}{'x floor':>9}{'next frame':>12}{'x floor':>9}{'peak MB':>9}")
    for r in runs:
        mem = r["peak_mb"] if r["what"] != "cuda" else r["cuda_peak_mb"]
        nxt = r.get("seconds_next")
        nxt_s = f"{nxt:>12.1f}{nxt / floor_s:>8.1f}x" if nxt else f"{'':>12}{'':>9}"
        print(f"{label(r):<{width}}{r['seconds']:>9.1f}{r['seconds'] / floor_s:>8.1f}x{nxt_s}{mem:>9.0f}")
    print("\nsplit (s; first frame of a calibration set / next frame, PSF samples reused where the code caches them):")
    print(f"{'path':<{width}}{'PSF samples':>13}{'prepare':>10}{'variance':>10}{'solves':>10}{'flags/chi2':>12}")
    for r in runs:
        if "info" not in r or r["what"] == "numpy":
            continue
        for key, tag in (("info", "first"), ("info_next", "next")):
            t = r.get(key)
            if not t:
                continue
            print(f"{label(r) + ', ' + tag:<{width + 7}}{t.get('t_psf_samples', float('nan')):>6.1f}"
                  f"{t['t_prepare'] - t.get('t_psf_samples', 0.0):>10.1f}{t['t_weights']:>10.1f}{t['t_solve']:>10.1f}"
                  f"{t['t_finish']:>12.1f}")
        solve = r["info_next"]["t_solve"] if "info_next" in r else r["info"]["t_solve"]
        print(f"{'':<{width + 7}}patch solves at {total_flop / solve / 1e9:.1f} GFLOP/s = "
              f"{total_flop / solve / 1e9 / gemm:.0%} of 1-thread GEMM; the eigen-decompositions' share at the "
              f"rate above {n_eigh * eigh_us / 1e6 / solve:.0%}; next frame: {r.get('same_next')}")
    after = np.load(tmp / f"out-torch{args.after}.npz")
    others = [(f"main @ {r}", tmp / f"out-torch{r}.npz") for r in revs] + [("numpy reference", tmp / "out-numpy.npz"),
                                                                        ("CUDA", tmp / "out-cuda.npz")]
    for name, path in others:
        if not path.exists():
            continue
        b = np.load(path)
        scale = np.abs(b["flux"]).max()
        live = b["ivar"] > 0
        print(f"this tree vs {name}: max |d flux| / max flux {np.abs(after['flux'] - b['flux']).max() / scale:.1e}, "
              f"max |d ivar| / ivar {np.max(np.abs(after['ivar'] - b['ivar'])[live] / b['ivar'][live]):.1e}, "
              f"max |d R| {np.abs(after['res'] - b['res']).max():.1e}, masks equal {np.array_equal(after['mask'], b['mask'])}")
    if not args.no_shapes:
        print("\npatch shapes (torch CPU, first 50 fibers x all rows):")
        print(f"{'core(+overlap) x rows(+pad)':<30}{'unknowns':>9}{'patches':>9}{'s':>8}{'solve s':>9}"
              f"{'unknowns/s':>12}{'GFLOP':>8}{'d vs pad 30':>13}")
        for r in _shapes(inputs):
            print(f"{r['shape']:<30}{r['unknowns']:>9}{r['patches']:>9}{r['seconds']:>8.1f}{r['solve_s']:>9.1f}"
                  f"{r['unknowns_per_s']:>12.0f}{r['gflop']:>8.1f}{r['rms_sigma']:>10.3f} sd")


# ----------------------------------------------------------------------------- accuracy


def accuracy(args) -> None:  # noqa: C901 - one report, step by step
    from fiberlake.ingest.simulate import make_expid, simulate_frame
    from fiberlake.processors import ccd
    from fiberlake.processors import deconv as D
    from fiberlake.processors import extract as E
    from fiberlake.processors import psf as P
    from fiberlake.processors.params import ReductionParams
    from fiberlake.processors.pipeline import build_calibration, master_frame
    from fiberlake.schemas.instrument import MINI
    from fiberlake.schemas.maskbits import Mask

    seed, night = args.seed, "2026-10-10"
    # the raw (unrectified) frame: the simulator's truth PSF and traces refer to it
    rp = ReductionParams().updated({"extractions": ("deconv",), "cosmics.enabled": False, "rectify.enabled": False})
    h = D.DeconvParams().resolution_halfwidth
    print(f"held-out mini night {night}, seed {seed} (no test uses it)\n")
    for camera in ("b1", "r1"):
        rng = np.random.default_rng(seed)
        fr = {}
        for i, k in enumerate(("BIAS", "BIAS", "FLAT", "FLAT", "ARC", "ARC")):
            fr.setdefault(k, []).append(simulate_frame(MINI, camera, k, night=night, expid=make_expid(night, i + 1),
                                                       seed=seed))
        params = ccd.CCDParams.from_header(dict(fr["FLAT"][0].header), saturation=65535)
        calib = build_calibration([f.raw for f in fr["BIAS"]], [f.raw for f in fr["FLAT"]], [fr["ARC"][0].raw],
                                  params, MINI, camera[0], rp)
        cam, traces, psf = fr["FLAT"][0].camera, calib.traces, calib.psf
        flat = master_frame([f.raw for f in fr["FLAT"]], params, calib.master_bias, rp.ccd.combine_sigma)
        arc1 = master_frame([fr["ARC"][0].raw], params, calib.master_bias, rp.ccd.combine_sigma)
        inv = P.fit_psf(flat.image, flat.ivar, flat.mask, arc1.image, arc1.ivar, arc1.mask, traces, invariant=True)
        gauss = P.fit_psf(flat.image, flat.ivar, flat.mask, arc1.image, arc1.ivar, arc1.mask, traces, order=0)
        print(f"== camera {camera}: PSF from {psf.info['n_lsf_lines']} arc lines and {psf.info['n_xsf_samples']} "
              f"flat profiles; sigma scatter about the model: LSF {psf.info['lsf_sigma_rms']:.3%}, "
              f"profile {psf.info['xsf_sigma_rms']:.3%}")

        # held-out arc exposure: isolated, unsaturated lines from its truth
        arc2 = master_frame([fr["ARC"][1].raw], params, calib.master_bias, rp.ccd.combine_sigma)
        t2 = fr["ARC"][1].truth
        line_row = t2["LINE_ROW"]
        fib, row = [], []
        for f in np.flatnonzero(~traces.dead):
            r = line_row[f]
            for j, rj in enumerate(r):
                if not 10 <= rj < MINI.ny - 10 or np.sum(np.abs(r - rj) < 16) > 1:
                    continue
                box = arc2.mask[int(rj) - 8:int(rj) + 9]
                if np.any(box[:, max(0, int(cam.trace_x[f, int(rj)]) - 8):int(cam.trace_x[f, int(rj)]) + 9]):
                    continue
                fib.append(f)
                row.append(rj)
        fib, row = np.array(fib), np.array(row)
        from_truth = _truth_stamp(cam)
        res = {name: P.arc_line_residuals(arc2.image, arc2.ivar, arc2.mask, traces, fib, row, stamp)
               for name, stamp in (("fitted (GH 8, deg 2)", P.psf_stamp(psf, traces)),
                                   ("invariant", P.psf_stamp(inv, traces)),
                                   ("Gaussian (order 0)", P.psf_stamp(gauss, traces)),
                                   ("simulator truth", from_truth))}
        bright = res["simulator truth"]["snr"] > np.percentile(res["simulator truth"]["snr"], 75)
        print(f"held-out arc lines ({fib.size} lines, 2D stamps): chi^2/dof median (brightest quarter), "
              f"RMS of residual/noise")
        for name, r in res.items():
            print(f"  {name:<24}{np.median(r['chi2']):>7.2f} ({np.median(r['chi2'][bright]):.2f})"
                  f"{np.median(r['rms']):>8.2f}")

        # pulls on frames rendered from known pre-LSF spectra with the pipeline's traces and PSF
        mags = np.linspace(13.0, 18.5, MINI.n_fibers)[rng.permutation(MINI.n_fibers)]
        binned = _science_binned(cam, rng, mags)
        expected = cam.render(cam.throughput[:, None] * cam.convolve_lsf(binned))
        F = cam.throughput[:, None] * binned[:, cam.margin - h:cam.margin + MINI.ny + h]
        pulls = []
        for _ in range(3):
            obs, iv = _observe(expected, rng)
            out = D.deconv_extract(obs, iv, None, traces, psf)
            p = (out.flux - D.apply_resolution(out.resolution, F)) * np.sqrt(out.ivar)
            pulls.append(np.where(out.ivar > 0, p, np.nan))
        live = ~traces.dead
        p = np.concatenate(pulls, axis=1)[live]
        m, s = np.nanmean(p, axis=1), np.nanstd(p, axis=1)
        print(f"pulls (flux - R F)/sigma, {live.sum()} live fibers x {p.shape[1]} rows: all {np.nanmean(p):+.3f} "
              f"/ {np.nanstd(p):.3f}; per-fiber mean in [{m.min():+.2f}, {m.max():+.2f}], std in "
              f"[{s.min():.2f}, {s.max():.2f}]")
        order = np.argsort(mags[live])
        print("  by magnitude: " + ", ".join(f"r={mags[live][i]:.1f}: {m[i]:+.2f}/{s[i]:.2f}" for i in order[::4]))

        # effective resolution: FWHM of isolated unresolved lines, alone (their own photon noise
        # dominates their pixels) and on a continuum ten times brighter than their peak rows
        lines = _line_rows(cam, rng)
        for label, cont in (("bright lines on a dark background", 0.0), ("lines on a bright continuum", 5.0e5)):
            e_lines = cam.render(cam.throughput[:, None] * (lines + cam.convolve_lsf(np.full_like(binned, cont))))
            obs, iv = _observe(e_lines, rng)
            ext = {"box": E.box_extract(obs, iv, None, traces), "optimal": E.optimal_extract(obs, iv, None, traces),
                   "deconv": D.deconv_extract(obs, iv, None, traces, psf)}
            fw = {k: [] for k in ext}
            for f in np.flatnonzero(live):
                pk = np.flatnonzero((lines[f][1:-1] > lines[f][:-2]) & (lines[f][1:-1] >= lines[f][2:])
                                    & (lines[f][1:-1] > 1e4)) + 1
                for r in pk[(pk > 12) & (pk < MINI.ny - 12)]:
                    for k, v in ext.items():
                        y = v.flux[f] - np.median(v.flux[f][r - 15:r + 16])
                        fw[k].append(_fwhm(y, r))
            fw = {k: np.array(v) for k, v in fw.items()}
            q = fw["deconv"] / fw["optimal"]
            q = q[np.isfinite(q)]
            print(f"FWHM of {q.size} isolated lines (rows), {label}: box {np.nanmedian(fw['box']):.3f}, optimal "
                  f"{np.nanmedian(fw['optimal']):.3f}, deconv {np.nanmedian(fw['deconv']):.3f} (deconv/optimal "
                  f"{np.median(q):.3f}, 10-90% {np.percentile(q, 10):.3f}-{np.percentile(q, 90):.3f})")

        # crosstalk: every third fiber bright, the others dark
        bright_f = np.arange(1, MINI.n_fibers, 3)
        thr = np.where(np.isin(np.arange(MINI.n_fibers), bright_f), cam.throughput, 0.0)
        lvl = np.full_like(binned, 2.0e5)
        e_x = cam.render(thr[:, None] * cam.convolve_lsf(lvl))
        dark = np.setdiff1d(np.flatnonzero(live), bright_f)
        sl = slice(20, -20)
        for label, (img, ivx) in (("noiseless", (e_x, 1.0 / (12.25 + e_x))), ("noisy", _observe(e_x, rng))):
            ext = {"box": E.box_extract(img, ivx, None, traces), "optimal": E.optimal_extract(img, ivx, None, traces),
                   "deconv": D.deconv_extract(img, ivx, None, traces, psf)}
            ref = np.median(ext["deconv"].flux[bright_f][:, sl])
            print(f"crosstalk into dark neighbours ({label}): " + ", ".join(
                f"{k} {np.mean(v.flux[dark][:, sl]) / ref:+.1e} "
                f"(|.| {np.median(np.abs(v.flux[dark][:, sl])) / ref:.1e})"
                for k, v in ext.items()))

        # bad data: masked block, NaN, dead fiber, CCD edges
        obs, iv = _observe(expected, rng)
        f0 = int(np.flatnonzero(live)[len(np.flatnonzero(live)) // 2])
        x = int(round(cam.trace_x[f0, 500]))
        obs[500:506, x - 13:x + 14] = np.nan
        mask = np.zeros(obs.shape, np.uint32)
        mask[600, x - 1:x + 2] = Mask.COSMIC
        out = D.deconv_extract(obs, iv, mask, traces, psf)
        pb = (out.flux - D.apply_resolution(out.resolution, F)) * np.sqrt(out.ivar)
        near = np.zeros_like(out.ivar, bool)
        near[f0, 490:516] = True
        near[f0, 592:609] = True
        ok = (out.ivar > 0) & near
        edge = np.zeros_like(near)
        edge[:, :3] = edge[:, -3:] = True
        edge &= out.ivar > 0
        print(f"bad data: NaN block -> {int(np.sum(out.mask[f0] & Mask.ALLBADPIX > 0))} bins ALLBADPIX (ivar 0); "
              f"{int(np.sum(out.mask & Mask.SOMEBADPIX > 0))} SOMEBADPIX; pulls of usable bins next to them "
              f"{np.mean(pb[ok]):+.2f}/{np.std(pb[ok]):.2f} (n={ok.sum()}); dead fibers {np.flatnonzero(traces.dead)} "
              f"all DEADFIBER: {bool(np.all(out.mask[traces.dead] & Mask.DEADFIBER))}; first/last 3 rows: "
              f"{edge.sum()} usable, pulls {np.mean(pb[edge]):+.2f}/{np.std(pb[edge]):.2f}; "
              f"NaN in outputs: {bool(np.isnan(out.flux).any() or np.isnan(out.ivar).any())}\n")


def _observe(expected, rng, read_noise=3.5):
    obs = rng.poisson(np.clip(expected, 0, None)).astype(float) + rng.normal(0.0, read_noise, expected.shape)
    return obs, 1.0 / (read_noise**2 + np.clip(obs, 0, None))


def _science_binned(cam, rng, mags, exptime=1200.0, n_lines=40):
    grid = cam.fine_grid
    w = grid.wave
    lo, hi = float(cam.wave.min()), float(cam.wave.max())
    t = (w - lo) / (hi - lo)
    spec = np.empty((mags.size, w.size))
    for f in range(mags.size):
        s = 1.0 + 0.3 * np.sin(2 * np.pi * (t * rng.uniform(1, 3) + rng.uniform()))
        for _ in range(n_lines):
            c, width, a = rng.uniform(lo, hi), rng.uniform(0.05, 1.0), rng.uniform(-0.6, 2.0)
            s += a * np.exp(-0.5 * ((w - c) / width) ** 2)
        spec[f] = np.clip(s, 0.02, None)
    return cam.bin_continuum(grid, spec * (1.5 * 10 ** (-0.4 * (mags - 16.0)) * exptime)[:, None])


def _line_rows(cam, rng, spacing=30):
    ny = cam.instrument.ny
    rows = np.arange(15, ny - 15, spacing) + rng.uniform(-4, 4, size=len(range(15, ny - 15, spacing)))
    wave = np.interp(rows, np.arange(ny), cam.wave[cam.instrument.n_fibers // 2])
    return cam.deposit_lines(wave, rng.uniform(5e4, 3e5, size=wave.size))


def _fwhm(y, r):
    """Full width at half maximum (rows) of the peak nearest row ``r`` (NaN if not inside +-8)."""
    seg = y[r - 8:r + 9]
    k = int(np.argmax(seg))
    half = seg[k] / 2
    i0 = k
    while i0 > 0 and seg[i0 - 1] >= half:
        i0 -= 1
    i1 = k
    while i1 < seg.size - 1 and seg[i1 + 1] >= half:
        i1 += 1
    if i0 == 0 or i1 == seg.size - 1:
        return np.nan
    left = i0 - (seg[i0] - half) / (seg[i0] - seg[i0 - 1])
    right = i1 + (seg[i1] - half) / (seg[i1] - seg[i1 + 1])
    return right - left


def _truth_stamp(cam):
    from fiberlake.ingest.sim_optics import pixel_weights

    ratio, ny = cam.params.wing_sigma_ratio, cam.instrument.ny

    def stamp(f, centre, r0, r1, c0, c1):
        ci = int(np.clip(np.rint(centre), 0, ny - 1))
        lw = pixel_weights(np.arange(r0, r1) - centre, cam.sigma_y[f, ci], cam.wing_frac[f, ci], cam.wing_dy[f, ci],
                           ratio, dtype=np.float64)
        rows = np.arange(r0, r1)
        relc = np.arange(c0, c1)[None, :] - cam.trace_x[f, rows][:, None]
        xw = pixel_weights(relc, cam.sigma_x[f, rows], cam.wing_frac[f, rows], cam.wing_dx[f, rows], ratio,
                           dtype=np.float64)
        return lw[:, None] * xw
    return stamp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--camera", default="b1")
    s.add_argument("--reference-patches", type=int, default=0,
                   help="time the numpy reference on this many patches only (0: the whole frame)")
    s.add_argument("--no-shapes", action="store_true")
    s.add_argument("--rounds", type=int, default=3, help="rounds of the interleaved before/after runs")
    s.add_argument("--after", default="", help="git revision of processors/deconv.py for the 'after' run "
                   "(default: this tree)")
    s.add_argument("--before", default="",
                   help="comma-separated git revisions whose processors/deconv.py also runs (before/after)")
    a = sub.add_parser("accuracy")
    a.add_argument("--seed", type=int, default=4242)
    r = sub.add_parser("_run")
    r.add_argument("--what", required=True)
    r.add_argument("--inputs", required=True)
    r.add_argument("--patches", type=int, default=0)
    r.add_argument("--rev", default="")
    r.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.cmd == "_run" and args.what == "interleaved":
        _interleaved(args)
        return
    {"speed": speed, "accuracy": accuracy, "_run": _child}[args.cmd](args)


if __name__ == "__main__":
    main()
