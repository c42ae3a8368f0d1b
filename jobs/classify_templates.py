"""Template grids of the chi-square template fit, from a star model other than the data's.

The template fit must not fit the truth's own generator: on nights drawn with the analytic model
its templates come from ``thedoppler``'s Cannon models, and the other way round
(:func:`other_model`). When the Cannon pickles are not installed, both sides can only be
analytic; the grid then says ``source = 'analytic (same as data: Cannon models not found)'``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fiberlake.processors.template_fit import TemplateGrid, smooth_to_resolution

TEMPLATE_LABELS: dict[str, tuple[tuple[float, float], ...]] = {
    # (Teff, log g) of each template: several per class across its range, dwarfs and giants
    "A": ((7600.0, 4.0), (8500.0, 4.0), (9500.0, 4.0), (8200.0, 3.5)),
    "F": ((6100.0, 4.2), (6600.0, 4.2), (7200.0, 4.2), (6500.0, 3.5)),
    "G": ((5300.0, 4.4), (5650.0, 4.4), (5950.0, 4.4), (5300.0, 2.8)),
    "K": ((4000.0, 4.6), (4500.0, 4.6), (5000.0, 4.6), (4300.0, 2.0)),
    "M": ((3200.0, 4.8), (3500.0, 4.8), (3800.0, 4.8), (3600.0, 1.2)),
    "DA": ((8000.0, 8.0), (11000.0, 8.0), (15000.0, 8.0), (22000.0, 8.0)),
    "C": ((3400.0, 1.2), (3800.0, 1.2), (4200.0, 1.5), (3600.0, 4.0)),
}
"""Template labels per class; [Fe/H] = -0.3 (the simulator's mean)."""


def other_model(data_model: str) -> str:
    """The star model of the templates for data drawn with ``data_model`` (analytic <-> cannon)."""
    return "analytic" if data_model == "cannon" else "cannon"


@lru_cache(maxsize=4)
def template_grid(model: str, lo: float = 3600.0, hi: float = 9400.0, step: float = 0.5,
                  sigma_a: float = 2.5, classes: tuple[str, ...] | None = None) -> TemplateGrid:
    """A grid of rest-frame templates from star model ``model``, smoothed to ``sigma_a`` (A).

    Parameters
    ----------
    model : str
        ``analytic`` or ``cannon`` (falls back to analytic when the Cannon pickles are missing; the
        grid's ``source`` says which was used).
    lo, hi, step : float
        Wavelength grid (A).
    sigma_a : float
        Gaussian line-spread sigma of the instrument (A).
    """
    from fiberlake.ingest.sim_spectra import FineGrid, resolve_stellar_model, stellar_spectra

    classes = classes or tuple(TEMPLATE_LABELS)
    grid = FineGrid.covering(lo, hi, step)
    names, labels = [], []
    for c in classes:
        for teff, logg in TEMPLATE_LABELS[c]:
            names.append(c)
            labels.append((teff, logg, 0.0 if c == "DA" else -0.3))
    lab = np.array(labels)
    used = resolve_stellar_model(model)[0]
    flux = stellar_spectra(grid, lab[:, 0], lab[:, 1], lab[:, 2], np.zeros(len(lab)), model=model,
                           spectype=np.array(names))
    source = used if used == model else f"{used} (asked {model}: Cannon models not found)"
    return TemplateGrid(wave=grid.wave, flux=smooth_to_resolution(grid.wave, flux, sigma_a),
                        classes=np.array(names), labels=lab, source=source)
