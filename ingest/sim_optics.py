"""Optics of the instrument simulator: where light lands on a CCD and how it spreads.

A :class:`CameraModel` is the static truth of one camera on one night (computed once, shared by
every frame of that camera and night):

* **Geometry.** Fiber ``f`` sits at the nominal slit column ``x0_f`` (plus a nightly flexure
  shift of a few tenths of a pixel). A wavelength lands, in the ideal (undistorted) image, on
  row ``y0 = yc + s_f + (ny/2) P^-1((lambda - lambda_c) / (D ny/2))`` with ``P(t) = t + q2 t^2
  + q3 t^3`` (a smooth nonlinear dispersion), a line curvature ``s_f = smile * u_f^2`` across
  the slit (``u_f`` in [-1, 1]) and small perturbations smooth along the slit. Then a pincushion
  distortion about the distortion centre ``c`` maps ``p0 -> c + (p0 - c) (1 + k r^2)`` with
  ``r = |p0 - c| / R``, so traces bend more toward the edges. The true trace column and
  wavelength at every row are found by inverting this mapping per fiber (``np.interp``).
* **PSF.** The cross-dispersion profile and the line-spread function are each a core Gaussian
  plus a wing Gaussian (``wing_sigma_ratio`` wider, flux fraction 10 % at the centre to 20 % at
  the corners) offset radially outward from the core. Core sigmas grow toward the corners and
  elongate radially. Offsets are arranged so the *flux centroid* of each profile sits exactly at
  the true trace column / true row of a wavelength, so ``TRACE_X`` and ``WAVE`` are centroid
  truths; the peak of an edge profile sits up to ~0.1 px inward. That is the default
  ``psf_model='radial'`` (aberrations unrelated to the distortion). With
  ``psf_model='distortion'`` the core is instead an invariant kernel in undistorted coordinates
  whose widths are stretched by the local Jacobian of the pincushion (so a rectification that
  undoes the distortion makes it invariant: seed 000's premise), and only ``psf_residual``
  (10 %) of the radial growth, ellipticity, wing-fraction growth and wing offset remains.
* **Rendering.** Row-binned spectra are convolved with each fiber's row-varying,
  pixel-integrated LSF; lines are deposited at their exact sub-pixel rows; then every row's
  electrons are spread across columns with the pixel-integrated cross-dispersion profile
  centred on the trace (so spots shear along a bent trace). Every kernel is normalised within
  its window, so flux is conserved except what falls off the CCD.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from numpy.polynomial import legendre
from scipy.special import erf

from fiberlake.ingest.sim_params import DEFAULT_PARAMS, SimParams
from fiberlake.ingest.sim_rng import TAG, rng_for
from fiberlake.ingest.sim_spectra import FineGrid, efficiency
from fiberlake.schemas.instrument import Instrument, parse_camera


def pixel_weights(rel: np.ndarray, sigma: np.ndarray, frac: np.ndarray, sep: np.ndarray,
                  wing_ratio: float, dtype=np.float32) -> np.ndarray:
    """Pixel-integrated core + wing profile, normalised over the window.

    Parameters
    ----------
    rel : ndarray, shape (..., K)
        Pixel-centre positions relative to the profile's flux centroid (pixels), ascending and
        contiguous (unit spacing) along the last axis.
    sigma, frac, sep : ndarray, shape (...)
        Core Gaussian sigma, wing flux fraction, wing offset from the core (pixels, signed).
    wing_ratio : float
        Wing sigma / core sigma.
    dtype : numpy dtype, optional
        Working precision (float32 by default: weights are exact to ~1e-7).

    Returns
    -------
    ndarray, shape (..., K)
        Fraction of the profile's flux in each pixel (sums to 1; its centroid ``sum(rel * w)``
        is 0 to ~1e-4 px: the loss of far wing to the window is compensated by a small shift).
    """
    sigma = np.asarray(sigma, dtype=dtype)[..., None]
    frac = np.asarray(frac, dtype=dtype)[..., None]
    sep = np.asarray(sep, dtype=dtype)[..., None]
    rel = np.asarray(rel, dtype=dtype)
    edges = np.concatenate([rel - dtype(0.5), rel[..., -1:] + dtype(0.5)], axis=-1)
    inv = dtype(1.0 / np.sqrt(2.0)) / sigma
    shift = dtype(0.0)
    for _ in range(2):
        # Second pass: move the profile by minus the centroid error that truncation to the
        # window caused, so the flux centroid of the rendered weights is the requested one.
        core = np.diff(erf((edges + frac * sep - shift) * inv), axis=-1)
        wing = np.diff(erf((edges - (1 - frac) * sep - shift) * (inv / dtype(wing_ratio))), axis=-1)
        w = (1 - frac) * core + frac * wing
        w /= w.sum(axis=-1, keepdims=True)
        shift = shift - (w * rel).sum(axis=-1, keepdims=True)
    return w


@dataclass(eq=False)
class CameraModel:
    """Static truth of one camera on one night: geometry, PSF, fiber throughputs.

    Arrays with suffix ``_ext`` cover the extended rows ``-margin .. ny + margin - 1`` so that
    light just off the CCD can blur onto it; the public properties crop them to the CCD.

    Attributes
    ----------
    instrument : Instrument
    camera : str
    night : str
    seed : int
    params : SimParams
    distortion : dict
        ``k``, ``cx``, ``cy`` (pixels, 0-based), ``R`` (pixels).
    throughput : ndarray, shape (n_fibers,)
        Relative fiber throughput: mean 1 over live fibers, 0 for dead fibers.
    dead : ndarray of bool, shape (n_fibers,)
    """

    instrument: Instrument
    camera: str
    night: str
    seed: int
    params: SimParams
    distortion: dict
    margin: int
    x_ext: np.ndarray
    wave_ext: np.ndarray
    wave_edges_ext: np.ndarray
    sigma_x_ext: np.ndarray
    sigma_y_ext: np.ndarray
    wing_frac_ext: np.ndarray
    wing_dx_ext: np.ndarray
    wing_dy_ext: np.ndarray
    throughput: np.ndarray
    dead: np.ndarray
    eff_coeffs: np.ndarray
    geometry_params: dict = field(default_factory=dict)

    # --- cropped truths ---------------------------------------------------------------
    @property
    def arm(self) -> str:
        """Arm letter."""
        return parse_camera(self.camera)[0]

    @property
    def specid(self) -> int:
        """Spectrograph number (1-based)."""
        return parse_camera(self.camera)[1]

    def _crop(self, a: np.ndarray) -> np.ndarray:
        return a[:, self.margin:self.margin + self.instrument.ny]

    @property
    def trace_x(self) -> np.ndarray:
        """True trace column (profile flux centroid) at each row centre, ``(n_fibers, ny)``."""
        return self._crop(self.x_ext)

    @property
    def wave(self) -> np.ndarray:
        """True air wavelength (A) whose LSF centroid falls on each row centre, ``(n_fibers, ny)``."""
        return self._crop(self.wave_ext)

    @property
    def sigma_x(self) -> np.ndarray:
        """Core Gaussian sigma of the cross-dispersion profile (px), ``(n_fibers, ny)``."""
        return self._crop(self.sigma_x_ext)

    @property
    def sigma_y(self) -> np.ndarray:
        """Core Gaussian sigma of the line-spread function (px), ``(n_fibers, ny)``."""
        return self._crop(self.sigma_y_ext)

    @property
    def wing_frac(self) -> np.ndarray:
        """Flux fraction in the PSF wing, ``(n_fibers, ny)``."""
        return self._crop(self.wing_frac_ext)

    @property
    def wing_dx(self) -> np.ndarray:
        """Column offset (px) of the wing from the core, ``(n_fibers, ny)``."""
        return self._crop(self.wing_dx_ext)

    @property
    def wing_dy(self) -> np.ndarray:
        """Row offset (px) of the wing from the core, ``(n_fibers, ny)``."""
        return self._crop(self.wing_dy_ext)

    @property
    def fine_grid(self) -> FineGrid:
        """Wavelength grid (1/8 of the central dispersion) covering every extended row."""
        arm = self.instrument.arm(self.arm)
        return FineGrid.covering(float(self.wave_edges_ext.min()) - 20.0,
                                 float(self.wave_edges_ext.max()) + 20.0, arm.dispersion / 8.0)

    def efficiency(self, wave: np.ndarray) -> np.ndarray:
        """System efficiency of this camera: the arm's curve times a smooth camera modulation."""
        arm = self.instrument.arm(self.arm)
        lo, hi = arm.wave_range(self.instrument.ny)
        v = (np.asarray(wave, dtype=float) - arm.wave_center) / (0.5 * (hi - lo))
        return efficiency(self.arm, wave) * legendre.legval(np.clip(v, -1.5, 1.5), self.eff_coeffs)

    def rows_of_wave(self, wave: np.ndarray) -> np.ndarray:
        """Fractional CCD row where each wavelength's LSF centroid falls, per fiber.

        Returns ``(n_fibers, len(wave))``; values outside the extended rows are clipped to them.
        """
        rows = np.arange(self.x_ext.shape[1], dtype=float) - self.margin
        wave = np.asarray(wave, dtype=float)
        return np.stack([np.interp(wave, w, rows) for w in self.wave_ext])

    # --- rendering kernels (computed on first use) -------------------------------------
    @cached_property
    def lsf_kernel(self) -> np.ndarray:
        """Pixel-integrated LSF of a source at each extended row centre, ``(nf, n_ext, 2W+1)``."""
        W = self.params.lsf_window_px
        rel = np.arange(-W, W + 1, dtype=float)
        out = np.empty(self.x_ext.shape + (2 * W + 1,), dtype=np.float32)
        for f0 in range(0, out.shape[0], 16):
            sl = slice(f0, f0 + 16)
            out[sl] = pixel_weights(rel, self.sigma_y_ext[sl], self.wing_frac_ext[sl],
                                    self.wing_dy_ext[sl], self.params.wing_sigma_ratio)
        return out

    @cached_property
    def profile(self) -> tuple[np.ndarray, np.ndarray]:
        """Cross-dispersion weights ``(2W+1, nf, ny)`` (float32) and first column ``(nf, ny)``.

        ``weights[j, f, r]`` is the fraction of fiber ``f``'s electrons in row ``r`` that land
        in column ``start[f, r] + j``.
        """
        W = self.params.window_px
        x = self.trace_x
        start = np.rint(x).astype(np.int64) - W
        weights = np.empty((2 * W + 1,) + x.shape, dtype=np.float32)
        j = np.arange(2 * W + 1, dtype=float)
        for f0 in range(0, x.shape[0], 16):
            sl = slice(f0, f0 + 16)
            rel = (start[sl][..., None] + j) - x[sl][..., None]
            weights[:, sl] = np.moveaxis(
                pixel_weights(rel, self.sigma_x[sl], self.wing_frac[sl], self.wing_dx[sl],
                              self.params.wing_sigma_ratio), -1, 0)
        return weights, start.astype(np.int32)

    def release_kernels(self) -> None:
        """Drop the cached rendering kernels (they are rebuilt on demand)."""
        self.__dict__.pop("lsf_kernel", None)
        self.__dict__.pop("profile", None)

    # --- rendering ----------------------------------------------------------------------
    def bin_continuum(self, grid: FineGrid, spectrum: np.ndarray, fibers: np.ndarray | None = None) -> np.ndarray:
        """Integrate a photon spectrum over each extended row's wavelength interval.

        Parameters
        ----------
        grid : FineGrid
            Grid of ``spectrum``; must cover :attr:`wave_edges_ext`.
        spectrum : ndarray, shape (grid.n,) or (n, grid.n)
            Photon rate per Angstrom (shared by all fibers, or one per fiber).
        fibers : ndarray of int, optional
            The fibers of the rows of a 2D ``spectrum`` (default: all fibers).

        Returns
        -------
        ndarray, shape (n, n_ext)
            Photons per extended row, before the LSF (``n`` = all fibers, or ``len(fibers)``).
        """
        spectrum = np.asarray(spectrum, dtype=float)
        cum = np.zeros(spectrum.shape[:-1] + (spectrum.shape[-1],))
        cum[..., 1:] = np.cumsum(0.5 * (spectrum[..., 1:] + spectrum[..., :-1]), axis=-1) * grid.dw
        edges = self.wave_edges_ext if fibers is None else self.wave_edges_ext[fibers]
        idx = np.clip((edges - grid.w0) / grid.dw, 0.0, grid.n - 1.000001)
        i0 = idx.astype(np.int64)
        t = idx - i0
        if cum.ndim == 1:
            c = cum[i0] * (1.0 - t) + cum[i0 + 1] * t
        else:
            c = np.take_along_axis(cum, i0, axis=1) * (1.0 - t) + np.take_along_axis(cum, i0 + 1, axis=1) * t
        return np.diff(c, axis=1)

    def convolve_lsf(self, binned_ext: np.ndarray) -> np.ndarray:
        """Spread row-binned photons along rows with each fiber's LSF; returns ``(nf, ny)``."""
        W = self.params.lsf_window_px
        kernel = self.lsf_kernel
        n = binned_ext.shape[1]
        out = np.zeros_like(binned_ext, dtype=float)
        for j, d in enumerate(range(-W, W + 1)):
            contrib = binned_ext * kernel[:, :, j]
            if d >= 0:
                out[:, d:] += contrib[:, :n - d]
            else:
                out[:, :n + d] += contrib[:, -d:]
        return self._crop(out)

    def deposit_lines(self, wave: np.ndarray, flux: np.ndarray) -> np.ndarray:
        """Deposit emission lines at their exact sub-pixel rows, with the local LSF.

        Parameters
        ----------
        wave : ndarray, shape (n_lines,)
            Air wavelengths (A).
        flux : ndarray, shape (n_lines,) or (n_fibers, n_lines)
            Photons in each line (throughput 1).

        Returns
        -------
        ndarray, shape (n_fibers, ny)
        """
        W = self.params.window_px
        nf, n_ext = self.x_ext.shape
        wave = np.asarray(wave, dtype=float)
        out = np.zeros(nf * n_ext)
        lo, hi = self.wave_ext.min(), self.wave_ext.max()
        keep = (wave > lo) & (wave < hi)
        if not keep.any():
            return self._crop(out.reshape(nf, n_ext))
        wave = wave[keep]
        flux = np.broadcast_to(np.asarray(flux, dtype=float)[..., keep], (nf, wave.size))
        pos = self.rows_of_wave(wave) + self.margin  # extended-row coordinate
        centre = np.rint(pos).astype(np.int64)
        ci = np.clip(centre, 0, n_ext - 1)
        fi = np.arange(nf)[:, None]
        rel = (centre[..., None] + np.arange(-W, W + 1)) - pos[..., None]
        w = pixel_weights(rel, self.sigma_y_ext[fi, ci], self.wing_frac_ext[fi, ci],
                          self.wing_dy_ext[fi, ci], self.params.wing_sigma_ratio)
        rows = centre[..., None] + np.arange(-W, W + 1)
        ok = (rows >= 0) & (rows < n_ext)
        flat = (fi[..., None] * n_ext + rows)[ok]
        out += np.bincount(flat, weights=(flux[..., None] * w)[ok], minlength=nf * n_ext)
        return self._crop(out.reshape(nf, n_ext))

    def render(self, rows: np.ndarray) -> np.ndarray:
        """Spread per-row electrons of every fiber across columns: the noiseless image.

        Parameters
        ----------
        rows : ndarray, shape (n_fibers, ny)
            Electrons per CCD row of each fiber (throughput already applied).

        Returns
        -------
        ndarray, shape (ny, nx)
            Electrons per pixel (light falling off the CCD columns is lost).
        """
        inst = self.instrument
        W = self.params.window_px
        weights, start = self.profile
        nf, ny = rows.shape
        pad = W + 1
        width = inst.nx + 2 * pad
        img = np.zeros(ny * width)
        # Fibers f and f + n_groups never share a column in a row, so each group can be added
        # with plain fancy indexing (no duplicate indices within one assignment).
        sep = float(np.min(np.diff(self.trace_x, axis=0))) if nf > 1 else np.inf
        n_groups = int((2 * W + 1) // sep) + 1 if np.isfinite(sep) and sep > 0 else nf
        n_groups = min(max(n_groups, 1), nf)
        row_base = (np.arange(ny, dtype=np.int64) * width)[None, :]
        for g in range(n_groups):
            sel = slice(g, nf, n_groups)
            flat = row_base + np.clip(start[sel].astype(np.int64) + pad, 0, width - (2 * W + 1))
            r = rows[sel]
            for j in range(2 * W + 1):
                img[flat + j] += r * weights[j, sel]
        return img.reshape(ny, width)[:, pad:pad + inst.nx]


def _smooth_along_slit(rng: np.random.Generator, u: np.ndarray, amplitude: float, deg: int = 3) -> np.ndarray:
    coeffs = np.concatenate([[0.0], rng.normal(0.0, amplitude, size=deg)])
    return legendre.legval(u, coeffs)


def build_camera_model(instrument: Instrument, camera: str, night: str, seed: int,
                       params: SimParams = DEFAULT_PARAMS) -> CameraModel:
    """Compute the static truth of one camera on one night.

    Design values (dispersion shape, line curvature, PSF quirks, fiber throughputs) come from a
    generator seeded by ``(seed, camera)`` and so are the same every night; nightly values
    (flexure shifts, small throughput changes, the distortion centre's wander) come from
    ``(seed, night, camera)``.

    Parameters
    ----------
    instrument : Instrument
    camera : str
        ``<arm><spectrograph>``, e.g. ``"b1"``.
    night : str
        ``YYYY-MM-DD``.
    seed : int
    params : SimParams, optional

    Returns
    -------
    CameraModel
    """
    inst = instrument
    arm_name, specid = parse_camera(camera)
    arm = inst.arm(arm_name)
    if not 1 <= specid <= inst.n_spectrographs:
        raise ValueError(f"camera {camera!r}: {inst.name} has spectrographs 1..{inst.n_spectrographs}")
    nf, ny, nx = inst.n_fibers, inst.ny, inst.nx
    design = rng_for(seed, TAG.DESIGN, camera)
    nightly = rng_for(seed, TAG.NIGHTLY, night, camera)
    fibers = rng_for(seed, TAG.FIBERS, specid)
    fibers_night = rng_for(seed, TAG.FIBERS_NIGHT, night, specid)

    # --- distortion -----------------------------------------------------------------------
    R = inst.distortion_radius
    k = inst.distortion_k * (1.0 + params.distortion_scatter * design.standard_normal())
    cx = (nx - 1) / 2.0 + params.distortion_centre_scatter * R * design.standard_normal()
    cy = (ny - 1) / 2.0 + params.distortion_centre_scatter * R * design.standard_normal()

    # --- ideal slit positions and wavelength solution ---------------------------------------
    u = (inst.nominal_fiber_columns() - (nx - 1) / 2.0) / (nx / 2.0)
    flex_x, flex_y = nightly.normal(0.0, 0.3, size=2)
    x0 = inst.nominal_fiber_columns() + flex_x + design.normal(0.0, 0.02, size=nf)
    q2 = design.uniform(-0.01, 0.01)
    q3 = abs(q2) + design.uniform(0.003, 0.012)
    smile = params.smile_px * design.choice([-1.0, 1.0]) * design.uniform(0.7, 1.0)
    row_shift = (smile * u**2 + _smooth_along_slit(design, u, 0.15)
                 + design.normal(0.0, 0.02, size=nf) + flex_y)
    disp_scale = 1.0 + _smooth_along_slit(design, u, 3e-4, deg=2)

    margin = params.lsf_window_px
    g = np.arange(-margin - 8, ny + margin + 8, dtype=float)  # ideal rows
    t = (g[None, :] - (ny - 1) / 2.0 - row_shift[:, None]) / (ny / 2.0)
    L = arm.wave_center + arm.dispersion * (ny / 2.0) * (t + q2 * t**2 + q3 * t**3) * disp_scale[:, None]
    dx0 = x0[:, None] - cx
    dy0 = g[None, :] - cy
    scale = 1.0 + k * (dx0**2 + dy0**2) / R**2
    X = cx + dx0 * scale
    Y = cy + dy0 * scale

    rows_ext = np.arange(-margin, ny + margin, dtype=float)
    edges_ext = np.arange(-margin - 0.5, ny + margin, dtype=float)
    x_ext = np.empty((nf, rows_ext.size))
    wave_ext = np.empty_like(x_ext)
    wave_edges_ext = np.empty((nf, edges_ext.size))
    for f in range(nf):
        x_ext[f] = np.interp(rows_ext, Y[f], X[f])
        wave_ext[f] = np.interp(rows_ext, Y[f], L[f])
        wave_edges_ext[f] = np.interp(edges_ext, Y[f], L[f])

    # --- PSF across the CCD -------------------------------------------------------------------
    Rc = np.hypot((nx - 1) / 2.0, (ny - 1) / 2.0)
    dx = (x_ext - cx) / Rc
    dy = np.broadcast_to((rows_ext[None, :] - cy) / Rc, x_ext.shape).copy()
    rho2 = dx**2 + dy**2
    focus_x = 1.0 + _smooth_along_slit(design, u, 0.015) + design.normal(0.0, 0.008, size=nf)
    focus_y = 1.0 + _smooth_along_slit(design, u, 0.015) + design.normal(0.0, 0.008, size=nf)
    if params.psf_model == "radial":
        aberr, jx, jy = 1.0, 1.0, 1.0
    elif params.psf_model == "distortion":
        # an invariant kernel in undistorted coordinates, seen through the local Jacobian J of
        # the pincushion p = c + d (1 + k |d|^2 / R^2): J = (1 + k|d|^2/R^2) I + 2k d d^T / R^2.
        # The rendered PSF is separable (LSF along rows, profile along columns, sheared only
        # along the trace), so it takes the marginal widths sqrt((J S0 J^T)_xx) and
        # sqrt((J S0 J^T)_yy) of the stretched kernel; the tilt J_xy (<= 2k at the corners)
        # enters the widths but is otherwise neglected, as the renderer cannot tilt a spot.
        aberr = params.psf_residual
        y0_ext = np.stack([np.interp(rows_ext, Y[f], g) for f in range(nf)])
        ddx = np.broadcast_to((x0 - cx)[:, None], y0_ext.shape) / R
        ddy = (y0_ext - cy) / R
        s0 = 1.0 + k * (ddx**2 + ddy**2)
        jxx, jyy, jxy = s0 + 2 * k * ddx**2, s0 + 2 * k * ddy**2, 2 * k * ddx * ddy
        sx0, sy0 = inst.profile_sigma_px * focus_x[:, None], arm.lsf_sigma_px * focus_y[:, None]
        jx = np.sqrt(jxx**2 + (jxy * sy0 / sx0) ** 2)
        jy = np.sqrt(jyy**2 + (jxy * sx0 / sy0) ** 2)
    else:
        raise ValueError(f"psf_model {params.psf_model!r} not one of ('radial', 'distortion')")
    grow = 1.0 + aberr * params.psf_growth * rho2
    ell = aberr * params.psf_ellipticity
    sigma_x = inst.profile_sigma_px * focus_x[:, None] * jx * grow * (1.0 + ell * (dx**2 - dy**2))
    sigma_y = arm.lsf_sigma_px * focus_y[:, None] * jy * grow * (1.0 + ell * (dy**2 - dx**2))
    wing_frac = (params.wing_frac_centre
                 + aberr * (params.wing_frac_corner - params.wing_frac_centre) * np.clip(rho2, 0, 1.5))
    wing_dx = aberr * params.wing_offset_px * dx
    wing_dy = aberr * params.wing_offset_px * dy

    # --- fibers (shared by the arms of a spectrograph) ------------------------------------------
    base = np.clip(fibers.normal(1.0, params.throughput_scatter, size=nf), 0.85, 1.15)
    n_dead = int(fibers.choice(len(params.dead_fiber_probs), p=list(params.dead_fiber_probs)))
    dead = np.zeros(nf, dtype=bool)
    if n_dead:
        dead[fibers.choice(nf, size=min(n_dead, nf), replace=False)] = True
    arm_term = rng_for(seed, TAG.FIBERS_ARM, camera).normal(0.0, 0.01, size=nf)
    thr = base * (1.0 + fibers_night.normal(0.0, 0.005, size=nf)) * (1.0 + arm_term)
    thr[dead] = 0.0
    thr[~dead] /= thr[~dead].mean()
    eff_coeffs = np.array([1.0 + design.normal(0.0, 0.04), design.normal(0.0, 0.03), design.normal(0.0, 0.02)])

    return CameraModel(
        instrument=inst, camera=camera, night=night, seed=seed, params=params,
        distortion={"k": float(k), "cx": float(cx), "cy": float(cy), "R": float(R)},
        margin=margin, x_ext=x_ext, wave_ext=wave_ext, wave_edges_ext=wave_edges_ext,
        sigma_x_ext=sigma_x, sigma_y_ext=sigma_y, wing_frac_ext=wing_frac,
        wing_dx_ext=wing_dx, wing_dy_ext=wing_dy, throughput=thr, dead=dead, eff_coeffs=eff_coeffs,
        geometry_params={"q2": q2, "q3": q3, "smile": smile, "flex_x": flex_x, "flex_y": flex_y},
    )
