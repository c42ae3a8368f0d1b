"""Calibration sets (per night and camera) as Zarr groups of named arrays plus JSON metadata.

On a local disk a set is written into a temporary directory and renamed into place; an existing
set is swapped out with a second rename, so a reader sees the old set or the new one, never a
mixture. On an object store (no rename) the set is uploaded with its root ``zarr.json`` last,
after the old set's marker and objects are deleted (:mod:`fiberlake.storage.objectpublish`): a
reader sees the old set, no set (while it is replaced, or after a crash: the re-run builds it
again) or the new one; a read that overlaps a replacement is detected and read again.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from fiberlake.storage.failpoints import failpoint
from fiberlake.storage.objectpublish import encode, list_nodes, marker_version, publish
from fiberlake.storage.objectstore import LakeRoot, ObjectPath, zarr_store

_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


READ_ATTEMPTS = 3


def _create(store, arrays: dict[str, np.ndarray], metadata: dict) -> None:
    """Write the set's group into ``store`` (the same bytes on any store)."""
    root = zarr.open_group(store, mode="w", attributes=metadata)
    for name, value in arrays.items():
        value = np.asarray(value)
        root.create_array(
            name,
            data=value,
            chunks=value.shape if value.ndim else "auto",
            compressors=_CODEC if value.ndim else None,
        )


def write_calib_set(path: LakeRoot, arrays: dict[str, np.ndarray], metadata: dict) -> None:
    """Write a calibration set atomically.

    Parameters
    ----------
    path : Path or ObjectPath
        Destination group (``lake/calib/<night>/<camera>``), a directory or an object-store prefix.
    arrays : dict of str to ndarray
        Products, e.g. ``master_bias``, ``traces/coeffs``; a ``/`` makes a sub-group (the
        output of :meth:`~fiberlake.schemas.containers.ArrayContainer.to_arrays`).
    metadata : dict
        JSON-serialisable description (input exposures, parameters, quality figures).
    """
    if isinstance(path, ObjectPath):
        objects = encode(lambda store: _create(store, arrays, metadata))
        publish(path, objects, before_marker=lambda: failpoint("calib.before_publish"))
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        _create(zarr.storage.LocalStore(tmp), arrays, metadata)
        failpoint("calib.before_publish")
        if path.exists():
            old = path.parent / f".old-{path.name}-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_calib_set(path: LakeRoot) -> tuple[dict[str, np.ndarray], dict]:
    """Read every array (dtype and shape as written) and the metadata of a calibration set.

    Raises
    ------
    FileNotFoundError
        If no set exists at ``path``.
    """
    if isinstance(path, ObjectPath):
        return _read_object_set(path)
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise FileNotFoundError(f"no calibration set at {path}")
    return _read_group(zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r"))


def _read_object_set(path: ObjectPath) -> tuple[dict[str, np.ndarray], dict]:
    """Read a set on an object store; read again if it was replaced while being read."""
    for _ in range(READ_ATTEMPTS):
        before = marker_version(path)
        if before is None:
            break
        try:
            out = _read_group(zarr.open_group(zarr_store(path, read_only=True), mode="r"))
        except FileNotFoundError:  # an object deleted under us: the set is being replaced
            continue
        if marker_version(path) == before:
            return out
    raise FileNotFoundError(f"no calibration set at {path}" if before is None else
                            f"calibration set {path} kept changing while being read")


def _read_group(root: zarr.Group) -> tuple[dict[str, np.ndarray], dict]:
    arrays: dict[str, np.ndarray] = {}

    def walk(group: zarr.Group, prefix: str) -> None:
        for name, member in group.members():
            key = f"{prefix}{name}"
            if isinstance(member, zarr.Group):
                walk(member, key + "/")
            else:
                arrays[key] = np.asarray(member[...])  # a 0-d array too, not a numpy scalar

    walk(root, "")
    return arrays, dict(root.attrs)


def read_calib_meta(path: LakeRoot) -> dict | None:
    """The metadata of a calibration set without reading its arrays (None if there is no set)."""
    if isinstance(path, ObjectPath):
        try:
            return dict(zarr.open_group(zarr_store(path, read_only=True), mode="r").attrs)
        except FileNotFoundError:  # no marker: no set, or one not completely published
            return None
    path = Path(path)
    if not (path / "zarr.json").exists():
        return None
    return dict(zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r").attrs)


def list_calib_leftovers(root: LakeRoot) -> list[tuple[str, float]]:
    """Sets left by interrupted writes, as (path relative to the lake root, modification time).

    Local: the hidden ``.tmp-``/``.old-`` directories of a swap. Object store: prefixes
    ``calib/<night>/<camera>`` whose objects have no root marker.
    """
    if isinstance(root, ObjectPath):
        return [(rel, mtime) for rel, mtime, marked in list_nodes(root, "calib", 2) if not marked]
    calib = Path(root) / "calib"
    if not calib.is_dir():
        return []
    return [(tmp.relative_to(root).as_posix(), tmp.stat().st_mtime) for tmp in sorted(calib.glob("*/.*"))
            if tmp.name.startswith((".tmp-", ".old-"))]

