"""The single writer of a processing run: results in, batched atomic commits out.

Workers (in-process or Ray actors) return :class:`~fiberlake.jobs.reduce_worker.FrameResult`;
only the driver writes tables, through one :class:`BatchWriter`, so commits never race. A batch
of frames becomes one commit per table: ``spectra`` and ``metrics`` rows of the reduced frames
replace those frames' earlier rows (one Delta ``overwrite`` with a predicate naming the frames),
then the ``reductions`` markers of every frame of the batch are replaced the same way. Each commit
carries the application transaction ``(run_id, batch number)``, checked before writing, so a
retried flush inside a run cannot apply twice; a frame whose marker did not land is reduced
again by the next run, and its rows are replaced, not added.
"""

from __future__ import annotations

import datetime as dt
import time

import pyarrow as pa

from fiberlake.jobs.reduce_worker import FrameResult
from fiberlake.storage.tables import TableStore, Txn


def frames_predicate(results: list[FrameResult]) -> str:
    """SQL predicate selecting the given frames (night, expid and camera were validated at ingest)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for r in results:
        groups.setdefault((r.night, r.camera), []).append(int(r.expid))
    return " OR ".join(
        f"(night = '{night}' AND camera = '{camera}' AND expid IN ({', '.join(str(e) for e in sorted(set(ids)))}))"
        for (night, camera), ids in sorted(groups.items())
    )


class BatchWriter:
    """Buffers frame results and commits them in batches.

    Parameters
    ----------
    tables : TableStore
        The lake's tables.
    run_id : str
        Run id written in every row, and the application id of the commits.
    config_hash : str
        Hash of the run's reduction parameters (in every marker).
    batch_frames : int
        Frames per commit.
    batch_seconds : float
        A batch older than this is committed even when not full (keeps streaming latency low).
    """

    def __init__(self, tables: TableStore, run_id: str, config_hash: str, *, batch_frames: int = 8,
                 batch_seconds: float = 30.0):
        self.tables, self.run_id, self.config_hash = tables, run_id, config_hash
        self.batch_frames, self.batch_seconds = batch_frames, batch_seconds
        self.buffer: list[FrameResult] = []
        self.started = time.monotonic()
        self.batches = 0
        self.markers: list[dict] = []

    def add(self, result: FrameResult) -> None:
        """Queue one frame's result; commit when the batch is full or old."""
        if not self.buffer:
            self.started = time.monotonic()
        self.buffer.append(result)
        if len(self.buffer) >= self.batch_frames or time.monotonic() - self.started >= self.batch_seconds:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered results (no-op when empty)."""
        if not self.buffer:
            return
        batch, self.buffer = self.buffer, []
        self.batches += 1
        txn = Txn(self.run_id, self.batches)
        done = [r for r in batch if r.ok]
        if done:
            spectra = pa.concat_tables([r.spectra for r in done])
            spectra = spectra.set_column(spectra.schema.get_field_index("run_id"), "run_id",
                                         pa.array([self.run_id] * spectra.num_rows, pa.string()))
            predicate = frames_predicate(done)
            self.tables.replace("spectra", spectra, predicate, txn=txn)
            self.tables.replace("metrics", [m | {"run_id": self.run_id} for r in done for m in r.metrics],
                                predicate, txn=txn)
        now = dt.datetime.now(dt.timezone.utc)
        markers = [r.marker | {"config_hash": self.config_hash, "run_id": self.run_id, "reduced_at": now} for r in batch]
        self.tables.replace("reductions", markers, frames_predicate(batch), txn=txn)
        self.markers.extend(markers)
