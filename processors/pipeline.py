"""The classical reduction of one camera, as pure functions over arrays.

Two steps, each a list of calls to the stage modules:

* :func:`build_calibration`: master bias -> master flat -> traces -> [aberration map from the
  traces; master flat and arcs resampled into the rectified frame; traces measured again there]
  -> wavelength solution from the arcs -> fiber flats (one per extraction method, extracted the
  same way as science);
* :func:`reduce_frame`: CCD correction -> [resampling into the rectified frame] -> extraction
  on the row grid -> fiber flat -> resampling onto the camera's wavelength grid -> sky
  subtraction -> quality metrics. It is three steps that ``jobs/`` can run as separate tasks:
  :func:`prepare_frame` (correction, then the frame cut into fiber bundles),
  :func:`extract_bundle` (extraction to the wavelength grid, one bundle at a time) and
  :func:`finish_frame` (sky from all the sky fibers, metrics).

No file or table I/O happens here; ``jobs/process.py`` reads frames and writes products.
"""

from __future__ import annotations

import dataclasses
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np

from fiberlake.processors import (ccd, deconv, extract, fiberflat, frame_tiles, quality, rectify, resample, sky,
                                   tracing, wavecal)
from fiberlake.processors.chunks import Bundle, bundle_columns, plan_bundles, subset_profile, subset_psf, subset_traces
from fiberlake.processors.rectify import Rectification, RectifyConfig
from fiberlake.processors.params import ReductionParams
from fiberlake.processors.rectify_map import MapConfig
from fiberlake.processors.psf import fit_psf
from fiberlake.schemas.containers import (ArrayContainer, ProfileModel, PSFModel, Spectra1D, TraceSet, WaveSolution,
                                          transient)
from fiberlake.schemas.instrument import Instrument
from fiberlake.schemas.linelists import arc_lines
from fiberlake.schemas.maskbits import Mask



def rectify_config(params: ReductionParams) -> RectifyConfig:
    """The aberration-correction settings of the reduction parameters."""
    r = params.rectify
    device = params.execution.rectify_device
    return RectifyConfig(
        sampling=r.sampling, n_samples=r.samples, edge_ratio=r.edge_ratio, order=r.order, labels=r.labels,
        map=MapConfig(kind=r.map, hidden=r.mlp_hidden, epochs=r.mlp_epochs, batch=r.mlp_batch, lr=r.mlp_lr,
                      seed=r.mlp_seed, residual=r.mlp_residual, deg=r.deg, device=None if device == "auto" else device))


def deconv_params(params: ReductionParams) -> deconv.DeconvParams:
    """The deconvolution settings of the reduction parameters."""
    d, run = params.deconv, params.execution
    return deconv.DeconvParams(
        fibers_per_patch=d.patch_fibers, rows_per_patch=d.patch_rows, pad_rows=d.pad_rows,
        overlap_fibers=d.overlap_fibers, resolution_halfwidth=d.resolution_halfwidth, regularize=d.regularize,
        retry_regularize=d.retry_regularize, variance_model=d.variance_model, batch=run.deconv_batch,
        device=run.deconv_device, cpu_threads=run.deconv_cpu_threads)


def camera_ccd_params(camera: ccd.CCDParams, params: ReductionParams) -> ccd.CCDParams:
    """A camera's CCD parameters (from its header) with the overscan and cosmic-ray settings of the run."""
    c, cr = params.ccd, params.cosmics
    return dataclasses.replace(camera, overscan_sigma=c.overscan_sigma, overscan_smooth=c.overscan_smooth,
                               cr_sigclip=cr.sigclip, cr_sigfrac=cr.sigfrac, cr_objlim=cr.objlim, cr_niter=cr.niter,
                               cr_grow=cr.grow)


@dataclass
class Calibration(ArrayContainer):
    """A night's calibration set for one camera.

    Stored by :class:`~fiberlake.schemas.containers.ArrayContainer`: each field under its own
    name (``master_bias``, ``traces/...``, ``wave/...``, ``fiberflats/<method>/...``,
    ``profile/...``, ``psf/...``, ``rectification/...``; a product that is None writes nothing),
    except ``info``, which the calibration store keeps as the set's metadata (see
    :meth:`from_arrays`). A stage that adds a product to the set adds a field. The arrays also
    hold ``layout``, the version of these names: a set of another layout is refused, not misread.
    """

    LAYOUT: ClassVar[int] = 2
    """Version of the stored array names (1: the hand-written ``fiberflat_<method>/``, ``rectify/``
    names before the containers had one serialisation)."""

    master_bias: np.ndarray
    master_flat: np.ndarray
    master_flat_ivar: np.ndarray
    traces: TraceSet
    wave: WaveSolution
    fiberflats: dict[str, Spectra1D]
    grid: np.ndarray
    profile: ProfileModel | None = None
    info: dict = transient(default_factory=dict)
    psf: PSFModel | None = None
    """PSF model of the deconvolution extraction, when requested."""
    rectification: Rectification | None = None
    """Aberration map when the set was built with ``rectify``: then ``master_flat``, ``traces``,
    ``wave``, ``fiberflats`` (and ``profile``, ``psf``) are in the rectified frame, and every
    frame is resampled with this map before extraction."""

    @cached_property
    def wave_rows(self) -> np.ndarray:
        """Wavelength (Angstrom) of every fiber's CCD rows, ``(n_fibers, ny)``."""
        return self.wave.wave()

    @cached_property
    def trace_figures(self) -> dict[str, np.ndarray]:
        """Straightness of the extraction traces (and of the raw ones) and the map residual, per fiber."""
        straight = rectify.trace_straightness(self.traces)
        rect = self.rectification
        return {"trace_straightness": straight,
                "trace_straightness_raw": rect.straightness_raw if rect is not None else straight,
                "map_residual": rect.residual if rect is not None else np.full(self.traces.n_fibers, np.nan)}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Named arrays of the set (``a/b`` names nest), with its ``layout``."""
        return super().to_arrays() | {"layout": np.array(self.LAYOUT, np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], info: dict | None = None) -> Calibration:
        """Rebuild a set from :meth:`to_arrays` output and its metadata (``info``).

        Raises
        ------
        ValueError
            If the arrays are of another layout (a set written by other code: build it again).
        """
        layout = int(arrays["layout"]) if "layout" in arrays else 1
        if layout != cls.LAYOUT:
            raise ValueError(f"calibration set of array layout {layout}; this code reads layout {cls.LAYOUT}: "
                             "build the set again")
        calib = super().from_arrays(arrays)
        calib.info = dict(info or {})
        return calib


@dataclass
class ReducedFrame:
    """Calibrated spectra of one frame for one extraction method."""

    spectra: Spectra1D
    sky: Spectra1D
    metrics: dict[str, np.ndarray]
    frame_metrics: dict[str, float]
    resolution: np.ndarray | None = None
    """``deconv`` only: float32 ``(n_fibers, 2 h + 1, ny)`` band of each fiber's resolution
    matrix on the CCD row grid (before the fiber flat and the resampling):
    ``flux_rows[f, r] ~ sum_k resolution[f, k, r] * F[f, r + k - h]`` with ``F`` the
    electrons per row before the line-spread function (see
    :mod:`fiberlake.processors.deconv`); the rows' wavelengths are the calibration's
    ``wave.wave()``."""


def _extract(method: str, image: ccd.CCDImage, traces: TraceSet, params: ReductionParams,
             profile: extract.ProfileModel | None, psf: PSFModel | None = None,
             constants: FrameConstants | None = None, prepared: tuple | None = None,
             cache_profile: bool = False) -> Spectra1D:
    read_noise = constants.read_noise if constants else None
    if method == "deconv":
        if psf is None:
            raise ValueError("deconv extraction needs a PSF model in the calibration set "
                             "(build it with 'deconv' among the extractions)")
        return deconv.deconv_extract(image.image, image.ivar, image.mask, traces, psf, deconv_params(params),
                                     read_noise=read_noise)
    if method == "cae":
        if psf is None:
            raise ValueError("cae extraction needs a PSF model in the calibration set "
                             "(build it with 'cae' among the extractions)")
        from fiberlake.processors import cae_extract

        return cae_extract.cae_extract(image.image, image.ivar, image.mask, traces, psf,
                                       cae_extract.installed(params.cae.model),
                                       aperture=params.cae.aperture or None, read_noise=read_noise,
                                       amplitude=params.cae.amplitude)
    if method == "box":
        return extract.box_extract(image.image, image.ivar, image.mask, traces, halfwidth=params.box.halfwidth,
                                   profile=profile, cache_profile=cache_profile, prepared=prepared)
    opt = params.optimal
    return extract.optimal_extract(
        image.image, image.ivar, image.mask, traces,
        halfwidth=opt.halfwidth, reject_sigma=opt.reject_sigma, max_iter=opt.max_iter, deblend=opt.deblend,
        profile_error=opt.profile_error, profile=profile, read_noise=read_noise,
        deblend_halfwidth=constants.deblend_halfwidth if constants else opt.deblend_halfwidth,
        cache_profile=cache_profile, prepared=prepared,
    )


def master_frame(raws: list[np.ndarray], ccd_params: ccd.CCDParams, master_bias: np.ndarray,
                  combine_sigma: float) -> ccd.CCDImage:
    """Correct raw lamp frames and combine them (sigma-clipped mean) into one image.

    The variance of the mean of n frames is (read noise^2 + counts) / n; a pixel masked in any
    input is masked in the result.
    """
    images = [ccd.preprocess(raw, ccd_params, master_bias) for raw in raws]
    combined = ccd.combine_frames([i.image for i in images], combine_sigma) if len(images) > 1 else images[0].image
    mask = np.bitwise_or.reduce([i.mask for i in images])
    var = (ccd_params.read_noise**2 + np.clip(combined, 0, None)) / len(images)
    ivar = np.where(mask == 0, 1.0 / var, 0.0).astype(np.float32)
    return ccd.CCDImage(image=combined.astype(np.float32), ivar=ivar, mask=mask)


def build_calibration(
    biases: list[np.ndarray],
    flats: list[np.ndarray],
    arcs: list[np.ndarray],
    ccd_params: ccd.CCDParams,
    instrument: Instrument,
    arm: str,
    params: ReductionParams,
) -> Calibration:
    """Build the calibration set of one camera from its raw calibration frames.

    Parameters
    ----------
    biases, flats, arcs : list of ndarray
        Raw frames (ADU, with overscan). At least one of each is needed.
    ccd_params : CCDParams
        Gain, read noise and sections of the camera.
    instrument : Instrument
        Instrument description (nominal fiber positions, arm dispersion, output grid).
    arm : str
        Arm of the camera.
    params : ReductionParams
        Reduction parameters.

    Returns
    -------
    Calibration
    """
    for kind, frames in (("BIAS", biases), ("FLAT", flats), ("ARC", arcs)):
        if not frames:
            raise ValueError(f"no {kind} frame for this camera: cannot build its calibration set")
    ccd_params = camera_ccd_params(ccd_params, params)
    sigma = params.ccd.combine_sigma
    bias_images = [ccd.overscan_subtract(raw, ccd_params.datasec, ccd_params.biassec, sigma=ccd_params.overscan_sigma,
                                         smooth=ccd_params.overscan_smooth) for raw in biases]
    master_bias = ccd.combine_frames(bias_images, sigma) if len(bias_images) > 1 else bias_images[0]

    flat = master_frame(flats, ccd_params, master_bias, sigma)
    nominal_x = instrument.nominal_fiber_columns()
    traces = tracing.trace_fibers(flat.image, flat.ivar, nominal_x, **params.tracing.science_dict())

    arc = master_frame(arcs, ccd_params, master_bias, sigma)
    rectification, rectify_info = None, {"applied": False}
    if params.rectify.enabled:
        rectification, rectify_info = _fit_rectification(traces, flat.image.shape[1], params, nominal_x)
    if rectification is not None:
        # resample the lamps into the rectified frame, where the traces are straight, and
        # measure everything else there
        order = rectification.config.order
        flat = rectify.rectify_image(flat.image, flat.ivar, flat.mask, rectification.map, order=order)
        arc = rectify.rectify_image(arc.image, arc.ivar, arc.mask, rectification.map, order=order)
        traces = tracing.trace_fibers(flat.image, flat.ivar, nominal_x, **params.tracing.science_dict())
        rectify_info["straightness_median"] = float(np.nanmedian(rectify.trace_straightness(traces)))
    spec = instrument.arm(arm)
    wave = wavecal.calibrate_wavelength(
        arc.image, arc.ivar, traces, arc_lines()["wave_air"], spec.wave_center, spec.dispersion,
        **params.wavecal.science_dict())

    prof = params.profile
    profile = extract.measure_profile(flat.image, flat.ivar, flat.mask, traces, n_bands=prof.n_bands,
                                      rows_per_band=prof.rows_per_band, max_sweeps=prof.max_sweeps,
                                      deg=(prof.deg, prof.deg)) if prof.measure else None
    psf = None
    if "deconv" in params.extractions or "cae" in params.extractions:
        p = params.psf
        psf = fit_psf(flat.image, flat.ivar, flat.mask, arc.image, arc.ivar, arc.mask, traces,
                      order=p.order, deg=(p.deg, p.deg), invariant=p.invariant, lsf_halfwidth=p.lsf_halfwidth,
                      xsf_halfwidth=p.xsf_halfwidth, n_rows=p.n_rows, min_snr=p.min_snr)
    fiberflats = {}
    wave_rows = wave.wave()
    for method in params.extractions:
        flat_spectra = _extract(method, flat, traces, params, profile, psf)
        fiberflats[method] = fiberflat.compute_fiberflat(flat_spectra, traces.dead, smooth=params.fiberflat.smooth,
                                                         wave_rows=wave_rows)
    return Calibration(
        master_bias=master_bias.astype(np.float32),
        master_flat=flat.image,
        master_flat_ivar=flat.ivar,
        traces=traces,
        wave=wave,
        fiberflats=fiberflats,
        grid=instrument.wavelengths(arm),
        profile=profile,
        info={"n_bias": len(biases), "n_flat": len(flats), "n_arc": len(arcs), "rectify": rectify_info},
        psf=psf,
        rectification=rectification,
    )


def _fit_rectification(traces: TraceSet, nx: int, params: ReductionParams,
                       nominal_x: np.ndarray) -> tuple[Rectification | None, dict]:
    """The aberration map from the master flat's traces, or None and the reason it cannot be built."""
    try:
        rect = rectify.fit_rectification(traces, nx, rectify_config(params), nominal_x)
    except (ImportError, ValueError) as err:  # torch missing for an MLP; too few live traces
        warnings.warn(f"aberration map not built, frames not rectified: {err}", RuntimeWarning, stacklevel=3)
        return None, {"applied": False, "reason": f"{type(err).__name__}: {err}"}
    info = {"applied": True, "map": rect.config.map.kind, "sampling": rect.config.sampling,
            "labels": rect.config.labels,
            "straightness_raw_median": float(np.nanmedian(rect.straightness_raw))}
    info |= {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in rect.info.items()}
    return rect, info


def _trace_offsets(image: ccd.CCDImage, traces: TraceSet, halfwidth: float) -> np.ndarray:
    """Median flux-weighted offset (pixels) of each fiber's light from its calibration trace."""
    ny, nx = image.image.shape
    rows = np.arange(ny)
    xc = traces.x(rows)  # [nf, ny]
    offsets = np.arange(-int(halfwidth), int(halfwidth) + 1)
    cols = np.rint(xc)[..., None].astype(int) + offsets  # [nf, ny, nw]
    inside = (cols >= 0) & (cols < nx)
    colsc = np.clip(cols, 0, nx - 1)
    flat = colsc + (rows * nx)[:, None]  # one gather per array (the same values as 2D indexing)
    values = image.image.ravel()[flat]
    values *= inside & (image.ivar.ravel()[flat] > 0)
    np.maximum(values, 0, out=values)
    total = values.sum(-1)
    centroid = (values * (colsc - xc[..., None])).sum(-1) / np.where(total > 0, total, 1)
    weight = total > np.nanpercentile(total, 50, axis=1, keepdims=True)
    out = np.array([np.median(c[w]) if w.any() else np.nan for c, w in zip(centroid, weight)])
    return out.astype(np.float32)


@dataclass(frozen=True)
class FrameConstants:
    """Figures of a whole corrected frame that every bundle's extraction uses, so that a bundle
    is extracted as it would be in the whole frame.

    Attributes
    ----------
    read_noise : float
        Read noise (electrons) implied by the frame's inverse variance.
    deblend_halfwidth : float
        Profile support of the simultaneous optimal fit.
    """

    read_noise: float
    deblend_halfwidth: float


@dataclass
class FrameSlab:
    """The columns of a corrected frame that one bundle is extracted from.

    Attributes
    ----------
    bundle : Bundle
    col0 : int
        CCD column of the slab's column 0.
    image : CCDImage
        The slab (rows: the whole frame).
    """

    bundle: Bundle
    col0: int
    image: ccd.CCDImage


@dataclass
class BundleSpectra:
    """A bundle's core fibers, extracted, flat-fielded and on the wavelength grid (before sky).

    Attributes
    ----------
    bundle : Bundle
    spectra : dict of str to Spectra1D
        Per extraction method, shape ``(n_core, n_wave)``.
    resolution : dict of str to ndarray or None
        ``deconv``: the core fibers' resolution bands on the row grid (see :class:`ReducedFrame`).
    offsets : ndarray, shape (n_core,)
        Median offset (px) of each fiber's light from its trace.
    """

    bundle: Bundle
    spectra: dict[str, Spectra1D]
    resolution: dict[str, np.ndarray | None]
    offsets: np.ndarray


def frame_bundles(calib: Calibration, params: ReductionParams) -> list[Bundle]:
    """The bundles a frame of this calibration is cut into."""
    return plan_bundles(calib.traces.n_fibers, params.execution.chunk_fibers, params.execution.chunk_margin)


def prepare_frame(raw: np.ndarray, ccd_params: ccd.CCDParams, calib: Calibration,
                  params: ReductionParams) -> tuple[FrameConstants, list[FrameSlab]]:
    """Correct a raw frame (CCD, cosmics, aberration) and cut it into its bundles' slabs.

    Parameters
    ----------
    raw : ndarray
        Raw frame (ADU, with overscan).
    ccd_params : CCDParams
        Camera parameters from the frame's header.
    calib : Calibration
        The camera's calibration set.
    params : ReductionParams

    Returns
    -------
    FrameConstants
    list of FrameSlab
        One per bundle of :func:`frame_bundles`, in order.
    """
    camera = camera_ccd_params(ccd_params, params)
    adu, mask = ccd.correct_counts(raw, camera, calib.master_bias)
    rect = calib.rectification  # when set, the calibration lives in the rectified frame
    run = params.execution
    threads = frame_tiles.threads(run.prepare_threads)
    # in one process, tiles beyond one per thread only add their margins' work
    image = frame_tiles.correct_frame(adu, mask, camera, cosmics=params.cosmics.enabled,
                                      rmap=None if rect is None else rect.map,
                                      order=3 if rect is None else rect.config.order,
                                      n_tiles=min(run.prepare_tiles, threads), threads=threads)
    return cut_frame(image, calib, params)


def cut_frame(image: ccd.CCDImage, calib: Calibration,
              params: ReductionParams) -> tuple[FrameConstants, list[FrameSlab]]:
    """The last step of :func:`prepare_frame`: the frame's constants and its bundles' slabs, from
    the corrected frame (whole, or joined from its tiles by
    :func:`~fiberlake.processors.frame_tiles.join_tiles`)."""
    constants = FrameConstants(
        read_noise=extract.estimate_read_noise(image.image, image.ivar, image.mask),
        deblend_halfwidth=params.optimal.deblend_halfwidth or extract.default_deblend_halfwidth(
            calib.traces, params.optimal.halfwidth, profile=calib.profile))
    reach = max(params.box.halfwidth, params.optimal.halfwidth, constants.deblend_halfwidth)
    if calib.psf is not None:
        reach = max(reach, calib.psf.xsf.halfwidth + 1)
    nx = image.image.shape[1]
    slabs = []
    for bundle in frame_bundles(calib, params):
        c0, c1 = bundle_columns(calib.traces, bundle, reach, nx)
        cut = ccd.CCDImage(image=image.image[:, c0:c1], ivar=image.ivar[:, c0:c1], mask=image.mask[:, c0:c1])
        slabs.append(FrameSlab(bundle=bundle, col0=c0, image=cut))
    return constants, slabs


def _core(spectra: Spectra1D, keep: slice) -> Spectra1D:
    return Spectra1D(spectra.flux[keep], spectra.ivar[keep], spectra.mask[keep],
                     chi2=None if spectra.chi2 is None else spectra.chi2[keep],
                     npix=None if spectra.npix is None else spectra.npix[keep])


def extract_bundle(slab: FrameSlab, constants: FrameConstants, calib: Calibration,
                   params: ReductionParams) -> BundleSpectra:
    """Extract one bundle's fibers from its slab, flat-field them and resample them onto the grid.

    Parameters
    ----------
    slab : FrameSlab
        From :func:`prepare_frame`.
    constants : FrameConstants
        From :func:`prepare_frame`.
    calib : Calibration
    params : ReductionParams

    Returns
    -------
    BundleSpectra
    """
    bundle = slab.bundle
    lo, hi = bundle.core
    traces = subset_traces(calib.traces, bundle.fibers, slab.col0)
    profile = subset_profile(calib.profile, bundle.fibers)
    psf = subset_psf(calib.psf, bundle.fibers, slab.col0)
    wave_rows = calib.wave_rows[lo:hi]
    dead = calib.traces.dead[lo:hi]
    offsets = _trace_offsets(slab.image, traces, params.box.halfwidth)[bundle.keep]
    spectra, resolution = {}, {}
    # box and optimal prepare the slab's pixels the same way: once for both
    prepared = (extract.prepare_image(slab.image.image, slab.image.ivar, slab.image.mask)
                if {"box", "optimal"} <= set(params.extractions) else None)
    for method in params.extractions:
        rows = _extract(method, slab.image, traces, params, profile, psf, constants,
                        prepared=prepared if method in ("box", "optimal") else None, cache_profile=True)
        res = getattr(rows, "resolution", None)
        resolution[method] = None if res is None else res[bundle.keep]
        flatted = fiberflat.apply_fiberflat(_core(rows, bundle.keep), _core(calib.fiberflats[method], slice(lo, hi)))
        on_grid = resample.resample_to_grid(wave_rows, flatted, calib.grid, row_range=calib.wave.row_range[lo:hi])
        on_grid.mask[dead] |= np.uint32(Mask.DEADFIBER)
        on_grid.ivar[dead] = 0
        spectra[method] = on_grid
    return BundleSpectra(bundle=bundle, spectra=spectra, resolution=resolution, offsets=offsets)


def finish_frame(parts: list[BundleSpectra], calib: Calibration, sky_fibers: np.ndarray,
                 params: ReductionParams) -> dict[str, ReducedFrame]:
    """Join a frame's bundles, subtract the sky (from all its sky fibers) and measure quality.

    Parameters
    ----------
    parts : list of BundleSpectra
        Every bundle of the frame, any order.
    calib : Calibration
    sky_fibers : ndarray of bool, shape (n_fibers,)
    params : ReductionParams

    Returns
    -------
    dict of str to ReducedFrame
        Keyed by extraction method.
    """
    parts = sorted(parts, key=lambda p: p.bundle.core[0])
    cores = [p.bundle.core for p in parts]
    if cores[0][0] != 0 or cores[-1][1] != calib.traces.n_fibers or any(a[1] != b[0] for a, b in zip(cores, cores[1:])):
        raise ValueError(f"bundles {cores} do not tile the {calib.traces.n_fibers} fibers")
    dead = calib.traces.dead
    sky_fibers = np.asarray(sky_fibers, bool) & ~dead
    offsets = np.concatenate([p.offsets for p in parts])

    def finish(method: str) -> ReducedFrame:
        on_grid = Spectra1D(*(np.concatenate([getattr(p.spectra[method], k) for p in parts])
                              for k in ("flux", "ivar", "mask")))
        res = [p.resolution[method] for p in parts]
        clip = params.sky.clip_sigma
        sky_model = sky.sky_model(on_grid, sky_fibers, clip_sigma=clip)
        final = sky.subtract_sky(on_grid, sky_model)
        residuals = sky.sky_residuals(on_grid, sky_fibers, clip_sigma=clip) if sky_fibers.sum() >= 3 else {}
        return ReducedFrame(
            spectra=final,
            sky=sky_model,
            metrics=fiber_metrics(final, calib, offsets, sky_fibers),
            frame_metrics={k: float(v) for k, v in residuals.items()}
            | {"trace_offset_rms": float(np.sqrt(np.nanmean(offsets[~dead] ** 2)))},
            resolution=None if any(r is None for r in res) else np.concatenate(res),
        )

    # the methods are independent: one thread each (numpy releases the GIL). The metrics silence
    # their RuntimeWarnings (all-NaN fibers) with warnings.catch_warnings, which is not
    # thread-safe: silenced here for the pool, and restored by the calling thread after it.
    threads = min(frame_tiles.threads(params.execution.prepare_threads), len(params.extractions))
    if threads > 1:
        with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=threads) as pool:
            warnings.simplefilter("ignore", RuntimeWarning)
            return dict(zip(params.extractions, pool.map(finish, params.extractions)))
    return {method: finish(method) for method in params.extractions}


def reduce_frame(
    raw: np.ndarray,
    ccd_params: ccd.CCDParams,
    calib: Calibration,
    sky_fibers: np.ndarray,
    params: ReductionParams,
) -> dict[str, ReducedFrame]:
    """Reduce one science or standard frame to calibrated spectra, per extraction method.

    The three steps :func:`prepare_frame`, :func:`extract_bundle` (once per bundle) and
    :func:`finish_frame`, in one call; ``jobs/`` runs them as separate tasks so that the bundles
    of a frame are extracted in parallel.

    Parameters
    ----------
    raw : ndarray
        Raw frame (ADU, with overscan).
    ccd_params : CCDParams
        Camera parameters from the frame's header.
    calib : Calibration
        The camera's calibration set.
    sky_fibers : ndarray of bool, shape (n_fibers,)
        Fibers that point at blank sky (from the fiber map).
    params : ReductionParams
        Reduction parameters.

    Returns
    -------
    dict of str to ReducedFrame
        Keyed by extraction method.
    """
    constants, slabs = prepare_frame(raw, ccd_params, calib, params)
    parts = [extract_bundle(slab, constants, calib, params) for slab in slabs]
    return finish_frame(parts, calib, sky_fibers, params)


def fiber_metrics(spectra: Spectra1D, calib: Calibration, offsets: np.ndarray, sky_fibers: np.ndarray) -> dict[str, np.ndarray]:
    """Per-fiber quality figures of calibrated spectra (columns of the ``metrics`` table)."""
    good = spectra.ivar > 0
    flux = np.where(good, spectra.flux, np.nan)
    snr_pix = np.where(good, spectra.flux * np.sqrt(np.clip(spectra.ivar, 0, None)), np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-masked (dead) fibers give NaN
        median_snr = np.nanmedian(snr_pix, axis=1)
        median_flux = np.nanmedian(flux, axis=1)
        chi2 = np.nanmean(np.where(good, spectra.flux**2 * spectra.ivar, np.nan), axis=1)
    mask = ~good
    return {
        "snr_eq15": quality.snr_eq15(spectra.flux, mask),
        "variance_eq14": quality.variance_eq14(spectra.flux, mask),
        "der_snr": quality.der_snr(spectra.flux, mask),
        "median_snr": median_snr,
        "median_flux": median_flux,
        "frac_masked": mask.mean(axis=1),
        "wave_rms": calib.wave.rms,
        "wave_nlines": calib.wave.n_lines,
        "trace_rms": calib.traces.rms,
        "trace_offset": offsets,
        "sky_chi2": np.where(sky_fibers, chi2, np.nan),
        **calib.trace_figures,
    }
