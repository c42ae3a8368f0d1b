"""``fiberlake demo``: simulate a mini night, ingest it, process it, and report."""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl

from fiberlake.jobs.ingest import ingest_night
from fiberlake.jobs.process import process_night
from fiberlake.jobs.query import sql
from fiberlake.storage.layout import Lake

NIGHT = "2026-11-21"

REPORT_QUERY = """
SELECT m.extraction, f.objtype, count(*) AS n_fibers,
       round(median(m.median_snr), 2) AS median_snr,
       round(median(m.snr_eq15), 2) AS median_snr_eq15,
       round(median(m.wave_rms), 4) AS median_wave_rms_A
FROM metrics m JOIN fibermap f
  ON m.night = f.night AND m.expid = f.expid AND m.fiber = f.fiber
GROUP BY m.extraction, f.objtype
ORDER BY m.extraction, f.objtype
"""


TYPING_QUERY = """
SELECT type_header, type_pixels, count(*) AS frames, min(confidence) AS min_confidence,
       sum(CASE WHEN type_agree THEN 1 ELSE 0 END) AS agree, first(model_id) AS model_id
FROM frames GROUP BY type_header, type_pixels ORDER BY type_header
"""


DENOISE_QUERY = """
SELECT extraction, subclass, status, count(*) AS n, round(median(residual_rms), 2) AS median_residual_rms,
       round(median(n_observed), 0) AS median_observed_bins, first(model_id) AS model_id
FROM spectra_denoised GROUP BY extraction, subclass, status ORDER BY extraction, subclass, status
"""

LABELS_QUERY = """
SELECT l.method, f.objtype, l.class, l.flag, count(*) AS n_fibers, round(median(l.snr_r), 1) AS median_snr_r,
       first(l.model_id) AS model_id
FROM labels l JOIN fibermap f
  ON l.night = f.night AND l.expid = f.expid AND l.spectrograph = f.spectrograph AND l.fiber = f.fiber
GROUP BY l.method, f.objtype, l.class, l.flag ORDER BY l.method, f.objtype, l.class, l.flag
"""

DEMO_DENOISE = {"denoise.sources": ("coadds",)}
"""The demo denoises the night's coadds (a few dozen spectra; every joined exposure would add a minute)."""


def run_demo(workdir: Path, *, seed: int = 0, progress: bool = True) -> pl.DataFrame:
    """Run the whole chain on a simulated ``mini`` night and print a short report.

    Parameters
    ----------
    workdir : Path
        Directory for the simulated night (``workdir/nights``) and the lake (``workdir/lake``).
    seed : int
        Simulation seed.
    progress : bool
        Show progress bars.

    Returns
    -------
    polars.DataFrame
        The report query's result.
    """
    from fiberlake.ingest.simulate import simulate_night

    workdir = Path(workdir)
    lake = Lake.at(workdir / "lake")
    t0 = time.perf_counter()
    paths = simulate_night("mini", NIGHT, workdir / "nights", seed=seed, progress=progress)
    t1 = time.perf_counter()
    ingest = ingest_night(lake, workdir / "nights" / NIGHT, progress=progress, instrument="mini")
    t2 = time.perf_counter()
    from fiberlake.processors.params import ReductionParams

    processed = process_night(lake, NIGHT, progress=progress, config=ReductionParams().updated(DEMO_DENOISE))
    t3 = time.perf_counter()
    print(f"simulated {len(paths)} frames in {t1 - t0:.1f} s")
    print(f"ingest:  {ingest.summary()} in {t2 - t1:.1f} s")
    print(f"process: {processed.summary()} in {t3 - t2:.1f} s")
    print(f"lake:    {lake.root}")
    typed = sql(lake, TYPING_QUERY)
    with pl.Config(tbl_rows=20, tbl_cols=-1):
        print("frame typing (seed 001): header type against the type from the pixels")
        print(typed)
    result = sql(lake, REPORT_QUERY)
    with pl.Config(tbl_rows=50, tbl_cols=-1):
        print(result)
        print("denoised coadds (seed 004, shipped model): MAP subclass, status, fit quality")
        print(sql(lake, DENOISE_QUERY))
        print("stellar classes (seed 003, shipped DRC-Net beside RC-Net and the template fit), per method")
        print(sql(lake, LABELS_QUERY))
    print(f'try: fiberlake query --lake {lake.root} "SELECT camera, count(*) FROM spectra GROUP BY camera"')
    return result
