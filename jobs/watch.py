"""``fiberlake watch``: take each frame of a night as it lands, reduce science as soon as it can be.

One cycle every ``poll`` seconds:

1. list the night directory; files already handled in this session (same name, size and mtime)
   are not looked at again, and files handled by earlier sessions are recognised from the
   ``deliveries`` log without being read;
2. :class:`~fiberlake.ingest.arrival.ArrivalTracker` keeps back files still being written;
3. the complete ones are ingested in one batch (:func:`~fiberlake.jobs.ingest.ingest_files`);
4. the nights that received frames are processed incrementally
   (:func:`~fiberlake.jobs.process.process_night`): every science frame whose camera has a
   calibration set (the night's own, built as soon as its bias, flat and arc are in, or the
   nearest earlier night's) is reduced, and its spectra are queryable when its ``reductions``
   row is committed.

The watcher holds the lake's writer lock for its whole life. SIGINT and SIGTERM stop it between
two steps (after the frame being reduced), never inside a commit; ``once`` runs one cycle over
what is there and returns.
"""

from __future__ import annotations

import datetime as dt
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from fiberlake.ingest.arrival import ArrivalTracker
from fiberlake.jobs.ingest import IngestReport, _night_of_dir, ingest_files, list_delivered
from fiberlake.jobs.process import ProcessReport, process_night
from fiberlake.processors.pipeline import ReductionParams
from fiberlake.storage.layout import Lake
from fiberlake.storage.lock import LakeLock
from fiberlake.storage.rawstore import remove_stale_temporaries
from fiberlake.storage.tables import TableStore


@dataclass
class WatchReport:
    """What a watch session did."""

    cycles: int = 0
    ingest: IngestReport = field(default_factory=IngestReport)
    reduced: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    waiting: list[tuple[str, str]] = field(default_factory=list)
    stopped_by: str = ""

    def summary(self) -> str:
        """One line for people."""
        text = f"{self.cycles} cycles: {self.ingest.summary()}; {len(self.reduced)} frames reduced"
        if self.failed:
            text += f", {len(self.failed)} failed"
        if self.waiting:
            text += f"; left for later (still being written): {', '.join(n for n, _ in self.waiting)}"
        return text + (f"; stopped by {self.stopped_by}" if self.stopped_by else "")


def _nights_of(lake: Lake, filenames: list[str]) -> list[str]:
    """Nights (from the frames' headers) of the frames ingested under ``filenames``."""
    if not filenames:
        return []
    rows = TableStore(lake.root / "tables").scan("exposures").filter(pl.col("filename").is_in(filenames))
    return sorted(rows.select("night").unique().collect()["night"].to_list())


def watch_night(
    lake: Lake,
    night_dir: str | Path,
    *,
    poll: float = 2.0,
    settle: float = 1.0,
    stale_after: float = 300.0,
    process: bool = True,
    config: ReductionParams | None = None,
    once: bool = False,
    stop: threading.Event | None = None,
    log: Callable[[str], None] | None = None,
    max_cycles: int | None = None,
) -> WatchReport:
    """Watch ``night_dir`` and bring every frame that lands into the lake (see the module docstring).

    Parameters
    ----------
    lake : Lake
        Destination lake.
    night_dir : path
        The directory the acquisition system writes the night's frames into.
    poll : float
        Seconds between two looks at the directory.
    settle : float
        Seconds a file must stay unchanged before it is taken.
    stale_after : float
        Seconds after which an unchanged, structurally incomplete file is taken (and quarantined
        as truncated) instead of waited for.
    process : bool
        Reduce science and standard frames as they become reducible.
    config : ReductionParams, optional
        Reduction parameters.
    once : bool
        Run one cycle and return (files still being written are left for the next run).
    stop : threading.Event, optional
        Set it to stop the loop; SIGINT/SIGTERM set it when called from the main thread.
    log : callable, optional
        Receives one line per cycle that did something.
    max_cycles : int, optional
        Stop after this many cycles (tests, benchmarks).

    Returns
    -------
    WatchReport
    """
    night_dir = Path(night_dir)
    if not night_dir.is_dir():
        raise FileNotFoundError(f"night directory {night_dir} does not exist")
    config = config or ReductionParams()
    stop = stop or threading.Event()
    log = log or (lambda line: None)
    report = WatchReport()
    night = _night_of_dir(night_dir)
    tracker = ArrivalTracker(settle=0.0 if once else settle, stale_after=stale_after)
    handled: dict[str, tuple[int, int]] = {}
    previous = _install_signal_handlers(stop, report)
    try:
        with LakeLock(lake.root, f"watch {night_dir}"):
            remove_stale_temporaries(lake.root)
            pending_nights: set[str] = {night}  # catch up on anything left unreduced by an earlier session
            while not stop.is_set():
                report.cycles += 1
                candidates = []
                for path in list_delivered(night_dir):
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue
                    if handled.get(path.name) != (st.st_size, st.st_mtime_ns):
                        candidates.append(path)
                ready, waiting = tracker.poll(candidates)
                report.waiting = [(p.name, why) for p, why in waiting.items()]
                if ready:
                    batch = ingest_files(lake, ready, night)
                    report.ingest.merge(batch)
                    for path in ready:
                        st = path.stat()
                        handled[path.name] = (st.st_size, st.st_mtime_ns)
                        tracker.forget(path)
                    pending_nights.update(_nights_of(lake, batch.ingested))
                    if batch.ingested or batch.quarantined:
                        log(_stamp(f"ingested {len(batch.ingested)}, quarantined {len(batch.quarantined)}, "
                                   f"known {len(batch.duplicates)}")
                            + "".join(f"\n  quarantined {n}: {why}" for n, why in batch.quarantined))
                if process and pending_nights and lake.describe():
                    for pnight in sorted(pending_nights):
                        if stop.is_set():
                            break
                        try:
                            done = process_night(lake, pnight, config=config, lock=False, stop=stop.is_set)
                        except LookupError:
                            continue  # no frames of that night yet
                        _merge_process(report, done)
                        if done.done or done.failed:
                            log(_stamp(done.summary()))
                    if not stop.is_set():
                        pending_nights.clear()
                if once or (max_cycles is not None and report.cycles >= max_cycles):
                    break
                stop.wait(poll)
    finally:
        _restore_signal_handlers(previous)
    return report


def _merge_process(report: WatchReport, done: ProcessReport) -> None:
    report.reduced.extend(done.done)
    report.failed.update(done.failed)


def _stamp(text: str) -> str:
    return f"{dt.datetime.now():%H:%M:%S} {text}"


def _install_signal_handlers(stop: threading.Event, report: WatchReport) -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):  # noqa: ARG001
        report.stopped_by = signal.Signals(signum).name
        stop.set()

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_signal_handlers(previous: dict) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)
