"""Ingest's fast paths give exactly what the paths they replace give.

- reading a plain uint16 raw frame (ingest/fitsreader.py ``_read_plain_uint16``) against
  ``fits.open`` with checksums: the same pixels, header and verdict on good, corrupted and unusual
  files;
- a raw frame's shard encoded by storage/rawshard.py against zarr's own write: the same files,
  byte for byte, for the lake's layouts, edge chunks, chunks of fill value and several codecs;
- frame typing's pre-processing on uint16 frames (processors/typing_kernels.py) against the float32
  path through astropy's ``sigma_clip`` that the shipped model was trained with: profile, trim
  region and the uint8 image, bit for bit, on simulated mini frames of every type, adversarial
  arrays and (slow) a full-size LAMOST frame.
"""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from astropy.io import fits
from conftest import make_raw_header

from fiberlake.ingest import fitsreader
from fiberlake.ingest.fitsreader import FrameRejected, read_frame

from fiberlake.ingest import simulate as sim
from fiberlake.processors import typing_kernels as tk
from fiberlake.processors import typing_prep as tp
from fiberlake.schemas.instrument import LAMOST, MINI
from fiberlake.storage import rawstore

NIGHT = "2026-11-21"


def _old_and_new(raw: np.ndarray) -> None:
    """The float32 (astropy) path and the integer path agree on profile and image."""
    image = tp.orient(raw)
    new = tp.row_max_profile(image)
    old = tp.row_max_profile(image.astype(np.float32))         # float input: astropy's sigma_clip
    assert new.dtype == np.float64 and np.array_equal(new, old)
    assert tk.row_max_profile_uint(image, tp.TRIM_SIGMA) is not None  # the integer path ran
    assert np.array_equal(tp.prepare_frame(raw), tp.prepare_frame(raw.astype(np.float32)))
    assert np.array_equal(tp.prepare_channels(raw, tp.CHANNELS), tp.prepare_channels(raw.astype(np.float32), tp.CHANNELS))


def _adversarial() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    frames = []
    x = (1000 + rng.normal(0, 3, (301, 64))).astype(np.uint16)   # odd column length
    x[:, 3] = 1234                                              # constant column: bounds are integers
    x[:, 4] = 0
    x[:, 5] = 65535
    x[:150, 6], x[150:, 6] = 10, 11                             # two values
    x[17, :] = 65535                                            # a row clipped in most columns
    frames.append(x)
    y = rng.integers(0, 65536, (64, 300), dtype=np.uint16)      # uniform: bounds beyond the range
    y[:, :10] = rng.choice([0, 65535], (64, 10)).astype(np.uint16)
    frames.append(y)
    frames.append((rng.poisson(3.0, (400, 50))).astype(np.uint16))   # small integers: many ties
    frames.append(rng.integers(0, 256, (90, 40), dtype=np.uint8))
    for n in (1, 2, 3):
        frames.append(rng.integers(0, 9, (n, 12), dtype=np.uint16))
    return frames


def test_integer_profile_equals_astropy_path_on_adversarial_arrays():
    for image in _adversarial():
        new = tp.row_max_profile(image)
        old = tp.row_max_profile(image.astype(np.float32))
        assert np.array_equal(new, old), image.shape


def test_every_column_through_astropys_bounds_gives_the_same(monkeypatch):
    monkeypatch.setattr(tk, "_guard", lambda n, centre, spread: np.full(np.shape(centre), 1.0))
    for image in _adversarial()[:3]:
        assert np.array_equal(tp.row_max_profile(image), tp.row_max_profile(image.astype(np.float32)))


def test_block_means_equal_the_float_path():
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 65536, (430, 1303), dtype=np.uint16)
    for image in (raw, raw.T, raw[3:, 5:], raw[:, 7:].T, raw.T[11:], raw[::2].T):   # the last three: as trimmed
        for fy, fx in ((2, 2), (19, 6), (1, 3)):
            view = np.asarray(image, dtype=np.float32)
            assert np.array_equal(tk.block_mean_uint(image, fy, fx), tp._block_mean(view, fy, fx))
    assert tk.block_mean_uint(raw.astype(np.float32), 2, 2) is None


def _with_cosmic_rays(rng: np.random.Generator) -> list[np.ndarray]:
    """Arrays with spikes (single pixels, pairs, saturated, next to the edges) on varied backgrounds."""
    frames = []
    base = (1000 + rng.normal(0, 4, (200, 300))).astype(np.uint16)
    base[:, 100:104] += 3000                                    # a bright fibre: not a hit
    ys, xs = rng.integers(0, 200, 60), rng.integers(0, 300, 60)
    base[ys, xs] = rng.integers(1100, 65536, 60).astype(np.uint16)
    base[ys[:20], np.minimum(xs[:20] + 1, 299)] = 65535          # two-pixel tracks and saturation
    base[:, 0], base[:, -1] = 60000, 60000                      # edge columns are never hits
    frames.append(base)
    flat = np.full((50, 80), 7, dtype=np.uint16)                # zero noise: the floor is 0.01 ADU
    flat[10, 10], flat[20, 40] = 8, 65535
    frames.append(flat)
    frames.append(rng.integers(0, 65536, (70, 90), dtype=np.uint16))   # noise as large as the range
    frames.append(rng.integers(0, 256, (60, 61), dtype=np.uint8))
    frames.append(np.zeros((5, 3), dtype=np.uint16))
    return frames


def test_cosmic_hits_and_pixel_noise_equal_the_float_path():
    rng = np.random.default_rng(11)
    arrays = _adversarial() + _with_cosmic_rays(rng)
    for seq, obstype in enumerate(("DARK", "SCIENCE")):
        frame = sim.simulate_frame(MINI, "r1", obstype, night=NIGHT, expid=sim.make_expid(NIGHT, seq + 1), seed=seq)
        arrays.append(tp.orient(frame.raw))                     # the ingest layout: a transposed view
    seen = 0
    for array in arrays:
        for image in (array, np.ascontiguousarray(array), array[1:, 2:]):
            as_float = image.astype(np.float32)
            assert tp.pixel_noise(image) == tp.pixel_noise(as_float), image.shape
            new, old = tp.cosmic_hits(image), tp.cosmic_hits(as_float)
            assert np.array_equal(new, old), (image.shape, int(new.sum()), int(old.sum()))
            seen += int(new.sum())
    assert tk.pixel_noise_mad_uint(np.zeros((4, 9)), 8) is None       # floats take the general path
    assert seen > 200, "the arrays must hold hits for the comparison to mean anything"


def test_mini_frames_of_every_type_prepare_identically():
    for seq, obstype in enumerate(("BIAS", "DARK", "FLAT", "ARC", "SCIENCE", "STANDARD")):
        frame = sim.simulate_frame(MINI, "b1", obstype, night=NIGHT, expid=sim.make_expid(NIGHT, seq + 1), seed=seq)
        _old_and_new(frame.raw)


@pytest.mark.slow
def test_lamost_frame_prepares_identically():
    frame = sim.simulate_frame(LAMOST, "r3", "SCIENCE", night=NIGHT, expid=sim.make_expid(NIGHT, 1), seed=4)
    _old_and_new(frame.raw)


def _outcome(data: bytes):
    try:
        frame = read_frame(data)
    except FrameRejected as rejected:
        return ("rejected", rejected.error_class, rejected.reason)
    cards = [(c.keyword, c.value, c.comment) for c in frame.header.cards]
    return ("read", frame.pixels.dtype.str, frame.pixels.shape, frame.pixels.tobytes(), cards, frame.obstype)


def _fits_bytes(data: np.ndarray, checksum: bool = True, **overrides) -> bytes:
    buffer = io.BytesIO()
    fits.PrimaryHDU(data=data, header=make_raw_header(**overrides)).writeto(buffer, checksum=checksum)
    return buffer.getvalue()


def _without(header: fits.Header, key: str, datasum: str) -> bytes:
    h = header.copy()
    del h[key]
    h["DATASUM"] = datasum
    return h.tostring().encode()


def _variants() -> dict[str, bytes]:
    rng = np.random.default_rng(11)
    pixels = (1000 + rng.normal(0, 30, MINI.raw_shape)).clip(0, 65535).astype(np.uint16)
    pixels[3, 4], pixels[5, 6] = 0, 65535
    good = _fits_bytes(pixels)
    out = {"good": good, "no checksum": _fits_bytes(pixels, checksum=False)}
    flip = bytearray(good)
    flip[-3000] ^= 0x10                                          # a pixel byte: both sums fail
    out["pixel corrupted"] = bytes(flip)
    pad = bytearray(good)
    pad[-1] = 7                                                  # the data padding is summed too
    out["padding corrupted"] = bytes(pad)
    hdr = bytearray(good)
    at = good.index(b"EXPTIME")
    hdr[at + 25:at + 30] = b"9.125"                              # a header value: CHECKSUM fails
    out["header corrupted"] = bytes(hdr)
    with fits.open(io.BytesIO(good)) as hdul:
        header = hdul[0].header.copy()
    for name, change in (("DATASUM only", ("CHECKSUM", None)), ("CHECKSUM only", ("DATASUM", None)),
                         ("DATASUM wrong", ("DATASUM", "12345"))):
        h = header.copy()
        if name == "DATASUM wrong":
            out["DATASUM only, wrong"] = _without(h, "CHECKSUM", change[1]) + good[len(header.tostring()):]
        if change[1] is None:
            del h[change[0]]
        else:
            h[change[0]] = change[1]
        body = good[len(header.tostring()):]
        out[name] = h.tostring().encode() + body
    out["extra HDU"] = good + fits.ImageHDU(np.zeros((4, 4), np.int16)).header.tostring().encode() + bytes(2880)
    out["int16 without BZERO"] = _fits_bytes(pixels.astype(np.int16) // 2)
    out["float32"] = _fits_bytes(pixels.astype(np.float32))
    out["wrong shape"] = _fits_bytes(pixels[:-2])
    return out


def test_plain_frame_reader_gives_astropys_pixels_header_and_verdict(monkeypatch):
    variants = _variants()
    fast = {name: _outcome(data) for name, data in variants.items()}
    took_fast = {name for name, data in variants.items() if fitsreader._read_plain_uint16(data) is not None}
    assert {"good", "no checksum", "pixel corrupted", "header corrupted", "DATASUM wrong"} <= took_fast
    assert not {"extra HDU", "float32", "int16 without BZERO"} & took_fast
    monkeypatch.setattr(fitsreader, "_read_plain_uint16", lambda data: None)
    slow = {name: _outcome(data) for name, data in variants.items()}
    for name in variants:
        assert fast[name] == slow[name], name
    assert fast["good"][0] == "read" and fast["pixel corrupted"][1] == "checksum"
    assert fast["padding corrupted"][1] == "checksum" and fast["DATASUM wrong"][1] == "checksum"
    assert "Datasum verification failed" in fast["DATASUM only, wrong"][2]


def test_reading_on_threads_keeps_the_verdicts_and_the_warning_filters():
    """Ingest reads on two threads: concurrent reads give the serial verdicts, and no reader's
    warning filter outlives it (an "error" filter left behind once made every later warning of
    the process an exception; processors/warnings_guard.py)."""
    variants = _variants()
    serial = {name: _outcome(data) for name, data in variants.items()}
    before = list(warnings.filters)
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(lambda item: (item[0], _outcome(item[1])), list(variants.items()) * 6))
    assert warnings.filters == before
    assert all(outcome == serial[name] for name, outcome in outcomes)


def test_ones_complement_sum_is_astropys():
    rng = np.random.default_rng(2)
    for n in (0, 4, 2880, 4 * 100_003):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        data[: n // 2] = 255                                     # carries
        hdu = object.__new__(fits.PrimaryHDU)
        assert fitsreader.ones_complement_sum(data.tobytes()) == int(hdu._compute_checksum(data))


def _files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("codec", [rawstore.RAW_CODEC, {"cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"},
                                   {"cname": "lz4", "clevel": 5, "shuffle": "noshuffle"}])
def test_shard_written_directly_equals_zarrs(tmp_path, monkeypatch, codec):
    import zarr

    monkeypatch.setattr(rawstore, "RAW_CODEC", codec)
    rng = np.random.default_rng(1)
    frames = {"mini": (1000 + rng.normal(0, 30, MINI.raw_shape)).astype(np.uint16)}
    small = rng.integers(0, 4000, (150, 100), dtype=np.uint16)   # chunks 64 x 32: a 3 x 4 grid, Morton order
    small[:64, :32] = 0                                          # a chunk of fill value: not stored
    frames["grid"] = small
    frames["zero"] = np.zeros((70, 40), np.uint16)               # no shard at all
    for name, pixels in frames.items():
        if name != "mini":
            monkeypatch.setattr(rawstore, "RAW_CHUNK", (64, 32))
        direct, via_zarr = tmp_path / f"{name}-direct", tmp_path / f"{name}-zarr"
        rawstore._create(zarr.storage.LocalStore(direct), pixels, {"a": 1}, "digest", local=direct)
        rawstore._create(zarr.storage.LocalStore(via_zarr), pixels, {"a": 1}, "digest")
        assert _files(direct) == _files(via_zarr), name
        assert np.array_equal(zarr.open_array(zarr.storage.LocalStore(direct), mode="r")[...], pixels)
