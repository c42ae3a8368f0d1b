"""The data containers of the reduction, and their one array serialisation.

Every product that travels between stages or into the lake is a dataclass of arrays defined
here (or, for a product whose evaluation needs the processors, in its processor module, built
on the same base):

* :class:`Spectra1D`: flux, inverse variance and mask of all fibers of a camera;
* :class:`ProfileModel`: cross-dispersion profiles (Gaussian core + wing) of every fiber;
* :class:`TraceSet` and :class:`WaveSolution`: per-fiber Legendre series of the trace column
  and of the wavelength along the CCD rows;
* :class:`GHField` and :class:`PSFModel`: the Gauss-Hermite PSF model of the deconvolution
  extraction, with its evaluation (:func:`gh_cdf`, :func:`gh_weights`);
* elsewhere on the same base: ``Calibration`` (:mod:`fiberlake.processors.pipeline`),
  ``Rectification`` (:mod:`fiberlake.processors.rectify`) and the coordinate maps
  (:mod:`fiberlake.processors.rectify_map`).

Serialisation
-------------
:class:`ArrayContainer` gives a dataclass ``to_arrays()`` / ``from_arrays()``: a flat mapping of
``"a/b"`` names to ndarrays (what :mod:`fiberlake.storage.calibstore` writes as a Zarr group, a
``/`` making a sub-group) and back. It is one implementation for every container, driven by the
fields' type annotations (:func:`to_arrays`, :func:`from_arrays`):

==================================  ==========================================================
field annotation                    stored as
==================================  ==========================================================
``np.ndarray``                      the array itself (dtype and shape kept)
``int``, ``float``, ``bool``        a 0-d ``int64`` / ``float64`` / ``bool`` array
``str``                             its UTF-8 bytes, a 1-d ``uint8`` array
``dict`` (JSON-able info)           its JSON text (sorted keys) as UTF-8 bytes, 1-d ``uint8``
a dataclass (e.g. a container)      its own arrays under ``<field>/``
``dict[str, ndarray | dataclass]``  each value under ``<field>/<key>`` (keys without ``/``; an
                                    empty mapping writes nothing and reads back as ``{}``)
``float | np.ndarray``              the array; a 0-d array reads back as a ``float``
``X | None``                        as ``X``; ``None`` writes nothing and reads back as None
==================================  ==========================================================

Strings and info dicts are bytes rather than numpy unicode arrays because fixed-width unicode
is not a Zarr v3 data type and bytes read the same in any reader. A field declared with
:func:`transient` is not stored (its default comes back). A container whose class derives from
another dataclass (e.g. ``LegendreMap`` from ``CoordinateMap``) also writes its class name under
``class`` (a Python keyword, so never a field name), and ``from_arrays`` on the base class
rebuilds the subclass. A field missing from the arrays reads back as its default when it has one
(sets written before the field was added), else raises :class:`KeyError`.

The round trip is exact: arrays keep dtype, shape and values; scalars, strings and JSON values
come back equal (JSON turns tuples into lists and numpy scalars into Python numbers).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np
from numpy.polynomial import legendre
from scipy.special import ndtr

from fiberlake.schemas.maskbits import MASK_DTYPE

CLASS_KEY = "class"
"""Name of the array holding a derived container's class name."""
_STORED = "fiberlake_stored"
_SCALARS: dict[type, type] = {bool: np.bool_, int: np.int64, float: np.float64}
_SQRT2PI = np.sqrt(2.0 * np.pi)

C = TypeVar("C")


# ============================================================================ serialisation


def transient(**kwargs: Any) -> Any:
    """A dataclass field that :func:`to_arrays` skips (``from_arrays`` restores its default).

    Takes the keyword arguments of :func:`dataclasses.field` (``default`` or
    ``default_factory`` is needed for the field to come back).
    """
    return field(metadata={_STORED: False}, **kwargs)


def text_array(text: str) -> np.ndarray:
    """A string as a 1-d ``uint8`` array of its UTF-8 bytes (the inverse of :func:`array_text`)."""
    return np.frombuffer(str(text).encode("utf-8"), dtype=np.uint8).copy()


def array_text(arr: np.ndarray) -> str:
    """The string of a :func:`text_array` array."""
    return np.asarray(arr, dtype=np.uint8).tobytes().decode("utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def json_array(value: Any) -> np.ndarray:
    """A JSON-able value as a :func:`text_array` of its JSON text (sorted keys; numpy scalars and
    arrays become numbers and lists)."""
    return text_array(json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default))


def array_json(arr: np.ndarray) -> Any:
    """The value of a :func:`json_array` array."""
    return json.loads(array_text(arr))


def subset(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays under ``prefix/``, with the prefix removed."""
    start = prefix.rstrip("/") + "/"
    return {k[len(start):]: v for k, v in arrays.items() if k.startswith(start)}


@dataclass(frozen=True)
class _Kind:
    """How one field annotation is stored."""

    what: str  # array | scalar | text | json | nested | mapping | scalar_or_array
    optional: bool = False
    type: Any = None  # scalar type, dataclass, or the value _Kind of a mapping


def _kind(tp: Any, where: str) -> _Kind:
    optional = False
    args: tuple = ()
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = tuple(a for a in typing.get_args(tp) if a is not type(None))
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            tp, args = args[0], ()
    if args:
        scalars = [a for a in args if a in _SCALARS]
        if len(scalars) == 1 and len(args) == 2 and np.ndarray in args:
            return _Kind("scalar_or_array", optional, scalars[0])
        raise TypeError(f"{where}: cannot store a union of {args}")
    if tp is np.ndarray or typing.get_origin(tp) is np.ndarray:
        return _Kind("array", optional)
    if tp in _SCALARS:
        return _Kind("scalar", optional, tp)
    if tp is str:
        return _Kind("text", optional)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _Kind("nested", optional, tp)
    if tp is dict or typing.get_origin(tp) is dict:
        key, value = typing.get_args(tp) or (str, Any)
        value_kind = _kind(value, where) if value is not Any else None
        if value_kind is not None and value_kind.what in ("array", "nested") and not value_kind.optional:
            if key is not str:
                raise TypeError(f"{where}: a mapping of arrays or containers needs str keys")
            if optional:
                raise TypeError(f"{where}: a mapping of arrays or containers cannot be None (use an empty dict)")
            return _Kind("mapping", False, value_kind)
        return _Kind("json", optional)
    raise TypeError(f"{where}: cannot store a field of type {tp!r}")


@lru_cache(maxsize=None)
def _plan(cls: type) -> tuple[tuple[dataclasses.Field, _Kind], ...]:
    """The stored fields of a dataclass and how each is stored."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass")
    try:
        hints = typing.get_type_hints(cls)
    except NameError as err:
        raise TypeError(f"{cls.__name__}: field annotations must name types importable from "
                        f"{cls.__module__} ({err})") from None
    plan = []
    for f in dataclasses.fields(cls):
        if not f.init or not f.metadata.get(_STORED, True):
            continue
        if f.name == CLASS_KEY:  # cannot happen for a keyword, but a make_dataclass could try
            raise TypeError(f"{cls.__name__}: field name {CLASS_KEY!r} is reserved")
        plan.append((f, _kind(hints[f.name], f"{cls.__name__}.{f.name}")))
    return tuple(plan)


def _derived(cls: type) -> bool:
    return any(dataclasses.is_dataclass(base) for base in cls.__mro__[1:])


def _put(kind: _Kind, value: Any, name: str, out: dict[str, np.ndarray]) -> None:
    if value is None:
        if not kind.optional:
            raise ValueError(f"{name}: None in a field that is not optional")
        return
    if kind.what in ("array", "scalar_or_array"):
        out[name] = np.asarray(value)
    elif kind.what == "scalar":
        out[name] = np.asarray(value, dtype=_SCALARS[kind.type])
    elif kind.what == "text":
        out[name] = text_array(value)
    elif kind.what == "json":
        out[name] = json_array(value)
    elif kind.what == "nested":
        _flatten(value, name + "/", out)
    else:  # mapping
        for key, item in value.items():
            if not isinstance(key, str) or not key or "/" in key:
                raise ValueError(f"{name}: mapping key {key!r} must be a non-empty str without '/'")
            _put(kind.type, item, f"{name}/{key}", out)


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    cls = type(obj)
    if _derived(cls):
        out[prefix + CLASS_KEY] = text_array(cls.__name__)
    for f, kind in _plan(cls):
        _put(kind, getattr(obj, f.name), prefix + f.name, out)


def to_arrays(obj: Any) -> dict[str, np.ndarray]:
    """Flatten a dataclass into named arrays (``a/b`` names nest); see the module docstring.

    Parameters
    ----------
    obj : dataclass instance
        Its fields' annotations say how each is stored.

    Returns
    -------
    dict of str to ndarray
        The inverse of :func:`from_arrays`.

    Raises
    ------
    TypeError
        If a field's annotation is not one of the stored kinds.
    """
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    return out


def _subclass(cls: type, name: str) -> type:
    stack = [cls]
    while stack:
        c = stack.pop()
        if c.__name__ == name:
            return c
        stack.extend(c.__subclasses__())
    raise ValueError(f"no class {name!r} derived from {cls.__name__} (is its module imported?)")


def _get(kind: _Kind, arrays: dict[str, np.ndarray], name: str) -> tuple[bool, Any]:
    """(present, value) of field ``name`` in ``arrays``."""
    if kind.what in ("nested", "mapping"):
        part = subset(arrays, name)
        if not part:
            return False, None
        if kind.what == "nested":
            return True, from_arrays(kind.type, part)
        keys = dict.fromkeys(k.split("/", 1)[0] for k in part)
        return True, {key: _get(kind.type, part, key)[1] for key in keys}
    if name not in arrays:
        return False, None
    value = np.asarray(arrays[name])
    if kind.what == "array":
        return True, value
    if kind.what == "scalar_or_array":
        return True, kind.type(value) if value.ndim == 0 else value
    if kind.what == "scalar":
        return True, kind.type(value)
    if kind.what == "text":
        return True, array_text(value)
    return True, array_json(value)


def from_arrays(cls: type[C], arrays: dict[str, np.ndarray]) -> C:
    """Rebuild a dataclass from :func:`to_arrays` output.

    Parameters
    ----------
    cls : dataclass type
        The class written, or a dataclass it derives from (the stored ``class`` name picks the
        subclass).
    arrays : dict of str to ndarray
        Names as written by :func:`to_arrays` (values may be numpy scalars, as Zarr returns 0-d
        arrays).

    Returns
    -------
    An instance of ``cls`` (or of the stored subclass).

    Raises
    ------
    KeyError
        If a field without a default has no array.
    """
    if CLASS_KEY in arrays:
        cls = _subclass(cls, array_text(arrays[CLASS_KEY]))
    kwargs = {}
    for f, kind in _plan(cls):
        present, value = _get(kind, arrays, f.name)
        if present:
            kwargs[f.name] = value
        elif kind.optional:
            kwargs[f.name] = None
        elif kind.what == "mapping":
            kwargs[f.name] = {}
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise KeyError(f"{cls.__name__}.{f.name}: no array {f.name!r} among {sorted(arrays)[:20]}")
    return cls(**kwargs)


class ArrayContainer:
    """Base of the data containers: a dataclass that converts to named arrays and back.

    A subclass is a dataclass whose fields' annotations name the stored kinds (module
    docstring); annotations are resolved in the class's module, so nested types must be
    importable there.

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Night(ArrayContainer):
    ...     traces: TraceSet
    ...     flats: dict[str, Spectra1D]
    ...     info: dict
    ...     label: str = ""
    ...     extra: np.ndarray | None = None
    >>> traces = TraceSet(coeffs=np.zeros((2, 3)), ny=8, dead=np.array([False, True]), rms=np.ones(2))
    >>> flat = Spectra1D(np.ones((2, 8)), np.ones((2, 8)), np.zeros((2, 8)))
    >>> night = Night(traces, {"box": flat}, {"n_flat": 3}, label="b1")
    >>> arrays = night.to_arrays()
    >>> sorted(arrays)  # doctest: +NORMALIZE_WHITESPACE
    ['flats/box/flux', 'flats/box/ivar', 'flats/box/mask', 'info', 'label',
     'traces/coeffs', 'traces/dead', 'traces/ny', 'traces/rms', 'traces/sigma']
    >>> arrays["traces/ny"], arrays["flats/box/mask"].dtype, array_text(arrays["label"])
    (array(8), dtype('uint32'), 'b1')
    >>> back = Night.from_arrays(arrays)
    >>> back.traces.ny, back.flats["box"].flux.dtype, back.info, back.label, back.extra
    (8, dtype('float32'), {'n_flat': 3}, 'b1', None)
    """

    __slots__ = ()

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Named arrays of the container (``a/b`` names nest); the inverse of :meth:`from_arrays`."""
        return to_arrays(self)

    @classmethod
    def from_arrays(cls: type[C], arrays: dict[str, np.ndarray]) -> C:
        """Rebuild a container from :meth:`to_arrays` output."""
        return from_arrays(cls, arrays)


# ============================================================================ spectra


@dataclass
class Spectra1D(ArrayContainer):
    """Spectra of all fibers of one camera: flux, inverse variance and mask travel together.

    Attributes
    ----------
    flux : ndarray of float32, shape (n_fibers, n)
        Flux (electrons per row on the CCD grid, per Angstrom on a wavelength grid).
    ivar : ndarray of float32, shape (n_fibers, n)
        Inverse variance of ``flux``; 0 marks an unusable value.
    mask : ndarray of uint32, shape (n_fibers, n)
        :class:`~fiberlake.schemas.maskbits.Mask` bits.
    chi2 : ndarray of float32 or None
        Reduced chi^2 of the profile fit per fiber per row (optimal extraction only).
    npix : ndarray of float32 or None
        Number of good pixels (box: summed fractional weights) per fiber per row.
    """

    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    chi2: np.ndarray | None = None
    npix: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.flux = np.asarray(self.flux, dtype=np.float32)
        self.ivar = np.asarray(self.ivar, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=MASK_DTYPE)
        if not (self.flux.shape == self.ivar.shape == self.mask.shape) or self.flux.ndim != 2:
            raise ValueError(
                f"flux, ivar, mask must be 2D of one shape, got {self.flux.shape}, "
                f"{self.ivar.shape}, {self.mask.shape}")

    @property
    def n_fibers(self) -> int:
        """Number of fibers (rows of the arrays)."""
        return int(self.flux.shape[0])


# ============================================================================ profiles


def _per_fiber_row(a, n_fibers: int, ny: int) -> np.ndarray:
    """Scalar, (n_fibers,) or (n_fibers, ny) -> float array (n_fibers, ny)."""
    a = np.asarray(a, dtype=float)
    return np.broadcast_to(a[:, None] if a.ndim == 1 else a, (n_fibers, ny)).astype(float)


@dataclass
class ProfileModel(ArrayContainer):
    """Cross-dispersion profile of every fiber: a Gaussian core plus a wider Gaussian wing.

    The profile's flux centroid is the trace; the core sits at ``-wing_fraction * wing_offset``
    and the wing at ``(1 - wing_fraction) * wing_offset`` from it. ``wing_fraction = 0`` is a
    plain Gaussian.

    Attributes
    ----------
    sigma : ndarray, shape (n_fibers, ny)
        Core Gaussian sigma (px).
    wing_fraction : ndarray, shape (n_fibers, ny)
        Flux fraction in the wing.
    wing_offset : ndarray, shape (n_fibers, ny)
        Wing centre minus core centre (px, signed, along columns).
    wing_ratio : float or ndarray, shape (n_fibers, ny)
        Wing sigma over core sigma.
    """

    sigma: np.ndarray
    wing_fraction: np.ndarray
    wing_offset: np.ndarray
    wing_ratio: float | np.ndarray = 1.5

    @classmethod
    def gaussian(cls, sigma: np.ndarray, n_fibers: int, ny: int) -> "ProfileModel":
        """Plain Gaussian profiles; ``sigma`` scalar, per fiber or per fiber and row."""
        zero = np.zeros((n_fibers, ny))
        return cls(_per_fiber_row(sigma, n_fibers, ny), zero, zero.copy())

    def stacked(self, n_fibers: int, ny: int) -> np.ndarray:
        """Parameters as one array ``(n_fibers, ny, 4)``: sigma, wing fraction, wing offset,
        wing ratio."""
        par = np.stack([_per_fiber_row(a, n_fibers, ny)
                        for a in (self.sigma, self.wing_fraction, self.wing_offset, self.wing_ratio)],
                       axis=-1)
        if not (np.all(np.isfinite(par)) and np.all(par[..., 0] > 0)
                and np.all((par[..., 1] >= 0) & (par[..., 1] < 1)) and np.all(par[..., 3] > 0)):
            raise ValueError("profile: sigma > 0, 0 <= wing_fraction < 1 and wing_ratio > 0 required")
        return par

    def max_extent(self) -> float:
        """Largest Gaussian sigma of core or wing (px)."""
        wing = np.any(np.asarray(self.wing_fraction) > 0)
        return float(np.max(self.sigma)) * (max(1.0, float(np.max(self.wing_ratio))) if wing else 1.0)


# ============================================================================ traces and wavelengths
# Both are per-fiber Legendre series in the CCD row coordinate, normalised to [-1, 1] over
# [0, ny - 1].


def _normalise_rows(rows: np.ndarray, ny: int) -> np.ndarray:
    return 2.0 * np.asarray(rows, dtype=float) / (ny - 1) - 1.0


def _legval_fibers(coeffs: np.ndarray, u: np.ndarray) -> np.ndarray:
    # coeffs [nfiber, ncoef]; u [nrows] or [nfiber, nrows] -> [nfiber, nrows]
    if u.ndim == 1:
        return legendre.legval(u, coeffs.T).reshape(coeffs.shape[0], -1)
    return np.stack([legendre.legval(u[i], coeffs[i]) for i in range(coeffs.shape[0])])


@dataclass
class TraceSet(ArrayContainer):
    """Fiber centre column as a function of row, one Legendre series per fiber.

    Attributes
    ----------
    coeffs : ndarray, shape (n_fibers, deg + 1)
        Legendre coefficients of ``x(row)``.
    ny : int
        Number of rows of the frame the traces were measured on.
    dead : ndarray of bool, shape (n_fibers,)
        Fibers with no light on the flat; their coefficients are interpolated from neighbours.
    rms : ndarray, shape (n_fibers,)
        RMS (pixels) of the centroid residuals about each fit.
    sigma : ndarray, shape (n_fibers,)
        Median cross-dispersion Gaussian sigma (pixels) of each fiber profile on the flat
        (empty when not measured).
    """

    coeffs: np.ndarray
    ny: int
    dead: np.ndarray
    rms: np.ndarray
    sigma: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def n_fibers(self) -> int:
        """Number of fibers."""
        return int(self.coeffs.shape[0])

    def x(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Trace columns at ``rows`` (default every row), shape ``(n_fibers, n_rows)``."""
        rows = np.arange(self.ny) if rows is None else np.asarray(rows, dtype=float)
        return _legval_fibers(self.coeffs, _normalise_rows(rows, self.ny))


@dataclass
class WaveSolution(ArrayContainer):
    """Wavelength (Angstrom, air) as a function of row along each fiber's trace.

    Attributes
    ----------
    coeffs : ndarray, shape (n_fibers, deg + 1)
        Legendre coefficients of ``wave(row)``.
    ny : int
        Number of rows of the frame.
    rms : ndarray, shape (n_fibers,)
        RMS (Angstrom) of the identified arc lines about each fiber's fit.
    n_lines : ndarray of int, shape (n_fibers,)
        Number of arc lines used in each fit.
    row_range : ndarray, shape (n_fibers, 2)
        First and last row constrained by an identified line; outside it the solution is an
        extrapolation (mask bit ``EXTRAPWAVE``).
    """

    coeffs: np.ndarray
    ny: int
    rms: np.ndarray
    n_lines: np.ndarray
    row_range: np.ndarray

    @property
    def n_fibers(self) -> int:
        """Number of fibers."""
        return int(self.coeffs.shape[0])

    def wave(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Wavelengths at ``rows`` (default every row), shape ``(n_fibers, n_rows)``."""
        rows = np.arange(self.ny) if rows is None else np.asarray(rows, dtype=float)
        return _legval_fibers(self.coeffs, _normalise_rows(rows, self.ny))


# ============================================================================ PSF model
# See fiberlake.processors.psf for the model and its fit.


def gaussian_pdf(z: np.ndarray) -> np.ndarray:
    """The unit Gaussian density ``phi(z)``."""
    return np.exp(-0.5 * z * z) / _SQRT2PI


def gh_cdf(z: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Cumulative of a Gauss-Hermite series at standardised positions.

    Parameters
    ----------
    z : ndarray, shape (..., m)
        ``(t - mu) / sigma``.
    c : ndarray, shape (..., K + 1)
        Coefficients; ``c[..., 0]`` multiplies the Gaussian (1 for a normalised profile).

    Returns
    -------
    ndarray, shape (..., m)
        ``c_0 Phi(z) - phi(z) sum_{k>=1} c_k He_{k-1}(z)``.
    """
    c = np.asarray(c, dtype=float)
    out = c[..., 0:1] * ndtr(z)
    K = c.shape[-1] - 1
    if K == 0:
        return out
    he_prev, he = np.zeros_like(z), np.ones_like(z)       # He_{-1} (unused), He_0
    acc = c[..., 1:2] * he
    for k in range(1, K):                                  # He_k from He_{k-1}, He_{k-2}
        he_prev, he = he, z * he - (k - 1) * he_prev if k > 1 else z * he
        acc = acc + c[..., k + 1:k + 2] * he
    return out - gaussian_pdf(z) * acc


def gh_weights(rel: np.ndarray, sigma: np.ndarray, c: np.ndarray, *, passes: int = 2) -> np.ndarray:
    """Pixel-integrated GH profile on a window, unit sum, flux centroid at 0.

    Parameters
    ----------
    rel : ndarray, shape (..., m)
        Pixel centres relative to the requested flux centroid (contiguous, unit steps).
    sigma : ndarray, shape (...)
    c : ndarray, shape (..., K + 1)
    passes : int
        Centroid-correction passes (the profile is shifted by minus the centroid error of the
        previous pass; two passes leave < 1e-4 px).

    Returns
    -------
    ndarray, shape (..., m)
    """
    rel = np.asarray(rel, dtype=float)
    sig = np.asarray(sigma, dtype=float)[..., None]
    edges = np.concatenate([rel - 0.5, rel[..., -1:] + 0.5], axis=-1)
    shift = np.zeros(sig.shape)
    w = None
    for _ in range(max(1, passes)):
        w = np.diff(gh_cdf((edges - shift) / sig, c), axis=-1)
        tot = w.sum(axis=-1, keepdims=True)
        w = w / np.where(np.abs(tot) > 1e-300, tot, 1.0)
        shift = shift - (w * rel).sum(axis=-1, keepdims=True)
    return w


@dataclass
class GHField(ArrayContainer):
    """A 1D Gauss-Hermite profile whose shape varies smoothly over the CCD.

    Attributes
    ----------
    halfwidth : int
        The profile is evaluated on ``2 * halfwidth + 1`` pixels around its centroid.
    sigma_coef : ndarray, shape (du + 1, dv + 1)
        2D Legendre series of ``sigma`` (px) in the normalised trace column ``u`` and row ``v``
        (both in [-1, 1] over the CCD).
    coef : ndarray, shape (K, du + 1, dv + 1)
        2D Legendre series of ``c_1..c_K`` (``c_0 = 1``).
    focus : ndarray, shape (n_fibers,)
        Per-fiber relative sigma offset ``e_f``: ``sigma = S(u, v) * (1 + e_f)``.
    rms : float
        Clipped RMS of the relative sigma residuals of the samples about the model.
    n_samples : int
        Samples kept in the fit.
    """

    halfwidth: int
    sigma_coef: np.ndarray
    coef: np.ndarray
    focus: np.ndarray
    rms: float = 0.0
    n_samples: int = 0

    @property
    def order(self) -> int:
        """Gauss-Hermite order ``K``."""
        return int(self.coef.shape[0])

    def params(self, u: np.ndarray, v: np.ndarray, fiber: np.ndarray | None = None):
        """``sigma`` (...) and ``c`` (..., K + 1) at normalised positions ``u``, ``v``.

        Positions beyond [-1, 1] are clipped (the series are not extrapolated).
        """
        u = np.clip(np.asarray(u, dtype=float), -1.0, 1.0)
        v = np.clip(np.asarray(v, dtype=float), -1.0, 1.0)
        u, v = np.broadcast_arrays(u, v)
        sigma = legendre.legval2d(u, v, self.sigma_coef)
        if fiber is not None and self.focus.size:
            sigma = sigma * (1.0 + np.broadcast_to(self.focus[np.asarray(fiber)], u.shape))
        c = np.empty(u.shape + (self.order + 1,))
        c[..., 0] = 1.0
        for k in range(self.order):
            c[..., k + 1] = legendre.legval2d(u, v, self.coef[k])
        return np.maximum(sigma, 0.2), c

    @classmethod
    def gaussian(cls, sigma: float, halfwidth: int, order: int = 0, n_fibers: int = 0) -> GHField:
        """A spatially invariant Gaussian (all GH terms zero)."""
        return cls(halfwidth=int(halfwidth), sigma_coef=np.array([[float(sigma)]]),
                   coef=np.zeros((order, 1, 1)), focus=np.zeros(n_fibers))


@dataclass
class PSFModel(ArrayContainer):
    """LSF (along rows) and cross-dispersion profile (along columns) of every fiber.

    Attributes
    ----------
    lsf : GHField
        Line-spread function; its samples were located at (trace column, line row).
    xsf : GHField
        Cross-dispersion profile.
    ny, nx : int
        CCD shape the normalised coordinates refer to.
    invariant : bool
        One PSF for the whole frame (degree-0 series, no focus terms).
    info : dict
        Fit figures (sample counts, RMS).
    """

    lsf: GHField
    xsf: GHField
    ny: int
    nx: int
    invariant: bool = False
    info: dict = field(default_factory=dict)
    x_offset: float = transient(default=0.0)
    """CCD column of column 0 of the image the model is applied to (a slab of the frame, see
    :func:`fiberlake.processors.chunks.subset_psf`); not stored."""

    def _uv(self, x: np.ndarray, rows: np.ndarray):
        x_ccd = np.asarray(x, float) + self.x_offset
        return 2.0 * x_ccd / (self.nx - 1) - 1.0, 2.0 * np.asarray(rows, float) / (self.ny - 1) - 1.0

    def lsf_weights(self, fibers: np.ndarray, x: np.ndarray, centres: np.ndarray):
        """LSF of line centroids at fractional ``centres`` (rows).

        Parameters
        ----------
        fibers : int array (...)
        x : array (...)
            Trace column at the centre.
        centres : array (...)
            Row of the LSF's flux centroid.

        Returns
        -------
        first : int array (...)
            First row of the window ``first + arange(2 W + 1)``.
        weights : array (..., 2 W + 1)
        """
        W = self.lsf.halfwidth
        centres = np.asarray(centres, float)
        first = np.rint(centres).astype(np.int64) - W
        rel = first[..., None] + np.arange(2 * W + 1) - centres[..., None]
        sigma, c = self.lsf.params(*self._uv(x, centres), fibers)
        return first, gh_weights(rel, sigma, c)

    def xsf_weights(self, fibers: np.ndarray, x: np.ndarray, rows: np.ndarray):
        """Cross-dispersion profiles centred on trace columns ``x`` at ``rows``.

        Returns
        -------
        first : int array (...)
            First column of the window ``first + arange(2 W + 1)``.
        weights : array (..., 2 W + 1)
        """
        W = self.xsf.halfwidth
        x = np.asarray(x, float)
        first = np.rint(x).astype(np.int64) - W
        rel = first[..., None] + np.arange(2 * W + 1) - x[..., None]
        sigma, c = self.xsf.params(*self._uv(x, rows), fibers)
        return first, gh_weights(rel, sigma, c)

    @classmethod
    def gaussian(cls, sigma_lsf: float, sigma_xsf: float, ny: int, nx: int, *, lsf_halfwidth: int = 8,
                 xsf_halfwidth: int = 12) -> PSFModel:
        """An invariant Gaussian PSF (tests, first guesses)."""
        return cls(lsf=GHField.gaussian(sigma_lsf, lsf_halfwidth), xsf=GHField.gaussian(sigma_xsf, xsf_halfwidth),
                   ny=ny, nx=nx, invariant=True)
