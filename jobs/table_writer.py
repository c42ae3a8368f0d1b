"""The single writer of a processing run: results in, batched atomic commits out.

Workers (in-process or Ray actors) return :class:`~fiberlake.jobs.reduce_worker.FrameResult`;
only the driver writes tables, through one :class:`BatchWriter`, so commits never race. A batch
of frames becomes one commit per table: ``spectra`` and ``metrics`` rows of the reduced frames
replace those frames' earlier rows of the same extractions (one Delta ``overwrite`` with a predicate built
from the frames' validated keys, :mod:`fiberlake.storage.predicates`), then the ``reductions``
markers (one per frame and extraction) of every frame of the batch are replaced the same way. Each commit
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


def frame_keys(results: list[FrameResult]) -> list[dict]:
    """Key values of the given frames' rows, one per extraction (validated again where the predicate is built)."""
    return [{"night": r.night, "camera": r.camera, "extraction": method, "expid": int(r.expid)}
            for r in results for method in r.methods]


class BatchWriter:
    """Buffers frame results and commits them in batches.

    Parameters
    ----------
    tables : TableStore
        The lake's tables.
    run_id : str
        Run id written in every row, and the application id of the commits.
    config_hashes : dict of str to str
        Per extraction, the hash of every science parameter its spectra depend on (in its markers).
    batch_frames : int
        Frames per commit.
    batch_seconds : float
        A batch older than this is committed even when not full (keeps streaming latency low).
    """

    def __init__(self, tables: TableStore, run_id: str, config_hashes: dict[str, str], *, batch_frames: int = 8,
                 batch_seconds: float = 30.0):
        self.tables, self.run_id, self.config_hashes = tables, run_id, config_hashes
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
        """Commit the buffered results (no-op when empty): the reduced frames' spectra and metrics
        rows of the reduced extractions replace their earlier rows, then every frame's markers."""
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
            keys = frame_keys(done)
            self.tables.replace_keys("spectra", spectra, keys, txn=txn)
            self.tables.replace_keys("metrics", [m | {"run_id": self.run_id} for r in done for m in r.metrics],
                                     keys, txn=txn)
        now = dt.datetime.now(dt.timezone.utc)
        markers = [r.marker | {"extraction": method, "config_hash": self.config_hashes[method],
                               "n_spectra": r.marker["n_spectra"] // len(r.methods), "run_id": self.run_id,
                               "reduced_at": now}
                   for r in batch for method in r.methods]
        self.tables.replace_keys("reductions", markers, frame_keys(batch), txn=txn)
        self.markers.extend(markers)
