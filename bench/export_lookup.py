"""A target's coadd by targetid (``jobs/export.spectrum``): the whole coadds table against its HEALPix pixel.

Usage: ``python bench/export_lookup.py [--nights 10] [--lookups 5]``

Builds a synthetic lake of ``coadds`` (bench/query.py's plates: LAMOST-like targets, 16-bin
spectra, one commit per night, then compacted) and a ``fibermap`` of the same targets, then times,
with the bytes read counted at the page cache (every file evicted first; bench/query.py):

* before: ``coadds`` filtered on ``targetid`` alone (what ``spectrum`` did; coadds are sorted by
  HEALPix, so the target's row groups cannot be told apart by their statistics);
* after: ``export._coadd_rows``: the target's position from ``fibermap`` (sorted by target), its
  HEALPix pixel, then ``coadds`` filtered on the pixel and the target.

Both must return the same rows. Printed per lookup and as the median over ``--lookups`` targets.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where bench/typing.py would shadow the
# standard library's typing module; bench/query.py is imported from it by path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402

from fiberlake.jobs.export import _coadd_rows  # noqa: E402
from fiberlake.jobs.query import scan_tables  # noqa: E402
from fiberlake.jobs.upkeep import compact  # noqa: E402
from fiberlake.storage.layout import Lake  # noqa: E402
from fiberlake.storage.tables import TableStore  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_query", _HERE / "query.py")
query = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(query)


def build(root: Path, nights: int, seed: int) -> list[int]:
    if root.exists():
        shutil.rmtree(root)
    store = TableStore(root / "tables")
    rng, pool, targets = np.random.default_rng(seed), [], []
    for i in range(nights):
        night = query.night_tables(rng, i, query.PLATES_PER_NIGHT, 16, pool)
        coadds = night["coadds"]
        store.append("coadds", coadds)
        first = pl.from_arrow(coadds.select(["night", "targetid", "ra", "dec", "mag", "objtype"])).unique(
            "targetid", keep="first", maintain_order=True)
        n = first.height
        store.append("fibermap", pa.table({
            "night": pa.array(first["night"].to_list()), "expid": pa.array(np.full(n, i * 1000 + 1, np.int64)),
            "spectrograph": pa.array((np.arange(n) // 250 % 16 + 1).astype(np.int16)),
            "fiber": pa.array((np.arange(n) % 250).astype(np.int16)),
            "targetid": pa.array(first["targetid"].to_numpy()), "ra": pa.array(first["ra"].to_numpy()),
            "dec": pa.array(first["dec"].to_numpy()), "mag": pa.array(first["mag"].to_numpy()),
            "objtype": pa.array(first["objtype"].to_list()),
            "mag_g": pa.nulls(n, pa.float32()), "mag_i": pa.nulls(n, pa.float32())}))
        targets.append(int(first["targetid"][int(rng.integers(n))]))
        print(f"  night {i + 1}/{nights} written", file=sys.stderr, flush=True)
    compact(Lake.at(root), lock=False)
    os.sync()
    return targets


def measure(root: Path, fn) -> tuple[float, float, int, pl.DataFrame]:
    """Cold seconds, warm seconds (best of 3), bytes of coadds + fibermap read, and the rows."""
    files = query.data_files(root, "coadds") + query.data_files(root, "fibermap")
    os.sync()
    query.evict(root)
    t0 = time.perf_counter()
    out = fn()
    cold = time.perf_counter() - t0
    read = query.resident(files)
    warm = min(query._timed(fn) for _ in range(3))
    return cold, warm, read, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nights", type=int, default=10)
    ap.add_argument("--lookups", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fiberlake-export-lookup"))
    ap.add_argument("--seed", type=int, default=23)
    args = ap.parse_args()
    print(f"load at start: {os.getloadavg()[0]:.1f}")
    root = args.dir / "lake"
    targets = build(root, args.nights, args.seed)
    lake = Lake.at(root)
    total = query.table_bytes(root, "coadds")
    fm_total = query.table_bytes(root, "fibermap")
    tables = scan_tables(lake, arrays=False)
    n_rows = tables["coadds"].select(pl.len()).collect().item()
    print(f"coadds: {n_rows:,} rows, {total / 1e6:.1f} MB in {len(query.data_files(root, 'coadds'))} files; "
          f"fibermap {fm_total / 1e6:.1f} MB")
    print("| target | before: cold s / warm s / MB read / % of coadds | after: cold s / warm s / MB read / % of coadds |")
    print("|---|---|---|")
    figures = []
    for tid in targets[:: max(1, len(targets) // args.lookups)][: args.lookups]:
        b = measure(root, lambda: scan_tables(lake, arrays=False)["coadds"].filter(pl.col("targetid") == tid).collect())
        a = measure(root, lambda: _coadd_rows(scan_tables(lake, arrays=False), tid))
        assert b[3].sort("night", "extraction").equals(a[3].sort("night", "extraction")), tid
        figures.append((b, a))
        print(f"| {tid} ({a[3].height} rows) | {b[0]:.3f} / {b[1]:.3f} / {b[2] / 1e6:.2f} / {100 * b[2] / total:.2f} "
              f"| {a[0]:.3f} / {a[1]:.3f} / {a[2] / 1e6:.2f} / {100 * a[2] / total:.2f} |")
    med = lambda k, i: float(np.median([f[k][i] for f in figures]))  # noqa: E731
    print(f"median: before {med(0, 0):.3f} s cold, {med(0, 1):.3f} s warm, {med(0, 2) / 1e6:.2f} MB; "
          f"after {med(1, 0):.3f} s cold, {med(1, 1):.3f} s warm, {med(1, 2) / 1e6:.2f} MB "
          f"({med(0, 2) / max(med(1, 2), 1):.0f}x fewer bytes, {med(0, 1) / med(1, 1):.1f}x faster warm); "
          f"load at end {os.getloadavg()[0]:.1f}")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
