"""The reduction's parameters: one typed set per stage, nested in :class:`ReductionParams`.

Every tunable of the classical reduction is declared here once (default, allowed values, unit,
one line of meaning) and passed explicitly to the stage that uses it, so the ``runs`` row and
each calibration set record how a product was made, and a changed value changes the hash that
decides what is redone:

* :meth:`ReductionParams.calibration_digest` covers the stages that build a calibration set
  (CCD, tracing, aberration correction, wavelength, profile). With the set's input frames it
  makes ``calib_id``.
* :meth:`ReductionParams.extraction_digest` covers everything one extraction's spectra depend on
  (the calibration stages, cosmic rays, the extraction itself and its PSF, fiber flat, sky). It
  is the ``config_hash`` of the frame's marker for that extraction, so adding ``deconv`` to a
  night leaves its box and optimal spectra alone.
* :class:`ExecutionParams` (chunking, devices, batch sizes) never enters either.

``fiberlake params`` prints the whole list; ``tests/test_params.py`` checks that each default
agrees with the keyword default of the function it feeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fiberlake.schemas.parset import ParSet, digest_of, nested, par

EXTRACTIONS = ("box", "optimal", "deconv", "cae")
DEFAULT_EXTRACTIONS = ("box", "optimal")
PROFILE_SHAPES = ("gauss", "hermite", "halo")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class CCDStageParams(ParSet):
    """Overscan and frame combination (:mod:`fiberlake.processors.ccd`)."""

    stage: ClassVar[str] = "ccd"
    overscan_sigma: float = par(3.0, "sigma-clipping threshold of the per-row overscan level", unit="sigma",
                                bounds=(1.0, 20.0))
    overscan_smooth: int = par(31, "window of the Savitzky-Golay smoothing of the overscan level (1: none)",
                               unit="rows", bounds=(1, 1001))
    combine_sigma: float = par(3.0, "sigma-clipping threshold when bias, flat and arc frames are combined",
                               unit="sigma", bounds=(1.0, 20.0))


@dataclass(frozen=True)
class CosmicsParams(ParSet):
    """Cosmic-ray detection on science and standard frames (astroscrappy's L.A.Cosmic)."""

    stage: ClassVar[str] = "cosmics"
    enabled: bool = par(True, "detect cosmic rays on science and standard frames")
    sigclip: float = par(5.0, "Laplacian-to-noise threshold of a cosmic-ray pixel", unit="sigma", bounds=(1.0, 50.0))
    sigfrac: float = par(0.3, "fraction of sigclip for the neighbouring pixels of a cosmic ray", bounds=(0.01, 1.0))
    objlim: float = par(5.0, "contrast between the Laplacian and the fine structure of a real source",
                        bounds=(0.1, 100.0))
    niter: int = par(4, "iterations of the detection", bounds=(1, 20))
    grow: int = par(0, "pixels added around each detected cosmic ray", unit="px", bounds=(0, 10))


@dataclass(frozen=True)
class TracingParams(ParSet):
    """Fiber traces on the master flat (:func:`fiberlake.processors.tracing.trace_fibers`)."""

    stage: ClassVar[str] = "tracing"
    deg: int = par(5, "Legendre degree of each fiber's trace x(row)", bounds=(1, 15))
    band_rows: int = par(16, "rows summed into one band where the centroids are measured", unit="rows",
                         bounds=(4, 512))
    dead_fraction: float = par(0.1, "a fiber fainter than this fraction of the median is dead", bounds=(0.0, 1.0))
    sigma_guess: float = par(2.4, "first guess of the cross-dispersion sigma", unit="px", bounds=(0.3, 20.0))
    max_offset: float | None = par(None, "largest offset searched from the nominal fiber position "
                                   "(none: half the fiber spacing)", unit="px", bounds=(0.0, 1000.0), optional=True)
    clip: float = par(3.0, "sigma-clipping threshold of the Legendre fit", unit="sigma", bounds=(1.0, 20.0))
    n_neighbours: int = par(5, "neighbours used to interpolate a fiber without a good trace", bounds=(1, 50))
    min_valid_fraction: float = par(0.3, "a fiber with fewer valid bands than this fraction is interpolated",
                                    bounds=(0.0, 1.0))
    err_floor: float = par(0.01, "floor added to each centroid's error", unit="px", bounds=(0.0, 1.0))
    profile: str = par("halo", "cross-dispersion profile fitted to the bands", choices=PROFILE_SHAPES)


@dataclass(frozen=True)
class RectifyParams(ParSet):
    """Aberration correction (seed 000, :mod:`fiberlake.processors.rectify`)."""

    stage: ClassVar[str] = "rectify"
    enabled: bool = par(True, "fit a map that straightens the traces and reduce in the rectified frame")
    map: str = par("legendre", "coordinate map: 2D Legendre warp, or the paper's 2-20-2 ReLU network (torch)",
                   choices=("legendre", "mlp"))
    sampling: str = par("semicircle", "training samples along the traces: eq. 13 (more on edge fibers) or uniform",
                        choices=("semicircle", "uniform"))
    samples: int = par(30000, "training samples (the paper: ~30,000)", bounds=(100, 10_000_000))
    edge_ratio: float = par(3.0, "semicircle sampling: density at the slit ends over the centre", bounds=(1.0, 100.0))
    labels: str = par("slit", "target lines: parallel and equally spaced (slit) or each trace's TLS line (tls)",
                      choices=("slit", "tls"))
    order: int = par(3, "interpolation of the cumulative flux when resampling: 1 linear, 3 cubic", choices=(1, 3))
    deg: int = par(5, "Legendre map: degree in each coordinate", bounds=(1, 15))
    mlp_hidden: int = par(20, "MLP map: hidden units", bounds=(1, 1024))
    mlp_epochs: int = par(50, "MLP map: training epochs (the paper: 50)", bounds=(1, 10000))
    mlp_batch: int = par(600, "MLP map: batch size", bounds=(1, 1_000_000))
    mlp_lr: float = par(0.01, "MLP map: Adam learning rate", bounds=(1e-7, 1.0))
    mlp_seed: int = par(0, "MLP map: seed of the initialisation and batch order", bounds=(0, 2**31 - 1))
    mlp_residual: bool = par(True, "MLP map: learn the offset from the identity")


@dataclass(frozen=True)
class WavecalParams(ParSet):
    """Wavelength solution from the arcs (:func:`fiberlake.processors.wavecal.calibrate_wavelength`)."""

    stage: ClassVar[str] = "wavecal"
    deg: int = par(4, "Legendre degree of each fiber's wavelength(row)", bounds=(1, 12))
    half_width: float = par(3.5, "half width of the box extraction of the arc", unit="px", bounds=(0.5, 20.0))
    nsig: float = par(5.0, "line detection threshold", unit="sigma", bounds=(1.0, 100.0))
    lsf_sigma: float = par(1.4, "expected line sigma along rows", unit="px", bounds=(0.3, 20.0))
    min_sep: float = par(4.0, "lines closer than this to another are blends and not used", unit="px",
                         bounds=(0.0, 100.0))
    max_shift: float | None = par(None, "largest row offset searched (none: max(30, 0.03 ny))", unit="px",
                                  bounds=(1.0, 10000.0), optional=True)
    max_stretch: float = par(0.04, "largest fractional dispersion error searched for the seed fiber",
                             bounds=(0.0, 0.5))
    max_curvature: float | None = par(None, "largest quadratic departure searched for the seed (none: 0.015 ny)",
                                      unit="px", bounds=(0.0, 10000.0), optional=True)
    tol0: float = par(3.0, "first matching tolerance", unit="px", bounds=(0.01, 100.0))
    tol_final: float = par(0.6, "last matching tolerance", unit="px", bounds=(0.01, 100.0))
    clip: float = par(3.0, "sigma-clipping threshold of the solution fit", unit="sigma", bounds=(1.0, 20.0))
    min_lines: int | None = par(None, "fewest matched lines of a good fiber (none: deg + 3)", bounds=(2, 1000),
                                optional=True)
    max_rms_px: float = par(0.25, "a fiber with a larger residual RMS is interpolated", unit="px",
                            bounds=(0.001, 100.0))
    err_floor: float = par(0.01, "floor added to each line position's error", unit="px", bounds=(0.0, 1.0))
    n_seeds: int = par(3, "fibers tried as the seed of the line identification", bounds=(1, 50))
    line_profile: str = par("halo", "line profile fitted to the arc lines", choices=PROFILE_SHAPES)


@dataclass(frozen=True)
class ProfileParams(ParSet):
    """Cross-dispersion profile model fitted on the master flat (:func:`fiberlake.processors.extract.measure_profile`)."""

    stage: ClassVar[str] = "profile"
    measure: bool = par(False, "fit the profile (Gaussian core + offset wing) and use it in box and optimal; "
                        "otherwise a Gaussian of the traced width")
    n_bands: int = par(12, "row bands where the profile is measured", bounds=(1, 512))
    rows_per_band: int = par(6, "rows per band", unit="rows", bounds=(1, 256))
    max_sweeps: int = par(8, "sweeps of the alternating fit", bounds=(1, 100))
    deg: int = par(2, "Legendre degree of the profile's variation (columns and rows)", bounds=(0, 6))


@dataclass(frozen=True)
class PSFParams(ParSet):
    """PSF of the deconvolution (:func:`fiberlake.processors.psf.fit_psf`)."""

    stage: ClassVar[str] = "psf"
    order: int = par(8, "Gauss-Hermite order of the LSF (arcs) and cross-dispersion profile (flat)", bounds=(0, 20))
    deg: int = par(2, "Legendre degree (column and row) of the PSF's variation over the CCD", bounds=(0, 6))
    invariant: bool = par(False, "one PSF for the whole frame (rectified frames) instead of one varying over the CCD")
    lsf_halfwidth: int = par(8, "half width of the line-spread function", unit="px", bounds=(2, 64))
    xsf_halfwidth: int = par(12, "half width of the cross-dispersion profile", unit="px", bounds=(2, 64))
    n_rows: int = par(48, "rows of the flat sampled for the cross-dispersion profile", bounds=(4, 4096))
    min_snr: float = par(30.0, "arc lines fainter than this are not used", unit="S/N", bounds=(1.0, 1e6))


@dataclass(frozen=True)
class BoxParams(ParSet):
    """Box extraction (:func:`fiberlake.processors.extract.box_extract`)."""

    stage: ClassVar[str] = "box"
    halfwidth: float = par(7.0, "half width of the aperture", unit="px", bounds=(0.5, 50.0))


@dataclass(frozen=True)
class OptimalParams(ParSet):
    """Optimal extraction, Horne (1986) with a simultaneous fit of neighbours
    (:func:`fiberlake.processors.extract.optimal_extract`)."""

    stage: ClassVar[str] = "optimal"
    halfwidth: float = par(7.0, "half width of the aperture", unit="px", bounds=(0.5, 50.0))
    reject_sigma: float = par(5.0, "outlier rejection threshold", unit="sigma", bounds=(1.0, 100.0))
    max_iter: int = par(5, "iterations of the rejection", bounds=(1, 50))
    deblend: bool = par(True, "fit neighbouring fibers together (a tridiagonal solve per row)")
    deblend_halfwidth: float | None = par(None, "profile support of the simultaneous fit (none: from the traces)",
                                          unit="px", bounds=(0.5, 50.0), optional=True)
    profile_error: float = par(0.02, "fractional profile error added to the variance model", bounds=(0.0, 1.0))


@dataclass(frozen=True)
class DeconvStageParams(ParSet):
    """Deconvolution extraction, spectro-perfectionism (:mod:`fiberlake.processors.deconv`)."""

    stage: ClassVar[str] = "deconv"
    patch_fibers: int = par(10, "fibers in the core of a patch", unit="fibers", bounds=(1, 1000))
    patch_rows: int = par(30, "rows in the core of a patch", unit="rows", bounds=(1, 4096))
    pad_rows: int = par(10, "rows solved and discarded on each side of a patch", unit="rows", bounds=(0, 1000))
    overlap_fibers: int = par(1, "fibers solved and discarded on each side of a patch", unit="fibers",
                              bounds=(0, 50))
    resolution_halfwidth: int = par(7, "half width of the stored resolution band", unit="rows", bounds=(1, 50))
    regularize: float = par(1e-10, "ridge added to the normal equations, relative", bounds=(0.0, 1.0))
    retry_regularize: float = par(1e-4, "ridge of the retry of a patch whose solve failed", bounds=(0.0, 1.0))
    variance_model: str = par("rows", "pixel variance model: from a row fit, from the deconvolved model, or none",
                              choices=("rows", "deconv", "none"))


@dataclass(frozen=True)
class CAEStageParams(ParSet):
    """Extraction through the PSF-conditioned autoencoder, seed 002 (:mod:`fiberlake.processors.cae_extract`)."""

    stage: ClassVar[str] = "cae"
    model: str = par("default", "deconvolve model: default (shipped), a model id of the lake's models table, or a "
                     "directory with weights.safetensors and card.json")
    aperture: int = par(0, "half width (columns) of the sum on the deconvolved image (0: ceil(3 target sigma))",
                        unit="px", bounds=(0, 50))
    amplitude: str = par("fibers", "afterburner: fibers (one eq. 2 amplitude per fiber and tile) or tile (the paper's "
                         "one amplitude per tile, then its quadratic flux-bias correction)", choices=("fibers", "tile"))


@dataclass(frozen=True)
class FiberFlatParams(ParSet):
    """Fiber flat from the master flat (:func:`fiberlake.processors.fiberflat.compute_fiberflat`)."""

    stage: ClassVar[str] = "fiberflat"
    smooth: int = par(51, "running-median width of the lamp spectrum", unit="rows", bounds=(1, 4097))


@dataclass(frozen=True)
class SkyParams(ParSet):
    """Sky model from the sky fibers (:mod:`fiberlake.processors.sky`)."""

    stage: ClassVar[str] = "sky"
    clip_sigma: float = par(3.0, "sigma-clipping threshold across the sky fibers", unit="sigma", bounds=(1.0, 100.0))


@dataclass(frozen=True)
class ExecutionParams(ParSet):
    """How the work is cut and where it runs; never changes what a product is (not hashed)."""

    stage: ClassVar[str] = "execution"
    chunk_fibers: int = par(25, "fibers per bundle, the unit of work of the extraction (0: whole frames)",
                            unit="fibers", bounds=(0, 100000), science=False)
    chunk_margin: int = par(2, "neighbour fibers extracted with each bundle on either side, then dropped",
                            unit="fibers", bounds=(0, 100), science=False)
    prepare_tiles: int = par(8, "column tiles a frame's cosmic rays and rectification are computed in (1: whole frame; "
                             "in one process at most one per thread)",
                             bounds=(1, 4096), science=False)
    prepare_threads: int = par(0, "threads over the tiles (0: OMP_NUM_THREADS, which Ray sets to an actor's CPUs, "
                               "else every CPU)", bounds=(0, 1024), science=False)
    deconv_device: str = par("auto", "torch device of the deconvolution (auto: CUDA when available)",
                             choices=DEVICES, science=False)
    deconv_batch: int = par(0, "deconvolution patches solved per batch (0: all of a bundle)", bounds=(0, 1_000_000),
                            science=False)
    deconv_cpu_threads: int = par(1, "torch CPU threads of the deconvolution", bounds=(1, 1024), science=False)
    rectify_device: str = par("auto", "torch device of the MLP aberration map (auto: CUDA when available)",
                              choices=DEVICES, science=False)
    cae_device: str = par("auto", "torch device of the CAE deconvolution (auto: CUDA when available)",
                          choices=DEVICES, science=False)
    cae_batch: int = par(32, "CAE tiles per forward pass", bounds=(1, 100000), science=False)
    denoise_chunk: int = par(256, "spectra per denoising call on a reducer (a Ray actor), the unit of work of the "
                             "denoising stage; a multiple of denoise.batch keeps the MAP batches of one call",
                             unit="spectra", bounds=(1, 1_000_000), science=False)


@dataclass(frozen=True)
class FluxCalParams(ParSet):
    """Flux calibration from the standard stars (:mod:`fiberlake.processors.fluxcal`), a product above the frame."""

    stage: ClassVar[str] = "fluxcal"
    min_standards: int = par(2, "an exposure and spectrograph with fewer good standards uses the night's mean "
                             "response (flagged FLUXFALLBACK)", bounds=(1, 1000))
    max_standards: int = par(8, "brightest standards fitted per exposure and spectrograph", bounds=(1, 1000))
    cont_deg: int = par(5, "Legendre degree of each camera's free continuum in the stellar fit", bounds=(0, 20))
    model_error: float = par(0.02, "fractional model error added to the variance of the stellar and response fits",
                             bounds=(0.0, 1.0))
    knot_spacing: float = par(40.0, "B-spline knot spacing of the response", unit="A", bounds=(5.0, 5000.0))
    clip_sigma: float = par(4.0, "sigma-clipping threshold of the response fit", unit="sigma", bounds=(1.0, 100.0))
    star_clip: float = par(0.1, "a standard whose grey level departs from the median by more than this fraction is "
                           "rejected", bounds=(0.001, 10.0))
    line_mask: float = par(10.0, "half width of the strong stellar lines masked in the response fit", unit="A",
                           bounds=(0.0, 200.0))
    band_min: float = par(5600.0, "blue edge of the catalogue magnitude's band (photon-counting AB, top hat)",
                          unit="A", bounds=(1000.0, 20000.0))
    band_max: float = par(6900.0, "red edge of the catalogue magnitude's band", unit="A", bounds=(1000.0, 20000.0))
    telluric_flag: float = par(0.95, "bins where the telluric transmission divided out is below this get TELLURIC",
                               bounds=(0.0, 1.0))
    max_chi2: float = par(50.0, "a standard whose reduced chi^2 against its best model exceeds this is not used",
                          bounds=(1.0, 1e6))
    g_band_min: float = par(4000.0, "blue edge of the fiber map's blue magnitude mag_g (photon-counting AB, top hat)",
                            unit="A", bounds=(1000.0, 20000.0))
    g_band_max: float = par(5500.0, "red edge of mag_g's band", unit="A", bounds=(1000.0, 20000.0))
    i_band_min: float = par(7000.0, "blue edge of the fiber map's red magnitude mag_i (photon-counting AB, top hat)",
                            unit="A", bounds=(1000.0, 20000.0))
    i_band_max: float = par(8500.0, "red edge of mag_i's band", unit="A", bounds=(1000.0, 20000.0))
    colour_error: float = par(0.02, "error of a standard's catalogue colours g - r and r - i (from mag_g, mag, "
                              "mag_i) in the stellar fit's photometric chi^2", unit="mag", bounds=(0.001, 1.0))
    spectrum_weight: float = par(0.33, "weight of the spectrum's reduced chi^2 in the stellar fit, against the "
                                 "chi^2 of the colours and of the label prior (the models' line mismatch is "
                                 "correlated over the spectrum: it counts as a fraction of one measurement)",
                                 bounds=(0.001, 1e6))
    logg_prior: float = par(4.2, "centre of the Gaussian prior on the standards' log g (F dwarfs)", bounds=(2.5, 5.5))
    logg_prior_sigma: float = par(0.5, "its width", bounds=(0.01, 100.0))
    feh_prior: float = par(-0.5, "centre of the Gaussian prior on the standards' [Fe/H]", unit="dex",
                           bounds=(-2.5, 0.6))
    feh_prior_sigma: float = par(1.0, "its width", unit="dex", bounds=(0.01, 100.0))


@dataclass(frozen=True)
class CoaddParams(ParSet):
    """Arms joined and exposures combined per target (:mod:`fiberlake.processors.coadd`)."""

    stage: ClassVar[str] = "coadd"
    pixel_kms: float | None = par(None, "velocity step of the joined log-linear grid (none: the finest arm's own "
                                  "sampling)", unit="km/s", bounds=(1.0, 1000.0), optional=True)
    clip_sigma: float = par(4.0, "outlier rejection of a bin of one exposure against the others", unit="sigma",
                            bounds=(1.0, 100.0))
    max_iter: int = par(3, "iterations of the rejection", bounds=(1, 50))
    rel_floor: float = par(0.02, "fractional difference between exposures never rejected (their calibrations "
                           "differ by about this)", bounds=(0.0, 1.0))
    rescale: bool = par(True, "match each exposure's grey level to the exposures' mean before combining (aperture "
                        "losses differ between exposures)")
    nside: int = par(64, "HEALPix nside of the coadds' healpix column (nested)", choices=tuple(2**i for i in range(14)))
    across_nights: bool = par(True, "also combine each target's exposures of every night (coadds rows of night 'all')")


CALIBRATION_STAGES = ("ccd", "tracing", "rectify", "wavecal", "profile")
"""Stages whose parameters shape a calibration set (with its input frames, its ``calib_id``)."""

FRAME_STAGES = ("cosmics", "sky")
"""Stages applied to science frames only."""

METHOD_STAGES = {"box": ("box", "fiberflat"), "optimal": ("optimal", "fiberflat"),
                 "deconv": ("deconv", "psf", "fiberflat"), "cae": ("cae", "psf", "fiberflat")}
"""Stages behind each extraction's spectra (beyond the calibration and frame stages)."""


# --------------------------------------------------------------------------------------
# Bayesian denoising of 1D spectra (seed 004): a product above the frame
# --------------------------------------------------------------------------------------
DENOISE_SOURCES = ("joined", "coadds")
DENOISE_EXTRACTIONS = ("best", "all", *EXTRACTIONS)
"""``denoise.extraction``: ``best`` denoises one extraction of each spectrum (the first of
:data:`DENOISE_PREFERENCE` the run extracts), ``all`` every extraction of the run, a method name that one."""
DENOISE_PREFERENCE = ("optimal", "deconv", "box", "cae")


@dataclass(frozen=True)
class DenoiseParams(ParSet):
    """MAP denoising of joined spectra and coadds (:mod:`fiberlake.processors.denoise_map`)."""

    stage: ClassVar[str] = "denoise"
    enabled: bool = par(True, "denoise the night's joined spectra and coadds after the products (needs torch)")
    model: str = par("default", "denoise model: default (shipped with fiberlake), a model id of the lake's models "
                     "table, or a directory with weights.safetensors and card.json")
    sources: tuple[str, ...] = par(DENOISE_SOURCES, "which products to denoise", choices=DENOISE_SOURCES)
    extraction: str = par("best", "which extraction of each spectrum to denoise: best (optimal when the run "
                          "extracts it, else deconv, else box), all of the run's, or one method",
                          choices=DENOISE_EXTRACTIONS)
    steps: int = par(20, "Adam steps of the MAP over z (the best subclasses in parallel)", bounds=(0, 100000))
    start_iterations: int = par(3, "Gauss-Newton iterations on z before the Adam steps (the MAP's cheap start; 0: "
                                "Adam from the best training latent)", bounds=(0, 1000))
    lr: float = par(0.1, "Adam learning rate of the MAP (latent units)", bounds=(1e-6, 100.0))
    refine_classes: int = par(3, "subclasses whose latent is optimised per spectrum (those fitting best at their "
                              "initial latent; the others keep that objective)", bounds=(1, 1000))
    min_observed_fraction: float = par(0.05, "spectra with fewer observed bins of the 2048 are flagged few_bins",
                                       bounds=(0.0, 1.0))
    prior_margin: float = par(6.5, "flag out_of_prior when log p(z|C) at the MAP is this far below the subclass's "
                              "lowest training latent", unit="nats", bounds=(0.0, 1e6))
    max_residual_rms: float = par(2.13, "flag poor_fit when the NoiseFlow-whitened residuals have a larger rms",
                                  bounds=(0.0, 1e6))
    posterior_mean: bool = par(True, "denoised flux = the posterior mean of the signal under the generator's "
                               "discrepancy term, G(z) + S_C (S_C + N)^-1 (y - G(z)), when the model has S_C; "
                               "false: G(z), the paper's")
    batch: int = par(64, "spectra per MAP batch", bounds=(1, 100000), science=False)
    device: str = par("auto", "torch device of the MAP (auto: CUDA when available)", choices=DEVICES, science=False)
    cpu_threads: int = par(2, "torch CPU threads of the MAP", bounds=(1, 1024), science=False)


# --------------------------------------------------------------------------------------
# stellar classification from 2D stripes (seed 003): a product above the frame
# --------------------------------------------------------------------------------------
CLASSIFY_METHODS = ("drcnet", "rcnet", "template")


@dataclass(frozen=True)
class ClassifyParams(ParSet):
    """Stellar classes per fiber and exposure from both arms (:mod:`fiberlake.jobs.classify_stage`)."""

    stage: ClassVar[str] = "classify"
    enabled: bool = par(True, "label the night's stars after the products (needs torch)")
    model: str = par("default", "classify model (DRC-Net and RC-Net): default (shipped), a model id of the lake's "
                     "models table, or a directory with weights.safetensors and card.json")
    methods: tuple[str, ...] = par(CLASSIFY_METHODS, "which classifiers write labels", choices=CLASSIFY_METHODS)
    template_model: str = par("cannon", "star model of the template fit's grid (the other one than the data's; "
                              "analytic when the Cannon pickles are missing)", choices=("cannon", "analytic"))
    template_sigma: float = par(2.5, "Gaussian line-spread sigma of the templates", unit="A", bounds=(0.1, 50.0))
    min_snr: float = par(0.0, "fibers whose red (else blue) aperture S/N is below this are flagged low_snr",
                         bounds=(0.0, 1e6))
    batch: int = par(256, "fibers per inference batch", bounds=(1, 100000), science=False)
    device: str = par("auto", "torch device (auto: CUDA when available)", choices=DEVICES, science=False)


@dataclass(frozen=True)
class ReductionParams(ParSet):
    """Parameters of the classical reduction: the extractions to run and one set per stage.

    Examples
    --------
    >>> params = ReductionParams().updated({"extractions": ("box",), "cosmics.enabled": False})
    >>> params.cosmics.enabled
    False
    """

    stage: ClassVar[str] = ""
    extractions: tuple[str, ...] = par(DEFAULT_EXTRACTIONS, "extraction methods to run; a run adds its "
                                       "methods to a night and replaces only the same methods", choices=EXTRACTIONS)
    ccd: CCDStageParams = nested(CCDStageParams, "overscan and frame combination")
    cosmics: CosmicsParams = nested(CosmicsParams, "cosmic-ray detection")
    tracing: TracingParams = nested(TracingParams, "fiber tracing")
    rectify: RectifyParams = nested(RectifyParams, "aberration correction (seed 000)")
    wavecal: WavecalParams = nested(WavecalParams, "wavelength calibration")
    profile: ProfileParams = nested(ProfileParams, "cross-dispersion profile model")
    psf: PSFParams = nested(PSFParams, "PSF of the deconvolution")
    box: BoxParams = nested(BoxParams, "box extraction")
    optimal: OptimalParams = nested(OptimalParams, "optimal extraction")
    deconv: DeconvStageParams = nested(DeconvStageParams, "deconvolution extraction")
    cae: CAEStageParams = nested(CAEStageParams, "extraction through the PSF-conditioned CAE (seed 002)")
    fiberflat: FiberFlatParams = nested(FiberFlatParams, "fiber flat")
    sky: SkyParams = nested(SkyParams, "sky subtraction")
    fluxcal: FluxCalParams = nested(FluxCalParams, "flux calibration from the standard stars")
    coadd: CoaddParams = nested(CoaddParams, "arms joined, exposures combined per target")
    denoise: DenoiseParams = nested(DenoiseParams, "Bayesian denoising of joined spectra and coadds (seed 004)")
    classify: ClassifyParams = nested(ClassifyParams, "stellar classes from 2D stripes (seed 003) and baselines")
    execution: ExecutionParams = nested(ExecutionParams, "chunking and devices (not hashed)", science=False)

    def _stages(self, names: tuple[str, ...]) -> dict:
        return {name: getattr(self, name).science_dict() for name in names}

    def calibration_dict(self) -> dict:
        """Science parameters of the stages that build a calibration set's common part."""
        return self._stages(CALIBRATION_STAGES)

    def method_dict(self, method: str) -> dict:
        """Science parameters of one extraction's own calibration products (fiber flat, PSF)."""
        return self._stages(METHOD_STAGES[method])

    def extraction_dict(self, method: str) -> dict:
        """Every science parameter one extraction's spectra depend on."""
        return self.calibration_dict() | self._stages(FRAME_STAGES) | self.method_dict(method)

    def calibration_digest(self) -> str:
        """Hash of :meth:`calibration_dict` (part of ``calib_id``)."""
        return digest_of(self.calibration_dict())

    def method_digest(self, method: str) -> str:
        """Hash of :meth:`method_dict` (identifies a method's products in a calibration set)."""
        return digest_of(self.method_dict(method))

    def extraction_digest(self, method: str) -> str:
        """Hash of :meth:`extraction_dict`: the ``config_hash`` of a frame's marker for ``method``."""
        return digest_of(self.extraction_dict(method))

    def products_digest(self, method: str) -> str:
        """Hash of everything the products above the frame (flux calibration, joined spectra, coadds)
        of one extraction depend on: :meth:`extraction_dict` plus ``fluxcal`` and ``coadd``."""
        return digest_of(self.extraction_dict(method) | self._stages(("fluxcal", "coadd")))


# --------------------------------------------------------------------------------------
# frame typing (seed 001, SPIT): an ingest stage, not part of the reduction
# --------------------------------------------------------------------------------------
ROUTING_MODES = ("auto", "header", "pixels")
TYPING_ARCHITECTURES = ("compact", "paper")


@dataclass(frozen=True)
class TypingParams(ParSet):
    """Frame typing at ingest (:mod:`fiberlake.processors.typing_route`): which model, and how its answer is used.

    ``routing`` decides the type the pipeline acts on (``type_used`` of the ``frames`` table):

    * ``auto`` - the header type stays primary (as PypeIt); a frame whose header type is missing
      or not a known type, or whose header is contradicted by the pixels with at least
      ``min_flips`` of 4 flips agreeing and a mean probability of at least ``min_confidence``,
      is routed by its pixel type and flagged;
    * ``header`` - the header type always (pixel types are recorded and disagreements flagged,
      never acted on): the classical rules alone;
    * ``pixels`` - the pixel type whenever the final scheme decided one, else the header type.
    """

    stage: ClassVar[str] = "typing"
    enabled: bool = par(True, "type every frame from its pixels at ingest (needs torch)")
    model: str = par("default", "typing model: default (shipped with fiberlake), a model id of the lake's "
                     "models table, or a directory with weights.safetensors and card.json")
    routing: str = par("auto", "which type the pipeline acts on: auto (header unless missing or contradicted with "
                       "confidence), header (header rules alone), pixels (pixel type when decided)",
                       choices=ROUTING_MODES)
    min_confidence: float = par(0.9, "mean probability (over the 4 flips) a pixel type needs to override a header",
                                bounds=(0.0, 1.0))
    min_flips: int = par(4, "flips (of 4) that must agree before a pixel type overrides a header", bounds=(3, 4))
    super_majority: int = par(3, "flips (of 4) that must agree for a pixel type at all, else UNKNOWN (the paper: 3)",
                              bounds=(3, 4))
    batch: int = par(16, "frames per forward pass of the typing network", bounds=(1, 4096), science=False)
    device: str = par("auto", "torch device of the typing network (auto: CUDA when available)", choices=DEVICES,
                      science=False)
    cpu_threads: int = par(2, "torch CPU threads of the typing network", bounds=(1, 1024), science=False)


@dataclass(frozen=True)
class TypingTrainParams(ParSet):
    """Training of a typing model (``fiberlake train typing``): data, network and optimiser.

    The defaults make the shipped model: ~14 CPU-minutes to simulate the 1,476 training frames, ~11 to
    simulate the 774 held-out ones, 6 epochs of the image network (~16-19 minutes on one thread), then
    the scalars' classifier fused with it (seconds). Seeds of training
    nights come from :data:`fiberlake.ingest.typing_dataset.TRAIN_SEEDS`, held-out nights from
    :data:`~fiberlake.ingest.typing_dataset.HELDOUT_SEEDS`.
    """

    stage: ClassVar[str] = "train"
    arch: str = par("compact", "network: compact (shippable, global pooling) or paper (the paper's, 69 M weights)",
                    choices=TYPING_ARCHITECTURES)
    channels: str = par("zscale", "input channels, comma-separated: zscale (the paper's), asinh (whole dynamic range), "
                        "cosmics (cosmic-ray hits at full resolution)")
    scalars: str = par("hit_rate,level_p50,level_p90,level_p99",
                       "per-frame scalars read beside the image, comma-separated (empty: none, the paper's image "
                       "alone): hit_rate (cosmic-ray hits per raw pixel), level_p50, level_p90, level_p99 "
                       "(absolute levels)")
    scalar_fusion: str = par("product", "how the scalars are read: product (a small classifier of the scalars "
                             "alone, trained after the image network, its class probabilities multiplied with the "
                             "network's) or dense (concatenated to the pooled features before the dense layer, "
                             "trained with the network)", choices=("product", "dense"))
    scalar_hidden: int = par(32, "hidden units of the scalars' classifier (scalar_fusion product)", bounds=(1, 4096))
    scalar_steps: int = par(1500, "full-batch Adam steps (rate 1e-2) of the scalars' classifier", bounds=(1, 100000))
    image_model: str = par("", "a trained image network (folder or model id) to fuse with the scalars' classifier "
                           "instead of training one (scalar_fusion product; empty: train it)")
    mini_nights: int = par(40, "training nights of the mini instrument (one camera, every type)", bounds=(1, 200))
    lamost_nights: int = par(3, "training nights of the lamost instrument", bounds=(0, 200))
    per_class: int = par(6, "frames of each type in a mini training night", bounds=(1, 100))
    lamost_per_class: int = par(2, "frames of each type in a lamost night", bounds=(1, 100))
    heldout_mini_nights: int = par(25, "held-out mini nights (seeds no training run uses)", bounds=(1, 100))
    heldout_lamost_nights: int = par(2, "held-out lamost nights", bounds=(0, 100))
    heldout_per_class: int = par(5, "frames of each type in a held-out mini night", bounds=(1, 100))
    epochs: int = par(6, "passes over the (class-balanced) training frames times their 4 flips", bounds=(1, 10000))
    lr: float = par(2e-3, "initial Adam learning rate, decayed to 0 along a half cosine over the budget (the "
                    "paper: 1e-4 constant, over ~1,000 updates of 30 on a GPU)", bounds=(1e-7, 1.0))
    batch: int = par(32, "frames per Adam update", bounds=(1, 4096))
    seed: int = par(0, "seed of the initialisation, oversampling, flips and batch order", bounds=(0, 2**31 - 1))
    members: int = par(1, "networks trained (seeds seed, seed + 1, ...) and averaged as one ensemble", bounds=(1, 16))
    max_minutes: float = par(22.0, "stop training after this many minutes (the data simulation not counted)",
                             unit="min", bounds=(0.1, 10000.0))
    cpu_threads: int = par(2, "torch CPU threads while training", bounds=(1, 1024), science=False)
    device: str = par("auto", "torch device of the training (auto: CUDA when available)", choices=DEVICES,
                      science=False)


@dataclass(frozen=True)
class DenoiseTrainParams(ParSet):
    """Training of the denoiser (``fiberlake train denoise``): generator, KDE prior, NoiseFlow, DAE baselines.

    Stars and noise are simulated on the 2048-bin grid from the simulator's spectral and noise models
    (:mod:`fiberlake.ingest.sim_spectra1d`); the defaults train within ~15 CPU-minutes on 2 cores.
    """

    stage: ClassVar[str] = "train_denoise"
    seed: int = par(1600, "seed of the training stars and their exposures", bounds=(0, 2**31 - 1))
    per_subclass: int = par(150, "high-S/N training stars per subclass (the paper: its top 200)", bounds=(8, 100000))
    noise_per_subclass: int = par(80, "stars per subclass observed several times for the NoiseFlow training noise",
                                  bounds=(1, 100000))
    n_exposures: int = par(3, "exposures of each noise star (the simulator's plates hold up to three)",
                           bounds=(2, 100))
    noise_mag_max: float = par(18.5, "faintest magnitude of the noise and DAE stars (13 the brightest)", unit="mag",
                               bounds=(13.5, 25.0))
    latent_dim: int = par(3, "latent dimension L (the paper: 3)", bounds=(1, 64))
    ae_steps: int = par(2500, "Adam steps of the isometric autoencoder (eq. 10)", bounds=(1, 10**7))
    delta: float = par(1.0, "radius of the isometry perturbation (scaled flux units)", bounds=(0.0, 1e3))
    flow_steps: int = par(1000, "Adam steps of NoiseFlow", bounds=(1, 10**7))
    flow_window: int = par(5, "K: predecessors of each bin in NoiseFlow", bounds=(1, 256))
    dae_steps: int = par(2500, "Adam steps of each DAE baseline (plain and zero-imputed; the generator's budget)",
                         bounds=(0, 10**7))
    max_missing_fraction: float = par(0.4, "longest random missing interval of the zero-imputation DAE's training",
                                      bounds=(0.0, 0.95))
    batch: int = par(64, "spectra per Adam update", bounds=(1, 100000))
    lr: float = par(2e-3, "peak Adam learning rate (one-cycle schedule)", bounds=(1e-7, 1.0))
    cpu_threads: int = par(2, "torch CPU threads while training", bounds=(1, 1024), science=False)


@dataclass(frozen=True)
class ClassifyTrainParams(ParSet):
    """Training of the stellar classifier (``fiberlake train classify``): DRC-Net and RC-Net.

    Data: simulated ``mini`` science exposures (:mod:`fiberlake.jobs.classify_data`), every class
    equally likely, nights spread over ``designs`` instrument designs (seeds); training on stars of
    S/N_r > ``snr_min`` as the paper, made fainter at random (``augment_*``), the stars of 10 % of
    the designs for validation (early stopping); held-out exposures from other seeds for the figures.
    """

    stage: ClassVar[str] = "train_classify"
    seed: int = par(1501, "simulation seed of the training exposures (held-out: seed + 50)", bounds=(0, 2**31 - 1))
    stellar_model: str = par("analytic", "star model of the training exposures", choices=("analytic", "cannon"))
    exposures: int = par(200, "training exposures (both arms, ~28 stars each)", bounds=(1, 100000))
    designs: int = par(100, "instrument designs (simulation seeds seed + 10000 k: 2D PSF, traces, wavelength "
                       "solution, detector) the training nights spread over", bounds=(1, 100000))
    exposures_per_night: int = par(2, "exposures of each simulated night (training and held-out)", bounds=(1, 1000))
    heldout_exposures: int = par(24, "held-out exposures per star model", bounds=(1, 100000))
    heldout_designs: int = par(12, "instrument designs of the held-out exposures of each star model",
                               bounds=(1, 100000))
    snr_min: float = par(30.0, "train on stars above this S/N_r (the paper: 30)", bounds=(0.0, 1e6))
    epochs: int = par(36, "most passes over the training stars (the shipped model: DRC-Net reaches it, RC-Net "
                      "stops early at 17)", bounds=(1, 100000))
    patience: int = par(10, "stop when the validation loss has not improved for this many epochs (the paper: "
                        "50 of 300)", bounds=(1, 100000))
    batch: int = par(32, "stars per AdaGrad update (the paper: 4)", bounds=(1, 4096))
    lr: float = par(1e-2, "AdaGrad learning rate (the paper: 1e-3 at batch 4)", bounds=(1e-7, 10.0))
    arm_dropout: float = par(0.3, "probability that a training star loses one arm (zeroed), so a missing camera "
                             "still gets a label", bounds=(0.0, 0.5))
    augment_fraction: float = par(0.75, "fraction of training stars made fainter in each batch (noise from the frame's "
                                  "variance model; a deviation from the paper's S/N > 30 training set that keeps its "
                                  "stars)", bounds=(0.0, 1.0))
    augment_snr_min: float = par(3.0, "faintest S/N_r of an augmented star (log-uniform up to its own)",
                                 bounds=(0.5, 1e6))
    mirror_fraction: float = par(0.5, "fraction of training stars whose stripes are mirrored across the trace (the "
                                 "cross profile carries the instrument, not the star)", bounds=(0.0, 1.0))
    weight_decay: float = par(1e-4, "L2 weight decay of AdaGrad", bounds=(0.0, 1.0))
    max_minutes: float = par(60.0, "safety cap: stop a network's training after this many minutes (a budget in "
                             "minutes depends on the machine's load; epochs and patience are the rule)", unit="min",
                             bounds=(0.1, 10000.0))
    workers: int = par(2, "processes simulating the data", bounds=(1, 64), science=False)
    cpu_threads: int = par(2, "torch CPU threads while training", bounds=(1, 1024), science=False)


# --------------------------------------------------------------------------------------
# PSF-conditioned CAE deconvolution (seed 002): training
# --------------------------------------------------------------------------------------
CAE_COMBINATIONS = ("PSF-iPSF-iPSF1", "PSF-iPSF1", "PSF-iPSF", "iPSF-iPSF1", "PSF", "iPSF", "iPSF1")


@dataclass(frozen=True)
class CAETrainParams(ParSet):
    """Training of a deconvolve model (``fiberlake train deconvolve``): chunks, network, optimiser.

    Chunks come from :func:`fiberlake.ingest.sim_chunks.simulate_chunks`; training, afterburner
    calibration and held-out chunks use disjoint seeds (``seed``, ``seed + 1``, ``heldout_seed``).
    """

    stage: ClassVar[str] = "train_cae"
    combination: str = par("PSF-iPSF-iPSF1", "input combination of the paper (Table 1)", choices=CAE_COMBINATIONS)
    chunks: int = par(3000, "training chunks (each one 64 x 64 tile with its margins)", bounds=(16, 10_000_000))
    calib_chunks: int = par(400, "chunks fitting the afterburner's flux-bias quadratic and the error scale",
                            bounds=(16, 1_000_000))
    heldout_chunks: int = par(300, "held-out chunks of the card's figures", bounds=(16, 1_000_000))
    tile: int = par(64, "tile side (px) the network sees", unit="px", choices=(32, 64, 96, 128))
    margin: int = par(16, "context (px) around each training tile for its PSF/iPSF filtering", unit="px",
                      bounds=(0, 64))
    stride: int = par(48, "tile step at inference (tiles overlap by tile - stride, blended)", unit="px",
                      bounds=(8, 128))
    target_sigma: float = par(0.8, "sigma (px) of the truth's invariant Gaussian PSF", unit="px", bounds=(0.3, 3.0))
    reg: float = par(1e-3, "Tikhonov regularisation of the inverse PSF, relative to max |K|^2", bounds=(1e-8, 1.0))
    sigma1: float = par(1.0, "sigma (px) of the Gaussian that regularises iPSF into iPSF1", unit="px",
                        bounds=(0.2, 5.0))
    pitch: float = par(16.0, "fiber spacing (px) of the simulated chunks (the instrument's fiber_pitch)", unit="px",
                       bounds=(4.0, 64.0))
    filters: int = par(16, "filters of the first convolution, then x2, x4 (the paper: 64, i.e. 64/128/256; 16 keeps "
                       "the shipped model small and trainable on 2 CPU cores)", bounds=(4, 256))
    epochs: int = par(20, "passes over the training chunks (max_minutes usually stops first)", bounds=(1, 10000))
    batch: int = par(8, "tiles per Adam update (the paper: 32 on a GPU; 8 gives 4x more updates per CPU-minute)",
                     bounds=(1, 4096))
    lr: float = par(2e-3, "initial Adam learning rate (the paper: 1e-4 over 100 GPU epochs)", bounds=(1e-7, 1.0))
    lr_decay: float = par(0.6, "exponential decay of the learning rate per decay_steps updates (the paper: 0.6)",
                          bounds=(0.01, 1.0))
    decay_steps: int = par(2000, "updates per lr_decay factor (the paper: 100,000)", bounds=(1, 10_000_000))
    seed: int = par(1700, "seed of the training chunks (calibration chunks: seed + 1) and of the initialisation",
                    bounds=(0, 2**31 - 1))
    heldout_seed: int = par(91700, "seed of the held-out chunks of the card", bounds=(0, 2**31 - 1))
    max_minutes: float = par(9.0, "stop training after this many minutes (simulation, ~3 min, not counted)", unit="min",
                             bounds=(0.1, 10000.0))
    cpu_threads: int = par(2, "torch CPU threads while training", bounds=(1, 1024), science=False)
    device: str = par("auto", "torch device of the training (auto: CUDA when available)", choices=DEVICES,
                      science=False)
