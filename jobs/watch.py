"""``fiberlake watch``: take each frame of a night as it lands, reduce science as soon as it can be.

One cycle every ``poll`` seconds:

1. list the night directory; files already handled in this session (same name, size and mtime)
   are not looked at again, and files handled by earlier sessions are recognised from the
   ``deliveries`` log without being read;
2. :class:`~fiberlake.ingest.arrival.ArrivalTracker` keeps back files still being written;
3. the complete ones are ingested in one batch (:func:`~fiberlake.jobs.ingest.ingest_files`);
4. the nights that received frames are handed to a reducer thread, which processes them
   incrementally (:func:`~fiberlake.jobs.process.process_night`) while the ingest loop goes on
   taking new frames: every science frame whose camera has a
   calibration set (the night's own, built as soon as its bias, flat and arc are in, or the
   nearest earlier night's) is reduced, and its spectra are queryable when its ``reductions``
   row is committed.

The watcher holds the lake's writer lock for its whole life. SIGINT and SIGTERM stop it between
two steps (after the frame being reduced), never inside a commit; ``once`` runs one cycle over
what is there and returns.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from fiberlake.ingest.arrival import ArrivalTracker
from fiberlake.ingest.delivery import scan_night
from fiberlake.jobs.ingest import IngestReport, night_of_dir, declare_instrument, ingest_files, split_ready
from fiberlake.jobs.process import ProcessReport, process_night
from fiberlake.processors.params import ReductionParams, TypingParams
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
    instrument: str | None = None,
    typing: TypingParams | None = None,
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
    instrument : str, optional
        Instrument of a new lake (see :func:`~fiberlake.jobs.ingest.declare_instrument`); an
        existing lake keeps its own.
    typing : TypingParams, optional
        Frame typing from the pixels at ingest (default: the shipped model).

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
    night = night_of_dir(night_dir)
    tracker = ArrivalTracker(settle=0.0 if once else settle, stale_after=stale_after)
    handled: dict[str, tuple[int, int]] = {}
    previous = _install_signal_handlers(stop, report)
    try:
        with LakeLock(lake.root, f"watch {night_dir}"):
            remove_stale_temporaries(lake.root)
            if instrument or lake.describe():
                declare_instrument(lake, instrument)  # before any frame: a wrong lake fails at once
            reducer = _Reducer(lake, config, stop, report, log) if process else None
            if reducer:
                reducer.wake({night})  # catch up on anything left unreduced by an earlier session
            if reducer and not once:
                reducer.start()
            try:
                while not stop.is_set():
                    report.cycles += 1
                    nights = _ingest_cycle(lake, night_dir, night, tracker, handled, report, log, instrument,
                                           typing)
                    if reducer:
                        reducer.wake(nights)
                        if once:
                            reducer.run_pending()
                    if once or (max_cycles is not None and report.cycles >= max_cycles):
                        break
                    stop.wait(poll)
            finally:
                if reducer and reducer.is_alive():
                    stop.set()
                    reducer.join()
    finally:
        _restore_signal_handlers(previous)
    return report


def _ingest_cycle(lake: Lake, night_dir: Path, night: str, tracker: ArrivalTracker, handled: dict,
                  report: WatchReport, log: Callable[[str], None], instrument: str | None = None,
                  typing: TypingParams | None = None) -> set[str]:
    """Ingest the files that became complete; return the nights of the frames ingested.

    Every entry of the directory is looked at (frames, fiber maps, and what is only logged:
    links, other extensions, sub-directories); one handled in this session is looked at again
    only when its size, mtime or ctime changed (a ``chmod`` that lifts a refusal changes ctime).
    """
    fresh = []
    for entry in scan_night(night_dir):
        if handled.get(entry.name) != _signature(entry.st):
            fresh.append(entry)
    ready, waiting = split_ready(tracker, fresh)
    report.waiting = [(p.name, why) for p, why in waiting.items()]
    if not ready:
        return set()
    batch = ingest_files(lake, ready, night, instrument=instrument, typing=typing)
    report.ingest.merge(batch)
    for entry in fresh:
        if entry.path in waiting:
            continue
        try:
            handled[entry.name] = _signature(os.lstat(entry.path) if entry.source in (None, entry.path)
                                             else os.stat(entry.path))
        except OSError:
            continue
        tracker.forget(entry.path)
    if batch.ingested or batch.quarantined or batch.refused:
        log(_stamp(f"ingested {len(batch.ingested)}, quarantined {len(batch.quarantined)}, "
                   f"refused {len(batch.refused)}, known {len(batch.duplicates)}")
            + "".join(f"\n  quarantined {n}: {why}" for n, why in batch.quarantined)
            + "".join(f"\n  refused {n}: {why}" for n, why in batch.refused))
    return set(_nights_of(lake, batch.ingested))


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


class _Reducer(threading.Thread):
    """Reduces the nights that received frames, beside the ingest loop.

    Ingest writes ``exposures``, ``quarantine``, ``deliveries`` and ``fibermap``; reduction
    writes calibration sets, ``spectra``, ``metrics``, ``reductions`` and ``runs``: no table has
    two writers, so the two loops never race on a commit, and a long reduction does not hold
    back the ingest of the frames landing meanwhile.
    """

    def __init__(self, lake: Lake, config: ReductionParams, stop: threading.Event, report: WatchReport,
                 log: Callable[[str], None]):
        super().__init__(name="fiberlake-reducer", daemon=True)
        self.lake, self.config, self.stop, self.report, self.log = lake, config, stop, report, log
        self.pending: set[str] = set()
        self.lock = threading.Lock()
        self.wakeup = threading.Event()

    def wake(self, nights: set[str]) -> None:
        """Queue nights to (re)consider."""
        if nights:
            with self.lock:
                self.pending |= nights
            self.wakeup.set()

    def run_pending(self) -> None:
        """Reduce every queued night once (incremental: only what is not reduced yet)."""
        with self.lock:
            nights, self.pending = sorted(self.pending), set()
        for pnight in nights:
            if self.stop.is_set() or not self.lake.describe():
                with self.lock:
                    self.pending.add(pnight)  # not done: the next session does it
                continue
            try:
                done = process_night(self.lake, pnight, config=self.config, lock=False, stop=self.stop.is_set)
            except LookupError:
                continue  # no frames of that night yet
            except Exception as err:  # a reduction bug must not end the watch: record and go on
                self.report.failed[pnight] = f"{type(err).__name__}: {err}"
                self.log(_stamp(f"processing {pnight} failed: {type(err).__name__}: {err}"))
                continue
            _merge_process(self.report, done)
            if done.done or done.failed or done.retry:
                self.log(_stamp(done.summary()))

    def run(self) -> None:
        while not self.stop.is_set():
            self.wakeup.wait(0.5)
            if self.wakeup.is_set():
                self.wakeup.clear()
                self.run_pending()


def _merge_process(report: WatchReport, done: ProcessReport) -> None:
    report.reduced.extend(done.done)
    report.failed.update(done.failed)
    report.failed.update({key: f"{error} (environment: retried by the next run)" for key, error in done.retry.items()})


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
