"""Chunks of a frame: bundles of adjacent fibers over the full wavelength range.

A frame is cut into bundles of ``fibers_per_bundle`` adjacent fibers (the unit of work of the
extraction, see ``DESIGN.md``). Each bundle is extracted from a slab of the corrected frame: the
columns its fibers' light can reach, plus ``margin_fibers`` neighbours on each side that are
extracted with it (so that the simultaneous fits of the optimal and deconvolution extractions
see the light of their neighbours) and dropped afterwards.

Everything is expressed in the bundle's own column coordinates: the traces are shifted by the
slab's first column, so the stage functions run unchanged on the slab. A frame with at most
``fibers_per_bundle`` fibers (or ``fibers_per_bundle = 0``) is one bundle, the whole frame.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from fiberlake.schemas.containers import ProfileModel, PSFModel, TraceSet


@dataclass(frozen=True)
class Bundle:
    """One chunk of a frame.

    Attributes
    ----------
    index : int
        Position of the bundle along the slit (0 first).
    core : tuple of int
        Fibers ``[start, stop)`` whose spectra the bundle delivers.
    fibers : tuple of int
        Fibers ``[start, stop)`` extracted: the core and its margin neighbours.
    """

    index: int
    core: tuple[int, int]
    fibers: tuple[int, int]

    @property
    def keep(self) -> slice:
        """The core fibers' positions among the extracted ones."""
        return slice(self.core[0] - self.fibers[0], self.core[1] - self.fibers[0])


def plan_bundles(n_fibers: int, fibers_per_bundle: int, margin_fibers: int = 2) -> list[Bundle]:
    """Cut ``n_fibers`` fibers into bundles.

    Parameters
    ----------
    n_fibers : int
        Fibers of the frame.
    fibers_per_bundle : int
        Core fibers per bundle; 0, or at least ``n_fibers``, gives one bundle (the whole frame).
    margin_fibers : int
        Neighbours extracted on each side of a core (clipped at the ends of the slit).

    Returns
    -------
    list of Bundle
        Cores that tile ``[0, n_fibers)`` in order.
    """
    if n_fibers < 1:
        raise ValueError("a frame needs at least one fiber")
    if fibers_per_bundle < 0 or margin_fibers < 0:
        raise ValueError("fibers_per_bundle and margin_fibers must be >= 0")
    if fibers_per_bundle == 0 or fibers_per_bundle >= n_fibers:
        return [Bundle(0, (0, n_fibers), (0, n_fibers))]
    bundles = []
    for i, start in enumerate(range(0, n_fibers, fibers_per_bundle)):
        stop = min(n_fibers, start + fibers_per_bundle)
        bundles.append(Bundle(i, (start, stop), (max(0, start - margin_fibers), min(n_fibers, stop + margin_fibers))))
    return bundles


def n_bundles(n_fibers: int, fibers_per_bundle: int) -> int:
    """Number of bundles :func:`plan_bundles` makes (known before any calibration is read)."""
    if fibers_per_bundle == 0 or fibers_per_bundle >= n_fibers:
        return 1
    return math.ceil(n_fibers / fibers_per_bundle)


def bundle_columns(traces: TraceSet, bundle: Bundle, reach: float, nx: int) -> tuple[int, int]:
    """Columns ``[c0, c1)`` of the slab a bundle is extracted from.

    Parameters
    ----------
    traces : TraceSet
        The frame's traces.
    bundle : Bundle
    reach : float
        How far (px) from a trace its extraction uses pixels (aperture or PSF half-width).
    nx : int
        Columns of the frame.
    """
    x = subset_traces(traces, bundle.fibers, 0).x()  # the bundle's fibers only (not all, then cut)
    c0 = int(math.floor(float(np.min(x)) - reach)) - 1
    c1 = int(math.ceil(float(np.max(x)) + reach)) + 2
    return max(0, c0), min(nx, c1)


def subset_traces(traces: TraceSet, fibers: tuple[int, int], col0: int) -> TraceSet:
    """Traces of fibers ``[start, stop)`` in the columns of a slab starting at ``col0``."""
    lo, hi = fibers
    coeffs = np.array(traces.coeffs[lo:hi], dtype=float, copy=True)
    coeffs[:, 0] -= col0  # P0 = 1: shifting x is shifting the constant term
    sigma = traces.sigma[lo:hi] if traces.sigma.size else traces.sigma
    return TraceSet(coeffs=coeffs, ny=traces.ny, dead=traces.dead[lo:hi], rms=traces.rms[lo:hi], sigma=sigma)


def subset_profile(profile: ProfileModel | None, fibers: tuple[int, int]) -> ProfileModel | None:
    """The cross-dispersion profiles of fibers ``[start, stop)``."""
    if profile is None:
        return None
    lo, hi = fibers

    def cut(a):
        a = np.asarray(a)
        return a[lo:hi] if a.ndim >= 1 else a  # scalar, (n_fibers,) or (n_fibers, ny)

    return ProfileModel(sigma=cut(profile.sigma), wing_fraction=cut(profile.wing_fraction),
                        wing_offset=cut(profile.wing_offset), wing_ratio=cut(profile.wing_ratio))


def subset_psf(psf: PSFModel | None, fibers: tuple[int, int], col0: int) -> PSFModel | None:
    """The PSF model of fibers ``[start, stop)`` seen from a slab starting at column ``col0``."""
    if psf is None:
        return None
    lo, hi = fibers

    def field(gh):
        return dataclasses.replace(gh, focus=gh.focus[lo:hi] if gh.focus.size else gh.focus)

    return dataclasses.replace(psf, lsf=field(psf.lsf), xsf=field(psf.xsf), x_offset=psf.x_offset + col0)

