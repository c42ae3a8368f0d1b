"""Parameters of the instrument simulator, one typed object with a description per field.

Everything the simulator draws at random is drawn around these values; changing one changes the
simulated sky, lamps, optics or detector in a documented way. The object is serialisable
(:meth:`SimParams.to_dict`) so a simulated night can say how it was made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

SIM_VERSION = "1.0"
"""Version of the simulator's physics; written to every header (``SIMVERS``)."""


def _p(default, description: str):
    return field(default=default, metadata={"description": description})


@dataclass(frozen=True)
class SimParams:
    """Physical knobs of the simulator (defaults are LAMOST-like)."""

    # --- photometry -----------------------------------------------------------------------
    rate_mag16: float = _p(
        1.5,
        "photo-electrons per second per Angstrom from an r=16 star into a fiber of throughput 1 at "
        "the peak of the system efficiency, above the atmosphere; sets SNR ~25 per row at r=16 in "
        "1200 s on LAMOST numbers")
    sky_rate: float = _p(
        0.028,
        "dark-sky continuum in a fiber at 5000 A (e-/s/A, throughput 1, efficiency 1); about an "
        "r~20 source per fiber")
    sky_line_ew: float = _p(
        400.0,
        "equivalent width (A) of [OI] 5577 relative to the sky continuum at 5577; other lines "
        "scale with their relative_intensity / 300")
    arc_rate_1000: float = _p(
        7.0e4,
        "e-/s in an arc line of relative_intensity 1000 (throughput 1, efficiency 1); the "
        "brightest lines just saturate in 30 s")
    arc_continuum_rate: float = _p(0.05, "weak arc-lamp continuum (e-/s/A)")
    flat_peak_adu: float = _p(30000.0, "flat-field peak counts (ADU above bias) per arm at 10 s")
    flat_temperature: float = _p(3100.0, "flat-lamp colour temperature (K)")

    stellar_model: str = _p(
        "analytic",
        "stellar spectra: 'analytic' (blackbody + class-dependent lines; always available), "
        "'cannon' (thedoppler's Cannon models when their pickles are found, else analytic) or 'auto'")
    target_class_probs: tuple = _p(
        (("A", 0.05), ("F", 0.25), ("G", 0.35), ("K", 0.25), ("M", 0.10)),
        "class mix (class, probability) of ordinary science targets; normalised to sum 1")
    exotic_class_probs: tuple = _p(
        (("DA", 0.04), ("C", 0.04)),
        "fraction of science targets that are DA white dwarfs and carbon stars (C), decided from a "
        "stream of their own, so the other targets are the same stars with or without them; "
        "flux standards are never drawn from these classes")

    # --- optics ---------------------------------------------------------------------------
    distortion_scatter: float = _p(0.05, "relative per-camera scatter of the pincushion coefficient k")
    distortion_centre_scatter: float = _p(0.01, "per-camera scatter of the distortion centre (units of R)")
    smile_px: float = _p(2.5, "line curvature: row shift (px) of a fixed wavelength at the slit ends")
    psf_growth: float = _p(0.25, "core sigma grows by (1 + psf_growth * rho^2); rho = 1 at the CCD corner")
    psf_ellipticity: float = _p(0.08, "extra radial elongation of the core at the corners")
    wing_frac_centre: float = _p(0.10, "flux fraction of the PSF wing at the CCD centre")
    wing_frac_corner: float = _p(0.20, "flux fraction of the PSF wing at the CCD corner")
    wing_offset_px: float = _p(2.0, "radial offset (px) between wing and core at the corner")
    wing_sigma_ratio: float = _p(1.5, "wing sigma / core sigma")
    psf_model: str = _p(
        "radial",
        "'radial' (default): core sigma, ellipticity and wing grow with the distance from the CCD "
        "centre, independently of the distortion (aberrations that no coordinate map undoes); "
        "'distortion': an invariant kernel in undistorted coordinates stretched by the local "
        "Jacobian of the pincushion, so that an exact rectification makes it invariant, plus "
        "psf_residual times the radial terms")
    psf_residual: float = _p(
        0.1,
        "psf_model='distortion': fraction of the radial aberration terms (psf_growth, "
        "psf_ellipticity, the wing fraction's growth, wing_offset_px) kept as residual optics")
    window_px: int = _p(12, "half width (px) of the rendered cross-dispersion profile window")
    lsf_window_px: int = _p(8, "half width (px) of the rendered line-spread-function window")

    # --- fibers ---------------------------------------------------------------------------
    throughput_scatter: float = _p(0.07, "fiber throughput scatter (clipped to 0.85-1.15)")
    dead_fiber_probs: tuple = _p((0.3, 0.4, 0.3), "probabilities of 0, 1, 2 dead fibers per spectrograph")

    # --- detector -------------------------------------------------------------------------
    gain_scatter: float = _p(0.05, "per-camera gain drawn uniformly within +-this fraction of nominal")
    read_noise_scatter: float = _p(0.05, "per-camera read noise drawn within +-this fraction of nominal")
    prnu: float = _p(0.005, "pixel response non-uniformity (rms)")
    bias_pattern_adu: float = _p(1.5, "amplitude of the fixed 2D bias pattern (ADU)")
    bias_drift_adu: float = _p(1.0, "amplitude of the row-dependent bias drift (ADU), seen by the overscan too")
    cosmic_rate: float = _p(1.0, "cosmic rays per cm^2 per minute of exposure")
    pixel_um: float = _p(15.0, "pixel size (micron)")
    dark_rate: float = _p(0.0005, "dark current (e-/pixel/s; negligible)")

    def to_dict(self) -> dict:
        """Plain dict of every parameter (for run records)."""
        return asdict(self)

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Description of every parameter."""
        return {f.name: f.metadata.get("description", "") for f in fields(cls)}


DEFAULT_PARAMS = SimParams()
