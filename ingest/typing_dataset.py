"""A labelled data set for the frame typer (seed 001), simulated in memory.

Every frame is a :func:`~fiberlake.ingest.simulate.simulate_frame` of a known type with a
:class:`~fiberlake.ingest.sim_variety.FrameVariant` and an exposure time drawn by
:func:`~fiberlake.ingest.sim_variety.draw_variant`: the label is the type the frame was made as,
never a header. A *typing night* is one ``(instrument, seed, night, camera)``: one detector, one
set of optics and lamps, several frames of every type. Seeds decide everything, so the split is
by seed:

* :data:`TRAIN_SEEDS` - the seeds training runs draw from;
* :data:`HELDOUT_SEEDS` - seeds no training run uses (held-out nights: other detectors, optics,
  lamps, skies), for validation and test figures.

Nothing here imports :mod:`fiberlake.processors`; the train job pre-processes the frames it gets.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from fiberlake.ingest.sim_params import DEFAULT_PARAMS, SIM_VERSION
from fiberlake.ingest.sim_rng import TAG, rng_for
from fiberlake.ingest.sim_variety import FrameVariant, draw_variant
from fiberlake.ingest.simulate import camera_truth, detector_truth, make_expid, make_fibermap, simulate_frame
from fiberlake.schemas.header import OBSTYPES, SKY_OBSTYPES
from fiberlake.schemas.instrument import get_instrument

CLASSES: tuple[str, ...] = OBSTYPES
"""Frame types the typer learns, in the order of its outputs (bias, dark, flat, arc, science, standard)."""

TRAIN_SEEDS: tuple[int, ...] = tuple(range(1001, 1201))
"""Seeds of training nights (a training run takes the first ones it needs)."""
HELDOUT_SEEDS: tuple[int, ...] = tuple(range(9001, 9101))
"""Seeds of held-out nights: never used by a training run."""


@dataclass(frozen=True)
class NightSpec:
    """One typing night: a camera of an instrument on a night with a seed, and frames per type."""

    instrument: str
    seed: int
    night: str
    camera: str
    per_class: int

    def to_dict(self) -> dict:
        """Plain dict (for model cards)."""
        return {"instrument": self.instrument, "seed": self.seed, "night": self.night, "camera": self.camera,
                "per_class": self.per_class}


@dataclass
class TypedFrame:
    """One simulated frame with its true type."""

    raw: np.ndarray
    label: str
    instrument: str
    seed: int
    night: str
    camera: str
    expid: int
    exptime: float
    variant: FrameVariant
    header: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The variety of the frame (``twilight``, ``moonlit``, ...; see :attr:`FrameVariant.kind`)."""
        return self.variant.kind


def plan_nights(instrument: str, seeds: tuple[int, ...] | list[int], per_class: int,
                cameras: tuple[str, ...] | None = None) -> list[NightSpec]:
    """One typing night per seed: a night date and a camera drawn from the seed.

    Parameters
    ----------
    instrument : str
        ``mini`` or ``lamost``.
    seeds : sequence of int
        One night per seed.
    per_class : int
        Frames of each type in each night.
    cameras : tuple of str, optional
        Cameras to draw from (default: every camera of the instrument, so both arms).
    """
    inst = get_instrument(instrument)
    pool = tuple(cameras) if cameras else tuple(inst.cameras)
    out = []
    for seed in seeds:
        rng = rng_for(int(seed), TAG.TYPING, "night")
        night = (dt.date(2025, 1, 1) + dt.timedelta(days=int(rng.integers(0, 730)))).isoformat()
        out.append(NightSpec(inst.name, int(seed), night, str(pool[int(rng.integers(len(pool)))]), int(per_class)))
    return out


def simulate_night_frames(spec: NightSpec, classes: tuple[str, ...] = CLASSES) -> Iterator[TypedFrame]:
    """Simulate the frames of one typing night, type by type, in memory.

    Each frame draws its exposure time and variant from a stream of ``(seed, night, expid)``,
    so a frame is the same whichever others are simulated. Science and standard frames observe
    a plate of their own (plate number = their sequence number).
    """
    inst = get_instrument(spec.instrument)
    cam = camera_truth(inst, spec.camera, spec.night, spec.seed)
    det = detector_truth(inst, spec.camera, spec.seed)
    seq = 0
    for obstype in classes:
        for _ in range(spec.per_class):
            seq += 1
            expid = make_expid(spec.night, seq)
            rng = rng_for(spec.seed, TAG.TYPING, spec.night, expid)
            exptime, variant = draw_variant(rng, obstype, DEFAULT_PARAMS.flat_peak_adu)
            fibermap = make_fibermap(inst, spec.night, spec.seed, obstype, seq, expid) if obstype in SKY_OBSTYPES else None
            frame = simulate_frame(inst, spec.camera, obstype, night=spec.night, expid=expid, seed=spec.seed,
                                   exptime=exptime, fibermap=fibermap, camera_model=cam, detector=det, variant=variant)
            yield TypedFrame(raw=frame.raw, label=obstype, instrument=inst.name, seed=spec.seed, night=spec.night,
                             camera=spec.camera, expid=expid, exptime=exptime, variant=variant,
                             header={"OBSTYPE": obstype, "EXPTIME": exptime})
    cam.release_kernels()


def iter_frames(specs: list[NightSpec], classes: tuple[str, ...] = CLASSES) -> Iterator[TypedFrame]:
    """Every frame of every typing night, night by night."""
    for spec in specs:
        yield from simulate_night_frames(spec, classes)


def simulator_settings() -> dict:
    """What the data set's frames were made with (for model cards)."""
    return {"sim_version": SIM_VERSION, "sim_params": DEFAULT_PARAMS.to_dict(), "classes": list(CLASSES),
            "variety": "ingest.sim_variety.draw_variant", "train_seeds": [TRAIN_SEEDS[0], TRAIN_SEEDS[-1]],
            "heldout_seeds": [HELDOUT_SEEDS[0], HELDOUT_SEEDS[-1]]}
