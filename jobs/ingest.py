"""Ingest job: a night directory of raw FITS into the lake, incrementally and idempotently.

A frame's identity is the SHA-256 of its bytes. A file whose bytes are already in
``exposures`` (under any name) or already in ``quarantine`` is skipped; a *different* file for
an existing (night, expid, camera) becomes a new ``file_version`` and is stored beside the old
one, never over it. Refused files are copied under ``quarantine/`` with a row giving the reason,
and the rest of the night still lands. Pixels are published (atomic rename) before the table
rows that reference them are committed, so a crash leaves at worst an unreferenced array that a
re-run adopts (same pixels) instead of duplicating.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from tqdm import tqdm

from fiberlake.ingest.fibermap import is_fibermap, read_fibermap
from fiberlake.ingest.fitsreader import FrameRejected, RawFrame, read_frame, sha256_file
from fiberlake.schemas.header import NIGHT_PATTERN
from fiberlake.schemas.instrument import get_instrument
from fiberlake.storage.layout import Lake
from fiberlake.storage.rawstore import remove_stale_temporaries, write_raw_frame
from fiberlake.storage.tables import TableStore


@dataclass
class IngestReport:
    """What one ingest run did."""

    ingested: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    fibermaps: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for people."""
        return (
            f"{len(self.ingested)} frames ingested, {len(self.duplicates)} already in the lake, "
            f"{len(self.quarantined)} quarantined, {len(self.fibermaps)} fiber maps"
        )


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
    dest = lake.root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
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


def ingest_night(lake: Lake, night_dir: str | os.PathLike, *, progress: bool = False) -> IngestReport:
    """Ingest every raw frame and fiber map in ``night_dir`` that the lake does not hold yet.

    Parameters
    ----------
    lake : Lake
        Destination lake; created on first use for the instrument of the first valid frame.
    night_dir : path
        Directory of delivered ``*.fits`` files (sub-directories such as ``truth/`` are ignored).
    progress : bool
        Show a progress bar.

    Returns
    -------
    IngestReport
    """
    night_dir = Path(night_dir)
    if not night_dir.is_dir():
        raise FileNotFoundError(f"night directory {night_dir} does not exist")
    tables = TableStore(lake.root / "tables")
    remove_stale_temporaries(lake.root)
    dir_night = _night_of_dir(night_dir)
    instrument = get_instrument(lake.instrument) if lake.describe() else None

    known = tables.read("exposures", columns=["night", "expid", "camera", "file_version", "file_sha256"]).to_pylist()
    known_sha = {row["file_sha256"] for row in known}
    versions: dict[tuple, int] = {}
    for row in known:
        key = (row["night"], row["expid"], row["camera"])
        versions[key] = max(versions.get(key, 0), row["file_version"])
    quarantined_sha = set(tables.read("quarantine", columns=["file_sha256"]).column("file_sha256").to_pylist())

    report = IngestReport()
    exposure_rows: list[dict] = []
    quarantine_rows: list[dict] = []
    fibermap_rows: dict[tuple[str, int], list[dict]] = {}
    files = sorted(p for p in night_dir.iterdir() if p.is_file() and p.suffix.lower() == ".fits")
    for path in tqdm(files, desc=f"ingest {night_dir.name}", unit="file", disable=not progress):
        sha, size = sha256_file(path)
        if sha in known_sha or sha in quarantined_sha:
            report.duplicates.append(path.name)
            continue
        if is_fibermap(path):
            try:
                rows = read_fibermap(path, dir_night)
            except FrameRejected as rejected:
                quarantine_rows.append(_quarantine(lake, dir_night, path, sha, size, rejected))
                quarantined_sha.add(sha)
                report.quarantined.append((path.name, rejected.reason))
                continue
            if rows:
                fibermap_rows[(rows[0]["night"], rows[0]["expid"])] = rows
            report.fibermaps.append(path.name)
            continue
        try:
            frame = read_frame(path, instrument)
            if instrument is None:
                instrument = frame.instrument
                lake.ensure(instrument.name)
            key = (frame.night, frame.expid, frame.camera)
            version = versions.get(key, 0) + 1
            relpath = lake.raw_relpath(frame.night, frame.expid, frame.camera, version)
            cards = header_to_json(frame.header)
            attrs = {"header": cards, "filename": path.name, "file_sha256": sha, "file_version": version}
            pixel_sha = write_raw_frame(lake.root, relpath, frame.pixels, attrs)
        except FrameRejected as rejected:
            quarantine_rows.append(_quarantine(lake, dir_night, path, sha, size, rejected))
            quarantined_sha.add(sha)
            report.quarantined.append((path.name, rejected.reason))
            continue
        versions[key] = version
        known_sha.add(sha)
        exposure_rows.append(_exposure_row(frame, path, sha, size, version, relpath, pixel_sha, json.dumps(cards)))
        report.ingested.append(path.name)

    if exposure_rows:
        tables.append("exposures", exposure_rows)
    if quarantine_rows:
        tables.append("quarantine", quarantine_rows)
    for (night, expid), rows in fibermap_rows.items():
        tables.replace("fibermap", rows, f"night = '{night}' AND expid = {int(expid)}")
    return report
