"""Aberration correction cost on a full-size LAMOST frame (4096 x 4096, 250 fibers).

Usage: ``python bench/rectify.py [--camera b1] [--repeat 2] [--skip-mlp]``

Simulates one full-size science frame (and takes the camera's true traces, fitted with Legendre
series as a traced flat would give, as the map's input), then times in the same run:

* building the ~30,000 samples and TLS labels (eq. 13 sampling);
* training the map: the 2D Legendre warp (numpy least squares) and the paper's 2-20-2 MLP
  (torch, 50 epochs of batches of 600, forward and inverse nets) on CPU;
* evaluating each map on every pixel corner (16.8 M points);
* fiberlake's flux-conserving two-pass rectification of image + ivar + mask (cubic and linear
  cumulative interpolation);
* the baseline: ``scipy.ndimage.map_coordinates`` doing the same resampling in the usual way
  (inverse map evaluated at every output pixel, interpolation, times the Jacobian determinant
  to keep counts), on the image alone and on image + variance + mask, at order 1 and 3 (the
  coordinates are timed apart);
* the paper's own application (section 4.1: the 15 pixels across each trace copied to the
  nearest mapped pixel, the others left as they were);
* with a CUDA device (torch), the MLP training and evaluation there too.

It prints seconds, ratios to ``map_coordinates`` (order 1, image only) and how well each keeps
the total flux of the frame and how far it lands from fiberlake's output on bright pixels.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from timing import best_of  # bench/timing.py (scripts run from bench/)


def source_coordinates(rmap, ny: int, nx: int):
    """Inverse map at every output pixel centre, and the Jacobian determinant of that inverse."""
    src_c, src_r = rmap.inverse_grid(np.arange(nx, dtype=float), np.arange(ny, dtype=float))
    jac = np.abs(np.gradient(src_c, axis=1) * np.gradient(src_r, axis=0)
                 - np.gradient(src_c, axis=0) * np.gradient(src_r, axis=1))
    return np.array([src_r, src_c]), jac


def map_coordinates_rectify(image, var, mask, coords, jac, order: int, with_var_mask: bool):
    """The classical resampling: pull every output pixel from its inverse-mapped input position,
    times the Jacobian determinant (counts = surface brightness x area)."""
    from scipy import ndimage

    out = ndimage.map_coordinates(image, coords, order=order, mode="constant", cval=0.0) * jac
    if not with_var_mask:
        return out, None, None
    v = ndimage.map_coordinates(var, coords, order=1, mode="constant", cval=0.0) * jac**2
    m = ndimage.map_coordinates(mask, coords, order=0, mode="constant", cval=0)
    return out, v, m


def paper_pixel_copy(image, rmap, xtrace, half: int = 7):
    """Seed 000's application (section 4.1): the 2 x 7 + 1 pixels across each trace are sent
    through the map and copied to the nearest output pixel; every other pixel keeps its value."""
    ny, nx = image.shape
    out = image.copy()
    rows = np.arange(ny)
    cols = np.rint(xtrace).astype(np.int64)[:, :, None] + np.arange(-half, half + 1)  # (nf, ny, 15)
    rr = np.broadcast_to(rows[None, :, None], cols.shape)
    ok = (cols >= 0) & (cols < nx)
    c, r = cols[ok].astype(float), rr[ok].astype(float)
    tc, tr = rmap.forward(c, r)
    tc, tr = np.rint(tc).astype(np.int64), np.rint(tr).astype(np.int64)
    inside = (tc >= 0) & (tc < nx) & (tr >= 0) & (tr < ny)
    out[tr[inside], tc[inside]] = image[r.astype(np.int64)[inside], c.astype(np.int64)[inside]]
    hits = np.bincount(tr[inside] * nx + tc[inside], minlength=ny * nx)
    band = np.zeros(ny * nx, bool)
    band[(r.astype(np.int64) * nx + c.astype(np.int64))] = True
    return out, float(np.mean(hits[band] == 0)), float(np.mean(hits[band] > 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--camera", default="b1")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-mlp", action="store_true", help="no MLP training (no torch)")
    args = parser.parse_args()

    from numpy.polynomial import legendre

    from fiberlake.ingest.simulate import simulate_frame
    from fiberlake.processors import ccd
    from fiberlake.processors.rectify import rectify_image
    from fiberlake.processors.rectify_map import Frame, MapConfig, fit_map
    from fiberlake.processors.rectify_sampling import build_training_set
    from fiberlake.schemas.containers import TraceSet
    from fiberlake.schemas.instrument import LAMOST

    t0 = time.perf_counter()
    sci = simulate_frame(LAMOST, args.camera, "SCIENCE", night="2026-11-21", expid=2150010, seed=1)
    params = ccd.CCDParams.from_header(sci.header)
    img = ccd.preprocess(sci.raw, params, cosmics=False)
    cam = sci.camera
    ny, nx = img.image.shape
    u = 2 * np.arange(ny) / (ny - 1) - 1
    traces = TraceSet(coeffs=legendre.legfit(u, cam.trace_x.T, 6).T, ny=ny, dead=cam.dead.copy(),
                      rms=np.zeros(LAMOST.n_fibers))
    print(f"simulated a {ny}x{nx} {args.camera} science frame in {time.perf_counter() - t0:.0f} s")
    frame = Frame(ny, nx)
    var = np.where(img.ivar > 0, 1 / np.where(img.ivar > 0, img.ivar, 1), 0).astype(np.float32)

    rows = []
    t_samp, ts = best_of(lambda: build_training_set(traces, 30000, "semicircle"), args.repeat)
    rows.append(("samples + TLS labels (30,000)", t_samp, ""))
    maps = {}
    t_leg, maps["legendre"] = best_of(lambda: fit_map(ts.inputs(), ts.targets(), frame, MapConfig(kind="legendre")),
                                    args.repeat)
    rows.append(("train legendre (fwd + inv)", t_leg, f"label rms {maps['legendre'].info['fwd_rms']:.4f} px"))
    if not args.skip_mlp:
        t_mlp, maps["mlp"] = best_of(lambda: fit_map(ts.inputs(), ts.targets(), frame,
                                                   MapConfig(kind="mlp", device="cpu")), 1)
        rows.append(("train mlp 2-20-2, CPU (fwd + inv)", t_mlp, f"label rms {maps['mlp'].info['fwd_rms']:.4f} px"))
    edges_c = np.arange(nx + 1) - 0.5
    edges_r = np.arange(ny + 1) - 0.5
    for kind, m in maps.items():
        t_eval, _ = best_of(lambda: m.forward_grid(edges_c, edges_r), 1)
        rows.append((f"evaluate {kind} on 16.8 M pixel corners", t_eval, ""))

    total = float(np.sum(img.image))
    ref = None
    for kind, m in maps.items():
        for order in ((3, 1) if kind == "legendre" else (3,)):
            t, out = best_of(lambda: rectify_image(img.image, img.ivar, img.mask, m, order=order), args.repeat)
            good = out.ivar > 0
            rows.append((f"fiberlake rectify ({kind}, order {order}): image+ivar+mask", t,
                         f"flux kept {out.image.sum() / total:.6f}; masked {100 * (~good).mean():.2f} %"))
            if kind == "legendre" and order == 3:
                ref = out.image.astype(float)
            del out
    t_coord, (coords, jac) = best_of(lambda: source_coordinates(maps["legendre"], ny, nx), 1)
    rows.append(("inverse legendre map + Jacobian at 16.8 M pixel centres", t_coord, "(map_coordinates needs it)"))
    bright = ref > np.percentile(ref, 95)
    base = None
    for order in (1, 3):
        t_img, (out, _, _) = best_of(lambda: map_coordinates_rectify(img.image, var, img.mask, coords, jac, order, False),
                                   args.repeat)
        t_all, _ = best_of(lambda: map_coordinates_rectify(img.image, var, img.mask, coords, jac, order, True), 1)
        dev = np.median(np.abs(out[bright] - ref[bright]) / ref[bright])
        rows.append((f"map_coordinates order {order}: image only", t_img,
                     f"flux kept {out.sum() / total:.6f}; median |diff| vs fiberlake {100 * dev:.3f} % (bright px)"))
        rows.append((f"map_coordinates order {order}: image+var+mask", t_all, ""))
        base = base or t_img
    t_copy, (out, holes, dup) = best_of(lambda: paper_pixel_copy(img.image, maps["legendre"], cam.trace_x), 1)
    dev = np.median(np.abs(out[bright] - ref[bright]) / ref[bright])
    rows.append(("paper's pixel copy (15 px per trace, nearest)", t_copy,
                 f"flux kept {out.sum() / total:.6f}; band px never written {100 * holes:.1f} %, "
                 f"written twice+ {100 * dup:.1f} %; median |diff| vs fiberlake {100 * dev:.3f} %"))
    del out

    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda and not args.skip_mlp:
        torch.cuda.synchronize()
        t_gpu, m_gpu = best_of(lambda: fit_map(ts.inputs(), ts.targets(), frame, MapConfig(kind="mlp", device="cuda")), 1)
        rows.append(("train mlp 2-20-2, CUDA (fwd + inv)", t_gpu, f"label rms {m_gpu.info['fwd_rms']:.4f} px"))
    else:
        rows.append(("CUDA: no device (torch sees none); GPU lines skipped", float("nan"), ""))

    width = max(len(r[0]) for r in rows)
    print(f"{'step':<{width}}  {'seconds':>8}  {'/ map_coord o1':>14}  notes")
    for name, t, note in rows:
        ratio = t / base if np.isfinite(t) else float("nan")
        print(f"{name:<{width}}  {t:8.2f}  {ratio:14.2f}  {note}")


if __name__ == "__main__":
    main()
