"""``fiberlake plot``: a target's flux-calibrated spectrum as a PNG.

The coadd (of a night, or over every night) or one exposure's joined spectrum, with its 1-sigma
band, the masked bins shaded, the sky that was subtracted from the target's fiber (electrons per
Angstrom, per camera, on the right axis), and a title with the target's label (id, type,
magnitude, position), the median S/N per bin and where it came from (extraction, run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from fiberlake.jobs.export import SpectrumArrays, spectrum
from fiberlake.jobs.query import scan_tables
from fiberlake.processors import qa_figures as qf
from fiberlake.processors.spectrum_format import linear_wavelengths, median_snr
from fiberlake.storage.layout import Lake


def _sky(tables: dict[str, pl.LazyFrame], targetid: int, extraction: str, pairs: list[tuple[str, int]]) -> list:
    """Median sky of the target's fiber per camera over the exposures ``pairs`` (night, expid)."""
    if not pairs:
        return []
    keys = pl.DataFrame({"night": [p[0] for p in pairs], "expid": [int(p[1]) for p in pairs]})
    rows = (tables["spectra"].filter((pl.col("targetid") == targetid) & (pl.col("extraction") == extraction))
            .join(keys.lazy(), on=["night", "expid"], how="semi")
            .select("camera", "wave_min", "dwave", "nwave", "sky").collect())
    out = []
    for (camera,), group in rows.sort("camera").group_by(["camera"], maintain_order=True):
        wave = linear_wavelengths(group["wave_min"][0], group["dwave"][0], group["nwave"][0])
        sky = np.median(np.stack([np.asarray(v, np.float32) for v in group["sky"].to_list()]), axis=0)
        out.append((wave, sky, camera))
    return out


def _title(spec: SpectrumArrays, fibermap: dict, snr: float) -> str:
    meta = spec.meta
    what = (f"coadd of {meta['n_exp']} exposure(s), " + ("all nights" if meta.get("scope") == "all" else f"night {meta['night']}")
            if "n_exp" in meta else f"exposure {meta['expid']}, night {meta['night']}, fiber {meta['fiber']}")
    mag = fibermap.get("mag")
    label = (f"target {meta['targetid']}  {meta.get('objtype') or ''}"
             + (f"  mag {mag:.2f}" if mag is not None else "")
             + (f"  ra {fibermap['ra']:.5f} dec {fibermap['dec']:+.5f}" if fibermap.get("ra") is not None else ""))
    return (f"{label}\n{what}; {meta['extraction']} extraction; median S/N {snr:.1f} per bin; "
            f"flux calibration {meta.get('fluxcal_status')}; run {meta.get('run_id')}")


def plot_target(lake: Lake, targetid: int, out: str | Path, *, night: str | None = None, expid: int | None = None,
                extraction: str | None = None) -> Path:
    """Write a PNG of a target's coadded (or one exposure's joined) spectrum.

    Parameters
    ----------
    lake : Lake
    targetid : int
    out : path-like
        The PNG file (its folder is created).
    night : str, optional
        That night's coadd (default: the coadd over every night); with ``expid``, the night of the exposure.
    expid : int, optional
        Plot this exposure's joined spectrum instead of a coadd.
    extraction : str, optional
        Default: the first present of optimal, deconv, box.

    Returns
    -------
    Path

    Raises
    ------
    LookupError
        A sentence when the lake has no such spectrum.
    """
    if expid is None:
        spec = spectrum(lake, targetid, night=night, kind="coadd", extraction=extraction)
        pairs = list(zip(spec.meta["nights"], spec.meta["expids"]))
    else:
        found = [s for s in spectrum(lake, targetid, night=night, kind="exposures", extraction=extraction)
                 if s.meta["expid"] == expid]
        if not found:
            raise LookupError(f"target {targetid} has no joined spectrum of exposure {expid}")
        spec = found[-1]
        pairs = [(spec.meta["night"], expid)]
    tables = scan_tables(lake, arrays=False)
    fm = (tables["fibermap"].filter(pl.col("targetid") == targetid).select("ra", "dec", "mag")
          .head(1).collect().to_dicts())
    snr = float(median_snr(spec.flux, np.where(spec.mask == 0, spec.ivar, 0))[0])
    fig = qf.spectrum_plot(spec.wave, spec.flux, spec.ivar, spec.mask, title=_title(spec, fm[0] if fm else {}, snr),
                           sky=_sky(tables, targetid, spec.meta["extraction"], pairs),
                           flux_label="flux (erg s\u207b\u00b9 cm\u207b\u00b2 \u00c5\u207b\u00b9)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
