"""Tables at survey scale: metadata queries, one-target and one-spectrum lookups and a HEALPix cone
search over a synthetic lake of millions of spectra rows, against a full scan, old layout vs new.

Usage::

    python bench/query.py [--rows 10000000] [--real-rows 8000] [--dir /tmp/fiberlake-query]

Two lakes are written through the project's own write path (``TableStore.append``, one commit
per exposure as the streaming writer does, then ``jobs.upkeep.compact`` per lake):

* ``before``: the layout of main before issue 19 (512-row groups in every table, rows in arrival
  order, compaction by bin-packing);
* ``after``: the current layout (:data:`fiberlake.storage.tables.CLUSTER_COLUMNS`: rows of each
  commit sorted (spectra by key, metrics by targetid, coadds by HEALPix), 65536-row groups in
  scalar-only tables and 4 MB groups in list tables, each night of metrics re-sorted at
  compaction).

Metadata is realistic (LAMOST-like: plates of 16 spectrographs x 250 fibers, 3 exposures, 2 arms,
box + optimal extraction, about 240 000 spectra rows a night; random 40-bit targetids; plates
centred at random on the sky with 15 % of them revisiting an earlier field; sky and standard
fibers; one percent of fibers flagged). Pixels are cheap: the ``spectra`` table's flux, ivar, mask
and sky lists hold ``--cheap-nwave`` (16) values instead of 3932, and ``coadds`` flam lists 16;
``metrics`` is the metadata-only part (no lists). A third, small lake (``--real-rows``, one night,
full 3932-bin spectra) times the one-spectrum reads at real pixel size in both layouts.

Bytes read are counted at the page cache: every data file is evicted
(``posix_fadvise(DONTNEED)`` after ``sync``), the query runs (cold), and the pages of the table's
files then resident (``mincore``) are the bytes it read from disk, read-ahead included. Times are
cold (that first run) and warm (best of 3). The baseline is a full scan of the same table (every
column of every row) measured the same way in the same run. Queries go through the project's
read path (``TableStore.scan``: Polars ``scan_delta``, which prunes partitions and skips files
on the Delta log's statistics and row groups on the Parquet statistics).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where bench/typing.py would shadow the
# standard library's typing module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import mmap  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402

from fiberlake.jobs.upkeep import compact
from fiberlake.processors.coadd import healpix_nested
from fiberlake.schemas.tables import SCHEMAS
from fiberlake.storage import tables as tables_mod
from fiberlake.storage.layout import Lake
from fiberlake.storage.tables import TableStore

N_SPECTROGRAPHS, N_FIBERS, N_EXP, ARMS, EXTRACTIONS = 16, 250, 3, ("b", "r"), ("box", "optimal")
PLATE_TARGETS = N_SPECTROGRAPHS * N_FIBERS
ROWS_PER_PLATE = PLATE_TARGETS * N_EXP * len(ARMS) * len(EXTRACTIONS)
PLATES_PER_NIGHT = 5
NSIDE = 64
REAL_NWAVE = 3932
FIELD_RADIUS_DEG = 2.5


# ----------------------------------------------------------------------------- layouts
@contextlib.contextmanager
def legacy_layout():
    """The layout of main before issue 19: no clustering, 512-row groups everywhere."""
    saved = dict(tables_mod.CLUSTER_COLUMNS), tables_mod.SCALAR_ROW_GROUP_ROWS, tables_mod.MIN_ROW_GROUP_ROWS
    tables_mod.CLUSTER_COLUMNS.clear()
    tables_mod.SCALAR_ROW_GROUP_ROWS = tables_mod.ROW_GROUP_ROWS
    tables_mod.MIN_ROW_GROUP_ROWS = tables_mod.ROW_GROUP_ROWS
    try:
        yield
    finally:
        tables_mod.CLUSTER_COLUMNS.update(saved[0])
        tables_mod.SCALAR_ROW_GROUP_ROWS, tables_mod.MIN_ROW_GROUP_ROWS = saved[1], saved[2]


# ----------------------------------------------------------------------------- synthetic survey
def _lists(rng, n: int, nwave: int, dtype) -> pa.Array:
    if np.issubdtype(dtype, np.integer):
        values = (rng.random(n * nwave) < 0.02).astype(dtype)
    else:
        values = rng.normal(100.0, 10.0, n * nwave).astype(dtype)
    offsets = np.arange(0, n * nwave + 1, nwave, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _sky_field(rng) -> tuple[float, float]:
    ra = rng.uniform(0, 360)
    dec = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-10)), np.sin(np.radians(60)))))
    return ra, dec


def _plate_targets(rng, pool: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Targets of one plate: (targetid, ra, dec, objtype index 0 TGT 1 SKY 2 STD), fiber order."""
    if pool and rng.random() < 0.15:
        return pool[rng.integers(len(pool))]
    ra0, dec0 = _sky_field(rng)
    r = FIELD_RADIUS_DEG * np.sqrt(rng.random(PLATE_TARGETS))
    phi = rng.uniform(0, 2 * np.pi, PLATE_TARGETS)
    dec = dec0 + r * np.sin(phi)
    ra = (ra0 + r * np.cos(phi) / np.cos(np.radians(dec0))) % 360
    targetid = rng.integers(1, 2**40, PLATE_TARGETS)
    kind = np.zeros(PLATE_TARGETS, np.int8)
    fiber = np.tile(np.arange(N_FIBERS), N_SPECTROGRAPHS)
    kind[fiber % 12 == 5] = 1                      # ~20 sky fibers per spectrograph
    kind[fiber % 25 == 7] = 2                      # ~10 standards
    plate = (targetid, ra, dec, kind)
    pool.append(plate)
    return plate


def night_tables(rng, night_index: int, plates: int, nwave: int, pool: list, extractions=EXTRACTIONS,
                 n_exp: int = N_EXP) -> dict[str, pa.Table]:
    """The spectra, metrics and coadds rows of one synthetic night, one pyarrow table per exposure
    (spectra, metrics) and one for the night's coadds."""
    night = f"2026-{1 + night_index // 28:02d}-{1 + night_index % 28:02d}"
    run_id = f"run-{night_index:04d}"
    objtypes = np.array(["TGT", "SKY", "STD"])
    exposures, coadds = [], []
    for p in range(plates):
        targetid, ra, dec, kind = _plate_targets(rng, pool)
        for e in range(n_exp):
            expid = night_index * 1000 + p * N_EXP + e + 1
            # row order: camera (arm, spectrograph), fiber, extraction: the order frames arrive in
            n = PLATE_TARGETS * len(ARMS) * len(extractions)
            arm = np.repeat(np.array(ARMS), PLATE_TARGETS * len(extractions))
            slot = np.tile(np.repeat(np.arange(PLATE_TARGETS), len(extractions)), len(ARMS))
            spectrograph = (slot // N_FIBERS + 1).astype(np.int16)
            fiber = (slot % N_FIBERS).astype(np.int16)
            camera = np.char.add(arm, spectrograph.astype(str))
            extraction = np.tile(np.array(extractions), PLATE_TARGETS * len(ARMS))
            status = np.where(rng.random(n) < 0.01, 1 << rng.integers(0, 8, n), 0).astype(np.int32)
            common = {
                "night": pa.array([night] * n), "expid": pa.array(np.full(n, expid, np.int64)),
                "camera": pa.array(camera), "spectrograph": pa.array(spectrograph), "fiber": pa.array(fiber),
                "targetid": pa.array(targetid[slot]), "objtype": pa.array(objtypes[kind[slot]]),
                "extraction": pa.array(extraction), "run_id": pa.array([run_id] * n),
            }
            spectra = dict(common)
            spectra |= {
                "arm": pa.array(arm), "obstype": pa.array(["SCIENCE"] * n),
                "wave_min": pa.array(np.where(arm == "b", 3700.0, 5700.0)),
                "dwave": pa.array(np.full(n, 0.6)), "nwave": pa.array(np.full(n, nwave, np.int32)),
                "fiber_status": pa.array(status),
                "flux": _lists(rng, n, nwave, np.float32), "ivar": _lists(rng, n, nwave, np.float32),
                "mask": _lists(rng, n, nwave, np.uint32), "sky": _lists(rng, n, nwave, np.float32),
                "resolution": pa.nulls(n, pa.list_(pa.float32())), "resolution_ndiag": pa.nulls(n, pa.int16()),
                "resolution_wave": pa.nulls(n, pa.list_(pa.float64())),
            }
            snr = rng.lognormal(2.0, 1.0, n).astype(np.float32)
            metrics = dict(common)
            metrics |= {name: pa.array(rng.normal(1.0, 0.1, n).astype(np.float32))
                        for name, dtype in zip(SCHEMAS["metrics"].names, SCHEMAS["metrics"].types)
                        if dtype == pa.float32()}
            metrics |= {"median_snr": pa.array(snr), "snr_eq15": pa.array(snr * 1.1),
                        "frac_masked": pa.array((rng.random(n) ** 8).astype(np.float32)),
                        "wave_nlines": pa.array(rng.integers(20, 40, n).astype(np.int32))}
            exposures.append((pa.table(spectra), pa.table(metrics)))
        m = PLATE_TARGETS * len(extractions)
        idx = np.repeat(np.arange(PLATE_TARGETS), len(extractions))
        keep = kind[idx] != 1                           # no coadds of sky fibers
        idx = idx[keep]
        m = idx.size
        coadds = coadds + [pa.table({
            "night": pa.array([night] * m), "targetid": pa.array(targetid[idx]),
            "extraction": pa.array(np.tile(np.array(extractions), PLATE_TARGETS)[keep]),
            "scope": pa.array(["night"] * m), "run_id": pa.array([run_id] * m),
            "objtype": pa.array(objtypes[kind[idx]]), "ra": pa.array(ra[idx]), "dec": pa.array(dec[idx]),
            "mag": pa.array(rng.uniform(12, 19, m).astype(np.float32)),
            "healpix": pa.array(healpix_nested(ra[idx], dec[idx], NSIDE)), "nside": pa.array(np.full(m, NSIDE, np.int32)),
            "n_exp": pa.array(np.full(m, n_exp, np.int32)),
            "expids": pa.array([[night_index * 1000 + p * N_EXP + e + 1 for e in range(n_exp)]] * m, pa.list_(pa.int64())),
            "nights": pa.array([[night]] * m, pa.list_(pa.string())),
            "n_rejected": pa.array(np.zeros(m, np.int32)), "fluxcal_status": pa.array(["ok"] * m),
            "loglam_min": pa.array(np.full(m, 3.5682)), "dloglam": pa.array(np.full(m, 1e-4)),
            "nwave": pa.array(np.full(m, nwave, np.int32)),
            "flam": _lists(rng, m, nwave, np.float32), "flam_ivar": _lists(rng, m, nwave, np.float32),
            "flam_mask": _lists(rng, m, nwave, np.uint32),
            "resolution": pa.nulls(m, pa.list_(pa.float32())), "resolution_ndiag": pa.nulls(m, pa.int16()),
            "input_hash": pa.array([f"{h:016x}" for h in rng.integers(0, 2**62, m)]),
            "made_at": pa.array(np.full(m, np.datetime64("2026-11-29T00:00:00", "us")), pa.timestamp("us", tz="UTC")),
        })]
    return {"night": night, "exposures": exposures, "coadds": pa.concat_tables(coadds)}


def build_lake(root: Path, nights: int, plates: int, nwave: int, seed: int, tables=("spectra", "metrics", "coadds"),
               extractions=EXTRACTIONS, n_exp: int = N_EXP) -> dict:
    """Write the synthetic survey into the lake at ``root`` (one commit per exposure, then compact)."""
    if root.exists():
        shutil.rmtree(root)
    store = TableStore(root / "tables")
    rng, pool, facts = np.random.default_rng(seed), [], {"targets": [], "keys": [], "cones": []}
    t0 = time.perf_counter()
    for i in range(nights):
        night = night_tables(rng, i, plates, nwave, pool, extractions, n_exp)
        for spectra, metrics in night["exposures"]:
            if "spectra" in tables:
                store.append("spectra", spectra)
            if "metrics" in tables:
                store.append("metrics", metrics)
        if "coadds" in tables:
            store.append("coadds", night["coadds"])
        s0 = night["exposures"][1][0]
        pick = rng.integers(s0.num_rows)
        facts["keys"].append({k: s0[k][pick].as_py() for k in ("night", "expid", "camera", "fiber", "extraction")})
        facts["targets"].append(s0["targetid"][pick].as_py())
        c = night["coadds"]
        facts["cones"].append((c["ra"][0].as_py(), c["dec"][0].as_py()))
        print(f"  {root.name}: night {i + 1}/{nights} written ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    t1 = time.perf_counter()
    compact(Lake.at(root), lock=False)
    facts["write_s"], facts["compact_s"] = t1 - t0, time.perf_counter() - t1
    os.sync()
    return facts


# ----------------------------------------------------------------------------- bytes read at the page cache
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
PAGE = os.sysconf("SC_PAGE_SIZE")


def data_files(root: Path, table: str) -> list[Path]:
    """The table's live data files (those its current version references)."""
    return [Path(uri.removeprefix("file://")) for uri in TableStore(root / "tables").delta(table).file_uris()]


def table_bytes(root: Path, table: str) -> int:
    return sum(p.stat().st_size for p in data_files(root, table))


def evict(root: Path) -> None:
    """Drop every file of the lake from the page cache (clean pages only: sync first)."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def resident(paths: list[Path]) -> int:
    """Bytes of ``paths`` in the page cache now (``mmap`` + ``mincore``; mapping reads nothing)."""
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    total = 0
    for p in paths:
        size = p.stat().st_size
        if size == 0:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            base = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if base in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {p}")
            npages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * npages)()
            try:
                if _libc.mincore(base, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore {p}")
            finally:
                _libc.munmap(base, size)
            total += min(size, int((np.frombuffer(vec, np.uint8) & 1).sum()) * PAGE)
        finally:
            os.close(fd)
    return total


def measure(root: Path, table: str, fn, repeat: int = 3) -> dict:
    """Cold time and bytes read from disk (table's data files), then the warm best of ``repeat``."""
    os.sync()
    evict(root)
    t0 = time.perf_counter()
    out = fn()
    cold = time.perf_counter() - t0
    read = resident(data_files(root, table))
    warm = min(_timed(fn) for _ in range(repeat))
    return {"cold_s": cold, "warm_s": warm, "bytes": read, "rows": _rows(out)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rows(out) -> int:
    return out.height if isinstance(out, pl.DataFrame) else int(out)


# ----------------------------------------------------------------------------- queries
def queries(root: Path, facts: dict) -> dict[str, tuple[str, object]]:
    """name -> (table, callable) over the lake at ``root``; the facts pick existing keys."""
    store = TableStore(root / "tables")
    night = facts["keys"][len(facts["keys"]) // 2]["night"]
    key = facts["keys"][len(facts["keys"]) // 3]
    target = facts["targets"][len(facts["targets"]) // 4]
    ra0, dec0 = facts["cones"][len(facts["cones"]) // 5]

    def metadata_night():
        return (store.scan("metrics").filter((pl.col("night") == night) & (pl.col("objtype") == "TGT")
                                             & (pl.col("median_snr") > 10))
                .group_by("spectrograph", "camera").agg(pl.len(), pl.col("median_snr").median()).collect())

    def flagged_night():
        return (store.scan("spectra").filter((pl.col("night") == night) & (pl.col("fiber_status") != 0))
                .group_by("camera").agg(pl.len()).collect())

    def spectrograph_all_nights():
        return (store.scan("metrics").filter(pl.col("spectrograph") == 7)
                .group_by("night").agg(pl.col("median_snr").mean()).collect())

    def one_target():
        return store.scan("spectra").filter(pl.col("targetid") == target).collect()

    def one_target_indexed():
        # metrics (scalar, sorted by targetid per night) is the target index: target -> its spectra's keys
        keys = (store.scan("metrics").filter(pl.col("targetid") == target)
                .select("night", "expid", "camera", "fiber").unique().collect())
        if keys.is_empty():
            return keys
        return store.scan("spectra").filter(
            pl.col("night").is_in(keys["night"].unique().to_list()) & pl.col("expid").is_in(keys["expid"].unique().to_list())
            & pl.col("camera").is_in(keys["camera"].unique().to_list()) & pl.col("fiber").is_in(keys["fiber"].unique().to_list())
            & (pl.col("targetid") == target)).collect()

    def target_index():
        return store.scan("metrics").filter(pl.col("targetid") == target).select(
            "night", "expid", "camera", "fiber", "extraction").collect()

    def one_coadd():
        return store.scan("coadds").filter(pl.col("targetid") == target).collect()

    def one_spectrum():
        return store.scan("spectra").filter(
            (pl.col("night") == key["night"]) & (pl.col("expid") == key["expid"]) & (pl.col("camera") == key["camera"])
            & (pl.col("fiber") == key["fiber"]) & (pl.col("extraction") == key["extraction"])).collect()

    def cone():
        import astropy.units as u
        from astropy_healpix import HEALPix

        pixels = HEALPix(nside=NSIDE, order="nested").cone_search_lonlat(ra0 * u.deg, dec0 * u.deg, 1.0 * u.deg)
        pixels = np.sort(np.asarray(pixels, np.int64))
        lo, hi = int(pixels[0]), int(pixels[-1])
        # the pixels' range first (statistics skip on it), then the exact set and the exact distance
        frame = (store.scan("coadds").filter(pl.col("healpix").is_between(lo, hi) & pl.col("healpix").is_in(pixels.tolist()))
                 .select("targetid", "ra", "dec", "mag", "night").collect())
        ra, dec = np.radians(frame["ra"].to_numpy()), np.radians(frame["dec"].to_numpy())
        cosd = (np.sin(dec) * np.sin(np.radians(dec0))
                + np.cos(dec) * np.cos(np.radians(dec0)) * np.cos(ra - np.radians(ra0)))
        return frame.filter(pl.Series(cosd >= np.cos(np.radians(1.0))))

    return {
        "metadata, one night (metrics: filter + group by)": ("metrics", metadata_night),
        "metadata, one night (spectra: flagged by camera)": ("spectra", flagged_night),
        "metadata, all nights (metrics: one spectrograph)": ("metrics", spectrograph_all_nights),
        "one target, all nights (spectra, every column)": ("spectra", one_target),
        "one target's keys, all nights (metrics index)": ("metrics", target_index),
        "one target via the metrics index (metrics + spectra)": ("spectra", one_target_indexed),
        "one target's coadds (coadds, every column)": ("coadds", one_coadd),
        "one spectrum by key (spectra, every column)": ("spectra", one_spectrum),
        "cone r=1 deg on coadds' HEALPix (coadds)": ("coadds", cone),
    }


def full_scan(root: Path, table: str):
    return lambda: TableStore(root / "tables").scan(table).collect()


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="spectra rows of the synthetic lake")
    ap.add_argument("--cheap-nwave", type=int, default=16)
    ap.add_argument("--real-rows", type=int, default=8000, help="rows of the real-pixel lake (0: skip it)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fiberlake-query"))
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--keep", action="store_true", help="keep the lakes")
    ap.add_argument("--real-only", action="store_true", help="only the real-pixel lake")
    args = ap.parse_args(argv)
    if args.real_only:
        print(f"load at start: {os.getloadavg()}")
        real(args)
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
        return
    pl.Config.set_tbl_rows(-1)
    rows_per_night = PLATES_PER_NIGHT * ROWS_PER_PLATE
    nights = max(1, round(args.rows / rows_per_night))
    print(f"load at start: {os.getloadavg()}")
    print(f"lake: {nights} nights x {rows_per_night} spectra rows = {nights * rows_per_night:,} spectra rows "
          f"(and as many metrics rows), coadds {nights * PLATES_PER_NIGHT * (PLATE_TARGETS - 320) * 2:,} rows; "
          f"pixels cheap: {args.cheap_nwave} bins")
    lakes, facts = {}, {}
    for name in ("before", "after"):
        root = args.dir / name
        ctx = legacy_layout() if name == "before" else contextlib.nullcontext()
        with ctx:
            facts[name] = build_lake(root, nights, PLATES_PER_NIGHT, args.cheap_nwave, args.seed)
        lakes[name] = root
        f = facts[name]
        print(f"{name}: written in {f['write_s']:.0f} s, compacted in {f['compact_s']:.0f} s; "
              + ", ".join(f"{t} {table_bytes(root, t) / 1e6:.0f} MB in {len(data_files(root, t))} files"
                          for t in ("spectra", "metrics", "coadds")))
    results: dict[str, dict[str, dict]] = {}
    for name, root in lakes.items():
        results[name] = {}
        for table in ("spectra", "metrics", "coadds"):
            results[name][f"full scan ({table})"] = measure(root, table, full_scan(root, table), repeat=1) | {"table": table}
        for label, (table, fn) in queries(root, facts["before"]).items():
            results[name][label] = measure(root, table, fn) | {"table": table}
    print(f"load after queries: {os.getloadavg()}")
    _print(results, lakes)
    if args.real_rows:
        real(args)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


def _print(results: dict, lakes: dict) -> None:
    print()
    print("| query | layout | rows | cold s | warm s | MB read | % of table | x full scan time (cold) |")
    print("|---|---|---|---|---|---|---|---|")
    for label in results["before"]:
        for name in ("before", "after"):
            r = results[name][label]
            full = results[name][f"full scan ({r['table']})"]
            total = table_bytes(lakes[name], r["table"])
            print(f"| {label} | {name} | {r['rows']} | {r['cold_s']:.3f} | {r['warm_s']:.3f} | {r['bytes'] / 1e6:.2f} "
                  f"| {100 * r['bytes'] / total:.3f} | {r['cold_s'] / full['cold_s']:.4f} |")


def real(args) -> None:
    """One-spectrum reads at real pixel size: one night, full-length spectra, both layouts."""
    plates = 1
    extractions = ("optimal",)
    per_exposure = PLATE_TARGETS * len(ARMS)
    n_exp = max(2, min(N_EXP, -(-args.real_rows // per_exposure)))
    print(f"\nreal pixels: {REAL_NWAVE} bins, {per_exposure * n_exp:,} spectra rows (one plate, {n_exp} exposures, "
          "one extraction)")
    out = {}
    for name in ("before", "after"):
        root = args.dir / f"real-{name}"
        ctx = legacy_layout() if name == "before" else contextlib.nullcontext()
        with ctx:
            f = build_lake(root, 1, plates, REAL_NWAVE, args.seed + 1, tables=("spectra", "metrics"), extractions=extractions,
                           n_exp=n_exp)
        q = queries(root, f)
        out[name] = {label: measure(root, "spectra", q[label][1]) for label in
                     ("one spectrum by key (spectra, every column)", "one target via the metrics index (metrics + spectra)")}
        out[name]["full scan (spectra)"] = measure(root, "spectra", full_scan(root, "spectra"), repeat=1)
        out[name]["_bytes"] = table_bytes(root, "spectra")
    print(f"load: {os.getloadavg()}")
    print("| query (real pixels) | layout | rows | cold s | warm s | MB read | % of table |")
    print("|---|---|---|---|---|---|---|")
    for label in out["before"]:
        if label.startswith("_"):
            continue
        for name in ("before", "after"):
            r = out[name][label]
            print(f"| {label} | {name} | {r['rows']} | {r['cold_s']:.3f} | {r['warm_s']:.3f} | {r['bytes'] / 1e6:.1f} "
                  f"| {100 * r['bytes'] / out[name]['_bytes']:.2f} |")


if __name__ == "__main__":
    main()
