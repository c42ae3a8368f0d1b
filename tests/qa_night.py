"""One simulated, reduced mini night shared by the export and QA tests (built once per test session).

Both cameras (b1, r1), two science exposures and a standard exposure, 4 standards per science plate
(so flux calibration, joined spectra and coadds exist), box extraction: about a minute on 2 cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

NIGHT = "2026-12-11"
SEED = 1801


@dataclass(frozen=True)
class ReducedNight:
    """A lake holding one reduced night."""

    lake: object          # fiberlake.storage.layout.Lake
    night: str
    sim: Path             # the simulated night's folder (raw frames and truth)


_BUILT: dict[str, ReducedNight] = {}


def reduced_night(factory: pytest.TempPathFactory) -> ReducedNight:
    """The shared night: simulated, ingested and processed on the first call, the same lake after."""
    if "night" not in _BUILT:
        from fiberlake.ingest.simulate import simulate_night
        from fiberlake.jobs.ingest import ingest_night
        from fiberlake.jobs.process import process_night
        from fiberlake.processors.params import ReductionParams
        from fiberlake.storage.layout import Lake
        from tests.stages import LIGHT_PRODUCTS

        root = factory.mktemp("qa-night")
        simulate_night("mini", NIGHT, root / "sim", seed=SEED, n_bias=1, n_flat=1, n_arc=1, n_science=2, n_standard=1,
                       std_per_spectrograph=4)
        lake = Lake.at(root / "lake")
        ingest_night(lake, root / "sim" / NIGHT, instrument="mini")
        report = process_night(lake, NIGHT, config=ReductionParams().updated({"extractions": ("box",),
                                                                              "cosmics.enabled": False}
                                                                             | LIGHT_PRODUCTS))
        assert not report.failed and not report.products.failed, report.summary()
        _BUILT["night"] = ReducedNight(lake, NIGHT, root / "sim" / NIGHT)
    return _BUILT["night"]
