"""Spectra for the instrument simulator: stars, night sky, lamps, atmosphere, system efficiency.

Every function here is pure and vectorised. Spectra are photon rates per Angstrom on a uniform
fine wavelength grid (:class:`FineGrid`, air wavelengths); the optics module bins them into CCD
rows. Stars come from an analytic model: a blackbody at ``Teff`` times absorption lines whose
strengths depend on ``Teff``, ``log g`` and ``[Fe/H]`` (Balmer series with damping wings for hot
stars, Ca II H&K, Ca I 4227, the G band, Mg b, Na D, the Ca II triplet, strong Fe I lines, a
fixed forest of weak metal lines, blue line blanketing, TiO bands for cool stars), Doppler
shifted by a radial velocity. The model is not a stellar atmosphere: it has the right features
in the right places with class-dependent strengths, which is what extraction, sky subtraction,
classification and denoising need to be tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import sparse

from fiberlake.schemas.linelists import arc_lines, sky_lines

HC_K = 1.438777e8
"""h c / k in Angstrom Kelvin."""
C_KMS = 299792.458
R_BAND = (5600.0, 6900.0)
"""Wavelength window (A) whose mean photon rate defines the r-band-like magnitude."""
G_BAND = (4000.0, 5500.0)
"""Top hat (A) of the fiber map's blue catalogue magnitude ``MAG_G`` (photon-counting AB, like ``MAG``)."""
I_BAND = (7000.0, 8500.0)
"""Top hat (A) of the fiber map's red catalogue magnitude ``MAG_I``."""


@dataclass(frozen=True)
class FineGrid:
    """Uniform wavelength grid ``w0 + dw * arange(n)`` (Angstrom)."""

    w0: float
    dw: float
    n: int

    @property
    def wave(self) -> np.ndarray:
        """Grid wavelengths."""
        return self.w0 + self.dw * np.arange(self.n)

    @classmethod
    def covering(cls, lo: float, hi: float, dw: float) -> "FineGrid":
        """Grid with step ``dw`` covering ``[lo, hi]``, aligned on multiples of ``dw``."""
        w0 = np.floor(lo / dw) * dw
        return cls(float(w0), float(dw), int(np.ceil((hi - w0) / dw)) + 1)


# --------------------------------------------------------------------------------------
# continuum shapes, efficiency, atmosphere
# --------------------------------------------------------------------------------------
def planck_photons(wave: np.ndarray, teff: np.ndarray | float) -> np.ndarray:
    """Blackbody photon flux density shape, ``lambda^-4 / (exp(hc / lambda k T) - 1)``.

    ``teff`` of shape ``(n,)`` gives ``(n, len(wave))``; arbitrary normalisation.
    """
    teff = np.asarray(teff, dtype=float)
    x = HC_K / (np.asarray(wave)[None, :] * teff.reshape(-1, 1))
    out = (np.asarray(wave)[None, :] / 5000.0) ** -4 / np.expm1(np.minimum(x, 600.0))
    return out[0] if teff.ndim == 0 else out


def _logistic(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


ARM_EFFICIENCY = {
    # centre, sigma of the bell (A), blue cut (centre, width), red cut (centre, width)
    "b": (4850.0, 1300.0, (3720.0, 45.0), (5900.0, 35.0)),
    "r": (7250.0, 1700.0, (5750.0, 35.0), (9200.0, 120.0)),
}
"""System efficiency of each arm: a Gaussian bell times logistic cut-offs (the dichroic between
the arms at ~5800 A, the atmosphere/CCD in the blue, the CCD in the red). Peak 1."""


def efficiency(arm: str, wave: np.ndarray) -> np.ndarray:
    """Relative system efficiency (telescope, fiber, spectrograph, CCD) of an arm, peak ~1.

    Parameters
    ----------
    arm : str
        ``"b"`` or ``"r"`` (other letters use the ``"r"`` curve).
    wave : ndarray
        Air wavelengths (Angstrom).
    """
    centre, sigma, (blue, wb), (red, wr) = ARM_EFFICIENCY.get(arm, ARM_EFFICIENCY["r"])
    wave = np.asarray(wave, dtype=float)
    bell = np.exp(-0.5 * ((wave - centre) / sigma) ** 2)
    return bell * _logistic((wave - blue) / wb) * _logistic((red - wave) / wr)


TELLURIC_BANDS = (
    # head (A), decay length (A), optical depth at airmass 1, onset width (A)
    (6867.0, 12.0, 1.2, 1.0),   # O2 B band
    (7594.0, 18.0, 2.5, 1.0),   # O2 A band
    (6276.0, 10.0, 0.15, 1.0),  # O2 gamma
    (7160.0, 90.0, 0.12, 8.0),  # H2O
    (8120.0, 110.0, 0.18, 8.0),  # H2O
    (8950.0, 150.0, 0.30, 10.0),  # H2O
)


def atmosphere_transmission(wave: np.ndarray, airmass: float) -> np.ndarray:
    """Transmission of the atmosphere: Rayleigh + aerosol + ozone extinction and telluric bands.

    Parameters
    ----------
    wave : ndarray
        Air wavelengths (Angstrom).
    airmass : float
        Airmass of the observation (>= 1).
    """
    wave = np.asarray(wave, dtype=float)
    lam_um = wave / 1e4
    k_mag = 1.086 * 0.0088 * lam_um ** -4.05 + 0.05 * (wave / 5500.0) ** -1.3 \
        + 0.03 * np.exp(-0.5 * ((wave - 6000.0) / 700.0) ** 2)
    tau = np.zeros_like(wave)
    for head, decay, depth, onset in TELLURIC_BANDS:
        dx = wave - head
        tau += depth * _logistic(dx / onset) * np.exp(-np.clip(dx, 0.0, None) / decay)
    return 10.0 ** (-0.4 * airmass * k_mag) * np.exp(-tau * airmass ** 0.6)


def sky_continuum(wave: np.ndarray) -> np.ndarray:
    """Dark-sky continuum shape (photons/s/A), 1 at 5000 A.

    Scattered sun-like light (5800 K) made bluer by a ``lambda^-1`` scattering law, plus a
    pseudo-continuum of unresolved airglow that rises into the near infrared.
    """
    wave = np.asarray(wave, dtype=float)
    scattered = planck_photons(wave, 5800.0) / planck_photons(np.array([5000.0]), 5800.0)[0]
    scattered = scattered * (wave / 5000.0) ** -1.0
    airglow = 0.25 * _logistic((wave - 7200.0) / 600.0) * (wave / 7000.0) ** 2
    return scattered + airglow


def sky_line_list(rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Night-sky emission lines with this exposure's intensities.

    Parameters
    ----------
    rng : Generator, optional
        Exposure-level generator: OH, [OI] and Na D vary independently from exposure to
        exposure (each by a common factor and a 10 % per-line scatter). ``None``: nominal.

    Returns
    -------
    wave, strength : ndarray
        Air wavelengths (A) and intensities relative to [OI] 5577 = 1 (nominal).
    """
    lines = sky_lines()
    wave = lines["wave_air"].astype(float)
    strength = lines["relative_intensity"] / 300.0
    if rng is not None:
        species = lines["species"]
        group = {"OH": rng.uniform(0.7, 1.4), "OI": rng.uniform(0.7, 1.3), "NaI": rng.uniform(0.6, 1.5)}
        factor = np.array([group.get(s, 1.0) for s in species])
        strength = strength * factor * rng.lognormal(0.0, 0.10, size=wave.size)
    return wave, strength


def arc_line_list(rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arc-lamp lines with lamp-dependent intensities.

    Parameters
    ----------
    rng : Generator, optional
        Lamp-level generator (same for every arc of a camera and night): each line's intensity
        scatters by 20 % around the catalogue relative intensity, as lamps differ.

    Returns
    -------
    wave, relative_intensity, ion : ndarray
    """
    lines = arc_lines()
    wave = lines["wave_air"].astype(float)
    rel = lines["relative_intensity"].astype(float)
    if rng is not None:
        rel = rel * rng.lognormal(0.0, 0.2, size=wave.size)
    return wave, rel, lines["ion"]


def flat_lamp(wave: np.ndarray, temperature: float = 3100.0) -> np.ndarray:
    """Continuum (quartz-halogen) lamp photon spectrum, peak-free blackbody shape."""
    return planck_photons(np.asarray(wave, dtype=float), temperature)


# --------------------------------------------------------------------------------------
# stars
# --------------------------------------------------------------------------------------
SPECTRAL_CLASSES = {
    # Teff range (K), dwarf logg range, giant logg range, giant fraction
    "A": ((7500.0, 9800.0), (3.8, 4.4), (3.3, 3.8), 0.1),
    "F": ((6000.0, 7400.0), (3.9, 4.5), (3.2, 3.9), 0.1),
    "G": ((5200.0, 6000.0), (4.2, 4.6), (2.3, 3.5), 0.3),
    "K": ((3900.0, 5200.0), (4.4, 4.8), (1.5, 3.0), 0.4),
    "M": ((3100.0, 3900.0), (4.6, 5.1), (0.8, 1.5), 0.05),
    # DA white dwarfs: degenerate, hydrogen atmospheres (pressure-broadened Balmer lines only)
    "DA": ((7000.0, 30000.0), (7.6, 8.4), (7.6, 8.4), 0.0),
    # carbon stars (C/O > 1): cool giants whose molecules are C2 and CN, not TiO
    "C": ((3200.0, 4500.0), (3.5, 4.5), (0.5, 2.0), 0.85),
}
STAR_CLASSES: tuple[str, ...] = ("A", "F", "G", "K", "M", "DA", "C")
"""Every spectral class the simulator draws (the ``SPECTYPE`` of the truth files)."""
TARGET_CLASS_PROBS = {"A": 0.05, "F": 0.25, "G": 0.35, "K": 0.25, "M": 0.10}
"""Class mix of ordinary (A-M) science targets."""
EXOTIC_CLASS_PROBS = {"DA": 0.04, "C": 0.04}
"""Fraction of science targets that are DA white dwarfs and carbon stars (drawn from a stream of
their own, so every other target is the star it was before these classes existed)."""


def draw_stellar_params(rng: np.random.Generator, objtype: str, class_rng: np.random.Generator | None = None,
                        class_probs: dict | None = None, exotic_probs: dict | None = None) -> dict:
    """Draw a star of known class for a fiber.

    Parameters
    ----------
    rng : Generator
        Seeded from the target id, so a target is the same star in every exposure and camera.
    objtype : str
        ``"STD"`` draws an F star (flux standard: never a white dwarf or a carbon star);
        ``"TGT"`` draws from ``class_probs`` (default :data:`TARGET_CLASS_PROBS`), or, with
        probabilities ``exotic_probs`` (default :data:`EXOTIC_CLASS_PROBS`) decided by
        ``class_rng``, a DA white dwarf or a carbon star (``"C"``).
    class_rng : Generator, optional
        The target's stream for the exotic classes; ``None``: only the ordinary classes.

    Returns
    -------
    dict
        ``spectype`` (one of :data:`STAR_CLASSES`), ``teff`` (K), ``logg``, ``feh``, ``rv`` (km/s).
    """
    if objtype == "STD":
        spectype = "F"
        teff = rng.uniform(6000.0, 7000.0)
        logg = rng.uniform(3.9, 4.5)
        feh = float(np.clip(rng.normal(-0.5, 0.3), -1.5, 0.2))
        return {"spectype": spectype, "teff": float(teff), "logg": float(logg), "feh": feh,
                "rv": float(rng.normal(0.0, 40.0))}
    if class_rng is not None:
        exotic = EXOTIC_CLASS_PROBS if exotic_probs is None else dict(exotic_probs)
        u = class_rng.uniform()
        edge = 0.0
        for name, prob in exotic.items():
            edge += float(prob)
            if u < edge:
                (t_lo, t_hi), dwarf, giant, f_giant = SPECTRAL_CLASSES[name]
                if name == "DA":   # a white dwarf's number density falls steeply with Teff
                    teff = float(np.exp(class_rng.uniform(np.log(t_lo), np.log(t_hi))))
                else:
                    teff = float(class_rng.uniform(t_lo, t_hi))
                lo, hi = giant if class_rng.uniform() < f_giant else dwarf
                feh = 0.0 if name == "DA" else float(np.clip(class_rng.normal(-0.3, 0.3), -1.5, 0.3))
                return {"spectype": name, "teff": teff, "logg": float(class_rng.uniform(lo, hi)), "feh": feh,
                        "rv": float(class_rng.normal(0.0, 40.0))}
    probs = TARGET_CLASS_PROBS if class_probs is None else dict(class_probs)
    names = list(probs)
    p = list(probs.values())
    if class_probs is not None:
        p = list(np.asarray(p, dtype=float) / np.sum(p))
    spectype = names[int(rng.choice(len(names), p=p))]
    (t_lo, t_hi), dwarf, giant, f_giant = SPECTRAL_CLASSES[spectype]
    teff = rng.uniform(t_lo, t_hi)
    lo, hi = giant if rng.uniform() < f_giant else dwarf
    logg = rng.uniform(lo, hi)
    feh = float(np.clip(rng.normal(-0.3, 0.35), -2.0, 0.5))
    rv = rng.normal(0.0, 40.0)
    return {"spectype": spectype, "teff": float(teff), "logg": float(logg), "feh": feh, "rv": float(rv)}


_FE_LINES = (
    4045.81, 4063.59, 4071.74, 4132.06, 4143.87, 4202.03, 4250.79, 4271.76, 4325.76, 4383.55,
    4404.75, 4415.12, 4528.61, 4891.49, 4920.50, 4957.60, 5167.49, 5227.19, 5232.94, 5269.54,
    5328.04, 5371.49, 5397.13, 5405.77, 5429.70, 5446.92, 5455.61, 5615.64, 6136.61, 6191.56,
    6230.72, 6252.56, 6393.60, 6400.00, 6494.98, 6678.00, 7495.07, 7511.02, 8327.05, 8688.62,
)
_TIO_BANDS = ((4761.0, 60.0, 0.6), (4954.0, 80.0, 0.7), (5167.0, 80.0, 0.8), (5448.0, 80.0, 0.8),
              (5847.0, 80.0, 0.6), (6159.0, 90.0, 1.0), (6651.0, 100.0, 0.6), (7054.0, 110.0, 1.2),
              (7589.0, 100.0, 0.8), (8432.0, 120.0, 0.7))
_BALMER = ((6562.80, 1.0, 10.0), (4861.33, 0.9, 8.0), (4340.47, 0.8, 7.0), (4101.74, 0.7, 6.0),
           (3970.07, 0.6, 5.0), (3889.05, 0.5, 4.0), (3835.38, 0.4, 3.5), (3797.90, 0.35, 3.0))

GROUPS = ("balmer_core", "balmer_wing", "cahk_core", "cahk_wing", "cat", "cat_wing", "nad",
          "nad_wing", "mgb", "mgb_wing", "ca1", "gband", "fe", "tio", "forest")


@lru_cache(maxsize=1)
def stellar_line_table() -> dict[str, np.ndarray]:
    """The analytic model's absorption features (fixed; independent of any seed).

    Returns
    -------
    dict of ndarray
        ``wave`` (A, air), ``group`` (index into :data:`GROUPS`), ``weight``, ``kind``
        (0 Gaussian, 1 Lorentzian, 2 molecular band), ``width`` (Gaussian sigma, Lorentzian
        half width or band decay length, A).
    """
    rows: list[tuple[float, str, float, int, float]] = []
    for w, s, gamma in _BALMER:
        rows.append((w, "balmer_core", s, 0, 1.2))
        rows.append((w, "balmer_wing", s, 1, gamma))
    for w, s in ((3933.66, 1.0), (3968.47, 0.8)):
        rows.append((w, "cahk_core", s, 0, 0.9))
        rows.append((w, "cahk_wing", s, 1, 2.5))
    for w, s in ((8498.02, 0.5), (8542.09, 1.0), (8662.14, 0.8)):
        rows.append((w, "cat", s, 0, 0.7))
        rows.append((w, "cat_wing", s, 1, 1.8))
    for w, s in ((5889.95, 1.0), (5895.92, 0.8)):
        rows.append((w, "nad", s, 0, 0.35))
        rows.append((w, "nad_wing", s, 1, 0.9))
    for w, s in ((5167.32, 0.7), (5172.68, 0.9), (5183.60, 1.0)):
        rows.append((w, "mgb", s, 0, 0.35))
        rows.append((w, "mgb_wing", s, 1, 0.8))
    rows.append((4226.73, "ca1", 1.0, 0, 0.45))
    for w in np.linspace(4296.0, 4316.0, 11):
        rows.append((float(w), "gband", 1.0, 0, 0.9))
    for w in _FE_LINES:
        rows.append((w, "fe", 1.0, 0, 0.25))
    for head, decay, s in _TIO_BANDS:
        rows.append((head, "tio", s, 2, decay))
    # A fixed forest of weak metal lines, denser in the blue (its own fixed generator, so the
    # forest is part of the model, not of a simulation's seed).
    forest = np.random.default_rng(20240601)
    u = forest.uniform(size=1500)
    lo, hi = 3600.0 ** -0.5, 9400.0 ** -0.5
    waves = (lo + u * (hi - lo)) ** -2.0
    weights = 0.10 * forest.lognormal(0.0, 0.8, size=waves.size)
    sigmas = forest.uniform(0.12, 0.3, size=waves.size)
    for w, s, sg in zip(waves, weights, sigmas):
        rows.append((float(w), "forest", float(s), 0, float(sg)))
    rows.sort(key=lambda r: r[0])
    return {
        "wave": np.array([r[0] for r in rows]),
        "group": np.array([GROUPS.index(r[1]) for r in rows]),
        "weight": np.array([r[2] for r in rows]),
        "kind": np.array([r[3] for r in rows]),
        "width": np.array([r[4] for r in rows]),
    }


def group_strengths(teff: np.ndarray, logg: np.ndarray, feh: np.ndarray) -> np.ndarray:
    """Optical depth scale of every line group, shape ``(n_stars, len(GROUPS))``."""
    t, g, z = (np.atleast_1d(np.asarray(a, dtype=float)) for a in (teff, logg, feh))
    cool = lambda t0, scale, lo, hi: np.clip((t0 - t) / scale, lo, hi)  # noqa: E731
    met = lambda a: 10.0 ** (a * z)  # noqa: E731
    out = np.empty((t.size, len(GROUPS)))
    out[:, 0] = 1.4 * np.exp(-(((t - 9000.0) / 3500.0) ** 2)) + 0.25 * np.clip((t - 3500.0) / 2000.0, 0, 1)
    out[:, 1] = 0.9 * np.exp(-(((t - 9200.0) / 1800.0) ** 2)) * (1.0 + 0.2 * (g - 4.0))
    out[:, 2] = 3.0 * cool(8000.0, 2000.0, 0.1, 1.5) * met(0.3)
    out[:, 3] = 1.2 * cool(7000.0, 1500.0, 0.0, 1.5) * met(0.3) * (1.0 + 0.3 * (g - 4.0))
    out[:, 4] = (0.8 + 0.4 * (4.5 - g)) * np.clip((7500.0 - t) / 2000.0 + 0.4, 0.3, 1.3) * met(0.3)
    out[:, 5] = 0.3 * out[:, 4]
    out[:, 6] = 1.5 * np.clip((6500.0 - t) / 1200.0 + 0.3, 0.1, 3.0) * met(0.4)
    out[:, 7] = 0.4 * out[:, 6] * np.clip(1.0 + 0.3 * (g - 4.0), 0.3, 2.0)
    out[:, 8] = 1.5 * np.clip((7000.0 - t) / 1500.0 + 0.3, 0.1, 2.5) * met(0.4)
    out[:, 9] = 0.4 * out[:, 8] * np.clip(1.0 + 0.25 * (g - 4.0), 0.3, 2.0)
    out[:, 10] = 1.5 * np.clip((6500.0 - t) / 1200.0 + 0.2, 0.05, 3.0) * met(0.4)
    out[:, 11] = 0.35 * np.exp(-(((t - 5000.0) / 1300.0) ** 2)) * met(0.3)
    out[:, 12] = 1.0 * np.clip((7200.0 - t) / 1500.0 + 0.15, 0.05, 2.0) * met(1.0)
    out[:, 13] = 1.2 * np.clip((4100.0 - t) / 700.0, 0.0, 2.5)
    out[:, 14] = np.clip((7500.0 - t) / 1500.0 + 0.2, 0.05, 2.5) * met(1.0)
    return out


@lru_cache(maxsize=8)
def line_matrix(grid: FineGrid) -> sparse.csr_matrix:
    """Sparse ``(n_lines, n_pixels)`` matrix of unit-depth line profiles on ``grid``."""
    table = stellar_line_table()
    wave = grid.wave
    rows, cols, vals = [], [], []
    for i, (w, kind, width) in enumerate(zip(table["wave"], table["kind"], table["width"])):
        if kind == 0:
            lo, hi = w - 5.0 * width, w + 5.0 * width
        elif kind == 1:
            lo, hi = w - min(60.0 * width, 400.0), w + min(60.0 * width, 400.0)
        else:
            lo, hi = w - 5.0, w + 6.0 * width
        i0 = max(int(np.floor((lo - grid.w0) / grid.dw)), 0)
        i1 = min(int(np.ceil((hi - grid.w0) / grid.dw)) + 1, grid.n)
        if i1 <= i0:
            continue
        x = wave[i0:i1] - w
        if kind == 0:
            prof = np.exp(-0.5 * (x / width) ** 2)
        elif kind == 1:
            prof = 1.0 / (1.0 + (x / width) ** 2)
        else:
            prof = _logistic(x / 1.0) * np.exp(-np.clip(x, 0.0, None) / width)
        rows.append(np.full(i1 - i0, i))
        cols.append(np.arange(i0, i1))
        vals.append(prof)
    n_lines = table["wave"].size
    if not rows:
        return sparse.csr_matrix((n_lines, grid.n))
    return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(n_lines, grid.n))


def stellar_rest_spectra(grid: FineGrid, teff, logg, feh, tio: bool = True) -> np.ndarray:
    """Rest-frame photon spectra of stars on ``grid``, arbitrary normalisation.

    ``tio=False`` leaves the TiO bands out (carbon stars: their oxygen is locked in CO).

    Returns
    -------
    ndarray, shape (n_stars, grid.n)
    """
    teff = np.atleast_1d(np.asarray(teff, dtype=float))
    strengths = group_strengths(teff, logg, feh)
    if not tio:
        strengths[:, GROUPS.index("tio")] = 0.0
    table = stellar_line_table()
    amp = strengths[:, table["group"]] * table["weight"][None, :]  # (n_stars, n_lines)
    tau = np.asarray((line_matrix(grid).T @ amp.T).T)  # (n_stars, n_pix)
    wave = grid.wave
    blanket = 0.35 * np.clip((6500.0 - teff) / 2000.0 + 0.15, 0.0, 1.5) * 10.0 ** (0.5 * np.atleast_1d(feh))
    tau += blanket[:, None] * (4000.0 / wave[None, :]) ** 6
    return planck_photons(wave, teff) * np.exp(-tau)


DA_BALMER = ((6562.80, 1.0, 28.0), (4861.33, 1.1, 34.0), (4340.47, 1.0, 30.0), (4101.74, 0.9, 26.0),
             (3970.07, 0.8, 22.0), (3889.05, 0.7, 18.0), (3835.38, 0.6, 15.0), (3797.90, 0.5, 12.0))
"""DA white-dwarf Balmer lines: air wavelength (A), relative depth, Lorentzian half width (A) at
log g = 8 (pressure broadening by the dense atmosphere; ~100 A full widths, no metal lines)."""

C2_SWAN_HEADS = ((4737.0, 90.0, 0.9), (5165.0, 110.0, 1.2), (5636.0, 110.0, 1.0), (6191.0, 100.0, 0.5),
                 (4382.0, 60.0, 0.4))
"""C2 Swan band heads (A), decay length (A), relative depth; degraded to the violet (absorb blueward)."""
CN_RED_HEADS = ((6926.0, 90.0, 0.5), (7088.0, 120.0, 0.5), (7874.0, 130.0, 0.8), (8125.0, 140.0, 0.8),
                (8320.0, 120.0, 0.5), (3883.0, 60.0, 0.9))
"""CN band heads (A): the red system (degraded to the red) and the violet 3883 head (treated alike)."""


def da_balmer_depth(grid: FineGrid, teff, logg) -> np.ndarray:
    """Optical depth of a DA white dwarf's Balmer lines on ``grid``, shape ``(n_stars, grid.n)``.

    The strength peaks near 12,500 K (hydrogen lines are strongest where n = 2 is most populated
    and the continuum opacity does not yet dominate) and the widths grow with log g.
    """
    teff = np.atleast_1d(np.asarray(teff, dtype=float))
    logg = np.broadcast_to(np.asarray(logg, dtype=float), teff.shape)
    strength = 0.25 + 1.0 * np.exp(-(((np.log10(teff) - np.log10(12500.0)) / 0.2) ** 2))
    width_scale = 10.0 ** (0.3 * (logg - 8.0))
    wave = grid.wave
    tau = np.zeros((teff.size, grid.n))
    for w, depth, gamma in DA_BALMER:
        g = gamma * width_scale[:, None]
        x = (wave[None, :] - w) / g
        core = np.exp(-0.5 * ((wave[None, :] - w) / 3.0) ** 2)
        tau += (strength * depth)[:, None] * (1.0 / (1.0 + x ** 2) + 0.5 * core)
    return tau


def carbon_band_depth(grid: FineGrid, teff) -> np.ndarray:
    """Optical depth of a carbon star's C2 Swan and CN bands on ``grid``, ``(n_stars, grid.n)``.

    Bands deepen toward cool temperatures (molecules survive); C2 bands absorb blueward of their
    heads, CN red bands redward.
    """
    teff = np.atleast_1d(np.asarray(teff, dtype=float))
    strength = np.clip((5000.0 - teff) / 1200.0, 0.3, 1.6)
    wave = grid.wave
    prof = np.zeros(grid.n)
    for head, decay, depth in C2_SWAN_HEADS:
        dx = head - wave
        prof += depth * _logistic(dx / 1.0) * np.exp(-np.clip(dx, 0.0, None) / decay)
    for head, decay, depth in CN_RED_HEADS:
        dx = wave - head
        prof += depth * _logistic(dx / 1.0) * np.exp(-np.clip(dx, 0.0, None) / decay)
    return strength[:, None] * prof[None, :]


def da_rest_spectra(grid: FineGrid, teff, logg) -> np.ndarray:
    """Rest-frame photon spectra of DA white dwarfs (analytic): blackbody times broad Balmer lines."""
    teff = np.atleast_1d(np.asarray(teff, dtype=float))
    return planck_photons(grid.wave, teff).reshape(teff.size, -1) * np.exp(-da_balmer_depth(grid, teff, logg))


def carbon_rest_spectra(grid: FineGrid, teff, logg, feh) -> np.ndarray:
    """Rest-frame photon spectra of carbon stars (analytic): the cool-star model without TiO, with C2 and CN."""
    return stellar_rest_spectra(grid, teff, logg, feh, tio=False) * np.exp(-carbon_band_depth(grid, teff))


def _shift(spectra: np.ndarray, grid: FineGrid, rv_kms: np.ndarray) -> np.ndarray:
    """Doppler shift rows of ``spectra`` (on ``grid``) by ``rv_kms``: ``out(l) = in(l / (1 + v/c))``."""
    src = grid.wave[None, :] / (1.0 + np.asarray(rv_kms, dtype=float)[:, None] / C_KMS)
    idx = np.clip((src - grid.w0) / grid.dw, 0.0, grid.n - 1.000001)
    i0 = idx.astype(np.int64)
    t = idx - i0
    lo = np.take_along_axis(spectra, i0, axis=1)
    hi = np.take_along_axis(spectra, i0 + 1, axis=1)
    return lo * (1.0 - t) + hi * t


@lru_cache(maxsize=1)
def _r_band_grid() -> FineGrid:
    return FineGrid.covering(R_BAND[0], R_BAND[1], 0.1)


def resolve_stellar_model(name: str) -> tuple[str, str | None]:
    """Which stellar model a request gets: ``("analytic", None)`` or ``("cannon", folder)``.

    ``"analytic"`` always works; ``"cannon"`` and ``"auto"`` use the Cannon models of
    ``thedoppler`` when their pickles are found (:func:`~fiberlake.ingest.sim_cannon.find_cannon_dir`)
    and fall back to the analytic model otherwise.
    """
    if name not in ("analytic", "cannon", "auto"):
        raise ValueError(f"stellar model {name!r} is not 'analytic', 'cannon' or 'auto'")
    if name == "analytic":
        return "analytic", None
    from fiberlake.ingest.sim_cannon import find_cannon_dir

    folder = find_cannon_dir()
    return ("cannon", str(folder)) if folder is not None else ("analytic", None)


def stellar_spectra(grid: FineGrid, teff, logg, feh, rv, model: str = "analytic", spectype=None) -> np.ndarray:
    """Observed-frame photon spectra, normalised to a mean of 1 over the r band.

    A star of magnitude ``m`` then has photon rate ``rate_mag16 * 10**(-0.4 (m - 16))`` times
    this shape (above the atmosphere, at efficiency 1).

    Parameters
    ----------
    grid : FineGrid
        Output grid (any wavelengths; need not contain the r band).
    teff, logg, feh, rv : array_like, shape (n_stars,)
        Effective temperature (K), surface gravity, metallicity, radial velocity (km/s).
    model : str, optional
        ``"analytic"`` (default), ``"cannon"`` or ``"auto"`` (see :func:`resolve_stellar_model`).
    spectype : array_like of str, optional
        Class of each star; ``"DA"`` (white dwarf) and ``"C"`` (carbon star) get their own
        spectra (:func:`da_rest_spectra`, :func:`carbon_rest_spectra`; with the Cannon model the
        Cannon continuum / cool-star spectrum carries the same features, see
        :func:`~fiberlake.ingest.sim_cannon.cannon_rest_spectra`); ``None`` or any other class:
        the ordinary model.

    Returns
    -------
    ndarray, shape (n_stars, grid.n)
    """
    teff = np.atleast_1d(np.asarray(teff, dtype=float))
    logg = np.broadcast_to(np.asarray(logg, dtype=float), teff.shape)
    feh = np.broadcast_to(np.asarray(feh, dtype=float), teff.shape)
    rv = np.broadcast_to(np.asarray(rv, dtype=float), teff.shape)
    kinds = np.full(teff.shape, "", dtype="<U3") if spectype is None \
        else np.broadcast_to(np.asarray(spectype, dtype="<U3"), teff.shape)
    kind, folder = resolve_stellar_model(model)
    if kind == "cannon":
        from fiberlake.ingest.sim_cannon import cannon_rest_spectra

        def rest_spectra(g: FineGrid) -> np.ndarray:
            return cannon_rest_spectra(g, teff, logg, feh, folder, spectype=kinds)
    else:
        def rest_spectra(g: FineGrid) -> np.ndarray:
            out = np.empty((teff.size, g.n))
            da, carbon = kinds == "DA", kinds == "C"
            normal = ~(da | carbon)
            for sel, fn in ((normal, lambda i: stellar_rest_spectra(g, teff[i], logg[i], feh[i])),
                            (da, lambda i: da_rest_spectra(g, teff[i], logg[i])),
                            (carbon, lambda i: carbon_rest_spectra(g, teff[i], logg[i], feh[i]))):
                idx = np.flatnonzero(sel)
                if idx.size:
                    out[idx] = fn(idx)
            return out
    norm = rest_spectra(_r_band_grid()).mean(axis=1)
    # Compute on a slightly wider rest grid so the shift never reads beyond its ends.
    pad = int(np.ceil(0.004 * (grid.w0 + grid.dw * grid.n) / grid.dw))
    wide = FineGrid(grid.w0 - pad * grid.dw, grid.dw, grid.n + 2 * pad)
    shifted = _shift(rest_spectra(wide), wide, rv)[:, pad:pad + grid.n]
    return shifted / norm[:, None]


# --------------------------------------------------------------------------------------
# absolute flux: the simulator's magnitudes on the AB scale
# --------------------------------------------------------------------------------------
H_ERG_S = 6.62607015e-27
"""Planck constant (erg s)."""
C_ANGSTROM_S = 2.99792458e18
"""Speed of light (Angstrom per second)."""
HC_ERG_ANGSTROM = H_ERG_S * C_ANGSTROM_S
"""h c (erg Angstrom): a photon of wavelength ``lambda`` (A) carries ``HC_ERG_ANGSTROM / lambda`` erg."""


def ab_photon_flux(wave: np.ndarray, mag: float | np.ndarray) -> np.ndarray:
    """Photon flux density of a source of constant AB magnitude (photons s^-1 cm^-2 A^-1).

    ``f_nu = 10**(-0.4 (mag + 48.6))`` erg s^-1 cm^-2 Hz^-1, so ``n_lambda = f_nu / (h lambda)``.
    """
    fnu = 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) + 48.6))
    return fnu / (H_ERG_S * np.asarray(wave, dtype=float))


def effective_area_cm2(rate_mag16: float) -> float:
    """Effective collecting area (cm^2) that ties :attr:`SimParams.rate_mag16` to the AB scale.

    A star's ``MAG`` is its photon-counting AB magnitude through a top-hat filter over
    :data:`R_BAND`: its mean photon flux density over the band equals that of a flat-``f_nu``
    source of that AB magnitude. A magnitude-16 star gives ``rate_mag16`` photo-electrons s^-1
    A^-1 at efficiency 1 above the atmosphere, so the area is ``rate_mag16`` over the mean photon
    flux density of AB = 16 in the band (LAMOST numbers: ~4300 cm^2, the 4 m pupil times the
    fiber, telescope and spectrograph losses not in the efficiency curve).
    """
    grid = _r_band_grid()
    return float(rate_mag16 / ab_photon_flux(grid.wave, 16.0).mean())


def band_magnitudes(mag_r: np.ndarray, teff, logg, feh, rv, bands: tuple[tuple[float, float], ...],
                    model: str = "analytic", dw: float = 0.5, chunk: int = 256, spectype=None) -> np.ndarray:
    """True photon-counting AB magnitudes of stars through top-hat ``bands``, above the atmosphere.

    A star's ``MAG`` (``mag_r``) is its photon-counting AB magnitude over :data:`R_BAND`; through
    another top hat ``B`` it is ``mag_r - 2.5 log10((<n>_B / <n_AB>_B) / (<n>_R / <n_AB>_R))``, with
    ``<n>`` the star's mean photon flux density over the band (its :func:`stellar_spectra`, radial
    velocity included) and ``n_AB`` that of a flat-``f_nu`` source. Every band's mean is taken on
    one grid of step ``dw`` covering them all and the r band, so the colours are exact ratios.

    Parameters
    ----------
    mag_r : ndarray, shape (n_stars,)
        The stars' ``MAG``.
    teff, logg, feh, rv : array_like, shape (n_stars,)
    bands : tuple of (lo, hi)
        Top hats (A).
    model : str
        The simulator's stellar model (:func:`resolve_stellar_model`).
    spectype : array_like of str, optional
        The stars' classes (:func:`stellar_spectra`).

    Returns
    -------
    ndarray, shape (n_stars, len(bands))
    """
    mag_r = np.atleast_1d(np.asarray(mag_r, dtype=float))
    labels = [np.broadcast_to(np.asarray(a, dtype=float), mag_r.shape) for a in (teff, logg, feh, rv)]
    lo = min([R_BAND[0]] + [b[0] for b in bands])
    hi = max([R_BAND[1]] + [b[1] for b in bands])
    grid = FineGrid.covering(lo, hi, dw)
    wave = grid.wave
    windows = [(wave >= b[0]) & (wave <= b[1]) for b in (R_BAND,) + tuple(bands)]
    ab = ab_photon_flux(wave, 0.0)
    ab_mean = np.array([ab[w].mean() for w in windows])
    out = np.empty((mag_r.size, len(bands)))
    for start in range(0, mag_r.size, chunk):
        sl = slice(start, start + chunk)
        kinds = None if spectype is None else np.asarray(spectype)[sl]
        shape = stellar_spectra(grid, *(a[sl] for a in labels), model=model, spectype=kinds)
        means = np.stack([shape[:, w].mean(axis=1) for w in windows], axis=1) / ab_mean[None, :]
        out[sl] = mag_r[sl, None] - 2.5 * np.log10(means[:, 1:] / means[:, :1])
    return out


def absolute_flux(wave: np.ndarray, photon_shape: np.ndarray, mag: np.ndarray, rate_mag16: float) -> np.ndarray:
    """Flux density above the atmosphere (erg s^-1 cm^-2 A^-1) of stars of magnitude ``mag``.

    Parameters
    ----------
    wave : ndarray, shape (n,)
        Wavelengths (A) of ``photon_shape``.
    photon_shape : ndarray, shape (n_stars, n)
        :func:`stellar_spectra` output (photon shape, mean 1 over :data:`R_BAND`).
    mag : ndarray, shape (n_stars,)
        Magnitudes (the fibermap's ``MAG``).
    rate_mag16 : float
        :attr:`SimParams.rate_mag16`.
    """
    rate = rate_mag16 * 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - 16.0))
    photons = photon_shape * (rate / effective_area_cm2(rate_mag16))[:, None]
    return photons * (HC_ERG_ANGSTROM / np.asarray(wave, dtype=float))[None, :]
