"""Calibration sets (per night and camera) as Zarr groups of named arrays plus JSON metadata.

A set is written into a temporary directory and renamed into place; an existing set is swapped
out with a second rename, so a reader sees the old set or the new one, never a mixture.
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

_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def write_calib_set(path: Path, arrays: dict[str, np.ndarray], metadata: dict) -> None:
    """Write a calibration set atomically.

    Parameters
    ----------
    path : Path
        Destination group directory (``lake/calib/<night>/<camera>``).
    arrays : dict of str to ndarray
        Products, e.g. ``master_bias``, ``traces/coeffs``; a ``/`` makes a sub-group.
    metadata : dict
        JSON-serialisable description (input exposures, parameters, quality figures).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        root = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", attributes=metadata)
        for name, value in arrays.items():
            value = np.asarray(value)
            root.create_array(
                name,
                data=value,
                chunks=value.shape if value.ndim else "auto",
                compressors=_CODEC if value.ndim else None,
            )
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


def read_calib_set(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read every array and the metadata of a calibration set.

    Raises
    ------
    FileNotFoundError
        If no set exists at ``path``.
    """
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise FileNotFoundError(f"no calibration set at {path}")
    root = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")
    arrays: dict[str, np.ndarray] = {}

    def walk(group: zarr.Group, prefix: str) -> None:
        for name, member in group.members():
            key = f"{prefix}{name}"
            if isinstance(member, zarr.Group):
                walk(member, key + "/")
            else:
                arrays[key] = member[...]

    walk(root, "")
    return arrays, dict(root.attrs)


def read_calib_meta(path: Path) -> dict | None:
    """The metadata of a calibration set without reading its arrays (None if there is no set)."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        return None
    return dict(zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r").attrs)


def subset(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Arrays under ``prefix/`` with the prefix removed."""
    start = prefix.rstrip("/") + "/"
    return {k[len(start):]: v for k, v in arrays.items() if k.startswith(start)}
