"""Nothing a file says can delete, leak or block: hostile and unlucky input at ingest (issue 12).

One deterministic test per kind of bad input (predicates, links, unreadable and oversized values,
the declared instrument, bad fiber maps, compressed frames and unknown files), then a Hypothesis
fuzz test over every header field, fiber-map value and file name that reaches a predicate or a
path, asserting for each example: the valid frame of the night lands, the bad file is quarantined,
refused or ignored with a reason, no existing row of any night changes, nothing is written outside
the lake, and a re-run converges (no commit at all).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from conftest import make_raw_header, write_raw
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fiberlake.ingest.arrival import fits_structure
from fiberlake.ingest.fitsreader import read_frame
from fiberlake.jobs.cli import main
from fiberlake.jobs.ingest import INSTRUMENT_ENV, ingest_night
from fiberlake.schemas.header import REQUIRED_KEYWORDS
from fiberlake.schemas.instrument import MINI
from fiberlake.storage.layout import Lake, LakeError
from fiberlake.storage.predicates import key_predicate, keys_predicate
from fiberlake.storage.rawstore import read_raw_frame
from fiberlake.storage.tables import TableStore

NIGHT, OTHER = "2026-11-21", "2026-11-20"
TABLES = ("exposures", "quarantine", "deliveries", "fibermap")
INJECTION = "x' OR true OR night = '"


# --- helpers ---------------------------------------------------------------------------------
def _pixels(seed: int) -> np.ndarray:
    return (1000 + np.random.default_rng(seed).normal(0, 3, MINI.raw_shape)).astype(np.uint16)


def write_fibermap(path: Path, *, night: str | None = NIGHT, expid: int | None = None, specid=None, fiber=None,
                   objtype=None, targetid=None, ra=None, **cards) -> Path:
    """A mini fiber map (32 fibers of spectrograph 1); any column or card may be overridden."""
    n = MINI.n_fibers
    columns = [
        fits.Column("SPECID", "I", array=np.asarray(specid if specid is not None else np.ones(n), np.int16)),
        fits.Column("FIBER", "I", array=np.asarray(fiber if fiber is not None else np.arange(n), np.int16)),
        fits.Column("TARGETID", "K",
                    array=np.asarray(targetid if targetid is not None else 10**12 + np.arange(n), np.int64)),
        fits.Column("RA", "D", array=np.asarray(ra if ra is not None else np.full(n, 10.0))),
        fits.Column("DEC", "D", array=np.full(n, 20.0)),
        fits.Column("MAG", "E", array=np.full(n, 15.0, np.float32)),
        fits.Column("OBJTYPE", "3A",
                    array=np.asarray(objtype if objtype is not None else ["TGT"] * (n - 3) + ["SKY"] * 3)),
    ]
    hdu = fits.BinTableHDU.from_columns(columns, name="FIBERMAP")
    if night is not None:
        hdu.header["NIGHT"] = night
    if expid is not None:
        hdu.header["EXPID"] = expid
    for key, value in cards.items():
        hdu.header[key] = value
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path, overwrite=True)
    return path


def rows(lake: Lake, name: str) -> list[dict]:
    """Rows of a table without commit timestamps, as sorted comparable tuples."""
    table = TableStore(lake.root / "tables").read(name).to_pylist()
    drop = {"ingested_at", "quarantined_at", "recorded_at"}
    return sorted((tuple((k, v) for k, v in r.items() if k not in drop) for r in table), key=repr)


def versions(lake: Lake) -> dict[str, int]:
    store = TableStore(lake.root / "tables")
    return {name: store.version(name) for name in TABLES}


def outcomes(lake: Lake) -> dict[str, tuple[str, str]]:
    table = TableStore(lake.root / "tables").read("deliveries").to_pylist()
    return {r["filename"]: (r["outcome"], r["detail"]) for r in sorted(table, key=lambda r: r["recorded_at"])}


def quarantined(lake: Lake) -> dict[str, str]:
    return {r["filename"]: r["error_class"] for r in TableStore(lake.root / "tables").read("quarantine").to_pylist()}


def night_dir(root: Path, night: str = NIGHT) -> Path:
    path = root / night
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- 1. predicates ---------------------------------------------------------------------------
def test_key_predicates_are_built_from_validated_values_only():
    assert key_predicate({"night": "2026-11-21", "expid": 7, "camera": "b1"}) == \
        "night = '2026-11-21' AND expid = 7 AND camera = 'b1'"
    assert keys_predicate([{"night": NIGHT, "camera": "b1", "expid": 9}, {"night": NIGHT, "camera": "b1", "expid": 2},
                           {"night": OTHER, "camera": "r1", "expid": 3}]) == \
        "(night = '2026-11-20' AND camera = 'r1' AND expid = 3) OR " \
        "(night = '2026-11-21' AND camera = 'b1' AND expid IN (2, 9))"
    for keys in ({"night": INJECTION}, {"night": "2026-02-30"}, {"night": "2026-11-21 "}, {"camera": "b1' OR '1"},
                 {"expid": 10**20}, {"expid": -1}, {"expid": True}, {"expid": "7"}, {"run_id": "a b"},
                 {"run_id": "é"}, {"fiber": 2**63}, {"night OR 1": NIGHT}, {"Night": NIGHT}, {},
                 {"camera": "b1\n"}, {"night": "2026-11-21\n"}, {"night": "٢٠٢٦-١١-٢١"}, {"run_id": "r1\n"},
                 {"expid\n": 1}):
        with pytest.raises(ValueError):
            key_predicate(keys)
    with pytest.raises(ValueError):
        keys_predicate([])
    with pytest.raises(ValueError):
        keys_predicate([{"night": NIGHT}, {"expid": 1}])


def test_replace_keys_refuses_unknown_columns_and_replaces_only_its_keys(tmp_path):
    store = TableStore(tmp_path / "tables")
    row = {"night": NIGHT, "expid": 1, "spectrograph": 1, "fiber": 0, "targetid": 5, "ra": 1.0, "dec": 2.0,
           "mag": 3.0, "objtype": "TGT", "mag_g": None, "mag_i": None}
    store.append("fibermap", [row, row | {"night": OTHER}])
    with pytest.raises(ValueError, match="no column"):
        store.replace_keys("fibermap", [row], {"camera": "b1"})
    store.replace_keys("fibermap", [row | {"targetid": 6}], {"night": NIGHT, "expid": 1})
    got = sorted((r["night"], r["targetid"]) for r in store.read("fibermap").to_pylist())
    assert got == [(OTHER, 5), (NIGHT, 6)]


def test_injected_fibermap_night_is_quarantined_and_deletes_nothing(tmp_path):
    lake = Lake.at(tmp_path / "lake")
    for night, expid in ((OTHER, 2140001), (NIGHT, 2150001)):
        write_fibermap(night_dir(tmp_path, night) / f"fibermap-{expid:08d}.fits", night=night, expid=expid)
        ingest_night(lake, tmp_path / night, instrument="mini")
    before = rows(lake, "fibermap")
    assert len(before) == 2 * MINI.n_fibers
    bad = night_dir(tmp_path, "2026-11-22")
    write_fibermap(bad / "fibermap-02160001.fits", night=INJECTION, expid=2160001)
    write_fibermap(bad / "fibermap-02160002.fits", night="2026-13-45", expid=2160002)
    write_fibermap(bad / "fibermap-02160003.fits", night=NIGHT, expid=5)  # EXPID card disagrees with the name
    report = ingest_night(lake, bad)
    assert rows(lake, "fibermap") == before, "a hostile fiber map must not touch other rows"
    assert quarantined(lake) == {"fibermap-02160001.fits": "bad_keyword", "fibermap-02160002.fits": "bad_keyword",
                                 "fibermap-02160003.fits": "bad_keyword"}
    assert all("NIGHT" in why or "EXPID" in why for _, why in report.quarantined)


def test_frame_key_fields_are_checked_against_the_contract(tmp_path):
    for key, value in (("NIGHT", "2026-02-30"), ("NIGHT", INJECTION), ("EXPID", 10**20), ("EXPID", 2**63),
                       ("CAMERA", "b1'"), ("EXPTIME", 1e39), ("GAIN", 0.0), ("DATE-OBS", "x/../y")):
        path = write_raw(tmp_path / "f.fits", **{key: value})
        with pytest.raises(Exception) as err:
            read_frame(path)
        assert type(err.value).__name__ == "FrameRejected" and len(err.value.reason) > 10, (key, value)


# --- 2. links, special files, copy permissions ------------------------------------------------
def test_links_out_of_the_night_are_refused_unread_and_copies_keep_permissions(tmp_path):
    night = night_dir(tmp_path)
    write_raw(night / "fl-02150001-b1.fits")
    secret = write_raw(tmp_path / "secret.fits", data=_pixels(9), EXPID=2150009)  # a valid frame, outside
    secret.chmod(0o600)
    (night / "a-secret.fits").symlink_to(secret)
    (night / "b-dangling.fits").symlink_to(tmp_path / "nowhere.fits")
    (night / "c-dir.fits").symlink_to(tmp_path)
    (night / "d-loop.fits").symlink_to(night / "d-loop.fits")
    (night / "e-inside.fits").symlink_to(night / "fl-02150001-b1.fits")
    os.mkfifo(night / "f-fifo.fits")
    bad = write_raw(night / "g-private-bad.fits", data=np.zeros(MINI.raw_shape, np.uint16), EXPID=2150002)
    bad.chmod(0o600)
    public = write_raw(night / "h-public-bad.fits", data=np.zeros(MINI.raw_shape, np.uint16), EXPID=2150003,
                       OBSTYPE="FLAT")
    public.chmod(0o644)
    lake = Lake.at(tmp_path / "lake")
    report = ingest_night(lake, night, instrument="mini")
    assert report.ingested == ["fl-02150001-b1.fits"]
    seen = outcomes(lake)
    for name in ("a-secret.fits", "b-dangling.fits", "c-dir.fits", "d-loop.fits", "f-fifo.fits"):
        assert seen[name][0] == "refused" and len(seen[name][1]) > 20, (name, seen[name])
    assert "outside the night directory" in seen["a-secret.fits"][1]
    assert seen["e-inside.fits"][0] == "duplicate"
    secret_bytes = secret.read_bytes()
    for path in lake.root.rglob("*"):
        assert not path.is_symlink()
        if path.is_file() and path.stat().st_size == len(secret_bytes):
            assert path.read_bytes() != secret_bytes, f"{path} holds the bytes behind a refused link"
    assert quarantined(lake) == {"g-private-bad.fits": "all_zero", "h-public-bad.fits": "all_zero"}
    stored = {r["filename"]: lake.root / r["stored_path"]
              for r in TableStore(lake.root / "tables").read("quarantine").to_pylist()}
    assert stat.S_IMODE(stored["g-private-bad.fits"].stat().st_mode) == 0o600
    assert stat.S_IMODE(stored["h-public-bad.fits"].stat().st_mode) == 0o644
    before = versions(lake)
    ingest_night(lake, night)
    assert versions(lake) == before, "a re-run over the same links must not commit"


# --- 3. one file never blocks a night -------------------------------------------------------
def test_unlucky_files_cost_one_file_and_a_rerun_converges(tmp_path, monkeypatch, capsys):
    night = night_dir(tmp_path)
    write_raw(night / "fl-02150001-b1.fits")
    write_raw(night / "fl-02150002-b1.fits", data=_pixels(2), EXPID=2150002)
    write_raw(night / "huge-expid.fits", data=_pixels(3), EXPID=10**20)
    write_fibermap(night / f"fibermap-{10**22 + 7}.fits", expid=None)
    write_raw(night / "locked.fits", data=_pixels(4), EXPID=2150004)
    raw_name = os.fsencode(str(night)) + b"/fl-\xff\xfe-b1.fits"
    with open(raw_name, "wb") as handle:
        handle.write(write_raw(tmp_path / "staged.fits", data=_pixels(5), EXPID=2150005).read_bytes())
    locked = str(night / "locked.fits")
    real_open = os.open

    def no_permission(path, flags, *args, **kwargs):  # as root, chmod 000 does not stop reading
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_permission)
    lake = str(tmp_path / "lake")
    assert main(["ingest", str(night), "--lake", lake, "--instrument", "mini", "--settle", "0", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "refused locked.fits" in out and "permission" in out
    lake = Lake.at(lake)
    seen = outcomes(lake)
    assert seen["fl-02150001-b1.fits"][0] == seen["fl-02150002-b1.fits"][0] == "ingested"
    assert seen["locked.fits"][0] == "refused" and "permission denied" in seen["locked.fits"][1]
    assert seen["fl-\\xff\\xfe-b1.fits"][0] == "refused" and "UTF-8" in seen["fl-\\xff\\xfe-b1.fits"][1]
    assert quarantined(lake) == {"huge-expid.fits": "bad_keyword", f"fibermap-{10**22 + 7}.fits": "bad_name"}
    before = versions(lake)
    assert main(["ingest", str(night), "--lake", str(lake.root), "--settle", "0", "--quiet"]) == 0
    assert versions(lake) == before, "a re-run over the same bad files must not commit"
    monkeypatch.setattr(os, "open", real_open)  # the permission is fixed: the next run takes the file
    report = ingest_night(lake, night)
    assert report.ingested == ["locked.fits"]
    assert outcomes(lake)["locked.fits"][0] == "ingested"


# --- 4. the lake's instrument is declared ---------------------------------------------------
def test_instrument_is_declared_never_guessed(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(INSTRUMENT_ENV, raising=False)
    night = night_dir(tmp_path)
    write_raw(night / "a-first-sorted.fits", data=_pixels(7), INSTRUME="lamost", EXPID=2150007)
    write_raw(night / "fl-02150001-b1.fits")
    write_raw(night / "fl-02150002-b1.fits", data=_pixels(2), EXPID=2150002)
    lake = tmp_path / "lake"
    assert main(["ingest", str(night), "--lake", str(lake), "--settle", "0", "--quiet"]) == 1
    assert "--instrument" in capsys.readouterr().err and not lake.exists()
    with pytest.raises(LakeError, match="several instruments"):
        ingest_night(Lake.at(lake), night)  # a library call without a declaration does not pick one
    assert main(["ingest", str(night), "--lake", str(lake), "--instrument", "mini", "--settle", "0", "--quiet"]) == 0
    assert Lake.at(lake).instrument == "mini"
    assert quarantined(Lake.at(lake)) == {"a-first-sorted.fits": "wrong_instrument"}
    assert len(rows(Lake.at(lake), "exposures")) == 2
    assert main(["ingest", str(night), "--lake", str(lake), "--instrument", "lamost", "--quiet"]) == 1
    assert "holds instrument 'mini'" in capsys.readouterr().err
    other = tmp_path / "lake2"
    monkeypatch.setenv(INSTRUMENT_ENV, "mini")
    assert main(["ingest", str(night), "--lake", str(other), "--settle", "0", "--quiet"]) == 0
    assert Lake.at(other).instrument == "mini"


# --- 5. fiber maps that would mislabel spectra ---------------------------------------------
def test_fibermap_with_a_fiber_twice_or_a_missing_fiber_is_refused(tmp_path):
    night = night_dir(tmp_path)
    write_raw(night / "fl-02150001-b1.fits")
    n = MINI.n_fibers
    twice = np.arange(n)
    twice[5] = 4
    write_fibermap(night / "fibermap-02150001.fits", fiber=twice)
    write_fibermap(night / "fibermap-02150002.fits", fiber=np.arange(n) + 1)  # fiber 32 does not exist on mini
    write_fibermap(night / "fibermap-02150003.fits", specid=np.full(n, 2))  # mini has one spectrograph
    write_fibermap(night / "fibermap-02150004.fits", objtype=["TGT"] * (n - 1) + ["X'"])
    write_fibermap(night / "fibermap-02150005.fits", ra=np.full(n, np.nan))
    write_fibermap(night / "fibermap-02150006.fits")
    lake = Lake.at(tmp_path / "lake")
    report = ingest_night(lake, night, instrument="mini")
    reasons = dict(report.quarantined)
    assert set(reasons) == {f"fibermap-0215000{i}.fits" for i in range(1, 6)}
    assert "fiber 4 of spectrograph 1 is listed 2 times" in reasons["fibermap-02150001.fits"]
    assert "fiber 32 of spectrograph 1 does not exist" in reasons["fibermap-02150002.fits"]
    assert "spectrograph 2 does not exist" in reasons["fibermap-02150003.fits"]
    assert "OBJTYPE" in reasons["fibermap-02150004.fits"] and "RA" in reasons["fibermap-02150005.fits"]
    assert report.fibermaps == ["fibermap-02150006.fits"] and len(rows(lake, "fibermap")) == n


# --- 6. compressed frames, and nothing silently ignored -------------------------------------
def test_gzip_and_fpack_frames_land_bit_exact_and_every_entry_is_logged(tmp_path):
    night = night_dir(tmp_path)
    plain = write_raw(tmp_path / "plain.fits", data=_pixels(1))
    (night / "fl-02150001-b1.fits.gz").write_bytes(gzip.compress(plain.read_bytes()))
    fz = fits.CompImageHDU(data=_pixels(2), header=make_raw_header(EXPID=2150002), compression_type="RICE_1")
    fits.HDUList([fits.PrimaryHDU(), fz]).writeto(night / "fl-02150002-b1.fits.fz", checksum=True)
    whole = gzip.compress(write_raw(tmp_path / "p3.fits", data=_pixels(3), EXPID=2150003).read_bytes())
    (night / "cut.fits.gz").write_bytes(whole[: len(whole) // 2])
    corrupt = bytearray(gzip.compress(write_raw(tmp_path / "p4.fits", data=_pixels(4), EXPID=2150004).read_bytes()))
    corrupt[len(corrupt) // 2] ^= 0xFF
    (night / "corrupt.fits.gz").write_bytes(bytes(corrupt))
    fz_bad = bytearray((night / "fl-02150002-b1.fits.fz").read_bytes())
    fz_bad[-3000] ^= 0xFF
    (night / "bad-sum.fits.fz").write_bytes(bytes(fz_bad))
    bomb = io.BytesIO()
    with gzip.GzipFile(fileobj=bomb, mode="wb", compresslevel=1) as stream:
        block = bytes(1 << 22)
        for _ in range(80 * (1 << 20) // len(block)):  # 80 MiB of zeros, more than any frame
            stream.write(block)
    (night / "bomb.fits.gz").write_bytes(bomb.getvalue())
    (night / "notes.txt").write_text("observer log")
    (night / ".fl-02150009-b1.fits.part").write_bytes(b"partial")
    (night / "truth").mkdir()
    assert fits_structure(night / "fl-02150001-b1.fits.gz") == (True, "")
    assert fits_structure(night / "cut.fits.gz")[0] is False
    lake = Lake.at(tmp_path / "lake")
    report = ingest_night(lake, night, instrument="mini")
    assert sorted(report.ingested) == ["fl-02150001-b1.fits.gz", "fl-02150002-b1.fits.fz"]
    exposures = {r["filename"]: r for r in TableStore(lake.root / "tables").read("exposures").to_pylist()}
    assert np.array_equal(read_raw_frame(lake.root, exposures["fl-02150001-b1.fits.gz"]["raw_path"]), _pixels(1))
    assert np.array_equal(read_raw_frame(lake.root, exposures["fl-02150002-b1.fits.fz"]["raw_path"]), _pixels(2))
    assert quarantined(lake) == {"cut.fits.gz": "truncated", "corrupt.fits.gz": "corrupt_gzip",
                                 "bad-sum.fits.fz": "checksum", "bomb.fits.gz": "too_large"}
    seen = outcomes(lake)
    for name in ("notes.txt", ".fl-02150009-b1.fits.part", "truth"):
        assert seen[name][0] == "ignored" and len(seen[name][1]) > 20, seen[name]
    assert set(seen) == {p.name for p in night.iterdir()}, "every entry of the night is logged"
    before = versions(lake)
    ingest_night(lake, night)
    assert versions(lake) == before


# --- 7. the fuzz test -----------------------------------------------------------------------
HOSTILE_TEXT = st.one_of(
    st.sampled_from([INJECTION, "2026-11-21' OR '1'='1", "../../etc", "/etc/passwd", "..", "b1/../r1", "", " ",
                     "2026-02-30", "2026-11-21 ", "9999-99-99", "b0", "r17", "B1", "b1;", "x" * 68, "NaN", "0x10",
                     "'; DROP TABLE exposures; --", "%s%s", "\\", "mini ", "lamost", "2026-11-20"]),
    st.text(alphabet=string.printable.strip() + " ", max_size=40),
)
HOSTILE_NUMBER = st.one_of(
    st.sampled_from([10**20, 2**63, 2**63 - 1, -1, 0, 2**31, -(2**63) - 1, 1e39, -0.0, 1e-300, 2140001]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
HOSTILE_NAME = st.one_of(
    st.sampled_from(["x' OR true OR night = '.fits", "a b.fits", "..fits", "-rf.fits", "é.fits", "a\nb.fits",
                     "a\tb.fits", "fibermap-99999999999999999999999.fits", "fibermap-.fits", "fibermap-1.fits.gz",
                     "f" * 240 + ".fits", "UPPER.FITS", "x.fits.fz", "x.fits.gz", "x.fit", "x", "fibermap-0.fits"]),
    st.text(alphabet=string.ascii_letters + string.digits + "._-' ;%$", min_size=1, max_size=30)
    .map(lambda t: t + ".fits"),
    st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_") + b".fits"),
)
FIELDS = [kw.name for kw in REQUIRED_KEYWORDS]
GOOD_NAME = "fl-02150001-b1.fits"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, bytes]:
    """A lake that already holds another night (a frame, a fiber map, a quarantined file), and the
    bytes of a valid frame of the night under test."""
    root = tmp_path_factory.mktemp("template")
    other = night_dir(root, OTHER)
    write_raw(other / "fl-02140001-b1.fits", data=_pixels(40), NIGHT=OTHER, EXPID=2140001)
    write_fibermap(other / "fibermap-02140001.fits", night=OTHER, expid=2140001)
    (other / "junk.fits").write_bytes(b"junk" * 720)
    ingest_night(Lake.at(root / "lake"), other, instrument="mini")
    good = write_raw(root / GOOD_NAME, data=_pixels(41)).read_bytes()
    return root / "lake", good


def _files_outside(root: Path, lake: Path) -> set[tuple[str, int]]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        if os.fsdecode(dirpath).startswith(str(lake)):
            continue
        for name in filenames + dirnames:
            full = os.path.join(dirpath, name)
            out.add((os.fsdecode(full), os.lstat(full).st_size))
    return out


def _hostile_item(data) -> tuple[str, dict]:
    """Draw one hostile delivery: a frame with hostile header values, or a hostile fiber map."""
    kind = data.draw(st.sampled_from(["frame", "frame", "fibermap", "name"]), label="kind")
    if kind == "fibermap":  # one hostile aspect at a time, the rest valid, so each aspect is reached
        spec = {"night": NIGHT, "expid": None, "digits": "02150002", "fiber": None, "objtype": None}
        aspect = data.draw(st.sampled_from(["night", "expid", "digits", "fiber", "objtype"]), label="hostile aspect")
        spec[aspect] = data.draw({
            "night": st.one_of(HOSTILE_TEXT, HOSTILE_NUMBER),
            "expid": HOSTILE_NUMBER,
            "digits": st.text("0123456789", min_size=1, max_size=25),
            "fiber": st.integers(-3, 40),
            "objtype": st.one_of(HOSTILE_TEXT.map(lambda t: t[:3]), st.sampled_from(["SKY", "STD", "TGT"])),
        }[aspect], label=aspect)
        assume(spec["digits"].lstrip("0") != "2140001")  # re-delivering the other night's map legitimately replaces it
        return "fibermap", spec
    overrides = data.draw(st.dictionaries(st.sampled_from(FIELDS), st.one_of(st.none(), HOSTILE_TEXT, HOSTILE_NUMBER),
                                          min_size=1 if kind == "frame" else 0, max_size=2), label="header")
    name = data.draw(HOSTILE_NAME, label="file name") if kind == "name" else "fl-hostile.fits"
    return "frame", {"overrides": overrides, "name": name}


def _write_hostile(night: Path, kind: str, spec: dict) -> bytes | None:
    """Write the hostile delivery; return its file name as bytes (None when astropy refuses to write it)."""
    try:
        if kind == "fibermap":
            name = f"fibermap-{spec['digits']}.fits".encode()
            fiber = np.arange(MINI.n_fibers)
            if spec["fiber"] is not None:
                fiber[0] = spec["fiber"]
            objtype = ["TGT"] * MINI.n_fibers
            if spec["objtype"] is not None:
                objtype[1] = spec["objtype"]
            path = night / os.fsdecode(name)
            write_fibermap(path, night=spec["night"], expid=spec["expid"], fiber=fiber, objtype=objtype)
            return name
        name = spec["name"] if isinstance(spec["name"], bytes) else spec["name"].encode()
        header = {"EXPID": 2150002} | spec["overrides"]
        hdu = fits.PrimaryHDU(data=_pixels(42), header=make_raw_header(**header))
        buffer = io.BytesIO()
        hdu.writeto(buffer, checksum=True)
    except (ValueError, TypeError, OverflowError, KeyError, fits.VerifyError):
        return None  # astropy itself refuses to write such a card: not a file anyone can deliver
    if kind == "frame":
        with open(os.path.join(os.fsencode(night), name), "wb") as handle:
            handle.write(buffer.getvalue())
    return name


@pytest.mark.slow  # a Hypothesis fuzzer over whole ingests
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_hostile_frames_fibermaps_and_names(template, data):
    lake_template, good = template
    kind, spec = _hostile_item(data)
    header_val = spec.get("overrides", {}).get("EXPID", spec.get("expid"))
    assume(header_val not in (2150001, 2140001))  # another frame's id: a legitimate conflict, tested elsewhere
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lake = Lake.at(root / "lake")
        shutil.copytree(lake_template, lake.root, symlinks=True)
        night = night_dir(root)
        (night / GOOD_NAME).write_bytes(good)
        name = _write_hostile(night, kind, spec)
        assume(name is not None and name != GOOD_NAME.encode())
        before = {t: rows(lake, t) for t in TABLES}
        outside = _files_outside(root, lake.root)

        report = ingest_night(lake, night)  # must not raise, whatever the file says

        assert GOOD_NAME in report.ingested, "the valid frame of the night must land"
        display = os.fsencode(name).decode("utf-8", "backslashreplace") if isinstance(name, bytes) else name
        seen = outcomes(lake)
        assert display in seen, f"the hostile file {display!r} must be logged"
        outcome, detail = seen[display]
        assert outcome in ("ingested", "quarantined", "refused", "ignored", "fibermap", "duplicate")
        if outcome in ("quarantined", "refused", "ignored"):
            assert len(detail) > 10, "a refusal carries a reason"
        for table in TABLES:
            after = rows(lake, table)
            assert set(before[table]) <= set(after), f"an existing {table} row changed or vanished"
            for row in set(after) - set(before[table]):
                row = dict(row)
                if "filename" in row:
                    assert row["filename"] in (GOOD_NAME, display)
                if table == "fibermap":
                    assert kind == "fibermap" and outcome == "fibermap"
        assert _files_outside(root, lake.root) == outside, "nothing may be written outside the lake"
        for path in lake.root.rglob("*"):
            assert not path.is_symlink() and path.resolve().is_relative_to(lake.root)
        committed = versions(lake)
        ingest_night(lake, night)
        assert versions(lake) == committed, "a re-run must converge (no commit)"
