"""Typed parameter sets: every parameter declared once, with its default, allowed values, unit and meaning.

A stage's parameters are a frozen dataclass deriving from :class:`ParSet` whose fields are
declared with :func:`par` (a value) or :func:`nested` (another parameter set). Declaring a field
is all there is to do: values are validated when the object is made (a readable
:class:`ParameterError` names the parameter, its CLI flag, the value and what is allowed), the
object converts to and from a JSON-able dict (:meth:`ParSet.to_dict`, :meth:`ParSet.from_dict`),
lists itself for people (:meth:`ParSet.describe`), and the command-line flags are generated from
it (:mod:`fiberlake.jobs.cli_params`), so no default is written twice. PypeIt's ``ParSet`` is the
model.

A field marked ``science=False`` is an execution setting (chunking, devices, batch sizes): it
is recorded with a run but never enters the hashes that decide what is redone
(:meth:`ParSet.science_dict`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


class ParameterError(ValueError):
    """A parameter value outside what its declaration allows (one readable sentence)."""


@dataclass(frozen=True)
class ParSpec:
    """The declaration of one parameter.

    Attributes
    ----------
    description : str
        One line: what the parameter does.
    unit : str
        Unit of the value ("" for dimensionless).
    choices : tuple, optional
        Allowed values (for text and small integer sets); for a tuple-valued parameter, the
        allowed members.
    bounds : tuple of (float or None, float or None), optional
        Inclusive range.
    optional : bool
        None is allowed (meaning "derived from the data"; the description says how).
    science : bool
        False for execution settings, which never change a product.
    """

    description: str
    unit: str = ""
    choices: tuple | None = None
    bounds: tuple[float | None, float | None] | None = None
    optional: bool = False
    science: bool = True

    def allowed(self) -> str:
        """What is allowed, in words."""
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(str(c) for c in self.choices))
        if self.bounds is not None:
            lo, hi = self.bounds
            parts.append(f"{'-inf' if lo is None else _num(lo)} .. {'inf' if hi is None else _num(hi)}")
        if self.optional:
            parts.append("or none (derived from the data)")
        return "; ".join(parts) or "any"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def par(default: Any, description: str, *, unit: str = "", choices: tuple | None = None,
        bounds: tuple[float | None, float | None] | None = None, optional: bool = False,
        science: bool = True):
    """Declare a parameter field (see :class:`ParSpec`)."""
    spec = ParSpec(description=description, unit=unit, choices=choices, bounds=bounds, optional=optional,
                   science=science)
    return field(default=default, metadata={"par": spec})


def nested(cls: type, description: str, *, science: bool = True):
    """Declare a field holding another parameter set (a stage of a larger set)."""
    return field(default_factory=cls, metadata={"par": ParSpec(description=description, science=science),
                                                "nested": cls})


_KINDS = {"bool": bool, "int": int, "float": float, "str": str, "tuple": tuple}


def _kind(f: dataclasses.Field) -> type:
    """The value type of a parameter: its default's, or the first type of its annotation when the default is None."""
    if f.default is not None:
        return type(f.default)
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    first = annotation.split("|")[0].split("[")[0].strip()
    if first not in _KINDS:
        raise TypeError(f"parameter {f.name}: cannot tell its type from {annotation!r}")
    return _KINDS[first]


def digest_of(data: dict) -> str:
    """SHA-256 of a JSON-able dict in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


FLAG_ALIASES = {"extractions": "--extract"}
"""Parameters whose command-line flag is not derived from the path."""

UNPREFIXED_STAGES = ("execution",)
"""Sets whose fields carry their own prefix (``execution.chunk_fibers`` is ``--chunk-fibers``)."""


def flag_name(path: str) -> str:
    """The command-line flag of a parameter path: ``wavecal.deg`` is ``--wavecal-deg``,
    ``cosmics.enabled`` is ``--cosmics`` (with ``--no-cosmics``), ``execution.chunk_fibers`` is
    ``--chunk-fibers``."""
    if path in FLAG_ALIASES:
        return FLAG_ALIASES[path]
    stage, _, name = path.rpartition(".")
    if name == "enabled" and stage:
        return "--" + stage.replace("_", "-")
    if stage in UNPREFIXED_STAGES:
        return "--" + name.replace("_", "-")
    return "--" + path.replace(".", "-").replace("_", "-")


def _type_name(kind: type) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "text", tuple: "a list"}.get(kind, kind.__name__)


@dataclass(frozen=True)
class ParSet:
    """Base of every parameter set. Subclasses are frozen dataclasses of :func:`par` fields."""

    stage: ClassVar[str] = ""
    """Name of the stage (the key of this set in its parent, and the prefix of its flags)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if "nested" in f.metadata:
                if not isinstance(value, f.metadata["nested"]):
                    raise ParameterError(f"{self._path(f.name)} must be a {f.metadata['nested'].__name__}")
                continue
            object.__setattr__(self, f.name, self._checked(f, value))

    # -- validation -----------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return f"{self.stage}.{name}" if self.stage else name

    def _refuse(self, name: str, value: Any, what: str) -> ParameterError:
        flag = flag_name(self._path(name))
        return ParameterError(f"{self._path(name)} ({flag}) = {value!r} is not allowed: {what}")

    def _checked(self, f: dataclasses.Field, value: Any) -> Any:
        spec: ParSpec = f.metadata["par"]
        kind = _kind(f)
        if value is None:
            if spec.optional:
                return None
            raise self._refuse(f.name, value, f"expected {_type_name(kind)} ({spec.allowed()})")
        if kind is tuple:
            if isinstance(value, (list, tuple)):
                value = tuple(value)
            else:
                raise self._refuse(f.name, value, f"expected a list ({spec.allowed()})")
            bad = [v for v in value if spec.choices is not None and v not in spec.choices]
            if bad or not value or len(set(value)) != len(value):
                raise self._refuse(f.name, value, f"expected distinct members, at least one, each {spec.allowed()}")
            return value
        if kind is bool:
            if not isinstance(value, bool):
                raise self._refuse(f.name, value, "expected true or false")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise self._refuse(f.name, value, f"expected an integer ({spec.allowed()})")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self._refuse(f.name, value, f"expected a number ({spec.allowed()})")
            value = float(value)
            if not math.isfinite(value):
                raise self._refuse(f.name, value, f"expected a finite number ({spec.allowed()})")
        elif kind is str:
            if not isinstance(value, str):
                raise self._refuse(f.name, value, f"expected text ({spec.allowed()})")
        if spec.choices is not None and value not in spec.choices:
            raise self._refuse(f.name, value, spec.allowed())
        if spec.bounds is not None:
            lo, hi = spec.bounds
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                unit = f" ({spec.unit})" if spec.unit else ""
                raise self._refuse(f.name, value, f"allowed range {spec.allowed()}{unit}")
        return value

    # -- conversion -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Every parameter, nested sets as dicts, tuples as lists (JSON-able)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, ParSet) else list(value) if isinstance(value, tuple) else value
        return out

    def science_dict(self) -> dict:
        """:meth:`to_dict` without the execution settings (``science=False`` fields)."""
        out = {}
        for f in fields(self):
            if not f.metadata["par"].science:
                continue
            value = getattr(self, f.name)
            out[f.name] = value.science_dict() if isinstance(value, ParSet) else list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ParSet:
        """The set described by ``data`` (as :meth:`to_dict` writes it); missing keys take their defaults.

        Raises
        ------
        ParameterError
            On an unknown key or a value that is not allowed.
        """
        if not isinstance(data, dict):
            raise ParameterError(f"parameters of {cls.stage or cls.__name__} must be a mapping, not {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            where = cls.stage or cls.__name__
            raise ParameterError(f"unknown parameter {unknown[0]!r} in {where} (known: {', '.join(known)})")
        kwargs = {}
        for name, value in data.items():
            f = known[name]
            kwargs[name] = f.metadata["nested"].from_dict(value) if "nested" in f.metadata else value
        return cls(**kwargs)

    def updated(self, changes: dict[str, Any]) -> ParSet:
        """A copy with dotted-path changes applied, e.g. ``{"cosmics.enabled": False}``."""
        here: dict[str, Any] = {}
        below: dict[str, dict[str, Any]] = {}
        names = {f.name for f in fields(self)}
        for path, value in changes.items():
            head, _, rest = path.partition(".")
            if head not in names:
                raise ParameterError(f"unknown parameter {self._path(head)!r}")
            if rest:
                below.setdefault(head, {})[rest] = value
            else:
                here[head] = value
        for head, sub in below.items():
            here[head] = getattr(self, head).updated(sub)
        return dataclasses.replace(self, **here)

    def digest(self, science_only: bool = True) -> str:
        """SHA-256 of the (science) parameters as canonical JSON."""
        return digest_of(self.science_dict() if science_only else self.to_dict())

    # -- documentation --------------------------------------------------------------------
    @classmethod
    def describe(cls, prefix: str = "") -> list[dict]:
        """One row per parameter: ``path``, ``type``, ``default``, ``allowed``, ``unit``, ``science``, ``description``."""
        rows = []
        for f in fields(cls):
            spec: ParSpec = f.metadata["par"]
            path = f"{prefix}{f.name}"
            if "nested" in f.metadata:
                rows += f.metadata["nested"].describe(prefix=f"{path}.")
                continue
            default = f.default
            rows.append({
                "path": path, "type": _kind(f).__name__,
                "default": list(default) if isinstance(default, tuple) else default,
                "allowed": spec.allowed(), "unit": spec.unit, "science": spec.science,
                "description": spec.description,
            })
        return rows
