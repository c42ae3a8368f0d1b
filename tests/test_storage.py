"""Storage: raw arrays, calibration sets and Delta tables."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow.dataset as ds
import pytest

from fiberlake.storage.calibstore import read_calib_set, write_calib_set
from fiberlake.storage.layout import Lake, safe_component
from fiberlake.storage.rawstore import read_raw_frame, remove_stale_temporaries, write_raw_frame
from fiberlake.storage.tables import TableStore, Txn


def _spectra_rows(n, night="2026-11-21", expid=1, value=1.0):
    return [dict(night=night, expid=expid, camera="b1", spectrograph=1, arm="b", fiber=i, targetid=i,
                 objtype="TGT", obstype="SCIENCE", extraction="box", run_id="r", wave_min=4000.0, dwave=0.5,
                 nwave=4, fiber_status=0, flux=[value] * 4, ivar=[1.0] * 4, mask=[0] * 4, sky=[0.0] * 4,
                 resolution=None, resolution_ndiag=None, resolution_wave=None)
            for i in range(n)]


def test_raw_roundtrip_bit_exact_and_no_silent_overwrite(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65535, (700, 300), dtype=np.uint16)
    digest = write_raw_frame(tmp_path, "raw/n/1/b1", pixels, {"k": 1})
    assert np.array_equal(read_raw_frame(tmp_path, "raw/n/1/b1"), pixels)
    assert write_raw_frame(tmp_path, "raw/n/1/b1", pixels, {}) == digest  # same pixels: no-op
    with pytest.raises(FileExistsError):
        write_raw_frame(tmp_path, "raw/n/1/b1", pixels + 1, {})


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "raw/n/1/.tmp-b1-deadbeef").mkdir(parents=True)
    assert remove_stale_temporaries(tmp_path) == 1
    assert not (tmp_path / "raw/n/1/.tmp-b1-deadbeef").exists()


def test_unsafe_path_components_refused():
    for bad in ("../x", "/abs", "a/b", "x\x00", "é", "a" * 300, ""):
        with pytest.raises(ValueError):
            safe_component(bad, "night")
    with pytest.raises(ValueError):
        Lake.at("/tmp/l").raw_relpath("../../etc", 1, "b1")


def test_calib_set_roundtrip_and_replace(tmp_path):
    path = tmp_path / "calib/n/b1"
    write_calib_set(path, {"a": np.arange(6.0).reshape(2, 3), "g/b": np.array(3)}, {"v": 1})
    write_calib_set(path, {"a": np.ones((2, 3)), "g/b": np.array(4)}, {"v": 2})
    arrays, meta = read_calib_set(path)
    assert meta == {"v": 2} and int(arrays["g/b"]) == 4 and arrays["a"].sum() == 6
    assert [p.name for p in path.parent.iterdir()] == ["b1"]


def test_txn_makes_append_idempotent(tmp_path):
    store = TableStore(tmp_path)
    assert store.append("spectra", _spectra_rows(3), Txn("job", 1))
    assert not store.append("spectra", _spectra_rows(3), Txn("job", 1))
    assert store.append("spectra", _spectra_rows(3, expid=2), Txn("job", 2))
    assert store.read("spectra").num_rows == 6


def test_replace_swaps_rows_atomically_and_readers_agree(tmp_path):
    store = TableStore(tmp_path)
    store.append("spectra", _spectra_rows(5, expid=1) + _spectra_rows(5, expid=2))
    store.replace("spectra", _spectra_rows(5, expid=1, value=2.0), "night = '2026-11-21' AND expid = 1")
    lf = store.scan("spectra").filter(pl.col("expid") == 1).collect()
    assert lf.height == 5 and lf["flux"].list.first().to_list() == [2.0] * 5
    # every reader sees the same rows: polars, pyarrow dataset, and time travel to version 0
    assert store.delta("spectra").to_pyarrow_dataset().count_rows() == 10
    assert isinstance(store.delta("spectra").to_pyarrow_dataset(), ds.Dataset)
    assert store.scan("spectra", version=0).filter(pl.col("expid") == 1).collect()["flux"].list.first().to_list() == [1.0] * 5


def test_conform_rejects_wrong_columns(tmp_path):
    store = TableStore(tmp_path)
    rows = _spectra_rows(1)
    rows[0]["unexpected"] = 1
    with pytest.raises(ValueError, match="unexpected"):
        store.append("spectra", rows)
