"""Ingest job: delivered raw FITS into the lake, incrementally, idempotently, crash-safe.

A frame's identity is the SHA-256 of its bytes. Bytes the lake already holds (under any name)
are a no-op recorded in the ``deliveries`` log as ``duplicate``; a *different* file for an
existing (night, expid, camera) under the same file name becomes a new ``file_version`` stored
beside the old one, never over it; under another name it is a conflicting exposure id and is
quarantined (``duplicate_expid``). Refused files are copied under ``quarantine/`` with a row
giving the reason, and the rest of the night still lands.

Nothing a file says can delete, leak or block (see :mod:`fiberlake.ingest.delivery` for what is
read at all): every entry of the night directory is logged in ``deliveries``; an entry that must
not be read (a link out of the directory, a FIFO, a name that is not UTF-8, a file without read
permission) is ``refused`` without reading or copying a byte and looked at again by the next
run; other extensions and sub-directories are ``ignored`` with the reason. Every key value a
frame or fiber map supplies is checked against the header contract before it reaches a path or a
table, and table rows are replaced only through typed key predicates
(:meth:`~fiberlake.storage.tables.TableStore.replace_keys`). A file's rows are checked against the
table schemas before its pixels are published, so one file's values cannot fail a commit of the
night: each bad file costs that file only.

The lake's instrument is declared (``lake.json``), never guessed from whatever frame sorts first:
:func:`declare_instrument` creates a lake for the instrument named by the caller (``--instrument``)
or by ``FIBERLAKE_INSTRUMENT``, and the CLI refuses to create a lake without one; frames of another
instrument are quarantined. (A library call on a new lake without a declaration takes the one
instrument that every frame of its batch names, and refuses a batch whose frames disagree.)

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
import hashlib
import io
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
from fiberlake.ingest.delivery import DeliveryRefused, Entry, classify, delivery_order, read_delivery, scan_night
from fiberlake.ingest.fibermap import read_fibermap
from fiberlake.ingest.fitsreader import FrameRejected, RawFrame, image_hdu, frame_bytes, read_frame
from fiberlake.processors.warnings_guard import catch_warnings
from fiberlake.schemas.header import check_night
from fiberlake.schemas.instrument import INSTRUMENTS, Instrument, get_instrument
from fiberlake.storage.layout import Lake, LakeError
from fiberlake.jobs.typing_stage import IngestTyper
from fiberlake.processors.params import TypingParams
from fiberlake.storage.lock import LakeLock
from fiberlake.storage.quarantine import copy_mode, keep_copy
from fiberlake.storage.rawstore import pixel_sha256, remove_stale_temporaries, write_raw_frame
from fiberlake.storage.tables import TableStore, Txn, conform

INSTRUMENT_ENV = "FIBERLAKE_INSTRUMENT"
"""Environment variable naming the instrument of a lake created without ``--instrument``."""


@dataclass
class IngestReport:
    """What one ingest run did."""

    ingested: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    fibermaps: list[str] = field(default_factory=list)
    waiting: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for people."""
        text = (
            f"{len(self.ingested)} frames ingested, {len(self.duplicates)} already in the lake, "
            f"{len(self.quarantined)} quarantined, {len(self.fibermaps)} fiber maps"
        )
        if self.refused:
            text += f", {len(self.refused)} refused unread"
        if self.ignored:
            text += f", {len(self.ignored)} ignored"
        return text + (f", {len(self.waiting)} still being written" if self.waiting else "")

    def merge(self, other: IngestReport) -> None:
        """Add another batch's outcome to this one."""
        for name in ("ingested", "duplicates", "quarantined", "fibermaps", "refused", "ignored"):
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


def night_of_dir(night_dir: Path) -> str:
    """The night a delivery directory is named after, or ``unknown`` when its name is not a date."""
    try:
        return check_night(night_dir.name)
    except ValueError:
        return "unknown"


def _exposure_row(frame: RawFrame, name: str, sha: str, size: int, version: int, relpath: str, pixel_sha: str,
                  header_json: str) -> dict:
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
        "filename": name,
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

FINAL_OUTCOMES = frozenset({"ingested", "new_version", "duplicate", "quarantined", "fibermap"})
"""Outcomes that depend on the bytes only: a file logged with one, unchanged since, is not read again.
``refused`` and ``ignored`` entries are looked at again by every run (nothing of them is read, and a
refusal such as a missing read permission may be lifted), and logged again only when the outcome
or its reason changes."""


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
                                                        "outcome", "detail", "recorded_at"]).to_pylist()
        deliveries.sort(key=lambda r: r["recorded_at"])  # the latest row of a name is its current state
        return cls(
            exposures={r["file_sha256"]: r for r in exp},
            quarantined={r["file_sha256"]: r for r in quarantine},
            deliveries={(r["night"], r["filename"]): r for r in deliveries},
            fibermap_sha={r["file_sha256"] for r in deliveries if r["outcome"] == "fibermap"},
            versions=versions,
            filenames=filenames,
        )

    def unchanged(self, night: str, name: str, st: os.stat_result) -> bool:
        """Whether ``name`` is a file already read, with the same size and mtime."""
        row = self.deliveries.get((night, name))
        return (row is not None and row["outcome"] in FINAL_OUTCOMES and row["file_size"] == st.st_size
                and row["mtime_ns"] == st.st_mtime_ns)

    def logged(self, night: str, name: str, outcome: str, detail: str) -> bool:
        """Whether the latest ``deliveries`` row of ``name`` already says ``outcome`` for the same reason."""
        row = self.deliveries.get((night, name))
        return row is not None and row["outcome"] == outcome and row["detail"] == detail


def _delivery(night: str, name: str, sha: str, st: os.stat_result, outcome: str, detail: str) -> dict:
    return {"night": night, "filename": name, "file_sha256": sha, "file_size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "outcome": outcome, "detail": detail, "recorded_at": _now()}


def _known_outcome(state: LakeState, name: str, sha: str) -> tuple[str, str] | None:
    """Outcome of bytes the lake already holds: the original delivery itself, or a duplicate."""
    if sha in state.exposures:
        row = state.exposures[sha]
        where = f"{row['raw_path']} (expid {row['expid']} {row['camera']} v{row['file_version']})"
        if row["filename"] == name:
            return ("ingested" if row["file_version"] == 1 else "new_version"), where
        return "duplicate", f"same bytes as {row['filename']}: {where}"
    if sha in state.quarantined:
        row = state.quarantined[sha]
        if row["filename"] == name:
            return "quarantined", row["reason"]
        return "duplicate", f"same bytes as quarantined {row['filename']}: {row['reason']}"
    if sha in state.fibermap_sha:
        return "duplicate", "same bytes as an ingested fiber map"
    return None


# --- the instrument of the lake ---------------------------------------------------------------
def resolve_instrument(lake: Lake, instrument: str | None = None) -> tuple[str, bool]:
    """The lake's instrument name and whether the lake already exists; writes nothing.

    Commands check this before taking the writer lock, so that a refused writer creates nothing.

    Raises
    ------
    LakeError
        As :func:`declare_instrument`.
    """
    held = lake.describe().get("instrument")
    if held:
        if instrument and instrument != held:
            raise LakeError(f"the lake at {lake.root} holds instrument {held!r}; it cannot take {instrument!r}")
        return held, True
    name = instrument or os.environ.get(INSTRUMENT_ENV, "").strip()
    if not name:
        raise LakeError(f"there is no lake at {lake.root} yet: declare its instrument with --instrument NAME "
                        f"(one of {', '.join(sorted(INSTRUMENTS))}) or {INSTRUMENT_ENV}")
    if name not in INSTRUMENTS:
        raise LakeError(f"unknown instrument {name!r}; known: {', '.join(sorted(INSTRUMENTS))}")
    return name, False


def declare_instrument(lake: Lake, instrument: str | None = None) -> Instrument:
    """The lake's instrument: the one ``lake.json`` holds, or the declared one for a new lake.

    A new lake is created for ``instrument``, else for ``$FIBERLAKE_INSTRUMENT``; it is never
    guessed from the frames.

    Raises
    ------
    LakeError
        If the lake holds another instrument than ``instrument``, the name is unknown, or a new
        lake has no declared instrument.
    """
    name, held = resolve_instrument(lake, instrument)
    if held:
        return get_instrument(name)
    lake.ensure(name)
    return get_instrument(name)


def _named_instrument(entry: Entry) -> str | None:
    """``INSTRUME`` of a frame delivery when it names a known instrument (None otherwise)."""
    try:
        data = frame_bytes(read_delivery(entry)[0])
        with catch_warnings():
            with fits.open(io.BytesIO(data), memmap=False) as hdul:
                name = image_hdu(hdul).header.get("INSTRUME")
    except Exception:  # unreadable: the reader refuses it later with the reason
        return None
    name = name.strip() if isinstance(name, str) else None
    return name if name in INSTRUMENTS else None


def _batch_instrument(lake: Lake, instrument: str | None, entries: list[Entry]) -> Instrument | None:
    """Instrument for a batch: held or declared; for a library call on a new lake without a
    declaration, the one instrument every frame of the batch names (the CLI always declares)."""
    held = lake.describe().get("instrument")
    if held or instrument or os.environ.get(INSTRUMENT_ENV, "").strip():
        return declare_instrument(lake, instrument)
    named = {n for n in (_named_instrument(e) for e in entries if e.kind == "frame") if n}
    if len(named) > 1:
        raise LakeError(f"the frames name several instruments ({', '.join(sorted(named))}) and the lake at "
                        f"{lake.root} has none declared: declare it with --instrument NAME or {INSTRUMENT_ENV}")
    return declare_instrument(lake, named.pop()) if named else None


# --- one batch ---------------------------------------------------------------------------------
PREFETCH = 3
"""Files inspected ahead of the one being published (bounds the frames held in memory)."""
INSPECT_THREADS = 2
"""Threads reading, hashing, validating and pre-processing for typing the next files while the
current one is compressed and published (numpy, hashlib and blosc release the GIL)."""


@dataclass
class _Inspected:
    """A delivered file after reading, hashing and validating (the parallel part of ingest).

    ``data`` keeps the delivered bytes until the file is taken: a frame refused only then (another
    instrument, a conflicting exposure id) is quarantined from the very bytes that were hashed.
    """

    st: os.stat_result
    sha: str = ""
    data: bytes | None = None
    frame: RawFrame | None = None
    pixel_sha: str | None = None
    fibermap: list[dict] | None = None
    rejected: FrameRejected | None = None
    refused: DeliveryRefused | None = None
    prepared: object | None = None
    """The frame's typing input (:meth:`IngestTyper.prepare`), computed on the reading thread."""


def _inspect(entry: Entry, instrument: Instrument | None, state: LakeState, night: str,
             typing: IngestTyper | None = None) -> _Inspected:
    """Read a file once, hash it and, unless its bytes are known, validate it as a frame or fiber map
    (and pre-process a frame for ``typing``)."""
    digest = hashlib.sha256()
    try:
        data, st = read_delivery(entry, digest=digest)          # hashed while read: one pass
    except DeliveryRefused as refused:
        return _Inspected(st=entry.st, refused=refused)
    seen = _Inspected(st=st, sha=digest.hexdigest(), data=data)
    if _known_outcome(state, entry.name, seen.sha) is not None:
        seen.data = None
        return seen
    try:
        if entry.kind == "fibermap":
            seen.fibermap = read_fibermap(data, night, instrument, name=entry.name)
            conform("fibermap", seen.fibermap)
        else:
            seen.frame = read_frame(data, instrument)
            seen.pixel_sha = pixel_sha256(seen.frame.pixels)
    except FrameRejected as rejected:
        seen.rejected = rejected
    except MemoryError:
        raise  # the machine, not the file: stop, a re-run resumes
    except Exception as err:  # a reader bug or a value no column holds must cost one file, not the night
        seen.rejected = FrameRejected("unreadable", f"unexpected {type(err).__name__} reading the file: {str(err)[:200]}")
    if seen.frame is not None and typing is not None:
        try:
            seen.prepared = typing.prepare(seen.frame.pixels, saturation=float(seen.frame.header.get("SATURATE", 65535)))
        except MemoryError:
            raise
        except Exception:  # not the file's fault: _take prepares it again, where an error surfaces as before
            seen.prepared = None
    return seen


@dataclass
class _Batch:
    """Rows of one batch, committed together at its end."""

    exposures: list[dict] = field(default_factory=list)
    typing: IngestTyper | None = None
    quarantine: list[dict] = field(default_factory=list)
    deliveries: list[dict] = field(default_factory=list)
    fibermaps: dict[tuple[str, int], list[dict]] = field(default_factory=dict)


def _log_unread(night: str, entry: Entry, outcome: str, reason: str, state: LakeState, report: IngestReport,
                batch: _Batch) -> None:
    """Record an entry that is not read (refused or ignored), once per outcome and reason."""
    (report.refused if outcome == "refused" else report.ignored).append((entry.name, reason))
    if not state.logged(night, entry.name, outcome, reason):
        row = _delivery(night, entry.name, "", entry.st, outcome, reason)
        batch.deliveries.append(row)
        state.deliveries[(night, entry.name)] = row


def _take(lake: Lake, night: str, entry: Entry, seen: _Inspected, instrument: Instrument | None, state: LakeState,
          report: IngestReport, batch: _Batch) -> None:
    """Decide what an inspected file is (in delivery order) and publish its pixels."""
    name = entry.name
    if seen.refused is not None:
        _log_unread(night, entry, "refused", seen.refused.reason, state, report, batch)
        return
    st, sha = seen.st, seen.sha
    known = _known_outcome(state, name, sha)
    if known is not None:
        report.duplicates.append(name)
        logged = state.deliveries.get((night, name))
        if logged is None or logged["file_sha256"] != sha or logged["outcome"] not in FINAL_OUTCOMES:
            batch.deliveries.append(_delivery(night, name, sha, st, *known))
        return

    def refuse(rejected: FrameRejected) -> None:
        rel = lake.quarantine_relpath(night, sha, name)
        keep_copy(lake.root, rel, seen.data, copy_mode(st.st_mode))
        row = {"night": night, "filename": name, "file_sha256": sha, "file_size": st.st_size,
               "reason": rejected.reason, "error_class": rejected.error_class, "stored_path": rel,
               "quarantined_at": _now()}
        batch.quarantine.append(row)
        state.quarantined[sha] = row
        batch.deliveries.append(_delivery(night, name, sha, st, "quarantined", rejected.reason))
        report.quarantined.append((name, rejected.reason))

    if seen.rejected is not None:
        refuse(seen.rejected)
        return
    if seen.fibermap is not None:
        rows = seen.fibermap
        batch.fibermaps[(rows[0]["night"], rows[0]["expid"])] = rows
        state.fibermap_sha.add(sha)
        batch.deliveries.append(_delivery(night, name, sha, st, "fibermap",
                                          f"{len(rows)} fibers of expid {rows[0]['expid']} ({rows[0]['night']})"))
        report.fibermaps.append(name)
        return
    frame = seen.frame
    key = (frame.night, frame.expid, frame.camera)
    holder = state.filenames.get(key)
    version = state.versions.get(key, 0) + 1
    try:
        if instrument is None or frame.instrument.name != instrument.name:
            raise FrameRejected("wrong_instrument", f"frame is from {frame.instrument.name!r} but the lake holds "
                                                    f"{instrument.name if instrument else 'no declared instrument'!r}")
        if holder is not None and holder != name:
            raise FrameRejected(
                "duplicate_expid",
                f"exposure {frame.expid} camera {frame.camera} of {frame.night} is already in the lake from "
                f"{holder} with other bytes; a corrected file must keep the original name to become a new version",
            )
        relpath = lake.raw_relpath(frame.night, frame.expid, frame.camera, version)
        cards = header_to_json(frame.header)
        row = _exposure_row(frame, name, sha, st.st_size, version, relpath, seen.pixel_sha, json.dumps(cards))
        conform("exposures", [row])  # a value no column holds refuses this file before anything is written
    except FrameRejected as rejected:
        refuse(rejected)
        return
    except (ValueError, TypeError, OverflowError) as err:
        refuse(FrameRejected("bad_keyword", f"a header value does not fit the exposures table: {str(err)[:200]}"))
        return
    attrs = {"header": cards, "filename": name, "file_sha256": sha, "file_version": version}
    write_raw_frame(lake.root, relpath, frame.pixels, attrs, digest=seen.pixel_sha)
    if batch.typing is not None:
        batch.typing.add(frame.pixels, None if frame.obstype == "UNKNOWN" else frame.obstype,
                         {"night": frame.night, "expid": frame.expid, "camera": frame.camera, "file_version": version,
                          "pixel_sha256": seen.pixel_sha},
                         saturation=float(frame.header.get("SATURATE", 65535)), prepared=seen.prepared)
    state.versions[key] = version
    state.filenames[key] = name
    state.exposures[sha] = row
    batch.exposures.append(row)
    detail = f"{relpath} (expid {frame.expid} {frame.camera} v{version})"
    batch.deliveries.append(_delivery(night, name, sha, st, "ingested" if version == 1 else "new_version", detail))
    report.ingested.append(name)


def _entries(files: list[Path]) -> list[Entry]:
    """Classify the given files of a night directory; links last, each group in name order."""
    entries = []
    for path in files:
        try:
            entries.append(classify(Path(path)))
        except FileNotFoundError:
            continue
    return sorted(entries, key=delivery_order)


def ingest_files(lake: Lake, files: list[Path], night: str, *, progress: bool = False,
                 instrument: str | None = None, typing: TypingParams | None = None) -> IngestReport:
    """Ingest the given delivered files of one night directory in one batch.

    The batch reads what the lake holds once, publishes pixel arrays one by one, then commits
    ``exposures``, ``quarantine``, the fiber maps and last the ``deliveries`` log, each in one
    commit tagged with an application transaction. Run it under the lake's writer lock
    (:class:`~fiberlake.storage.lock.LakeLock`); the jobs and the CLI do.

    Parameters
    ----------
    lake : Lake
        Destination lake.
    files : list of Path
        Entries of the night directory: complete files (see :mod:`fiberlake.ingest.arrival`),
        and entries that are only logged (links, other extensions, sub-directories).
    night : str
        Night of the delivery directory (its name), used for quarantine and the delivery log.
    progress : bool
        Show a progress bar.
    instrument : str, optional
        Instrument of a new lake (see :func:`declare_instrument`); an existing lake keeps its own.
        A library call on a new lake without one takes the instrument every frame of the batch
        names, and refuses a batch whose frames name several.
    typing : TypingParams, optional
        Frame typing from the pixels (seed 001): every ingested frame gets a ``frames`` row whose
        ``type_used`` the calibration sets and reductions act on. Default: the shipped model.

    Returns
    -------
    IngestReport

    Raises
    ------
    LakeError
        If the lake holds another instrument than ``instrument``, or a new lake's is unclear.
    """
    entries = _entries(files)
    inst = _batch_instrument(lake, instrument, entries)
    tables = TableStore(lake.root / "tables")
    state = LakeState.read(tables)
    report = IngestReport()
    batch = _Batch(typing=IngestTyper.load(lake, typing) if inst is not None else None)
    pending: list[Entry] = []
    for entry in entries:
        if not entry.candidate:
            _log_unread(night, entry, entry.kind, entry.reason, state, report, batch)
        elif state.unchanged(night, entry.name, entry.st):
            report.duplicates.append(entry.name)
        else:
            pending.append(entry)
    ahead: deque[tuple[Entry, Future]] = deque()
    with ThreadPoolExecutor(max_workers=INSPECT_THREADS, thread_name_prefix="fiberlake-ingest") as pool:
        # Reading, hashing, FITS decoding and typing's pre-processing of the next files overlap with
        # the compression and publication of the current one (all release the GIL); files are
        # taken in delivery order whatever order their inspections finish in.
        def refill() -> None:
            while pending and len(ahead) < PREFETCH:
                entry = pending.pop(0)
                ahead.append((entry, pool.submit(_inspect, entry, inst, state, night, batch.typing)))

        bar = tqdm(total=len(pending), desc=f"ingest {night}", unit="file", disable=not progress)
        refill()
        while ahead:
            entry, future = ahead.popleft()
            seen = future.result()
            refill()
            bar.update(1)
            _take(lake, night, entry, seen, inst, state, report, batch)
        bar.close()
    report.duplicates.sort()

    def txn(name: str) -> Txn:
        return Txn(APP_ID, (tables.committed_version(name, APP_ID) or 0) + 1)

    frames = batch.typing.rows() if batch.typing is not None else []
    if frames:  # before exposures: a crash between the two re-ingests (and re-types) the frames
        tables.replace_keys("frames", frames, [{k: row[k] for k in ("night", "expid", "camera", "file_version")}
                                               for row in frames])
    if batch.exposures:
        tables.append("exposures", batch.exposures, txn=txn("exposures"))
    if batch.quarantine:
        tables.append("quarantine", batch.quarantine, txn=txn("quarantine"))
    if batch.fibermaps:  # one commit: every delivered map replaces its exposure's rows, nothing else
        tables.replace_keys("fibermap", [row for rows in batch.fibermaps.values() for row in rows],
                            [{"night": night_, "expid": expid} for night_, expid in batch.fibermaps])
    if batch.deliveries:
        tables.append("deliveries", batch.deliveries, txn=txn("deliveries"))
    return report


def list_delivered(night_dir: Path) -> list[Path]:
    """Every entry of ``night_dir``: frames and fiber maps, and what is only logged (links,
    other extensions, sub-directories such as ``truth/``); see :func:`~fiberlake.ingest.delivery.scan_night`."""
    return [entry.path for entry in scan_night(Path(night_dir))]


def _settled(path: Path) -> tuple[bool, str]:
    return True, ""


def split_ready(tracker: ArrivalTracker, entries: list[Entry]) -> tuple[list[Path], dict[Path, str]]:
    """Entries to hand to :func:`ingest_files` now, and those still being written.

    Frames and fiber maps must be complete and settled (:class:`ArrivalTracker`); ignored files
    must be settled (a temporary file of a copy in progress is not logged); refused entries and
    directories are handed over at once (nothing of them is read).
    """
    candidates = [e.path for e in entries if e.candidate]
    logged_files = [e.path for e in entries if e.kind == "ignored" and e.source == e.path]
    ready, waiting = tracker.poll(candidates)
    ready_logged, waiting_logged = tracker.poll(logged_files, structure=_settled)
    logged = set(logged_files)
    at_once = [e.path for e in entries if not e.candidate and e.path not in logged]
    return ready + ready_logged + at_once, waiting | waiting_logged


def ingest_night(
    lake: Lake,
    night_dir: str | os.PathLike,
    *,
    progress: bool = False,
    settle: float = 0.0,
    lock: bool = True,
    instrument: str | None = None,
    typing: TypingParams | None = None,
) -> IngestReport:
    """Ingest every raw frame and fiber map in ``night_dir`` that the lake does not hold yet.

    Parameters
    ----------
    lake : Lake
        Destination lake.
    night_dir : path
        Directory of delivered files; every entry is looked at and logged in ``deliveries``.
    progress : bool
        Show a progress bar.
    settle : float
        Files changed less than ``settle`` seconds ago, or structurally incomplete and changed
        less than ``settle`` seconds ago, are left for a later run (reported in ``waiting``):
        they are still being written. An incomplete file older than that is quarantined as
        truncated.
    lock : bool
        Take the lake's writer lock (callers that already hold it pass False).
    instrument : str, optional
        Instrument of a new lake (see :func:`declare_instrument`); an existing lake keeps its own.
    typing : TypingParams, optional
        Frame typing from the pixels (see :func:`ingest_files`).

    Returns
    -------
    IngestReport
    """
    night_dir = Path(night_dir)
    if not night_dir.is_dir():
        raise FileNotFoundError(f"night directory {night_dir} does not exist")
    tracker = ArrivalTracker(settle=settle, stale_after=settle)
    ready, waiting = split_ready(tracker, scan_night(night_dir))
    with LakeLock(lake.root, "ingest") if lock else nullcontext():
        remove_stale_temporaries(lake.root)
        report = ingest_files(lake, ready, night_of_dir(night_dir), progress=progress, instrument=instrument,
                              typing=typing)
    report.waiting = [(p.name, why) for p, why in waiting.items()]
    return report
