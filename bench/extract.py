"""Extraction speed on a full-size LAMOST frame (250 fibers x 4096 rows).

Usage: ``python bench/extract.py [--camera r1] [--repeat 2]``

Simulates a flat and a science frame of one full-size camera, traces the flat, then times in the
same run:

* box and optimal (Horne 1986, with neighbour deblending) extraction of fiberlake, vectorized
  over fibers and rows;
* plain numpy references of the same two estimators written the obvious way (a Python loop over
  fibers, numpy over rows and the aperture; Gaussian profile, no deblending, no rejection).

It prints spectra per second and the speed-up over the reference, plus the agreement of the
fluxes (median |fiberlake - reference| / reference on bright fibers).
"""

from __future__ import annotations

import argparse

import numpy as np
from timing import best_of  # bench/timing.py (scripts run from bench/)


def reference_box(image: np.ndarray, xc: np.ndarray, halfwidth: float) -> np.ndarray:
    """Box sum of whole pixels within ``halfwidth`` of the trace, one fiber at a time."""
    ny, nx = image.shape
    rows = np.arange(ny)
    out = np.zeros(xc.shape)
    for f in range(xc.shape[0]):
        lo = np.clip(np.ceil(xc[f] - halfwidth).astype(int), 0, nx - 1)
        hi = np.clip(np.floor(xc[f] + halfwidth).astype(int), 0, nx - 1)
        cols = lo[:, None] + np.arange(int(2 * halfwidth) + 1)
        inside = cols <= hi[:, None]
        out[f] = np.where(inside, image[rows[:, None], np.clip(cols, 0, nx - 1)], 0).sum(1)
    return out


def reference_optimal(image: np.ndarray, var: np.ndarray, xc: np.ndarray, sigma: np.ndarray, halfwidth: float) -> np.ndarray:
    """Horne's estimator with a fixed Gaussian profile, one fiber at a time, one pass."""
    ny, nx = image.shape
    rows = np.arange(ny)
    out = np.zeros(xc.shape)
    n = int(2 * halfwidth) + 1
    for f in range(xc.shape[0]):
        cols = np.clip(np.rint(xc[f]).astype(int)[:, None] + np.arange(n) - n // 2, 0, nx - 1)
        p = np.exp(-0.5 * ((cols - xc[f][:, None]) / sigma[f]) ** 2)
        p /= p.sum(1, keepdims=True)
        d, v = image[rows[:, None], cols], var[rows[:, None], cols]
        out[f] = (p * d / v).sum(1) / (p**2 / v).sum(1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--camera", default="r1")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from fiberlake.ingest.simulate import simulate_frame
    from fiberlake.processors import ccd, extract, tracing
    from fiberlake.schemas.instrument import LAMOST

    night, cam = "2026-11-21", args.camera
    flat = simulate_frame(LAMOST, cam, "FLAT", night=night, expid=2150002, seed=1)
    sci = simulate_frame(LAMOST, cam, "SCIENCE", night=night, expid=2150010, seed=1)
    params = ccd.CCDParams.from_header(sci.header)
    t_pre, flat_img = best_of(lambda: ccd.preprocess(flat.raw, params), 1)
    t_trace, traces = best_of(lambda: tracing.trace_fibers(flat_img.image, flat_img.ivar, LAMOST.nominal_fiber_columns()), 1)
    image = ccd.preprocess(sci.raw, params)
    hw = 7.0
    xc = traces.x()
    nf = traces.n_fibers

    t_box, box = best_of(lambda: extract.box_extract(image.image, image.ivar, image.mask, traces, halfwidth=hw), args.repeat)
    t_opt, opt = best_of(lambda: extract.optimal_extract(image.image, image.ivar, image.mask, traces, halfwidth=hw), args.repeat)
    var = np.where(image.ivar > 0, 1.0 / np.where(image.ivar > 0, image.ivar, 1), 1e12)
    t_rbox, rbox = best_of(lambda: reference_box(image.image, xc, hw), args.repeat)
    t_ropt, ropt = best_of(lambda: reference_optimal(image.image, var, xc, traces.sigma, hw), args.repeat)

    bright = np.median(rbox, axis=1) > np.percentile(np.median(rbox, axis=1), 50)
    def agree(a, b):
        return float(np.median(np.abs(a[bright] - b[bright]) / np.abs(b[bright]).clip(1)))

    print(f"full-size LAMOST camera {cam}: {nf} fibers x {LAMOST.ny} rows; "
          f"CCD preprocess {t_pre:.2f} s, tracing {t_trace:.2f} s (once per night)")
    print(f"{'method':<34}{'seconds':>9}{'spectra/s':>11}{'vs reference':>14}{'|diff|/ref':>12}")
    print(f"{'reference box (numpy, loop/fiber)':<34}{t_rbox:9.2f}{nf / t_rbox:11.0f}{1.0:14.2f}{'':>12}")
    print(f"{'fiberlake box':<34}{t_box:9.2f}{nf / t_box:11.0f}{t_rbox / t_box:14.2f}{agree(box.flux, rbox):12.4f}")
    print(f"{'reference optimal (numpy, loop)':<34}{t_ropt:9.2f}{nf / t_ropt:11.0f}{1.0:14.2f}{'':>12}")
    print(f"{'fiberlake optimal (deblended)':<34}{t_opt:9.2f}{nf / t_opt:11.0f}{t_ropt / t_opt:14.2f}{agree(opt.flux, ropt):12.4f}")


if __name__ == "__main__":
    main()
