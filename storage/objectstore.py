"""Object-store lake roots (``s3://bucket/prefix``): URLs, the filesystem, and a path-like handle.

The jobs treat a lake root like a directory (``root / "tables"``, ``exists()``, ``iterdir()``).
:class:`ObjectPath` gives an ``s3://`` URL those few operations on top of fsspec's ``s3fs``, so
the same job code runs on a local directory and on an object store. What an object store cannot
do like a file system, an atomic rename, is handled where it matters (raw arrays and calibration
sets: :mod:`fiberlake.storage.objectpublish`; the writer lock: :mod:`fiberlake.storage.objectlock`);
a single PUT, which is atomic, covers ``lake.json`` and quarantined copies.

Credentials and endpoint come from the standard AWS environment variables, read at each call, so
the same command works on AWS and on an S3-compatible server:

``AWS_ENDPOINT_URL``
    Endpoint of an S3-compatible server (unset on AWS).
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``
    Credentials (unset: botocore's usual chain, e.g. an instance role; Delta then uses its own).
``AWS_REGION`` (or ``AWS_DEFAULT_REGION``)
    Region of the bucket.
``AWS_ALLOW_HTTP``
    ``true`` to allow a plain ``http://`` endpoint (a local server); refused otherwise.

Zarr arrays go through :class:`zarr.storage.FsspecStore` over an asynchronous ``s3fs``
filesystem, Delta tables through deltalake's own object store with :func:`storage_options`.
"""

from __future__ import annotations

import atexit
import fnmatch
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

SCHEMES = ("s3",)
ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
            "AWS_ALLOW_HTTP")
"""The environment variables fiberlake passes on (to s3fs and to deltalake/Polars)."""
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_TRUE = {"1", "true", "yes", "on"}


class ObjectStoreError(RuntimeError):
    """An object-store lake that cannot be used: bad URL, missing package, refused setting."""


class ConditionalPutUnsupported(ObjectStoreError):
    """The server does not honour ``If-None-Match: *`` (create only if absent)."""


def is_object_url(value: Any) -> bool:
    """Whether ``value`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(value, str) and "://" in value


def _env() -> dict[str, str]:
    env = {key: os.environ[key] for key in ENV_KEYS if os.environ.get(key)}
    if "AWS_REGION" not in env and os.environ.get("AWS_DEFAULT_REGION"):
        env["AWS_REGION"] = os.environ["AWS_DEFAULT_REGION"]
    endpoint = env.get("AWS_ENDPOINT_URL", "")
    if endpoint.startswith("http://") and env.get("AWS_ALLOW_HTTP", "").lower() not in _TRUE:
        raise ObjectStoreError(f"AWS_ENDPOINT_URL {endpoint} is plain http: set AWS_ALLOW_HTTP=true to allow it")
    return env


def storage_options() -> dict[str, str]:
    """Delta Lake / Polars ``storage_options`` from the AWS environment variables.

    deltalake (>= 1.0) commits to S3 with a conditional PUT (``If-None-Match: *``) by default:
    two commits of the same table version cannot both land, so no locking provider and no
    ``AWS_S3_ALLOW_UNSAFE_RENAME`` are needed (``tests/test_object_store.py`` checks this).
    """
    return dict(_env())


def _s3fs_kwargs(env: dict[str, str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"use_listings_cache": False}
    if "AWS_ENDPOINT_URL" in env:
        kwargs["endpoint_url"] = env["AWS_ENDPOINT_URL"]
    if "AWS_ACCESS_KEY_ID" in env and "AWS_SECRET_ACCESS_KEY" in env:
        kwargs["key"], kwargs["secret"] = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        if "AWS_SESSION_TOKEN" in env:
            kwargs["token"] = env["AWS_SESSION_TOKEN"]
    if "AWS_REGION" in env:
        kwargs["client_kwargs"] = {"region_name": env["AWS_REGION"]}
    return kwargs


@lru_cache(maxsize=8)
def _filesystem(env_items: tuple[tuple[str, str], ...], asynchronous: bool, pid: int):
    # ``pid``: a forked child must not reuse its parent's instance (its event loop thread is gone).
    try:
        import s3fs
    except ImportError:
        raise ObjectStoreError("an s3:// lake needs s3fs: pip install 'fiberlake[s3]'") from None
    fs = s3fs.S3FileSystem(asynchronous=asynchronous, **_s3fs_kwargs(dict(env_items)))
    if asynchronous:
        atexit.register(_close_async_session, fs)
    return fs


def _close_async_session(fs) -> None:
    """Close the HTTP session an asynchronous instance opened on Zarr's event loop (at exit)."""
    client = getattr(fs, "_s3", None)
    if client is None:
        return
    try:
        from zarr.core.sync import sync

        sync(client.__aexit__(None, None, None))
    except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
        pass


def filesystem(asynchronous: bool = False):
    """The ``s3fs.S3FileSystem`` for the current AWS environment (cached per environment).

    Parameters
    ----------
    asynchronous : bool
        An instance for asyncio callers (Zarr's :class:`~zarr.storage.FsspecStore`).
    """
    return _filesystem(tuple(sorted(_env().items())), asynchronous, os.getpid())


@dataclass(frozen=True, order=True)
class ObjectPath:
    """A location in an object store, used like a :class:`pathlib.Path` for what the lake needs.

    Parameters
    ----------
    url : str
        ``s3://bucket/key``; use :meth:`parse` for user input.
    kind : str, optional
        ``"file"`` or ``"directory"`` when known from a listing (saves a request).

    Notes
    -----
    There are no directories on an object store: a "directory" is a key prefix that some object
    has, so :meth:`mkdir` does nothing and an empty directory does not exist.
    """

    url: str
    kind: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        scheme, sep, rest = self.url.partition("://")
        if not sep or scheme not in SCHEMES:
            raise ObjectStoreError(f"unsupported lake URL {self.url!r}: only {', '.join(s + '://' for s in SCHEMES)} "
                                   "is supported")
        bucket = rest.split("/", 1)[0]
        if not _BUCKET.match(bucket):
            raise ObjectStoreError(f"{self.url!r}: {bucket!r} is not a valid bucket name")
        if any(part in ("", ".", "..") for part in rest.split("/")[1:]):
            raise ObjectStoreError(f"{self.url!r}: empty, '.' or '..' path components are not allowed")

    @classmethod
    def parse(cls, text: str) -> ObjectPath:
        """Normalise user input (trailing and repeated slashes) into an :class:`ObjectPath`."""
        scheme, sep, rest = str(text).strip().partition("://")
        parts = [p for p in rest.split("/") if p]
        return cls(f"{scheme.lower()}{sep}{'/'.join(parts)}")

    # --- naming ----------------------------------------------------------------------------
    def __str__(self) -> str:
        return self.url

    def __truediv__(self, other: str | PurePosixPath) -> ObjectPath:
        parts = [p for p in str(other).split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ObjectStoreError(f"'..' is not allowed in object paths: {other!r}")
        return ObjectPath("/".join([self.url, *parts]))

    @property
    def path(self) -> str:
        """``bucket/key`` (the form fsspec takes)."""
        return self.url.partition("://")[2]

    @property
    def bucket(self) -> str:
        """The bucket."""
        return self.path.split("/", 1)[0]

    @property
    def name(self) -> str:
        """Last component."""
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        """The enclosing prefix (the bucket is its own parent)."""
        head = self.path.rsplit("/", 1)[0]
        return ObjectPath(f"{self.url.partition('://')[0]}://{head}")

    def relative_to(self, other: ObjectPath) -> PurePosixPath:
        """This path relative to ``other`` (raises ``ValueError`` if it is not below it)."""
        prefix = other.path.rstrip("/") + "/"
        if not self.path.startswith(prefix):
            raise ValueError(f"{self.url} is not below {other.url}")
        return PurePosixPath(self.path[len(prefix):])

    def as_posix(self) -> str:
        """The URL."""
        return self.url

    def _child(self, info: dict) -> ObjectPath:
        return ObjectPath(f"{self.url.partition('://')[0]}://{info['name'].rstrip('/')}", kind=info.get("type"))

    # --- queries ---------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether an object, or any object below this prefix, exists."""
        return filesystem().exists(self.path)

    def is_dir(self) -> bool:
        """Whether objects exist below this prefix."""
        return self.kind == "directory" if self.kind else filesystem().isdir(self.path)

    def is_file(self) -> bool:
        """Whether an object exists at exactly this key."""
        return self.kind == "file" if self.kind else filesystem().isfile(self.path)

    def iterdir(self) -> Iterator[ObjectPath]:
        """Objects and prefixes directly below this prefix."""
        for info in filesystem().ls(self.path, detail=True):
            if info["name"].rstrip("/") != self.path:
                yield self._child(info)

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """Objects and prefixes below matching ``pattern`` (``*`` within one component)."""
        for name, info in sorted(filesystem().glob(f"{self.path}/{pattern}", detail=True).items()):
            yield self._child({**info, "name": name})

    def rglob(self, pattern: str) -> Iterator[ObjectPath]:
        """Objects and prefixes at any depth below whose name matches ``pattern``."""
        found = filesystem().find(self.path, withdirs=True, detail=True)
        for name, info in sorted(found.items()):
            if name.rstrip("/") != self.path and fnmatch.fnmatchcase(name.rstrip("/").rsplit("/", 1)[-1], pattern):
                yield self._child({**info, "name": name})

    # --- reads and writes --------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        """The object's bytes (``FileNotFoundError`` if absent)."""
        return filesystem().cat_file(self.path)

    def read_text(self, encoding: str = "utf-8") -> str:
        """The object decoded as text."""
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """Store ``data`` in one PUT: readers see the old object or the new one, never a part."""
        filesystem().pipe_file(self.path, bytes(data))

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        """Store ``text`` in one PUT."""
        self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: prefixes exist through their objects."""


LakeRoot = Path | ObjectPath
"""A lake root: a local directory or an object-store location."""


def as_root(value: str | os.PathLike | ObjectPath) -> LakeRoot:
    """``value`` as a lake root: :class:`ObjectPath` for a URL, else a :class:`~pathlib.Path`."""
    if isinstance(value, ObjectPath):
        return value
    if is_object_url(value):
        return ObjectPath.parse(value)
    return Path(value)


# --- conditional writes -----------------------------------------------------------------------
def _error_code(err: BaseException) -> str:
    cause = err.__cause__ if err.__cause__ is not None else err
    return str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))


def _precondition_failed(err: BaseException) -> bool:
    # 412 PreconditionFailed: the condition did not hold; 409 ConditionalRequestConflict: a
    # concurrent write of the same key won (AWS). s3fs maps the first to FileExistsError/EINVAL.
    return isinstance(err, FileExistsError) or _error_code(err) in (
        "PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _not_implemented(err: BaseException) -> bool:
    return _error_code(err) in ("NotImplemented", "501")


def put_if_absent(path: ObjectPath, data: bytes) -> str | None:
    """Create an object only if no object has that key (``If-None-Match: *``), in one request.

    Returns
    -------
    str or None
        The new object's ETag, or None when an object already existed (nothing written).

    Raises
    ------
    ConditionalPutUnsupported
        If the server refuses conditional PUTs.
    """
    try:
        out = filesystem().pipe_file(path.path, bytes(data), IfNoneMatch="*")
    except OSError as err:
        if _precondition_failed(err):
            return None
        if _not_implemented(err):
            raise ConditionalPutUnsupported(unsupported_message(path)) from err
        raise
    return (out or {}).get("ETag", "")


def put_if_match(path: ObjectPath, data: bytes, etag: str) -> str | None:
    """Replace an object only if it still has ETag ``etag`` (``If-Match``).

    Returns
    -------
    str or None
        The new ETag, or None when the object changed or vanished meanwhile (nothing written).
    """
    try:
        out = filesystem().pipe_file(path.path, bytes(data), IfMatch=etag)
    except FileNotFoundError:
        return None
    except OSError as err:
        if _precondition_failed(err):
            return None
        if _not_implemented(err):
            raise ConditionalPutUnsupported(unsupported_message(path, "If-Match")) from err
        raise
    return (out or {}).get("ETag", "")


def unsupported_message(path: ObjectPath, header: str = "If-None-Match: *") -> str:
    """The error text for a server without conditional PUT."""
    endpoint = _env().get("AWS_ENDPOINT_URL", "AWS S3")
    return (f"the object store at {endpoint} does not support conditional PUT ({header}) for {path.url}: "
            "fiberlake needs it for its writer lock and deltalake for safe commits; use a server that has it "
            "(AWS S3 since 2024, MinIO, Ceph RGW, Cloudflare R2, moto >= 5)")


def stat(path: ObjectPath) -> dict | None:
    """ETag, size and LastModified of an object, or None if absent."""
    try:
        return filesystem().info(path.path)
    except FileNotFoundError:
        return None


def remove_tree(path: LakeRoot) -> None:
    """Delete a directory tree or every object below a prefix (missing: nothing to do)."""
    if isinstance(path, ObjectPath):
        fs = filesystem()
        keys = [key for key in fs.find(path.path) if key == path.path or key.startswith(path.path + "/")]
        if keys:
            fs.rm(keys)
        return
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def sha256_stored(path: LakeRoot, block: int = 1 << 22) -> tuple[str, int]:
    """SHA-256 hex digest and size of a stored file or object, read in blocks."""
    digest, size = hashlib.sha256(), 0
    opener = filesystem().open(path.path, "rb", block_size=block) if isinstance(path, ObjectPath) else open(path, "rb")
    with opener as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def zarr_store(path: ObjectPath, *, read_only: bool):
    """A :class:`zarr.storage.FsspecStore` rooted at ``path``."""
    from zarr.storage import FsspecStore

    return FsspecStore(filesystem(asynchronous=True), path=path.path, read_only=read_only)
