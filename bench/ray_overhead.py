"""Where Ray's time goes for one LAMOST frame: start-up, calls, the object store, calibration sets.

Usage: ``python bench/ray_overhead.py [--calls 200]``

Measures, on local Ray with 2 one-CPU actors (a bare actor class, so that the figures are Ray's
own), in one run:

* ``ray.init`` and the start of the 2 actors (until each answers a call);
* one actor call's round trip (an empty method), the mean over ``--calls`` calls;
* the object store at the sizes one LAMOST frame moves (``FrameReducer``'s graph: 8 tile inputs,
  8 corrected tiles, 10 bundle slabs): ``ray.put`` in one actor (with the array's allocation: an
  upper bound), ``ray.get`` in the other, per megabyte, and the sum per frame;
* a LAMOST calibration set (box + optimal + aberration map, arrays as ``bench/prepare.py`` keeps
  them) shipped through the object store once (put, get in an actor), against
  ``Calibration.from_arrays`` of the same arrays in the actor (the in-memory part of a load).

With the calls per frame (1 read + 8 correct + 1 cut + 10 extract + 1 finish = 21), it prints
the overhead per frame against a frame's compute (``--frame-seconds``, from bench/prepare.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This script's folder would shadow `ray` (bench/ray.py) and `typing` (bench/typing.py).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import ray  # noqa: E402

TILE_IN = (4096, 640, 8)     # rows, columns, bytes per pixel: float32 counts + uint32 mask
TILE_OUT = (4096, 512, 12)   # float32 image + ivar, uint32 mask
SLAB = (4096, 520, 12)


@ray.remote(num_cpus=1)
class Bare:
    def ping(self) -> str:
        return "ok"

    def hold(self, nbytes: int):
        return ray.put(np.ones(nbytes, np.uint8))

    def get_seconds(self, refs) -> float:
        t0 = time.perf_counter()
        got = ray.get(refs)
        _ = sum(int(g.sum() if hasattr(g, "sum") else 0) for g in got[:1])
        return time.perf_counter() - t0

    def from_arrays(self, path: str) -> float:
        from fiberlake.processors.pipeline import Calibration

        with np.load(path) as z:
            arrays = {k[len("calib/"):]: z[k] for k in z.files if k.startswith("calib/")}
        t0 = time.perf_counter()
        Calibration.from_arrays(arrays)
        return time.perf_counter() - t0

    def get_calibration(self, ref) -> float:
        t0 = time.perf_counter()
        calib = ray.get(ref[0])
        _ = calib.traces.n_fibers
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--calib", type=Path, default=None, help="bench/prepare.py's --cache file (a LAMOST set)")
    ap.add_argument("--frame-seconds", type=float, default=88.0, help="a LAMOST frame's compute (bench/prepare.py)")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    actors = [Bare.remote() for _ in range(2)]
    ray.get([a.ping.remote() for a in actors])
    t_start = time.perf_counter() - t0
    ray.get([a.ping.remote() for a in actors])
    t0 = time.perf_counter()
    for _ in range(args.calls):
        ray.get(actors[0].ping.remote())
    t_call = (time.perf_counter() - t0) / args.calls

    def moved(shape) -> float:
        nbytes = int(np.prod(shape))
        ref = ray.get(actors[0].hold.remote(nbytes))           # put in actor 0
        best = min(ray.get(actors[1].get_seconds.remote([ref])) for _ in range(3))  # get in actor 1
        t0 = time.perf_counter()
        ray.get(actors[0].hold.remote(nbytes))
        put = time.perf_counter() - t0 - t_call
        return max(put, 0.0) + best, nbytes

    per = {}
    for name, shape, count in (("tile input", TILE_IN, 8), ("corrected tile", TILE_OUT, 8), ("bundle slab", SLAB, 10)):
        s, nbytes = moved(shape)
        per[name] = (s, nbytes, count)
    store_frame = sum(s * c for s, _, c in per.values())
    bytes_frame = sum(b * c for _, b, c in per.values())
    calls_frame = 21 * t_call
    print(f"\nray.init {t_init:.2f} s; 2 actors started in {t_start:.2f} s (once per job)")
    print(f"actor call round trip: {t_call * 1e3:.2f} ms; 21 calls a frame: {calls_frame:.3f} s")
    print(f"{'object':16s} {'MB':>8s} {'put+get s':>10s} {'MB/s':>8s} {'per frame':>10s}")
    for name, (s, nbytes, count) in per.items():
        print(f"{name:16s} {nbytes / 1e6:8.1f} {s:10.3f} {nbytes / 1e6 / s:8.0f} {count:>4d} x = {s * count:.2f} s")
    print(f"object store per frame: {bytes_frame / 1e6:.0f} MB, {store_frame:.2f} s")
    if args.calib is not None and args.calib.exists():
        from fiberlake.processors.pipeline import Calibration

        with np.load(args.calib) as z:
            arrays = {k[len("calib/"):]: z[k] for k in z.files if k.startswith("calib/")}
        calib = Calibration.from_arrays(arrays)
        nbytes = sum(int(v.nbytes) for v in arrays.values())
        t0 = time.perf_counter()
        ref = ray.put(calib)
        t_put = time.perf_counter() - t0
        t_get = ray.get(actors[1].get_calibration.remote([ref]))
        t_build = ray.get(actors[1].from_arrays.remote(str(args.calib)))
        print(f"LAMOST calibration set ({nbytes / 1e6:.0f} MB of arrays): object store put {t_put:.2f} s + get in an "
              f"actor {t_get:.2f} s; from_arrays in the actor {t_build:.2f} s (each actor, each set)")
    total = calls_frame + store_frame
    print(f"Ray per LAMOST frame: {total:.2f} s = {100 * total / args.frame_seconds:.1f} % of a {args.frame_seconds:.0f} s "
          f"frame (2 actors: half of it on each); load average at end {os.getloadavg()[0]:.1f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
