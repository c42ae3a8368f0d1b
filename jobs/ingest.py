"""Ingest job: delivered raw FITS into the lake, incrementally, idempotently, crash-safe.

A frame's identity is the SHA-256 of its bytes. Bytes the lake already holds (under any name)
are a no-op recorded in the ``deliveries`` log as ``duplicate``; a *different* file for an
existing (night, expid, camera) under the same file name becomes a new ``file_version`` stored
beside the old one, never over it; under another name it is a conflicting exposure id and is
quarantined (``duplicate_expid``). Refused files are copied under ``quarantine/`` with a row
giving the reason, and the rest of the night still lands.

Crash safety comes from the order of the steps: pixels are published (an atomic rename, or on an
object store a last PUT of the array's ``zarr.json``) before the table rows that reference
them; ``exposures`` and ``quarantine`` are committed before the
``deliveries`` log. A crash anywhere leaves at worst an unreferenced array that the re-run adopts
(same pixels, same path) and files the re-run reads again; every outcome is a function of the
bytes and of what the tables hold, so the re-run writes exactly the rows a clean run would have.
One writer at a time holds the lake (:class:`~fiberlake.storage.lock.LakeLock`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from tqdm import tqdm

from fiberlake.ingest.arrival import ArrivalTracker
from fiberlake.ingest.fibermap import is_fibermap, read_fibermap
from fiberlake.ingest.fitsreader import FrameRejected, RawFrame, read_frame, sha256_file
from fiberlake.schemas.header import NIGHT_PATTERN
from fiberlake.schemas.instrument import get_instrument
from fiberlake.storage.layout import Lake
from fiberlake.storage.rawstore import pixel_sha256, remove_stale_temporaries, write_raw_frame
from fiberlake.storage.lock import LakeLock
from fiberlake.storage.quarantine import keep_copy
from fiberlake.storage.tables import TableStore, Txn


@dataclass
class IngestReport:
    """What one ingest run did."""

    ingested: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    fibermaps: list[str] = field(default_factory=list)
    waiting: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for people."""
        text = (
            f"{len(self.ingested)} frames ingested, {len(self.duplicates)} already in the lake, "
            f"{len(self.quarantined)} quarantined, {len(self.fibermaps)} fiber maps"
        )
        return text + (f", {len(self.waiting)} still being written" if self.waiting else "")

    def merge(self, other: IngestReport) -> None:
        """Add another batch's outcome to this one."""
        for name in ("ingested", "duplicates", "quarantined", "fibermaps"):
            getattr(self, name).extend(getattr(other, name))
        self.waiting = list(other.waiting)


def header_to_json(header: fits.Header) -> list[list]:
    """Header cards as ``[key, value, comment]`` lists with JSON-safe values."""
    cards = []
    for card in header.cards:
        value = card.value
        if isinstance(value, (bool, np.bool_)):
            value = bool(value)
        elif isinstance(value, (int, np.integer)):
            value = int(value)
        elif isinstance(value, (float, np.floating)):
            value = float(value) if np.isfinite(value) else str(value)
        elif not isinstance(value, str):
            value = None if value is None or type(value).__name__ == "Undefined" else str(value)
        cards.append([card.keyword, value, card.comment])
    return cards


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _night_of_dir(night_dir: Path) -> str:
    name = night_dir.name
    return name if NIGHT_PATTERN.match(name) else "unknown"


def _quarantine(lake: Lake, night: str, path: Path, sha: str, size: int, rejected: FrameRejected) -> dict:
    rel = lake.quarantine_relpath(night, sha, path.name)
    keep_copy(lake.root, rel, path)
    return {
        "night": night,
        "filename": path.name,
        "file_sha256": sha,
        "file_size": size,
        "reason": rejected.reason,
        "error_class": rejected.error_class,
        "stored_path": rel,
        "quarantined_at": _now(),
    }


def _exposure_row(frame: RawFrame, path: Path, sha: str, size: int, version: int, relpath: str, pixel_sha: str, header_json: str) -> dict:
    hdr = frame.header
    return {
        "night": frame.night,
        "expid": frame.expid,
        "camera": frame.camera,
        "spectrograph": frame.spectrograph,
        "arm": frame.arm,
        "obstype": frame.obstype,
        "exptime": float(hdr["EXPTIME"]),
        "mjd_obs": float(hdr["MJD-OBS"]),
        "date_obs": str(hdr["DATE-OBS"]),
        "instrument": frame.instrument.name,
        "filename": path.name,
        "file_sha256": sha,
        "file_size": size,
        "file_version": version,
        "pixel_sha256": pixel_sha,
        "raw_path": relpath,
        "ny": int(frame.pixels.shape[0]),
        "nx": int(frame.pixels.shape[1]),
        "gain": float(hdr["GAIN"]),
        "read_noise": float(hdr["RDNOISE"]),
        "header_json": header_json,
        "ingested_at": _now(),
    }


APP_ID = "fiberlake.ingest"


@dataclass
class LakeState:
    """What the lake already holds, read once per ingest batch."""

    exposures: dict[str, dict]
    quarantined: dict[str, dict]
    deliveries: dict[tuple[str, str], dict]
    fibermap_sha: set[str]
    versions: dict[tuple, int]
    filenames: dict[tuple, str]

    @classmethod
    def read(cls, tables: TableStore) -> LakeState:
        """Read the identity columns of ``exposures``, ``quarantine`` and ``deliveries``."""
        exp = tables.read("exposures", columns=["night", "expid", "camera", "file_version", "file_sha256", "filename",
                                                "raw_path"]).to_pylist()
        versions: dict[tuple, int] = {}
        filenames: dict[tuple, str] = {}
        for row in exp:
            key = (row["night"], row["expid"], row["camera"])
            versions[key] = max(versions.get(key, 0), row["file_version"])
            filenames[key] = row["filename"]
        quarantine = tables.read("quarantine", columns=["night", "filename", "file_sha256", "reason"]).to_pylist()
        deliveries = tables.read("deliveries", columns=["night", "filename", "file_sha256", "file_size", "mtime_ns",
                                                        "outcome"]).to_pylist()
        return cls(
            exposures={r["file_sha256"]: r for r in exp},
            quarantined={r["file_sha256"]: r for r in quarantine},
            deliveries={(r["night"], r["filename"]): r for r in deliveries},
            fibermap_sha={r["file_sha256"] for r in deliveries if r["outcome"] == "fibermap"},
            versions=versions,
            filenames=filenames,
        )

    def unchanged(self, night: str, path: Path, st: os.stat_result) -> bool:
        """Whether ``path`` is a file already looked at, with the same size and mtime."""
        row = self.deliveries.get((night, path.name))
        return row is not None and row["file_size"] == st.st_size and row["mtime_ns"] == st.st_mtime_ns


def _delivery(night: str, path: Path, sha: str, st: os.stat_result, outcome: str, detail: str) -> dict:
    return {"night": night, "filename": path.name, "file_sha256": sha, "file_size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "outcome": outcome, "detail": detail, "recorded_at": _now()}


def _known_outcome(state: LakeState, path: Path, sha: str) -> tuple[str, str] | None:
    """Outcome of bytes the lake already holds: the original delivery itself, or a duplicate."""
    if sha in state.exposures:
        row = state.exposures[sha]
        where = f"{row['raw_path']} (expid {row['expid']} {row['camera']} v{row['file_version']})"
        if row["filename"] == path.name:
            return ("ingested" if row["file_version"] == 1 else "new_version"), where
        return "duplicate", f"same bytes as {row['filename']}: {where}"
    if sha in state.quarantined:
        row = state.quarantined[sha]
        if row["filename"] == path.name:
            return "quarantined", row["reason"]
        return "duplicate", f"same bytes as quarantined {row['filename']}: {row['reason']}"
    if sha in state.fibermap_sha:
        return "duplicate", "same bytes as an ingested fiber map"
    return None


PREFETCH = 2
"""Files inspected ahead of the one being published (bounds the frames held in memory)."""


@dataclass
class _Inspected:
    """A delivered file after hashing and reading (the parallel part of ingest)."""

    st: os.stat_result
    sha: str
    frame: RawFrame | None = None
    pixel_sha: str | None = None
    rejected: FrameRejected | None = None


def _inspect(path: Path, st: os.stat_result, instrument, state: LakeState) -> _Inspected:
    """Hash a file and, unless its bytes are known or it is a fiber map, read and validate it."""
    sha, _ = sha256_file(path)
    seen = _Inspected(st=st, sha=sha)
    if _known_outcome(state, path, sha) is not None or is_fibermap(path):
        return seen
    try:
        seen.frame = read_frame(path, instrument)
        seen.pixel_sha = pixel_sha256(seen.frame.pixels)
    except FrameRejected as rejected:
        seen.rejected = rejected
    except (OSError, MemoryError):
        raise  # the machine, not the file: stop, a re-run resumes
    except Exception as err:  # a reader bug must cost one file, not the night
        seen.rejected = FrameRejected("unreadable", f"unexpected {type(err).__name__} reading the file: {str(err)[:200]}")
    return seen


def _take(lake: Lake, night: str, path: Path, seen: _Inspected, state: LakeState, report: IngestReport,
          exposure_rows: list, quarantine_rows: list, delivery_rows: list, fibermap_rows: dict) -> None:
    """Decide what an inspected file is (in delivery order) and publish its pixels."""
    st, sha = seen.st, seen.sha
    known = _known_outcome(state, path, sha)
    if known is not None:
        report.duplicates.append(path.name)
        if (night, path.name) not in state.deliveries or state.deliveries[(night, path.name)]["file_sha256"] != sha:
            delivery_rows.append(_delivery(night, path, sha, st, *known))
        return

    def refuse(rejected: FrameRejected) -> None:
        row = _quarantine(lake, night, path, sha, st.st_size, rejected)
        quarantine_rows.append(row)
        state.quarantined[sha] = row
        delivery_rows.append(_delivery(night, path, sha, st, "quarantined", rejected.reason))
        report.quarantined.append((path.name, rejected.reason))

    if is_fibermap(path):
        try:
            rows = read_fibermap(path, night)
        except FrameRejected as rejected:
            refuse(rejected)
            return
        if rows:
            fibermap_rows[(rows[0]["night"], rows[0]["expid"])] = rows
        state.fibermap_sha.add(sha)
        delivery_rows.append(_delivery(night, path, sha, st, "fibermap",
                                       f"{len(rows)} fibers of expid {rows[0]['expid'] if rows else '?'}"))
        report.fibermaps.append(path.name)
        return
    if seen.rejected is not None:
        refuse(seen.rejected)
        return
    frame = seen.frame
    try:
        if lake.describe() and frame.instrument.name != lake.instrument:
            raise FrameRejected("wrong_instrument", f"frame is from {frame.instrument.name!r} but the lake holds "
                                                    f"{lake.instrument!r}")
        key = (frame.night, frame.expid, frame.camera)
        holder = state.filenames.get(key)
        if holder is not None and holder != path.name:
            raise FrameRejected(
                "duplicate_expid",
                f"exposure {frame.expid} camera {frame.camera} of {frame.night} is already in the lake from "
                f"{holder} with other bytes; a corrected file must keep the original name to become a new version",
            )
    except FrameRejected as rejected:
        refuse(rejected)
        return
    lake.ensure(frame.instrument.name)
    version = state.versions.get(key, 0) + 1
    relpath = lake.raw_relpath(frame.night, frame.expid, frame.camera, version)
    cards = header_to_json(frame.header)
    attrs = {"header": cards, "filename": path.name, "file_sha256": sha, "file_version": version}
    pixel_sha = write_raw_frame(lake.root, relpath, frame.pixels, attrs, digest=seen.pixel_sha)
    state.versions[key] = version
    state.filenames[key] = path.name
    row = _exposure_row(frame, path, sha, st.st_size, version, relpath, pixel_sha, json.dumps(cards))
    state.exposures[sha] = row
    exposure_rows.append(row)
    detail = f"{relpath} (expid {frame.expid} {frame.camera} v{version})"
    delivery_rows.append(_delivery(night, path, sha, st, "ingested" if version == 1 else "new_version", detail))
    report.ingested.append(path.name)


def ingest_files(lake: Lake, files: list[Path], night: str, *, progress: bool = False) -> IngestReport:
    """Ingest the given delivered files of one night directory in one batch.

    The batch reads what the lake holds once, publishes pixel arrays one by one, then commits
    ``exposures``, ``quarantine``, the fiber maps and last the ``deliveries`` log, each in one
    commit tagged with an application transaction. Run it under the lake's writer lock
    (:class:`~fiberlake.storage.lock.LakeLock`); the jobs and the CLI do.

    Parameters
    ----------
    lake : Lake
        Destination lake; created on first use for the instrument of the first valid frame.
    files : list of Path
        Complete files (see :mod:`fiberlake.ingest.arrival`), FITS frames or fiber maps.
    night : str
        Night of the delivery directory (its name), used for quarantine and the delivery log.
    progress : bool
        Show a progress bar.

    Returns
    -------
    IngestReport
    """
    tables = TableStore(lake.root / "tables")
    instrument = get_instrument(lake.instrument) if lake.describe() else None
    state = LakeState.read(tables)
    report = IngestReport()
    exposure_rows: list[dict] = []
    quarantine_rows: list[dict] = []
    delivery_rows: list[dict] = []
    fibermap_rows: dict[tuple[str, int], list[dict]] = {}
    pending = [p for p in sorted(files) if p.exists()]
    ahead: deque[tuple[Path, Future]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fiberlake-ingest") as pool:
        # Hashing and FITS decoding of the next file overlap with the compression and
        # publication of the current one (both release the GIL): a two-stage pipeline.
        def refill() -> None:
            while pending and len(ahead) < PREFETCH:
                path = pending.pop(0)
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                if state.unchanged(night, path, st):
                    report.duplicates.append(path.name)
                    continue
                ahead.append((path, pool.submit(_inspect, path, st, instrument, state)))

        bar = tqdm(total=len(pending), desc=f"ingest {night}", unit="file", disable=not progress)
        refill()
        while ahead:
            path, future = ahead.popleft()
            seen = future.result()
            refill()
            bar.update(1)
            _take(lake, night, path, seen, state, report, exposure_rows, quarantine_rows, delivery_rows, fibermap_rows)
            if instrument is None and lake.describe():
                instrument = get_instrument(lake.instrument)
        bar.close()
    report.duplicates.sort()

    def txn(name: str) -> Txn:
        return Txn(APP_ID, (tables.committed_version(name, APP_ID) or 0) + 1)

    if exposure_rows:
        tables.append("exposures", exposure_rows, txn=txn("exposures"))
    if quarantine_rows:
        tables.append("quarantine", quarantine_rows, txn=txn("quarantine"))
    for (fm_night, expid), rows in fibermap_rows.items():
        tables.replace("fibermap", rows, f"night = '{fm_night}' AND expid = {int(expid)}")
    if delivery_rows:
        tables.append("deliveries", delivery_rows, txn=txn("deliveries"))
    return report


def list_delivered(night_dir: Path) -> list[Path]:
    """The ``*.fits`` files directly in ``night_dir`` (sub-directories such as ``truth/`` are not deliveries)."""
    return sorted(p for p in night_dir.iterdir() if p.is_file() and p.suffix.lower() == ".fits")


def ingest_night(
    lake: Lake,
    night_dir: str | os.PathLike,
    *,
    progress: bool = False,
    settle: float = 0.0,
    lock: bool = True,
) -> IngestReport:
    """Ingest every raw frame and fiber map in ``night_dir`` that the lake does not hold yet.

    Parameters
    ----------
    lake : Lake
        Destination lake; created on first use for the instrument of the first valid frame.
    night_dir : path
        Directory of delivered ``*.fits`` files (sub-directories such as ``truth/`` are ignored).
    progress : bool
        Show a progress bar.
    settle : float
        Files changed less than ``settle`` seconds ago, or structurally incomplete and changed
        less than ``settle`` seconds ago, are left for a later run (reported in ``waiting``):
        they are still being written. An incomplete file older than that is quarantined as
        truncated.
    lock : bool
        Take the lake's writer lock (callers that already hold it pass False).

    Returns
    -------
    IngestReport
    """
    night_dir = Path(night_dir)
    if not night_dir.is_dir():
        raise FileNotFoundError(f"night directory {night_dir} does not exist")
    tracker = ArrivalTracker(settle=settle, stale_after=settle)
    ready, waiting = tracker.poll(list_delivered(night_dir))
    with LakeLock(lake.root, "ingest") if lock else nullcontext():
        remove_stale_temporaries(lake.root)
        report = ingest_files(lake, ready, _night_of_dir(night_dir), progress=progress)
    report.waiting = [(p.name, why) for p, why in waiting.items()]
    return report
