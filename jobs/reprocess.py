"""``fiberlake reprocess``: every selected exposure again, with the current code and parameters,
into one run id; resumable.

The run id is derived from the release name, the code version and the parameter hash, so
running the same command again (after a crash, a SIGKILL of the driver, a lost node) continues
that run: frames whose ``reductions`` marker already carries the run id are skipped, calibration
sets the run already rebuilt are reused, and everything else is reduced and replaced, never
duplicated. With other code or parameters it is a new run that reduces everything.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl
from tqdm import tqdm

from fiberlake.jobs.process import Executor, config_hash, process_night
from fiberlake.jobs.provenance import code_version
from fiberlake.processors.params import ReductionParams
from fiberlake.schemas.header import SKY_OBSTYPES
from fiberlake.storage.layout import Lake
from fiberlake.storage.lock import LakeLock
from fiberlake.storage.tables import TableStore


@dataclass
class ReprocessReport:
    """Outcome of a reprocessing run."""

    run_id: str
    nights: list[str] = field(default_factory=list)
    done: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for people."""
        text = (f"run {self.run_id}: {len(self.nights)} nights, {self.done} frames reduced, "
                f"{self.skipped} already done by this run, {len(self.failed)} failed in {self.seconds:.0f} s")
        return text


def reprocess_run_id(release: str, config: ReductionParams) -> str:
    """The run id of reprocessing ``release`` with this code and these parameters."""
    digest = hashlib.sha256(f"{code_version()}|{config_hash(config)}".encode()).hexdigest()[:10]
    return f"reprocess-{release}-{digest}"


def select_nights(lake: Lake, nights: list[str] | None) -> list[str]:
    """The nights to reprocess: those given, or every night with science frames."""
    tables = TableStore(lake.root / "tables")
    if not tables.exists("exposures"):
        raise LookupError(f"the lake at {lake.root} holds no exposures")
    have = set(tables.scan("exposures").filter(pl.col("obstype").is_in(list(SKY_OBSTYPES)))
               .select("night").unique().collect()["night"].to_list())
    if nights:
        missing = sorted(set(nights) - have)
        if missing:
            raise LookupError(f"no science frames for nights {', '.join(missing)}")
        return sorted(nights)
    return sorted(have)


def reprocess(
    lake: Lake,
    *,
    release: str = "all",
    nights: list[str] | None = None,
    config: ReductionParams | None = None,
    executor: Executor | None = None,
    progress: bool = False,
    batch_frames: int = 8,
    stop: Callable[[], bool] | None = None,
) -> ReprocessReport:
    """Reduce every science and standard frame of the selected nights again (see the module docstring).

    Parameters
    ----------
    lake : Lake
        The lake.
    release : str
        Name of the data release (part of the run id).
    nights : list of str, optional
        Nights to include; all nights with science frames when omitted.
    config : ReductionParams, optional
        Reduction parameters.
    executor : Executor, optional
        In-process or Ray actors.
    progress : bool
        Show a progress bar over nights (frames done, rate and ETA per night).
    batch_frames : int
        Frames per table commit.
    stop : callable, optional
        Checked between frames; the run can be resumed later.
    """
    from fiberlake.jobs.model_pins import pin_models

    t0 = time.perf_counter()
    with LakeLock(lake.root, f"reprocess {release}"):
        config = pin_models(lake, config or ReductionParams())  # the run id names the exact weights
        run_id = reprocess_run_id(release, config)
        report = ReprocessReport(run_id=run_id)
        selected = select_nights(lake, nights)
        for night in tqdm(selected, desc=f"reprocess {release}", unit="night", disable=not progress):
            result = process_night(lake, night, config=config, progress=progress, lock=False, stop=stop,
                                   executor=executor, batch_frames=batch_frames, run_id=run_id)
            report.nights.append(night)
            report.done += len(result.done)
            report.skipped += result.skipped
            report.failed.update({f"{night}/{k}": v for k, v in result.failed.items()})
            if stop is not None and stop():
                break
    report.seconds = time.perf_counter() - t0
    return report
