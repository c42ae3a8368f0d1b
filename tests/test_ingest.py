"""Ingest: validation, quarantine, idempotency, versioning and bit-exact storage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from conftest import write_raw

from fiberlake.ingest.fitsreader import FrameRejected, read_frame
from fiberlake.jobs.ingest import ingest_night
from fiberlake.schemas.instrument import MINI
from fiberlake.storage.layout import Lake
from fiberlake.storage.rawstore import read_raw_frame
from fiberlake.storage.tables import TableStore


def test_valid_frame_reads(raw_frame_path):
    frame = read_frame(raw_frame_path)
    assert frame.pixels.dtype == np.uint16 and frame.pixels.shape == MINI.raw_shape
    assert (frame.camera, frame.arm, frame.spectrograph, frame.obstype) == ("b1", "b", 1, "SCIENCE")


def _bad_files(night):
    """Every kind of bad delivery, with the error class it must get."""
    good = write_raw(night / "fl-02150001-b1.fits")
    raw = good.read_bytes()
    cases = {}
    (night / "truncated.fits").write_bytes(raw[: len(raw) // 2 // 2880 * 2880])
    cases["truncated.fits"] = "truncated"
    (night / "cut.fits").write_bytes(raw[:-100])
    cases["cut.fits"] = "truncated"
    (night / "random.fits").write_bytes(np.random.default_rng(1).bytes(2880 * 3))
    cases["random.fits"] = "not_fits"
    (night / "empty.fits").write_bytes(b"")
    cases["empty.fits"] = "empty"
    write_raw(night / "nokey.fits", EXPTIME=None, EXPID=2150002)
    cases["nokey.fits"] = "missing_keyword"
    write_raw(night / "float.fits", data=np.full(MINI.raw_shape, 1000.0, np.float32), EXPID=2150003)
    cases["float.fits"] = "bad_bitpix"
    nan = np.full(MINI.raw_shape, 1000.0, np.float32)
    nan[5, 5] = np.nan
    write_raw(night / "nan.fits", data=nan, EXPID=2150004)
    cases["nan.fits"] = "nonfinite"
    write_raw(night / "shape.fits", data=np.ones((100, 100), np.uint16), EXPID=2150005)
    cases["shape.fits"] = "bad_shape"
    write_raw(night / "zero.fits", data=np.zeros(MINI.raw_shape, np.uint16), EXPID=2150006)
    cases["zero.fits"] = "all_zero"
    write_raw(night / "sat.fits", data=np.full(MINI.raw_shape, 65535, np.uint16), EXPID=2150007)
    cases["sat.fits"] = "saturated"
    write_raw(night / "escape.fits", NIGHT="../../etc", EXPID=2150008)
    cases["escape.fits"] = "unsafe_keyword"
    write_raw(night / "camera.fits", CAMERA="r1", EXPID=2150009)
    cases["camera.fits"] = "bad_keyword"
    write_raw(night / "obstype.fits", OBSTYPE="FOO", EXPID=2150010)
    cases["obstype.fits"] = "bad_keyword"
    corrupt = bytearray(write_raw(night / "checksum.fits", EXPID=2150011).read_bytes())
    corrupt[-10] ^= 0xFF
    (night / "checksum.fits").write_bytes(bytes(corrupt))
    cases["checksum.fits"] = "checksum"
    return good, cases


def test_bad_input_is_quarantined_and_good_frames_land(tmp_path):
    night = tmp_path / "2026-11-21"
    night.mkdir()
    good, cases = _bad_files(night)
    lake = Lake.at(tmp_path / "lake")
    report = ingest_night(lake, night)
    assert report.ingested == [good.name]
    tables = TableStore(lake.root / "tables")
    quarantine = tables.read("quarantine").to_pylist()
    got = {row["filename"]: row["error_class"] for row in quarantine}
    assert got == cases
    for row in quarantine:
        assert row["reason"] and len(row["reason"]) > 10
        stored = lake.root / row["stored_path"]
        assert stored.read_bytes() == (night / row["filename"]).read_bytes(), "refused bytes must be kept"
    # nothing escaped the lake
    assert not (tmp_path / "etc").exists()


def test_ingest_is_idempotent_and_bit_exact(tmp_path):
    night = tmp_path / "2026-11-21"
    night.mkdir()
    for i in range(3):
        write_raw(night / f"fl-0215000{i}-b1.fits", EXPID=2150000 + i)
    lake = Lake.at(tmp_path / "lake")
    first = ingest_night(lake, night)
    assert len(first.ingested) == 3
    tables = TableStore(lake.root / "tables")
    version = tables.version("exposures")
    second = ingest_night(lake, night)
    assert second.ingested == [] and len(second.duplicates) == 3
    assert tables.version("exposures") == version, "a second ingest must not commit"
    rows = tables.read("exposures").to_pylist()
    assert len(rows) == 3
    for row in rows:
        original = fits.getdata(night / row["filename"], uint=True)
        stored = read_raw_frame(lake.root, row["raw_path"])
        assert stored.dtype == np.uint16
        assert np.array_equal(stored, original)


def test_redelivery_under_another_name_is_a_noop(tmp_path):
    night = tmp_path / "2026-11-21"
    night.mkdir()
    path = write_raw(night / "fl-02150001-b1.fits")
    lake = Lake.at(tmp_path / "lake")
    ingest_night(lake, night)
    (night / "copy-of-frame.fits").write_bytes(path.read_bytes())
    report = ingest_night(lake, night)
    assert report.duplicates == ["copy-of-frame.fits", "fl-02150001-b1.fits"]
    assert TableStore(lake.root / "tables").read("exposures").num_rows == 1


def test_changed_file_same_name_is_a_new_version(tmp_path):
    night = tmp_path / "2026-11-21"
    night.mkdir()
    path = write_raw(night / "fl-02150001-b1.fits")
    lake = Lake.at(tmp_path / "lake")
    ingest_night(lake, night)
    first_pixels = read_raw_frame(lake.root, lake.raw_relpath("2026-11-21", 2150001, "b1"))
    data = fits.getdata(path, uint=True).copy()
    data[10, 10] += 7
    write_raw(path, data=data)
    ingest_night(lake, night)
    rows = sorted(TableStore(lake.root / "tables").read("exposures").to_pylist(), key=lambda r: r["file_version"])
    assert [r["file_version"] for r in rows] == [1, 2]
    assert rows[0]["raw_path"] != rows[1]["raw_path"]
    assert np.array_equal(read_raw_frame(lake.root, rows[0]["raw_path"]), first_pixels), "old version kept"
    assert np.array_equal(read_raw_frame(lake.root, rows[1]["raw_path"]), data)


def test_lake_refuses_other_instrument(tmp_path):
    lake = Lake.at(tmp_path / "lake")
    lake.ensure("lamost")
    night = tmp_path / "2026-11-21"
    night.mkdir()
    write_raw(night / "fl-02150001-b1.fits")
    report = ingest_night(lake, night)
    assert report.ingested == [] and "lamost" in report.quarantined[0][1]


def test_read_frame_reports_missing_keyword_by_name(tmp_path):
    path = write_raw(tmp_path / "x.fits", GAIN=None)
    with pytest.raises(FrameRejected, match="GAIN"):
        read_frame(path)


def _header_bytes_patch(path: Path, old: bytes, new: bytes) -> None:
    """Overwrite header text in place (same length), as a broken acquisition system might."""
    raw = path.read_bytes()
    assert len(old) == len(new) and old in raw
    path.write_bytes(raw.replace(old, new, 1))


def test_more_bad_input_escapes_inf_and_conflicting_expid(tmp_path):
    night = tmp_path / "2026-11-21"
    night.mkdir()
    write_raw(night / "fl-02150001-b1.fits")
    cases = {}
    inf = np.full(MINI.raw_shape, 1000.0, np.float32)
    inf[7, 3] = np.inf
    write_raw(night / "inf.fits", data=inf, EXPID=2150020)
    cases["inf.fits"] = "nonfinite"
    write_raw(night / "absolute.fits", CAMERA="/etc/passwd", EXPID=2150021)
    cases["absolute.fits"] = "unsafe_keyword"
    write_raw(night / "long.fits", OBSTYPE="S" * 68, EXPID=2150022)
    cases["long.fits"] = "unsafe_keyword"
    # NUL and non-ASCII bytes in a header value: astropy refuses the first card outright and
    # replaces the second's bytes with '?', which the header contract then refuses
    for name, bad, cls in (("nul.fits", b"2026-11\x0021", "bad_header"), ("nonascii.fits", b"2026-11\xe921", "bad_keyword")):
        write_raw(night / name, checksum=False, EXPID=2150023 + len(cases))
        _header_bytes_patch(night / name, b"2026-11-21'", bad + b"'")
        cases[name] = cls
    # another file claiming an exposure id and camera the lake already holds, with other bytes
    data = fits.getdata(night / "fl-02150001-b1.fits", uint=True).copy()
    data[0, 0] += 1
    write_raw(night / "zz-same-expid.fits", data=data)
    cases["zz-same-expid.fits"] = "duplicate_expid"
    lake = Lake.at(tmp_path / "lake")
    report = ingest_night(lake, night)
    assert report.ingested == ["fl-02150001-b1.fits"]
    quarantine = TableStore(lake.root / "tables").read("quarantine").to_pylist()
    got = {row["filename"]: row["error_class"] for row in quarantine}
    assert got == cases, got
    reasons = {row["filename"]: row["reason"] for row in quarantine}
    assert "fl-02150001-b1.fits" in reasons["zz-same-expid.fits"]
    assert all(p.is_relative_to(lake.root) for p in lake.root.rglob("*"))
    assert not list(tmp_path.glob("etc*"))


def test_file_still_being_written_is_left_for_later_not_quarantined(tmp_path):
    night = tmp_path / "2026-11-21"
    night.mkdir()
    staged = write_raw(tmp_path / "staged.fits")
    content = staged.read_bytes()
    target = night / "fl-02150001-b1.fits"
    target.write_bytes(content[: 2880 * 30])  # the acquisition system is half way through
    lake = Lake.at(tmp_path / "lake")
    report = ingest_night(lake, night, settle=30.0)
    assert report.ingested == [] and report.quarantined == []
    assert [name for name, _ in report.waiting] == [target.name]
    assert "being written" in report.waiting[0][1] or "incomplete" in report.waiting[0][1]
    target.write_bytes(content)  # it finishes
    report = ingest_night(lake, night)
    assert report.ingested == [target.name] and report.quarantined == []


def test_second_ingest_reads_no_known_file(tmp_path, monkeypatch):
    night = tmp_path / "2026-11-21"
    night.mkdir()
    for i in range(3):
        write_raw(night / f"fl-0215000{i}-b1.fits", EXPID=2150000 + i)
    (night / "broken.fits").write_bytes(b"not a fits file" * 200)
    lake = Lake.at(tmp_path / "lake")
    ingest_night(lake, night)
    import fiberlake.jobs.ingest as ingest_module

    calls = []
    real = ingest_module.read_delivery
    monkeypatch.setattr(ingest_module, "read_delivery", lambda entry, **k: calls.append(entry.path) or real(entry, **k))
    tables = TableStore(lake.root / "tables")
    versions = {n: tables.version(n) for n in ("exposures", "quarantine", "deliveries")}
    report = ingest_night(lake, night)
    assert calls == [], "known files must be recognised from the deliveries log without reading them"
    assert len(report.duplicates) == 4
    assert {n: tables.version(n) for n in versions} == versions
    write_raw(night / "fl-02150009-b1.fits", EXPID=2150009)
    ingest_night(lake, night)
    assert [p.name for p in calls] == ["fl-02150009-b1.fits"]
    outcomes = dict(tables.read("deliveries", columns=["filename", "outcome"]).to_pylist() and
                    [(r["filename"], r["outcome"]) for r in tables.read("deliveries").to_pylist()])
    assert outcomes["broken.fits"] == "quarantined" and outcomes["fl-02150009-b1.fits"] == "ingested"
