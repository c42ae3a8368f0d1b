"""Model spectra of flux-standard stars for the flux calibration, independent of the simulator.

Real pipelines fit Kurucz or Phoenix models to real stars; the simulated night's stars come from
the simulator's own analytic model (:mod:`fiberlake.ingest.sim_spectra`), so fitting them with
that model would be an inverse crime. These models are built from textbook stellar-atmosphere
physics instead, with their own line list, strength laws and profiles:

* continuum: a Planck function at ``Teff`` with a metallicity-dependent blue blanketing;
* hydrogen: Balmer and Paschen lines at the Rydberg wavelengths (fine-structure weighted, vacuum
  to air), oscillator strengths from Kramers' formula with a Gaunt factor, level populations from
  the Boltzmann and Saha equations, Stark wings growing with the electron pressure (a simple
  ``log Pe(Teff, log g, [Fe/H])``); continuous opacity of H- and of hydrogen from n = 3;
* metals: ~70 real lines of Fe I/II, Mg I, Na I, Ca I/II, Ti II, Cr I, Mn I, Si I, O I (air
  wavelengths, excitation potentials and approximate ``log gf`` from the solar literature), their
  optical depths from abundance x gf x Boltzmann x Saha over the H- continuous opacity, equivalent
  widths through a numerical Voigt curve of growth, drawn at the instrument's resolution;
* two scale constants fixed on the Sun: Fe I 5269.5 (W = 0.48 A) and H-alpha (W = 4 A).

It is not a model atmosphere either, but none of its numbers came from the simulator. Spectra
are flux densities ``f_lambda`` (energy), arbitrary normalisation, air wavelengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.special import voigt_profile

HC_K = 1.438777e8
"""h c / k (Angstrom Kelvin)."""
C_KMS = 299792.458
THETA_EV = 5039.8
"""5040 / T is ``theta``; ``chi * theta`` is ``chi / (kT ln 10)`` for ``chi`` in eV."""

# species: log abundance (H = 12, solar), ionisation energy (eV), U(ion)/U(neutral), atomic mass
SPECIES = {
    "H": (12.00, 13.598, 0.5, 1.008),
    "O": (8.69, 13.618, 0.44, 16.0),
    "Na": (6.24, 5.139, 0.5, 23.0),
    "Mg": (7.60, 7.646, 2.0, 24.3),
    "Si": (7.51, 8.152, 0.6, 28.1),
    "Ca": (6.34, 6.113, 2.0, 40.1),
    "Ti": (4.95, 6.828, 1.8, 47.9),
    "Cr": (5.64, 6.767, 0.6, 52.0),
    "Mn": (5.43, 7.434, 1.2, 54.9),
    "Fe": (7.50, 7.902, 1.6, 55.8),
}

# metal lines: air wavelength (A), species, ionisation stage (0 neutral, 1 singly ionised),
# excitation potential of the lower level (eV), log gf, damping multiplier
METAL_LINES = (
    (3933.663, "Ca", 1, 0.00, 0.134, 40.0), (3968.469, "Ca", 1, 0.00, -0.166, 40.0),
    (4045.813, "Fe", 0, 1.49, 0.280, 1.0), (4063.594, "Fe", 0, 1.56, 0.062, 1.0),
    (4071.738, "Fe", 0, 1.61, -0.022, 1.0), (4077.709, "Sr", 1, 0.00, 0.150, 1.0),
    (4132.058, "Fe", 0, 1.61, -0.675, 1.0), (4143.868, "Fe", 0, 1.56, -0.511, 1.0),
    (4202.029, "Fe", 0, 1.49, -0.708, 1.0), (4226.728, "Ca", 0, 0.00, 0.244, 3.0),
    (4250.787, "Fe", 0, 1.56, -0.714, 1.0), (4271.760, "Fe", 0, 1.49, -0.164, 1.0),
    (4325.762, "Fe", 0, 1.61, 0.006, 1.0), (4383.545, "Fe", 0, 1.49, 0.200, 1.0),
    (4404.750, "Fe", 0, 1.56, -0.142, 1.0), (4415.122, "Fe", 0, 1.61, -0.615, 1.0),
    (4443.794, "Ti", 1, 1.08, -0.720, 1.0), (4468.507, "Ti", 1, 1.13, -0.600, 1.0),
    (4501.270, "Ti", 1, 1.12, -0.770, 1.0), (4528.614, "Fe", 0, 2.18, -0.822, 1.0),
    (4571.971, "Ti", 1, 1.57, -0.320, 1.0), (4583.837, "Fe", 1, 2.81, -1.930, 1.0),
    (4891.492, "Fe", 0, 2.85, -0.112, 1.0), (4920.502, "Fe", 0, 2.83, 0.068, 1.0),
    (4923.927, "Fe", 1, 2.89, -1.320, 1.0), (4957.597, "Fe", 0, 2.81, 0.233, 1.0),
    (5018.440, "Fe", 1, 2.89, -1.220, 1.0), (5041.072, "Fe", 0, 0.96, -3.090, 1.0),
    (5110.413, "Fe", 0, 0.00, -3.760, 1.0), (5167.322, "Mg", 0, 2.71, -0.870, 15.0),
    (5167.488, "Fe", 0, 1.49, -1.118, 1.0), (5169.033, "Fe", 1, 2.89, -1.300, 1.0),
    (5172.684, "Mg", 0, 2.71, -0.390, 15.0), (5183.604, "Mg", 0, 2.72, -0.170, 15.0),
    (5204.582, "Cr", 0, 0.94, -0.210, 1.0), (5208.419, "Cr", 0, 0.94, 0.160, 1.0),
    (5227.189, "Fe", 0, 1.56, -1.228, 1.0), (5232.940, "Fe", 0, 2.94, -0.058, 1.0),
    (5269.537, "Fe", 0, 0.86, -1.321, 1.0), (5316.615, "Fe", 1, 3.15, -1.850, 1.0),
    (5328.039, "Fe", 0, 0.92, -1.466, 1.0), (5371.490, "Fe", 0, 0.96, -1.645, 1.0),
    (5397.128, "Fe", 0, 0.92, -1.993, 1.0), (5405.775, "Fe", 0, 0.99, -1.844, 1.0),
    (5429.697, "Fe", 0, 0.96, -1.879, 1.0), (5446.917, "Fe", 0, 0.99, -1.914, 1.0),
    (5528.405, "Mg", 0, 4.35, -0.498, 2.0), (5615.644, "Fe", 0, 3.33, 0.050, 1.0),
    (5889.951, "Na", 0, 0.00, 0.108, 10.0), (5895.924, "Na", 0, 0.00, -0.194, 10.0),
    (6122.217, "Ca", 0, 1.89, -0.316, 2.0), (6136.615, "Fe", 0, 2.45, -1.400, 1.0),
    (6162.173, "Ca", 0, 1.90, -0.090, 2.0), (6191.558, "Fe", 0, 2.43, -1.417, 1.0),
    (6230.723, "Fe", 0, 2.56, -1.281, 1.0), (6252.555, "Fe", 0, 2.40, -1.687, 1.0),
    (6393.601, "Fe", 0, 2.43, -1.432, 1.0), (6400.001, "Fe", 0, 3.60, -0.290, 1.0),
    (6439.075, "Ca", 0, 2.53, 0.390, 2.0), (6494.980, "Fe", 0, 2.40, -1.273, 1.0),
    (6546.239, "Fe", 0, 2.76, -1.536, 1.0), (6677.987, "Fe", 0, 2.69, -1.418, 1.0),
    (7034.901, "Si", 0, 5.87, -0.780, 1.0), (7148.150, "Ca", 0, 2.71, 0.137, 2.0),
    (7445.751, "Fe", 0, 4.26, -0.237, 1.0), (7495.067, "Fe", 0, 4.22, -0.102, 1.0),
    (7511.019, "Fe", 0, 4.18, 0.119, 1.0), (7771.944, "O", 0, 9.15, 0.369, 1.0),
    (7774.166, "O", 0, 9.15, 0.223, 1.0), (7775.388, "O", 0, 9.15, 0.001, 1.0),
    (8183.256, "Na", 0, 2.10, 0.237, 2.0), (8194.824, "Na", 0, 2.10, 0.492, 2.0),
    (8327.052, "Fe", 0, 2.20, -1.525, 1.0), (8498.023, "Ca", 1, 1.69, -1.312, 12.0),
    (8542.091, "Ca", 1, 1.70, -0.362, 12.0), (8662.141, "Ca", 1, 1.69, -0.623, 12.0),
    (8688.625, "Fe", 0, 2.18, -1.212, 1.0), (8806.756, "Mg", 0, 4.35, -0.137, 3.0),
)
SPECIES["Sr"] = (2.87, 5.695, 0.5, 87.6)

SOLAR = (5772.0, 4.44, 0.0)
FE_5269_SUN_EW = 0.48
"""Equivalent width (A) of Fe I 5269.5 in the Sun (solar atlas), fixing the metal-line scale."""
HALPHA_SUN_EW = 4.0
"""Equivalent width (A) of H-alpha in the Sun, fixing the hydrogen-line scale."""
MICROTURBULENCE_KMS = 1.2


FINE_STRUCTURE = 6564.614 / 6564.696
"""The Bohr levels' wavelengths times this give the fine-structure-weighted ones (NIST H-alpha, vacuum)."""


def vacuum_to_air(wave_vac: np.ndarray) -> np.ndarray:
    """Air wavelengths (A) from vacuum ones (the IAU standard of Morton 2000)."""
    s2 = (1e4 / np.asarray(wave_vac, dtype=float)) ** 2
    n = 1.0 + 0.0000834254 + 0.02406147 / (130.0 - s2) + 0.00015998 / (38.9 - s2)
    return np.asarray(wave_vac, dtype=float) / n


BB_GAUNT = 0.76
"""Bound-bound Gaunt factor of the low Balmer and Paschen lines (Kramers' f times it)."""


def hydrogen_lines(lower: int, upper_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hydrogen series lines from level ``lower``: air wavelength, ``log gf`` (Kramers), upper level."""
    upper = np.arange(lower + 1, upper_max + 1)
    wave_vac = 1e8 / (109677.583 * (1.0 / lower**2 - 1.0 / upper**2)) * FINE_STRUCTURE
    f = BB_GAUNT * 32.0 / (3.0 * np.sqrt(3.0) * np.pi) / (lower**5 * upper**3) * (1.0 / lower**2 - 1.0 / upper**2) ** -3
    return vacuum_to_air(wave_vac), np.log10(2.0 * lower**2 * f), upper


def log_electron_pressure(teff: float, logg: float, feh: float) -> float:
    """Photospheric electron pressure (dyn cm^-2, log10): metals in cool stars, hydrogen above ~6000 K."""
    return 1.05 + (logg - 4.44) / 3.0 + 0.25 * feh + 15.0 * np.log10(teff / 5772.0)


def _saha_ratio(chi_ion: float, u_ratio: float, teff: float, log_pe: float) -> float:
    """``N(ion) / N(neutral)`` from the Saha equation (``chi_ion`` in eV)."""
    theta = THETA_EV / teff
    return 10.0 ** (np.log10(2.0 * u_ratio) + 2.5 * np.log10(teff) - chi_ion * theta - log_pe - 0.1762)


def _continuum_opacity(teff: float, log_pe: float, wave: float | np.ndarray) -> np.ndarray:
    """Continuous opacity per hydrogen atom, arbitrary units: H- bound-free (rising to ~8500 A)
    plus hydrogen bound-free from n = 3 (Paschen continuum, below 8204 A), which takes over above
    ~7300 K (:data:`H_BF_CROSSOVER`)."""
    theta = THETA_EV / teff
    wave = np.asarray(wave, dtype=float)
    h_minus = 10.0 ** (log_pe + 2.5 * np.log10(theta) + 0.754 * theta) * (wave / 5000.0) ** 1.5
    return h_minus + _h_bf_scale() * 10.0 ** (-12.09 * theta) * np.where(wave < 8204.0, (wave / 5000.0) ** 3, 0.02)


H_BF_CROSSOVER = (7300.0, 4.2)
"""(Teff, log g) where hydrogen bound-free equals H- opacity at 5000 A."""


@lru_cache(maxsize=1)
def _h_bf_scale() -> float:
    teff, logg = H_BF_CROSSOVER
    theta = THETA_EV / teff
    log_pe = log_electron_pressure(teff, logg, 0.0)
    return float(10.0 ** (log_pe + 2.5 * np.log10(theta) + 0.754 * theta + 12.09 * theta))


@lru_cache(maxsize=1)
def _curve_of_growth() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equivalent width / sigma_D on a grid of (log strength / sigma_D, log gamma / sigma_D)."""
    log_t = np.linspace(-4.0, 9.0, 131)
    log_g = np.linspace(-4.0, 2.0, 31)
    x = np.concatenate([np.linspace(0.0, 12.0, 1201)[:-1], np.geomspace(12.0, 1e7, 600)])
    dx = np.gradient(x)
    w = 2.0 * dx
    w[0] = dx[0]
    table = np.empty((log_t.size, log_g.size))
    for j, g in enumerate(10.0 ** log_g):
        phi = voigt_profile(x, 1.0, g)
        table[:, j] = (-np.expm1(-np.outer(10.0 ** log_t, phi)) * w[None, :]).sum(axis=1)
    return log_t, log_g, table


def equivalent_width(strength: np.ndarray, sigma_d: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """Equivalent width (A) of lines of integrated optical depth ``strength`` (A) with a Voigt profile."""
    from scipy.interpolate import RegularGridInterpolator

    log_t, log_g, table = _curve_of_growth()
    interp = RegularGridInterpolator((log_t, log_g), np.log10(table), bounds_error=False, fill_value=None)
    lt = np.clip(np.log10(np.maximum(strength / sigma_d, 1e-30)), log_t[0], log_t[-1])
    lg = np.clip(np.log10(gamma / sigma_d), log_g[0], log_g[-1])
    out = 10.0 ** interp(np.stack([lt, lg], axis=-1)) * sigma_d
    weak = np.log10(np.maximum(strength / sigma_d, 1e-30)) < log_t[0]
    return np.where(weak, strength, out)


@lru_cache(maxsize=1)
def _metal_line_table() -> dict[str, np.ndarray]:
    """:data:`METAL_LINES` with their species' constants, as arrays (one entry per line)."""
    species = [SPECIES[ln[1]] for ln in METAL_LINES]
    return {
        "wave": np.array([ln[0] for ln in METAL_LINES]), "ionised": np.array([bool(ln[2]) for ln in METAL_LINES]),
        "chi": np.array([ln[3] for ln in METAL_LINES]), "loggf": np.array([ln[4] for ln in METAL_LINES]),
        "damp": np.array([ln[5] for ln in METAL_LINES]),
        "abund": np.array([sp[0] for sp in species]), "chi_ion": np.array([sp[1] for sp in species]),
        "u_ratio": np.array([sp[2] for sp in species]), "mass": np.array([sp[3] for sp in species]),
        "feh_factor": np.array([0.5 if ln[1] == "O" else 1.0 for ln in METAL_LINES]),
    }


def _metal_strengths(teff: float, logg: float, feh: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Metal lines' wavelengths, unscaled integrated optical depths, Doppler sigmas and damping (A)."""
    t = _metal_line_table()
    wave = t["wave"]
    log_pe = log_electron_pressure(teff, logg, feh)
    theta = THETA_EV / teff
    ratio = _saha_ratio(t["chi_ion"], t["u_ratio"], teff, log_pe)
    frac = np.where(t["ionised"], ratio / (1.0 + ratio), 1.0 / (1.0 + ratio))
    out = (wave / 5000.0) ** 2 * 10.0 ** (t["abund"] - 12.0 + t["feh_factor"] * feh + t["loggf"] - t["chi"] * theta) * frac
    out = out / _continuum_opacity(teff, log_pe, wave)
    sig = wave / C_KMS * np.sqrt(0.0831 * teff / t["mass"] / 10.0 + MICROTURBULENCE_KMS**2 / 2.0)
    gam = t["damp"] * 0.006 * (wave / 5000.0) ** 2 * 10.0 ** (0.4 * (log_pe - 1.05))
    return wave, out, sig, gam


def _hydrogen_strengths(teff: float, logg: float, feh: float) -> tuple[np.ndarray, ...]:
    """Balmer and Paschen lines: wavelengths, unscaled integrated optical depths, sigma_D, Stark gamma."""
    log_pe = log_electron_pressure(teff, logg, feh)
    theta = THETA_EV / teff
    ratio = _saha_ratio(SPECIES["H"][1], SPECIES["H"][2], teff, log_pe)
    neutral = 1.0 / (1.0 + ratio)
    waves, taus, sigs, gams = [], [], [], []
    for lower, top in ((2, 18), (3, 20)):
        w, loggf, upper = hydrogen_lines(lower, top)
        chi = 13.598 * (1.0 - 1.0 / lower**2)
        tau = (w / 5000.0) ** 2 * 10.0 ** (loggf - chi * theta) / 2.0 * neutral / _continuum_opacity(teff, log_pe, w)
        waves.append(w)
        taus.append(tau)
        sigs.append(w / C_KMS * np.sqrt(0.0831 * teff / 1.008 / 10.0 + MICROTURBULENCE_KMS**2 / 2.0))
        gams.append(0.05 * (w / 6563.0) ** 2 * ((upper**2 - lower**2) / 5.0) ** 1.6 * 10.0 ** (2.0 / 3.0 * (log_pe - 1.4)))
    return tuple(np.concatenate(a) for a in (waves, taus, sigs, gams))


@lru_cache(maxsize=1)
def _scales() -> tuple[float, float]:
    """Metal and hydrogen scale constants fixed on the Sun (:data:`FE_5269_SUN_EW`, :data:`HALPHA_SUN_EW`)."""
    from scipy.optimize import brentq

    wave, tau, sig, gam = _metal_strengths(*SOLAR)
    i = int(np.argmin(np.abs(wave - 5269.537)))
    k_metal = 10.0 ** brentq(lambda lk: equivalent_width(np.array([10.0**lk * tau[i]]), sig[i:i + 1], gam[i:i + 1])[0]
                             - FE_5269_SUN_EW, -10.0, 20.0)
    hw, ht, hs, hg = _hydrogen_strengths(*SOLAR)
    j = int(np.argmin(np.abs(hw - 6562.8)))
    x = np.linspace(-300.0, 300.0, 60001)
    phi = voigt_profile(x, hs[j], hg[j])

    def ew(lk: float) -> float:
        return float(np.trapezoid(-np.expm1(-(10.0**lk) * ht[j] * phi), x)) - HALPHA_SUN_EW

    k_h = 10.0 ** brentq(ew, -10.0, 20.0)
    return k_metal, k_h


@dataclass(frozen=True)
class StarLabels:
    """Parameters of a model star."""

    teff: float
    logg: float
    feh: float
    rv: float = 0.0


def planck_flambda(wave: np.ndarray, teff: float) -> np.ndarray:
    """Planck ``B_lambda`` shape (energy), 1 at 5500 A."""
    wave = np.asarray(wave, dtype=float)
    ref = 5500.0**-5 / np.expm1(HC_K / (5500.0 * teff))
    return wave**-5 / np.expm1(np.minimum(HC_K / (wave * teff), 600.0)) / ref


def continuum(wave: np.ndarray, labels: StarLabels) -> np.ndarray:
    """Continuum ``f_lambda`` shape: Planck times a metallicity-dependent blue blanketing."""
    theta = THETA_EV / labels.teff
    tau = 0.06 * 10.0 ** labels.feh * theta**4 * (4000.0 / np.asarray(wave, dtype=float)) ** 4
    return planck_flambda(wave, labels.teff) * np.exp(-tau)


def model_spectrum(wave: np.ndarray, labels: StarLabels, sigma_lsf: float | np.ndarray, *,
                   hydrogen_step: float = 0.05) -> np.ndarray:
    """Model ``f_lambda`` (arbitrary normalisation) at the instrument's resolution.

    Parameters
    ----------
    wave : ndarray
        Increasing air wavelengths (A) of the output bins (any spacing up to ~1 A).
    labels : StarLabels
        Teff (K), log g, [Fe/H], radial velocity (km/s).
    sigma_lsf : float or ndarray
        Gaussian sigma (A) of the line-spread function (scalar, or one per wavelength).
    hydrogen_step : float, optional
        Step (A) of the grid the hydrogen lines' optical depth is computed on (0.05 resolves
        their Doppler cores; a coarser one is enough for band fluxes, :func:`band_magnitudes`).

    Returns
    -------
    ndarray, shape wave.shape
    """
    wave = np.asarray(wave, dtype=float)
    doppler = 1.0 + labels.rv / C_KMS
    rest = wave / doppler
    sigma = np.broadcast_to(np.asarray(sigma_lsf, dtype=float), wave.shape) / doppler
    k_metal, k_h = _scales()
    flux = continuum(rest, labels)
    tau = np.zeros_like(wave)
    lw, lt, ls, lg = _metal_strengths(labels.teff, labels.logg, labels.feh)
    near = (lw > rest[0] - 30.0) & (lw < rest[-1] + 30.0)
    ew = equivalent_width(k_metal * lt[near], ls[near], lg[near])
    for w, e, s, g in zip(lw[near], ew, ls[near], lg[near]):
        lo, hi = np.searchsorted(rest, [w - 40.0, w + 40.0])
        if hi > lo:
            sl = slice(lo, hi)
            tau[sl] += e * voigt_profile(rest[sl] - w, np.hypot(sigma[sl], s), g)
    # unresolved lines keep their equivalent width: subtracted linearly (floored for deep blends)
    flux = flux * np.clip(1.0 - tau, 0.02, None)
    return flux * _hydrogen_absorption(rest, labels, sigma, k_h, hydrogen_step)


HYDROGEN_CORE = 30.0
"""Half-width (A) around a hydrogen line inside which its profile is evaluated on the fine grid."""
HYDROGEN_WING_STEP = 0.5
"""Step (A) on which a hydrogen line's wings (beyond :data:`HYDROGEN_CORE`, out to 400 A) are evaluated
and from which they are interpolated linearly: the Stark wings there are smooth (relative error of the
interpolation ``~0.75 step^2 / x^2``, below 2e-4 of the wing's optical depth)."""
WING_STRIDE_MIN = 8
"""The wings' grid is at least this many fine steps (on the 0.25 A grid of :func:`band_magnitudes`: 2 A,
band means within 1e-5 mag of evaluating the wings on the fine grid)."""


def _hydrogen_absorption(rest: np.ndarray, labels: StarLabels, sigma: np.ndarray, k_h: float,
                         step: float = 0.05) -> np.ndarray:
    """``exp(-tau_H)`` on a ``step`` (A) grid, smoothed by the line-spread function, on ``rest``.

    Each line's profile is evaluated on the fine grid within :data:`HYDROGEN_CORE` of its centre and
    on a :data:`HYDROGEN_WING_STEP` grid beyond (interpolated); the Gaussian smoothing is computed at
    the fine points that ``rest`` interpolates between only (:func:`smoothed_at`), the same numbers
    as smoothing the whole fine grid. Transmission within 3e-5 of evaluating every line on the fine grid
    (``tests/test_fluxcal.py``); the stellar fit of a standard on LAMOST's arms 1.6x faster, no gain on
    mini's short arms (``bench/stellar_fit.py``).
    """
    hw, ht, hs, hg = _hydrogen_strengths(labels.teff, labels.logg, labels.feh)
    near = (hw > rest[0] - 400.0) & (hw < rest[-1] + 400.0)
    if not near.any():
        return np.ones_like(rest)
    fine = np.arange(rest[0] - 5.0, rest[-1] + 5.0, step)
    every = max(int(round(HYDROGEN_WING_STEP / step)), WING_STRIDE_MIN)
    at = np.unique(np.append(np.arange(0, fine.size, every), fine.size - 1))  # the coarse points, both ends kept
    coarse = np.zeros(at.size)
    exact = []
    for w, t, s, g in zip(hw[near], ht[near], hs[near], hg[near]):
        lo, hi = np.searchsorted(fine, [w - 400.0, w + 400.0])  # the line's window (cut at 400 A, as ever)
        k_a, k_b = np.searchsorted(at, [lo, hi])  # its coarse points: at[k_a:k_b]
        own = k_h * t * voigt_profile(fine[at[k_a:k_b]] - w, s, g)
        coarse[k_a:k_b] += own
        # fine points where interpolating the coarse grid is not this line: its core, and the ramps at its
        # window's cut between the last coarse point inside and the first outside
        c_lo, c_hi = np.clip(np.searchsorted(fine, [w - HYDROGEN_CORE, w + HYDROGEN_CORE]), lo, hi)
        left_ramp = at[k_a - 1] + 1 if k_a > 0 else 0
        right_ramp = at[k_b] if k_b < at.size else fine.size
        mark = np.zeros(right_ramp - left_ramp, dtype=bool)
        for a, b in ((c_lo, c_hi), (left_ramp, at[k_a] if k_a < k_b else lo), (at[k_b - 1] + 1 if k_b > k_a else hi, right_ramp)):
            mark[max(a - left_ramp, 0):max(b - left_ramp, 0)] = True
        idx = left_ramp + np.flatnonzero(mark)
        inside = (idx >= lo) & (idx < hi)
        value = np.zeros(idx.size)
        value[inside] = k_h * t * voigt_profile(fine[idx[inside]] - w, s, g)
        k0, k1 = max(k_a - 1, 0), min(k_b + 1, at.size)
        own_ext = np.concatenate([np.zeros(k_a - k0), own, np.zeros(k1 - k_b)])
        exact.append((idx, value - np.interp(fine[idx], fine[at[k0:k1]], own_ext)))
    tau = np.interp(fine, fine[at], coarse)  # every line's wings, interpolated
    for idx, correction in exact:
        tau[idx] += correction  # its core and its window's edges, exact
    trans = np.exp(-tau)
    sig_px = float(np.median(sigma)) / step
    return smoothed_at(rest, fine, trans, sig_px) if sig_px > 0.1 else np.interp(rest, fine, trans)


def hydrogen_absorption_reference(rest: np.ndarray, labels: StarLabels, sigma: np.ndarray, k_h: float,
                                  step: float = 0.05) -> np.ndarray:
    """The reference of :func:`_hydrogen_absorption` (what it computed before): every line's profile over
    its whole 400 A window on the fine grid, the whole grid smoothed (``tests/test_fluxcal.py`` and
    ``bench/stellar_fit.py`` compare against it)."""
    from scipy.ndimage import gaussian_filter1d

    hw, ht, hs, hg = _hydrogen_strengths(labels.teff, labels.logg, labels.feh)
    near = (hw > rest[0] - 400.0) & (hw < rest[-1] + 400.0)
    if not near.any():
        return np.ones_like(rest)
    fine = np.arange(rest[0] - 5.0, rest[-1] + 5.0, step)
    tau = np.zeros_like(fine)
    for w, t, s, g in zip(hw[near], ht[near], hs[near], hg[near]):
        lo, hi = np.searchsorted(fine, [w - 400.0, w + 400.0])
        tau[lo:hi] += k_h * t * voigt_profile(fine[lo:hi] - w, s, g)
    trans = np.exp(-tau)
    sig_px = float(np.median(sigma)) / step
    trans = gaussian_filter1d(trans, sig_px, mode="nearest") if sig_px > 0.1 else trans
    return np.interp(rest, fine, trans)


def smoothed_at(x: np.ndarray, grid: np.ndarray, values: np.ndarray, sigma_px: float) -> np.ndarray:
    """``np.interp(x, grid, gaussian_filter1d(values, sigma_px, mode="nearest"))``, with the filter computed
    only at the grid points ``x`` falls between (scipy's kernel: radius ``int(4 sigma + 0.5)``,
    normalised), so its cost scales with ``len(x)``, not ``len(grid)``."""
    radius = int(4.0 * sigma_px + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma_px) ** 2)
    kernel /= kernel.sum()
    left = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, grid.size - 2)
    frac = np.clip((x - grid[left]) / (grid[left + 1] - grid[left]), 0.0, 1.0)
    windows = sliding_window_view(np.pad(values, radius, mode="edge"), 2 * radius + 2)[left]  # around left, left + 1
    return (windows[:, :-1] @ kernel) * (1.0 - frac) + (windows[:, 1:] @ kernel) * frac


def band_magnitudes(labels: StarLabels, bands: tuple[tuple[float, float], ...], dw: float = 1.0) -> np.ndarray:
    """Synthetic photon-counting AB magnitudes of the model through top-hat ``bands``, up to one
    constant common to every band (the model's normalisation is arbitrary): differences are the
    model's colours.

    ``m_B = -2.5 log10(<f_lambda lambda>_B / <lambda^-1>_B)`` (the mean photon flux density over the
    band over that of a flat-``f_nu`` source), on a ``dw`` grid at a 2 A line-spread function,
    hydrogen on a 0.25 A grid: the band means are those of the full-resolution model to ~1e-4 mag.

    Returns
    -------
    ndarray, shape (len(bands),)
    """
    lo, hi = min(b[0] for b in bands), max(b[1] for b in bands)
    wave = np.arange(lo, hi + 0.5 * dw, dw)
    photons = model_spectrum(wave, labels, 2.0, hydrogen_step=0.25) * wave
    out = np.empty(len(bands))
    for k, (b_lo, b_hi) in enumerate(bands):
        inside = (wave >= b_lo) & (wave <= b_hi)
        out[k] = -2.5 * np.log10(np.mean(photons[inside]) / np.mean(1.0 / wave[inside]))
    return out
