"""Frame typing inside ingest: wrong and missing header types are caught before they reach a calibration set."""

from __future__ import annotations

import shutil

import polars as pl
import pytest
from astropy.io import fits

from fiberlake.ingest.simulate import simulate_night
from fiberlake.jobs.calibrations import calibration_sources
from fiberlake.jobs.ingest import ingest_night
from fiberlake.jobs.process import latest_exposures
from fiberlake.jobs.query import scan_tables
from fiberlake.jobs.typing_stage import retype_night
from fiberlake.processors.params import TypingParams
from fiberlake.storage.layout import Lake
from fiberlake.storage.tables import TableStore

pytestmark = pytest.mark.slow  # simulates a night and runs the typing network at ingest

NIGHT = "2026-11-29"


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """The same held-out night twice: as delivered, and with a bias labelled ARC and an arc without OBSTYPE."""
    root = tmp_path_factory.mktemp("typing")
    simulate_night("mini", NIGHT, root / "good", seed=9097, n_bias=2, n_flat=1, n_arc=1, n_science=1, n_standard=0,
                   cameras=["b1"])
    bad = root / "bad" / NIGHT
    shutil.copytree(root / "good" / NIGHT, bad)
    frames = {fits.getheader(p)["OBSTYPE"]: p for p in sorted(bad.glob("fl-*.fits"))}
    with fits.open(frames["BIAS"], mode="update") as hdul:
        hdul[0].header["OBSTYPE"] = "ARC"  # typed by hand, wrongly
    with fits.open(frames["ARC"], mode="update") as hdul:
        del hdul[0].header["OBSTYPE"]  # lost
    return root / "good" / NIGHT, bad


def _lake(tmp_path, night_dir, typing=None) -> Lake:
    lake = Lake.at(tmp_path / "lake")
    ingest_night(lake, night_dir, instrument="mini", typing=typing)
    return lake


def test_wrong_and_missing_header_types_are_routed_by_the_pixels(nights, tmp_path):
    good, bad = nights
    lake_good = _lake(tmp_path / "g", good)
    lake_bad = _lake(tmp_path / "b", bad)
    frames = scan_tables(lake_bad)["frames"].collect().sort("expid")
    assert frames.height == 5 and frames["model_id"].null_count() == 0
    flags = dict(zip(frames["type_flag"].to_list(), frames["type_used"].to_list()))
    assert flags.get("header_overridden") == "BIAS" and flags.get("header_missing") == "ARC"
    # the calibration inputs of the bad night equal those of the good one: same set, same calib_id
    sources_bad = calibration_sources(latest_exposures(TableStore(lake_bad.root / "tables"), NIGHT))
    sources_good = calibration_sources(latest_exposures(TableStore(lake_good.root / "tables"), NIGHT))
    assert {k: [s[0] for s in v] for k, v in sources_bad.items()} == {k: [s[0] for s in v] for k, v in sources_good.items()}
    # the header rules alone would have put a bias into the master arc and lost the arc
    header_only = _lake(tmp_path / "h", bad, TypingParams(routing="header"))
    sources_header = calibration_sources(latest_exposures(TableStore(header_only.root / "tables"), NIGHT))
    assert len(sources_header["ARC"]) == 1 and sources_header["ARC"] != sources_good["ARC"]
    assert len(sources_header["BIAS"]) == 1
    # typed again with the routing rule: the two frames change type and the inputs become the good night's
    assert retype_night(header_only, NIGHT, TypingParams()) == {"frames": 5, "changed": 2}
    sources_retyped = calibration_sources(latest_exposures(TableStore(header_only.root / "tables"), NIGHT))
    assert sources_retyped == sources_bad


def test_typing_off_records_header_types(nights, tmp_path):
    good, _ = nights
    lake = _lake(tmp_path, good, TypingParams(enabled=False))
    frames = scan_tables(lake)["frames"].collect()
    assert frames.height == 5 and frames["model_id"].null_count() == 5
    assert (frames["type_used"] == frames["type_header"]).all()
    assert scan_tables(lake)["models"].collect().height == 0


def test_a_bad_model_file_is_a_clear_error_at_start(nights, tmp_path):
    good, _ = nights
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "card.json").write_text("{}")
    with pytest.raises(Exception, match=r"(?i)weights|card|missing|model"):
        _lake(tmp_path, good, TypingParams(model=str(broken)))
    assert pl.DataFrame(scan_tables(Lake.at(tmp_path / "lake"))["exposures"].collect()).height == 0 \
        if (tmp_path / "lake" / "lake.json").exists() else True
