"""Publishing a Zarr node on an object store without a rename: its ``zarr.json`` goes last.

On a local disk a raw array or a calibration set is written into a hidden temporary directory
and renamed into place. An object store has no rename, so here the node is encoded in memory
(the same Zarr calls as on disk, hence the same bytes, object for file) and uploaded with its
root ``zarr.json`` as the last PUT; a single PUT is atomic, so that object is the completion
marker. Whatever was at the location before loses its marker first, then its other objects:

* until the marker lands there is no Zarr node at the location (Zarr itself, and every reader
  of the lake, finds nothing): a half-published array or set is never taken for complete;
* a crash leaves objects without a marker. The re-run publishes the node again over them (a
  raw array whose row is missing, a calibration set whose marker is missing, are always
  written again), and ``fiberlake vacuum`` removes leftovers that nothing re-publishes.
"""

from __future__ import annotations

from collections.abc import Callable

from zarr.storage import MemoryStore

from fiberlake.storage.objectstore import ObjectPath, filesystem

MARKER = "zarr.json"
"""The root metadata document of a Zarr v3 node, uploaded last."""


def encode(build: Callable[[MemoryStore], None]) -> dict[str, bytes]:
    """Run ``build`` on an in-memory Zarr store and return its objects (key -> bytes).

    Parameters
    ----------
    build : callable
        Writes a Zarr node at the root of the store it is given (e.g. ``zarr.create_array``).
    """
    contents: dict = {}
    build(MemoryStore(contents))
    return {key: value.to_bytes() for key, value in contents.items()}


def is_published(dest: ObjectPath) -> bool:
    """Whether a complete node (its marker) is at ``dest``."""
    return filesystem().isfile(f"{dest.path}/{MARKER}")


def publish(dest: ObjectPath, objects: dict[str, bytes], *, before_marker: Callable[[], None] | None = None) -> None:
    """Replace whatever is at ``dest`` by ``objects``, the root ``zarr.json`` last.

    Parameters
    ----------
    dest : ObjectPath
        Location of the node (a key prefix).
    objects : dict of str to bytes
        Keys relative to ``dest``, from :func:`encode`; must contain ``zarr.json``.
    before_marker : callable, optional
        Called after every other object is stored and before the marker (a failpoint).
    """
    if MARKER not in objects:
        raise ValueError(f"nothing to publish at {dest}: no root {MARKER}")
    fs = filesystem()
    root = dest.path
    marker = f"{root}/{MARKER}"
    existing = {key for key in fs.find(root) if key.startswith(root + "/")}
    if marker in existing:
        fs.rm_file(marker)  # first: what is left of the old node is no node at all
    stale = sorted(key for key in existing if key != marker and key[len(root) + 1:] not in objects)
    if stale:
        fs.rm(stale)
    body = {f"{root}/{key}": data for key, data in objects.items() if key != MARKER}
    if body:
        fs.pipe(body)
    if before_marker is not None:
        before_marker()
    fs.pipe_file(marker, objects[MARKER])


def marker_version(dest: ObjectPath) -> tuple[str, str] | None:
    """ETag and modification time of the node's marker, None if absent.

    A new publication changes the modification time even when the marker's bytes (hence its
    ETag) are the same, so comparing two of these tells whether the node was published again.
    """
    try:
        info = filesystem().info(f"{dest.path}/{MARKER}")
    except FileNotFoundError:
        return None
    return str(info.get("ETag")), str(info.get("LastModified"))


def list_nodes(root: ObjectPath, prefix: str, depth: int) -> list[tuple[str, float, bool]]:
    """Zarr node locations ``depth`` levels under ``root/prefix`` and whether each is published.

    Parameters
    ----------
    root : ObjectPath
        The lake root.
    prefix : str
        Top folder of the nodes (``raw``: ``raw/<night>/<expid>/<camera>``, depth 3; ``calib``:
        ``calib/<night>/<camera>``, depth 2).
    depth : int
        Path components of a node location below ``prefix``.

    Returns
    -------
    list of (str, float, bool)
        Location relative to the root, newest modification time (POSIX s) of its objects, and
        whether its root :data:`MARKER` is there; sorted by location.
    """
    base = (root / prefix).path + "/"
    found: dict[str, list] = {}
    for key, info in filesystem().find(base, detail=True).items():
        parts = key[len(base):].split("/")
        if len(parts) <= depth:
            continue
        entry = found.setdefault(f"{prefix}/" + "/".join(parts[:depth]), [0.0, False])
        entry[0] = max(entry[0], info["LastModified"].timestamp())
        entry[1] = entry[1] or (len(parts) == depth + 1 and parts[depth] == MARKER)
    return [(rel, mtime, marked) for rel, (mtime, marked) in sorted(found.items())]
