"""The flux standards' stellar fit: seconds per star, the current models against the fine-grid reference.

    python bench/stellar_fit.py [--stars 4] [--repeats 2]

``processors.fluxcal.fit_standard`` (radial-velocity scan, Teff/[Fe/H] grid, Nelder-Mead over the labels,
~200 model spectra per star) on synthetic standards of a mini night's two arms (the construction of
``tests/test_fluxcal.py``: the continuum of one model, the lines of another, S/N ~45 per bin, catalogue
colours given), timed with the current hydrogen absorption (wings on a coarse grid, smoothing where the
output needs it) and with :func:`~fiberlake.processors.stellar_models.hydrogen_absorption_reference`
(every line on the fine grid, the whole grid smoothed: the code before), interleaved in one run. Prints
seconds per star for both, their ratio, and the largest label difference between the two fits.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where bench/typing.py would shadow the
# standard library's typing module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from fiberlake.processors import fluxcal as fc  # noqa: E402
from fiberlake.processors import stellar_models as sm  # noqa: E402
from fiberlake.schemas.containers import Spectra1D  # noqa: E402

INSTRUMENTS = {
    "mini": {"b1": (4700.0, 0.54, 930, 0.75), "r1": (6300.0, 0.81, 990, 1.13)},
    "lamost": {"b1": (3700.0, 0.537, 4096, 0.75), "r1": (5700.0, 0.806, 4096, 1.13)},
}
"""Each instrument's arms: first wavelength, step, bins, line-spread sigma (A) (mini ~550 and ~800 A wide,
lamost ~2200 and ~3300 A: most Balmer lines and the Paschen series fall in the latter)."""


def synthetic_standard(true: sm.StarLabels, lines: sm.StarLabels, rng: np.random.Generator,
                       instrument: str = "mini") -> dict[str, fc.Arm]:
    """One star with the continuum of ``true`` and the lines of ``lines``, S/N ~45 per bin."""
    arms = {}
    for cam, (w0, dw, n, sig) in INSTRUMENTS[instrument].items():
        wave = w0 + dw * np.arange(n)
        flux = sm.continuum(wave, true) * sm.model_spectrum(wave, lines, sig) / sm.continuum(wave, lines)
        flux = 1000.0 * flux / flux.mean()
        var = flux / 2.0
        obs = flux + rng.normal(size=n) * np.sqrt(var)
        arms[cam] = fc.Arm(wave, Spectra1D(obs[None], 1.0 / var[None], np.zeros((1, n), np.uint32)), sig)
    return arms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stars", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved passes (the best is kept)")
    args = ap.parse_args()
    settings = fc.FluxCalSettings(max_standards=3)
    print(f"fit_standard on {args.stars} synthetic standards (2 arms), best of {args.repeats} interleaved passes")
    print("| instrument | reference (fine grid) s per star | current s per star | ratio | largest label difference |")
    print("|---|---|---|---|---|")
    for instrument in INSTRUMENTS:
        rng = np.random.default_rng(19)
        stars = []
        for teff in np.linspace(5600.0, 7400.0, args.stars):
            true = sm.StarLabels(float(teff), 4.1, -0.6, 25.0)
            lines = sm.StarLabels(float(teff) - 500.0, 4.1, -0.6, 25.0)
            stars.append((synthetic_standard(true, lines, rng, instrument), fc.model_colours(true, settings)))
        best, fits = timed_fits(stars, settings, args.repeats)
        ref, now = fits["reference"], fits["current"]
        d_teff = max(abs(a.labels.teff - b.labels.teff) for a, b in zip(ref, now))
        d_rv = max(abs(a.labels.rv - b.labels.rv) for a, b in zip(ref, now))
        print(f"| {instrument} | {best['reference']:.2f} | {best['current']:.2f} | "
              f"{best['reference'] / best['current']:.2f}x | Teff {d_teff:.1f} K, rv {d_rv:.2f} km/s |")


def timed_fits(stars: list, settings: fc.FluxCalSettings, repeats: int) -> tuple[dict, dict]:
    """Best seconds per star and the fits, with each hydrogen absorption (interleaved passes)."""
    current = sm._hydrogen_absorption
    variants = {"reference": sm.hydrogen_absorption_reference, "current": current}
    best = {name: np.inf for name in variants}
    fits = {}
    try:
        for _ in range(repeats):
            for name, fn in variants.items():
                sm._hydrogen_absorption = fn
                t0 = time.perf_counter()
                fits[name] = [fc.fit_standard(arms, 0, 14.0, settings, colours) for arms, colours in stars]
                best[name] = min(best[name], (time.perf_counter() - t0) / len(stars))
    finally:
        sm._hydrogen_absorption = current
    return best, fits

if __name__ == "__main__":
    main()
