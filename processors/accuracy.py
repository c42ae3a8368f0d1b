"""Accuracy figures of a reduction against simulator truth (pure: arrays in, numbers out)."""

from __future__ import annotations

import numpy as np

from fiberlake.processors.resample import resample_to_grid
from fiberlake.schemas.containers import Spectra1D


def _rms(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(np.sqrt(np.mean(values**2))) if values.size else float("nan")


def robust_std(values: np.ndarray) -> float:
    """Standard deviation estimated from the median absolute deviation (1.4826 MAD)."""
    values = values[np.isfinite(values)]
    if not values.size:
        return float("nan")
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def interior_rows(ny: int, fraction: float = 0.03) -> slice:
    """Rows away from the CCD ends, where distortion moves traces and lines off the chip."""
    cut = int(round(ny * fraction))
    return slice(cut, ny - cut)


def trace_error(measured_x: np.ndarray, true_x: np.ndarray, live: np.ndarray) -> dict[str, float]:
    """RMS and maximum of measured minus true trace columns (pixels) over live fibers."""
    rows = interior_rows(true_x.shape[1])
    diff = (measured_x - true_x)[live][:, rows]
    return {"trace_rms_px": _rms(diff), "trace_max_px": float(np.nanmax(np.abs(diff)))}


def wavelength_error(measured_wave: np.ndarray, true_wave: np.ndarray, live: np.ndarray) -> dict[str, float]:
    """RMS and maximum of measured minus true wavelengths (Angstrom) over live fibers."""
    rows = interior_rows(true_wave.shape[1])
    diff = (measured_wave - true_wave)[live][:, rows]
    return {"wave_rms_A": _rms(diff), "wave_max_A": float(np.nanmax(np.abs(diff)))}


def truth_on_grid(rows_per_fiber: np.ndarray, true_wave: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Noiseless per-row truth (electrons per row) on the output grid (electrons per Angstrom)."""
    ones = np.ones_like(rows_per_fiber, dtype=np.float32)
    truth = Spectra1D(rows_per_fiber.astype(np.float32), ones, np.zeros(rows_per_fiber.shape, np.uint32))
    return resample_to_grid(true_wave, truth, grid).flux


def flux_accuracy(spectra: Spectra1D, truth: np.ndarray, fibers: np.ndarray) -> dict[str, np.ndarray]:
    """Per-fiber comparison of extracted flux with the truth on the same grid.

    Parameters
    ----------
    spectra : Spectra1D
        Extracted, sky-subtracted spectra on the grid.
    truth : ndarray
        Noiseless object flux on the same grid.
    fibers : ndarray of int
        Fibers to compare.

    Returns
    -------
    dict
        Per fiber: ``ratio`` (median of flux / truth), ``ratio_scatter`` (robust std of flux/truth),
        ``pull_mean`` / ``pull_std`` (of (flux - truth) * sqrt(ivar)), ``snr_empirical``
        (mean truth / std(flux - truth)), ``snr_ivar`` (median flux * sqrt(ivar)).
    """
    out = {k: np.full(len(fibers), np.nan) for k in ("ratio", "ratio_scatter", "pull_mean", "pull_std", "snr_empirical", "snr_ivar")}
    for i, fiber in enumerate(fibers):
        t = truth[fiber]
        good = (spectra.ivar[fiber] > 0) & np.isfinite(t) & (t > 0)
        if good.sum() < 50:
            continue
        f, iv, tt = spectra.flux[fiber][good], spectra.ivar[fiber][good], t[good]
        ratio = f / tt
        pull = (f - tt) * np.sqrt(iv)
        out["ratio"][i] = np.median(ratio)
        out["ratio_scatter"][i] = robust_std(ratio)
        out["pull_mean"][i] = np.median(pull)
        out["pull_std"][i] = robust_std(pull)
        out["snr_empirical"][i] = np.mean(tt) / robust_std(f - tt)
        out["snr_ivar"][i] = np.median(f * np.sqrt(iv))
    return out


def sky_residual(spectra: Spectra1D, sky: np.ndarray, sky_fibers: np.ndarray) -> dict[str, float]:
    """Sky-subtraction residuals on sky fibers: chi (flux*sqrt(ivar)) and relative to the sky level."""
    idx = np.flatnonzero(sky_fibers)
    good = spectra.ivar[idx] > 0
    chi = (spectra.flux[idx] * np.sqrt(np.clip(spectra.ivar[idx], 0, None)))[good]
    level = np.median(sky[np.isfinite(sky) & (sky > 0)]) if np.any(sky > 0) else np.nan
    resid = spectra.flux[idx][good]
    bright = np.broadcast_to(sky, spectra.flux.shape)[idx][good] > 5 * level
    return {
        "sky_chi_mean": float(np.mean(chi)),
        "sky_chi_std": float(np.std(chi)),
        "sky_resid_over_level": float(robust_std(resid) / level),
        "sky_line_resid_frac": float(np.median(np.abs(resid[bright])) / np.median(np.broadcast_to(sky, spectra.flux.shape)[idx][good][bright]))
        if bright.any() else float("nan"),
    }
