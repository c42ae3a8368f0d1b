"""Optional stellar spectra from the Cannon models shipped by ``thedoppler`` (Nidever's Doppler).

``thedoppler`` ships two quadratic-in-cubic Cannon models of synthetic spectra (3000-18000 A at
0.1 A, air, continuum-normalised; Teff 3500-8000 K "cool stars" and 8000-40000 K "hot dwarfs"),
each with a companion Cannon model of the log continuum, as plain pickled dicts. Labels enter
scaled as in TheCannon: ``(label - median) / ptp(percentile(labels, [2.5, 97.5]))`` over the
training labels (checked: the solar labels give a normalised spectrum with continuum ~1.00 and
Na D / Mg b / H-alpha / Ca triplet core depths of 0.86 / 0.92 / 0.64 / 0.81).

Only the pickles are read (no import of the package, whose dependencies are heavy). They are
found in ``$FIBERLAKE_CANNON_DIR`` or in the data folder of an installed ``doppler`` package.
Broad molecular bands are absent from normalised spectra and from the smooth continuum model,
so the analytic TiO bands are applied on top for cool stars.

Neither model holds white dwarfs or carbon stars. A DA white dwarf is the hot model's
continuum (its log-continuum Cannon model at the star's Teff, log g clipped to the grid) times
the analytic pressure-broadened Balmer lines; a carbon star is the cool model's spectrum (its own
atomic lines and continuum) with the analytic C2 and CN bands instead of TiO.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np

from fiberlake.ingest.sim_spectra import (
    GROUPS,
    FineGrid,
    carbon_band_depth,
    da_balmer_depth,
    group_strengths,
    line_matrix,
    stellar_line_table,
)

MODEL_FILES = {
    "cool": "cannongrid_3000_18000_coolstars_norm_cubic_model.pkl",
    "hot": "cannongrid_3000_18000_hotdwarfs_norm_cubic_model.pkl",
}


def find_cannon_dir() -> Path | None:
    """Folder holding the Cannon model pickles, or ``None`` when they are not available."""
    candidates = []
    if os.environ.get("FIBERLAKE_CANNON_DIR"):
        candidates.append(Path(os.environ["FIBERLAKE_CANNON_DIR"]))
    spec = importlib.util.find_spec("doppler")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "data")
    for folder in candidates:
        if all((folder / name).exists() for name in MODEL_FILES.values()):
            return folder
    return None


def _prepare(model: dict) -> dict:
    labels = np.asarray(model["training_set_labels"], dtype=float)
    terms = model["vectorizer"][1]["terms"]
    disp = np.asarray(model["dispersion"], dtype=float)
    return {
        "theta": np.asarray(model["theta"], dtype=float),
        "terms": [[(int(i), float(p)) for i, p in t] for t in terms],
        "fiducial": np.median(labels, axis=0),
        "scale": np.ptp(np.percentile(labels, [2.5, 97.5], axis=0), axis=0),
        "lo": labels.min(axis=0),
        "hi": labels.max(axis=0),
        "wave": disp,
    }


@lru_cache(maxsize=2)
def load_cannon_models(folder: str) -> dict:
    """Load both models (normalised spectrum and log continuum) from ``folder``."""
    out = {}
    for key, name in MODEL_FILES.items():
        with open(Path(folder) / name, "rb") as handle:
            raw = pickle.load(handle)
        out[key] = {"norm": _prepare(raw), "cont": _prepare(raw["continuum"])}
    return out


def _label_vectors(m: dict, labels: np.ndarray) -> np.ndarray:
    x = (np.clip(labels, m["lo"], m["hi"]) - m["fiducial"]) / m["scale"]
    cols = [np.ones(len(x))]
    for term in m["terms"]:
        v = np.ones(len(x))
        for i, p in term:
            v = v * x[:, i] ** p
        cols.append(v)
    return np.stack(cols, axis=1)


def cannon_rest_spectra(grid: FineGrid, teff, logg, feh, folder: str | Path, spectype=None) -> np.ndarray:
    """Rest-frame photon spectra from the Cannon models on ``grid`` (arbitrary normalisation).

    ``spectype`` (optional, per star): ``"DA"`` and ``"C"`` stars as the module says.

    Returns
    -------
    ndarray, shape (n_stars, grid.n)
    """
    models = load_cannon_models(str(folder))
    teff = np.atleast_1d(np.asarray(teff, dtype=float))
    labels = np.stack([teff, np.broadcast_to(logg, teff.shape), np.broadcast_to(feh, teff.shape)], axis=1)
    kinds = np.full(teff.shape, "", dtype="<U3") if spectype is None \
        else np.broadcast_to(np.asarray(spectype, dtype="<U3"), teff.shape)
    da, carbon = kinds == "DA", kinds == "C"
    wave = grid.wave
    out = np.empty((teff.size, grid.n))
    if np.any(da):
        idx = np.flatnonzero(da)
        cont = models["hot"]["cont"]
        logc = _label_vectors(cont, labels[idx]) @ cont["theta"].T
        for j, star in enumerate(idx):
            out[star] = 10.0 ** np.interp(wave, cont["wave"], logc[j]) * wave
        out[idx] *= np.exp(-da_balmer_depth(grid, teff[idx], labels[idx, 1]))
    for key, sel in (("cool", (teff < 8000.0) & ~da), ("hot", (teff >= 8000.0) & ~da)):
        idx = np.flatnonzero(sel)
        if not idx.size:
            continue
        norm, cont = models[key]["norm"], models[key]["cont"]
        w = norm["wave"]
        i0 = max(int(np.searchsorted(w, wave[0])) - 2, 0)
        i1 = min(int(np.searchsorted(w, wave[-1])) + 2, w.size)
        flux = _label_vectors(norm, labels[idx]) @ norm["theta"][i0:i1].T
        flux = np.clip(flux, 0.0, 1.3)
        logc = _label_vectors(cont, labels[idx]) @ cont["theta"].T
        for j, star in enumerate(idx):
            f = np.interp(wave, w[i0:i1], flux[j])
            c = 10.0 ** np.interp(wave, cont["wave"], logc[j])
            out[star] = f * c * wave  # F_lambda -> photons
    # molecular bands (absent from the normalised models) from the analytic model
    tio = GROUPS.index("tio")
    strength = group_strengths(teff, labels[:, 1], labels[:, 2])[:, tio]
    strength[da | carbon] = 0.0
    if np.any(carbon):
        idx = np.flatnonzero(carbon)
        out[idx] *= np.exp(-carbon_band_depth(grid, teff[idx]))
    if np.any(strength > 0):
        table = stellar_line_table()
        amp = np.where(table["group"][None, :] == tio, strength[:, None] * table["weight"][None, :], 0.0)
        tau = np.asarray((line_matrix(grid).T @ amp.T).T)
        out *= np.exp(-tau)
    return out
