"""Frame typing inside ingest: one model per process, pixels typed while they are in memory, one
``frames`` row per ingested frame (seed 001, :mod:`fiberlake.processors.typing_route`).

:class:`IngestTyper` loads the typing model once (the shipped default, a lake model id or a
folder; CUDA when present) and registers it in the lake's ``models`` table. Without torch, or
with ``typing.enabled`` off, frames are still recorded, typed by their headers alone
(``model_id`` null), so ``frames.type_used`` always exists for the calibration sets.
"""

from __future__ import annotations

import datetime as dt
import json
import warnings
from dataclasses import dataclass, field

import numpy as np

from fiberlake.processors.params import TypingParams
from fiberlake.processors.typing_route import Prepared, prepare_for_typing, type_prepared
from fiberlake.storage.layout import Lake

_LOADED: dict[tuple, object] = {}
"""Typing models already loaded in this process, by (source, device, lake)."""


@dataclass
class IngestTyper:
    """The typing stage of one ingest batch.

    Attributes
    ----------
    params : TypingParams
    typer : FrameTyper or None
        None when typing is off or torch is missing (headers alone).
    note : str
        Why the pixels are not typed, when they are not.
    pending : list
        ``(Prepared, header type, key)`` of the batch's frames.
    """

    params: TypingParams
    typer: object | None = None
    note: str = ""
    pending: list[tuple[Prepared, str | None, dict]] = field(default_factory=list)

    @classmethod
    def load(cls, lake: Lake, params: TypingParams | None = None) -> IngestTyper:
        """The stage for ``lake`` (model loaded once per process and registered in the lake).

        Raises
        ------
        fiberlake.storage.models.ArtifactError, fiberlake.processors.spit.ModelError
            A model file that is missing, truncated or of the wrong shape: a clear error at start.
        """
        params = params or TypingParams()
        if not params.enabled:
            return cls(params, None, "typing is off (--no-typing): frames are typed by their headers")
        try:
            import torch  # noqa: F401
        except ImportError:
            note = "torch is not installed (pip install 'fiberlake[neural]'): frames are typed by their headers"
            warnings.warn(note, RuntimeWarning, stacklevel=2)
            return cls(params, None, note)
        from fiberlake.jobs.train import load_typing_model, register_model
        from fiberlake.storage.models import locate

        key = (params.model, params.device, str(lake.root))
        if key not in _LOADED:
            _LOADED[key] = load_typing_model(params.model, lake.root, device=params.device, batch=params.batch,
                                             cpu_threads=params.cpu_threads)
            source = "shipped" if params.model == "default" else "given"
            register_model(lake, locate(params.model, "typing", lake.root), source=source)
        return cls(params, _LOADED[key])

    @property
    def model_id(self) -> str | None:
        """Id of the typing model (None when frames are typed by their headers)."""
        return getattr(self.typer, "model_id", None)

    def prepare(self, raw: np.ndarray, saturation: float = 65535.0) -> Prepared:
        """Pre-process one frame (pure; ingest calls it on its reading threads, beside the writes)."""
        if self.typer is None:
            return Prepared(None, None)
        return prepare_for_typing(raw, saturation=saturation, channels=self.typer.channels, scalars=self.typer.scalars)

    def add(self, raw: np.ndarray | None, header_type: str | None, key: dict, saturation: float = 65535.0,
            prepared: Prepared | None = None) -> None:
        """Keep one frame for typing: its :meth:`prepare` result (136 kB), computed now unless given."""
        self.pending.append((prepared if prepared is not None else self.prepare(raw, saturation), header_type, key))

    def rows(self) -> list[dict]:
        """``frames`` rows of the frames added so far (one forward pass per ``typing.batch``)."""
        if not self.pending:
            return []
        p = self.params
        prepared, headers, keys = zip(*self.pending)
        rows = type_prepared(self.typer, list(prepared), list(headers), list(keys), routing=p.routing,
                             min_flips=p.min_flips, min_confidence=p.min_confidence, super_majority=p.super_majority)
        now = dt.datetime.now(dt.timezone.utc)
        return [row | {"typed_at": now} for row in rows]


def retype_night(lake: Lake, night: str, params: TypingParams | None = None, *, lock: bool = True) -> dict[str, int]:
    """Type every frame of ``night`` again (e.g. with a new model) and replace its ``frames`` rows.

    A frame whose ``type_used`` changes changes the inputs, and so the ``calib_id``, of its
    camera's calibration set: the next ``process`` rebuilds that set and reduces its frames
    again, and nothing else.

    Returns
    -------
    dict
        ``frames`` typed and ``changed`` (type_used differs from before).
    """
    from contextlib import nullcontext

    import polars as pl

    from fiberlake.storage.lock import LakeLock
    from fiberlake.storage.rawstore import read_raw_frame
    from fiberlake.storage.tables import TableStore

    tables = TableStore(lake.root / "tables")
    with LakeLock(lake.root, f"retype {night}") if lock else nullcontext():
        exposures = tables.scan("exposures").filter(pl.col("night") == night).collect()
        if exposures.is_empty():
            raise LookupError(f"the lake has no frames for night {night}")
        before = {(r["expid"], r["camera"], r["file_version"]): r["type_used"]
                  for r in tables.scan("frames").filter(pl.col("night") == night).collect().iter_rows(named=True)}
        stage = IngestTyper.load(lake, params)
        for exp in exposures.sort(["expid", "camera", "file_version"]).iter_rows(named=True):
            header = {card[0]: card[1] for card in json.loads(exp["header_json"])}
            stage.add(read_raw_frame(lake.root, exp["raw_path"]), None if exp["obstype"] == "UNKNOWN" else exp["obstype"],
                      {k: exp[k] for k in ("night", "expid", "camera", "file_version", "pixel_sha256")},
                      saturation=float(header.get("SATURATE", 65535)))
        rows = stage.rows()
        tables.replace_keys("frames", rows, [{k: row[k] for k in ("night", "expid", "camera", "file_version")}
                                             for row in rows])
    changed = sum(before.get((r["expid"], r["camera"], r["file_version"])) != r["type_used"] for r in rows)
    return {"frames": len(rows), "changed": int(changed)}
