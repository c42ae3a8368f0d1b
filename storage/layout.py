"""Where everything lives in a lake, and the lake's own description.

A lake is one root, a local directory or an object-store location (``s3://bucket/prefix``,
see :mod:`fiberlake.storage.objectstore`), with the same layout in both::

    lake.json                       instrument and format version (written once)
    raw/<night>/<expid>/<camera>    Zarr v3 array per frame, pixels bit-exact, header as attributes
    calib/<night>/<camera>          Zarr group: master bias, master flat, traces, wavelength solution
    tables/<name>                   Delta Lake tables (see schemas.tables), partitioned by night
    quarantine/<night>/<sha256>-<filename>   the refused bytes, kept so nothing is lost
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fiberlake.storage.objectstore import LakeRoot, ObjectPath, ObjectStoreError, is_object_url, put_if_absent

LAKE_FORMAT_VERSION = 2
"""Version of the lake's table schemas and layout. 2: one ``reductions`` marker per extraction,
``metrics`` with the full per-fiber key, ``runs.execution_json``, ``reductions.error_kind``, every
table created with the lake. A lake of another version is refused with a sentence, not misread."""
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # \Z: no trailing newline


class LakeError(RuntimeError):
    """A lake that cannot be used as asked (wrong instrument, missing, corrupt)."""


def safe_component(value: str, what: str) -> str:
    """Return ``value`` if it is safe as one path component, else raise ``ValueError``.

    Header values end up in paths; this refuses ``..``, separators, NUL, non-ASCII and very long
    strings so that no header can write outside the lake.
    """
    if not isinstance(value, str) or not _SAFE.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} is not a safe path component")
    return value


_DESCRIPTIONS: dict[tuple[str, str], dict] = {}
"""``lake.json`` of object-store lakes already read in this process (it never changes)."""


@dataclass(frozen=True)
class Lake:
    """Paths of one lake root.

    Parameters
    ----------
    root : Path or ObjectPath
        The lake directory (created on first write), or its object-store location.
    """

    root: LakeRoot

    @classmethod
    def at(cls, root: str | os.PathLike | ObjectPath) -> "Lake":
        """Lake rooted at ``root``: a local path (made absolute) or an ``s3://bucket/prefix`` URL.

        Raises
        ------
        LakeError
            If ``root`` is a URL fiberlake cannot use (another scheme, a bad bucket name).
        """
        if isinstance(root, ObjectPath):
            return cls(root)
        if is_object_url(root):
            try:
                return cls(ObjectPath.parse(root))
            except ObjectStoreError as err:
                raise LakeError(str(err)) from None
        return cls(Path(root).expanduser().resolve())

    @classmethod
    def open(cls, root: str | os.PathLike | ObjectPath) -> "Lake":
        """The existing lake at ``root``; unlike :meth:`at`, never a path that is not a lake yet.

        Every command but ``ingest`` and ``watch`` (which create lakes) opens its lake this way,
        so that a mistyped ``--lake`` is refused instead of becoming a new, empty lake.

        Raises
        ------
        LakeError
            If ``root`` holds no lake description (``lake.json``).
        """
        lake = cls.at(root)
        desc = lake.describe()
        if not desc:
            raise LakeError(f"{root} is not a fiberlake lake (it has no lake.json); only 'fiberlake ingest' "
                            f"and 'fiberlake watch' create a lake, so check the --lake path")
        lake.check_format(desc)
        return lake

    def check_format(self, desc: dict) -> None:
        """Refuse a lake written with other table schemas (:data:`LAKE_FORMAT_VERSION`).

        Raises
        ------
        LakeError
            With the way out: ingest the night directories into a new lake.
        """
        version = desc.get("format_version")
        if version != LAKE_FORMAT_VERSION:
            raise LakeError(f"lake {self.root} is of format {version}, and this fiberlake reads format "
                            f"{LAKE_FORMAT_VERSION} (other table columns); ingest its night directories into a "
                            f"new lake")

    @property
    def on_object_store(self) -> bool:
        """Whether the root is an object-store location rather than a local directory."""
        return isinstance(self.root, ObjectPath)

    # --- description -------------------------------------------------------------------
    @property
    def description_path(self) -> LakeRoot:
        """``lake.json``."""
        return self.root / "lake.json"

    def describe(self) -> dict:
        """The lake description, or ``{}`` for a lake not yet created."""
        if self.on_object_store:
            key = (os.environ.get("AWS_ENDPOINT_URL", ""), self.root.url)
            known = _DESCRIPTIONS.get(key)
            if known is None:
                try:  # one GET (no existence check first); written once, so kept once read
                    known = _DESCRIPTIONS[key] = json.loads(self.description_path.read_text())
                except FileNotFoundError:
                    return {}
            return dict(known)
        if not self.description_path.exists():
            return {}
        return json.loads(self.description_path.read_text())

    def ensure(self, instrument: str) -> None:
        """Create the lake for ``instrument``, or check that it already holds that instrument.

        Raises
        ------
        LakeError
            If the lake was created for a different instrument.
        """
        desc = self.describe()
        if desc:
            self.check_format(desc)
            if desc.get("instrument") != instrument:
                raise LakeError(
                    f"lake {self.root} holds instrument {desc.get('instrument')!r}, not {instrument!r}"
                )
            return
        text = json.dumps({"instrument": instrument, "format_version": LAKE_FORMAT_VERSION}, indent=2)
        self._create_tables()
        if self.on_object_store:
            # One conditional PUT: atomic, and a lake created meanwhile by another writer is kept.
            if put_if_absent(self.description_path, text.encode()) is None:
                held = self.describe().get("instrument")
                if held != instrument:
                    raise LakeError(f"lake {self.root} holds instrument {held!r}, not {instrument!r}")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.description_path.with_suffix(".json.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.description_path)

    def _create_tables(self) -> None:
        """Every table, empty, before ``lake.json`` is published: a lake always has all its tables."""
        from fiberlake.storage.tables import TableStore  # storage.tables does not import layout

        if not self.on_object_store:
            self.root.mkdir(parents=True, exist_ok=True)
        TableStore(self.root / "tables").create_missing()

    @property
    def instrument(self) -> str:
        """Instrument name the lake holds.

        Raises
        ------
        LakeError
            If there is no lake at the root.
        """
        desc = self.describe()
        if not desc:
            raise LakeError(f"no lake at {self.root} (run 'fiberlake ingest' first)")
        return desc["instrument"]

    # --- paths -------------------------------------------------------------------------
    def raw_relpath(self, night: str, expid: int, camera: str, version: int = 1) -> str:
        """Path of a raw frame array relative to the root."""
        name = safe_component(camera, "camera") + ("" if version == 1 else f".v{int(version)}")
        return f"raw/{safe_component(night, 'night')}/{int(expid):08d}/{name}"

    def calib_path(self, night: str, camera: str) -> LakeRoot:
        """Zarr group of a night's calibration set for one camera."""
        return self.root / "calib" / safe_component(night, "night") / safe_component(camera, "camera")

    def table_path(self, name: str) -> LakeRoot:
        """Delta table directory."""
        return self.root / "tables" / safe_component(name, "table")

    def quarantine_relpath(self, night: str, sha256: str, filename: str) -> str:
        """Where refused bytes are kept, relative to the root."""
        clean = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(filename))[:100] or "unnamed"
        return f"quarantine/{safe_component(night, 'night')}/{sha256[:16]}-{clean}"
