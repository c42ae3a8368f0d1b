"""Read and validate one raw FITS frame against the header contract and its instrument.

Every way a delivered file can be unusable raises :class:`FrameRejected` with a short machine
class (``error_class``) and a sentence a person can act on (``reason``). Nothing else escapes.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from fiberlake.ingest.delivery import GZIP_MAGIC, MAX_DELIVERY_BYTES, gunzip
from fiberlake.processors.warnings_guard import catch_warnings
from fiberlake.schemas.header import (
    OBSTYPES,
    REQUIRED_KEYWORDS,
    check_camera,
    check_expid,
    check_night,
    parse_section,
)
from fiberlake.schemas.instrument import Instrument, get_instrument

FITS_BLOCK = 2880


class FrameRejected(Exception):
    """A delivered file that cannot enter the lake.

    Parameters
    ----------
    error_class : str
        Short class, e.g. ``"truncated"``, ``"missing_keyword"``, ``"bad_shape"``.
    reason : str
        What is wrong, in words.
    """

    def __init__(self, error_class: str, reason: str):
        super().__init__(reason)
        self.error_class = error_class
        self.reason = reason


@dataclass
class RawFrame:
    """A validated raw frame."""

    pixels: np.ndarray
    header: fits.Header
    instrument: Instrument
    night: str
    expid: int
    camera: str
    spectrograph: int
    arm: str
    obstype: str


def sha256_file(path: Path, block: int = 1 << 22) -> tuple[str, int]:
    """SHA-256 hex digest and size of a file, read in blocks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _card_value(header: fits.Header, key: str, kind: type):
    if key not in header:
        raise FrameRejected("missing_keyword", f"required header keyword {key} is missing")
    value = header[key]
    try:
        if kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(value)
        if kind is float:
            out = float(value)
            if not np.isfinite(out):
                raise ValueError
            return out
        if not isinstance(value, str):
            raise ValueError
        return value.strip()
    except (TypeError, ValueError):
        raise FrameRejected("bad_keyword", f"header keyword {key} = {value!r} is not a valid {kind.__name__}") from None


FLOAT32_MAX = float(np.finfo(np.float32).max)
_RANGES = {"EXPTIME": (0.0, FLOAT32_MAX), "GAIN": (0.0, FLOAT32_MAX), "RDNOISE": (0.0, FLOAT32_MAX)}
"""Allowed closed ranges of float keywords stored as float32 (GAIN must also be above 0)."""


def validate_header(header: fits.Header, instrument: Instrument | None = None) -> dict:
    """Check the header contract; return the typed values of the required keywords.

    Every key field is checked by the rule its table column uses
    (:mod:`fiberlake.schemas.header`): ``NIGHT`` is a real date, ``EXPID`` fits int64,
    ``CAMERA`` is ``<arm><spectrograph>`` and names a camera of the instrument, the floats fit
    their float32 columns.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Primary header of the frame.
    instrument : Instrument, optional
        Instrument the lake holds; the frame must belong to it.

    Raises
    ------
    FrameRejected
        On any missing, mistyped or inconsistent keyword, or values unsafe to use in paths.
    """
    untyped = "OBSTYPE" not in header or (isinstance(header["OBSTYPE"], str) and not header["OBSTYPE"].strip())
    values = {kw.name: ("UNKNOWN" if kw.name == "OBSTYPE" and untyped else _card_value(header, kw.name, kw.kind))
              for kw in REQUIRED_KEYWORDS}
    for key in ("INSTRUME", "NIGHT", "CAMERA", "ARM", "OBSTYPE", "DATE-OBS"):
        text = values[key]
        if not text.isascii() or not text.isprintable() or len(text) > 64 or "/" in text or ".." in text:
            raise FrameRejected("unsafe_keyword", f"header keyword {key} = {text[:80]!r} is not a safe identifier")
    for key, check in (("NIGHT", check_night), ("CAMERA", check_camera), ("EXPID", check_expid)):
        try:
            values[key] = check(values[key])
        except ValueError as err:
            raise FrameRejected("bad_keyword", f"header keyword {key}: {err}") from None
    obstype = values["OBSTYPE"].upper()
    if obstype not in OBSTYPES and not untyped:  # no type at all: typed from the pixels at ingest
        raise FrameRejected("bad_keyword", f"OBSTYPE = {values['OBSTYPE']!r} is not one of {', '.join(OBSTYPES)}")
    values["OBSTYPE"] = obstype
    if values["CAMERA"] != f"{values['ARM']}{values['SPECID']}":
        raise FrameRejected(
            "bad_keyword", f"CAMERA = {values['CAMERA']!r} disagrees with ARM = {values['ARM']!r}, SPECID = {values['SPECID']}"
        )
    for key, (low, high) in _RANGES.items():
        if not low <= values[key] <= high or (key == "GAIN" and values[key] == 0):
            raise FrameRejected("bad_keyword", f"header keyword {key} = {values[key]!r} is out of range")
    try:
        inst = get_instrument(values["INSTRUME"])
    except KeyError as err:
        raise FrameRejected("unknown_instrument", str(err.args[0])) from None
    if instrument is not None and inst.name != instrument.name:
        raise FrameRejected("wrong_instrument", f"frame is from {inst.name!r} but the lake holds {instrument.name!r}")
    arm = values["ARM"]
    if arm not in {a.name for a in inst.arms} or not 1 <= values["SPECID"] <= inst.n_spectrographs:
        raise FrameRejected("bad_keyword", f"camera {values['CAMERA']!r} does not exist on instrument {inst.name!r}")
    for key in ("DATASEC", "BIASSEC"):
        try:
            parse_section(values[key])
        except ValueError as err:
            raise FrameRejected("bad_keyword", f"{key}: {err}") from None
    values["_instrument"] = inst
    return values


def _declared_size(data: bytes) -> int | None:
    """Bytes the primary HDU should occupy according to its header (None if unreadable)."""
    try:
        handle = io.BytesIO(data)
        header = fits.Header.fromfile(handle)
        header_bytes = handle.tell()
        nbytes = abs(int(header["BITPIX"])) // 8
        for axis in range(1, int(header["NAXIS"]) + 1):
            nbytes *= int(header[f"NAXIS{axis}"])
        return header_bytes + -(-nbytes // FITS_BLOCK) * FITS_BLOCK
    except Exception:
        return None


def frame_bytes(source: Path | bytes) -> bytes:
    """The FITS bytes of a delivery: read from a path, gunzipped when gzip-compressed.

    Raises
    ------
    FrameRejected
        If a gzip stream is truncated, corrupt or decompresses to more than any frame.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if data[:2] == GZIP_MAGIC:
        try:
            return gunzip(data)
        except ValueError as err:
            cls = "truncated" if "ends early" in str(err) else "too_large" if "exceeds" in str(err) else "corrupt_gzip"
            raise FrameRejected(cls, str(err)) from None
    return data


def _checksum_verdict(caught: list) -> None:
    """Raise ``checksum`` if astropy warned that a CHECKSUM or DATASUM did not match."""
    for warning in caught:
        message = str(warning.message)
        if "checksum" in message.lower() or "datasum" in message.lower():
            raise FrameRejected("checksum", f"CHECKSUM/DATASUM verification failed: {message.strip()[:200]}")


def image_hdu(hdul: fits.HDUList):
    """The HDU holding the raw pixels: the primary, or a tile-compressed image right after it (fpack)."""
    if hdul[0].header.get("NAXIS", 0) or len(hdul) < 2:
        return hdul[0]
    if isinstance(hdul[1], fits.CompImageHDU):
        return hdul[1]
    return hdul[0]


def ones_complement_sum(data: bytes | memoryview, offset: int = 0, size: int | None = None) -> int:
    """The FITS 32-bit ones' complement sum of ``size`` bytes from ``offset`` (a multiple of 4 bytes).

    The exact integer sum of the big-endian words, folded with end-around carry: astropy's
    ``_compute_checksum`` (which folds after each 4 GiB block, the same value), in one pass.
    """
    words = np.frombuffer(data, dtype=">u4", count=-1 if size is None else size // 4, offset=offset)
    total = int(words.sum(dtype=np.uint64))    # no overflow below 2^32 words
    while high := total >> 32:
        total = (total & 0xFFFFFFFF) + high
    return total


def _astropy_checksum(header: fits.Header, datasum: int) -> str:
    """The CHECKSUM value astropy computes for ``header`` and ``datasum`` (its own encoding)."""
    hdu = object.__new__(fits.PrimaryHDU)      # no data, no header processing: the methods need ``_header``
    hdu._header = header
    return fits.PrimaryHDU._calculate_checksum(hdu, datasum)


def _read_plain_uint16(data: bytes) -> tuple[fits.Header, np.ndarray, str | None] | None:
    """The header, pixels and checksum verdict of a file that is one plain uint16 primary HDU.

    The common raw frame (a primary header, BITPIX 16, BZERO 32768, two axes, nothing after the
    padded data) is decoded here without astropy's HDU machinery: the header by astropy's parser,
    CHECKSUM/DATASUM verified as astropy verifies them (the same sums and encoding, the data sum
    once instead of twice), the pixels as astropy's ``uint=True`` gives them. Anything else, or any
    warning while parsing the header, returns None and the caller reads the file through
    ``fits.open`` (the same verdicts, ``tests/test_ingest_speed.py`` compares both).

    Returns
    -------
    (header, pixels, failure) or None
        ``failure`` is astropy's warning text for a failed CHECKSUM or DATASUM, else None.
    """
    try:
        with catch_warnings(record=True, action="always") as caught:
            handle = io.BytesIO(data)
            header = fits.Header.fromfile(handle)
            header_bytes = handle.tell()
            cards = header.cards
            if (len(cards) == 0 or cards[0].keyword != "SIMPLE" or cards[0].value is not True
                    or header.get("BITPIX") != 16 or header.get("NAXIS") != 2 or type(header.get("BZERO")) is not int
                    or header["BZERO"] != 32768 or header.get("BSCALE", 1) != 1 or "BLANK" in header
                    or "GROUPS" in header or "XTENSION" in header):
                return None
            nx, ny = header["NAXIS1"], header["NAXIS2"]
            if type(nx) is not int or type(ny) is not int or nx <= 0 or ny <= 0:
                return None
            padded = -(-2 * nx * ny // FITS_BLOCK) * FITS_BLOCK
            if len(data) != header_bytes + padded:
                return None
            failure = None
            if "CHECKSUM" in header:
                datasum = ones_complement_sum(data, header_bytes, padded) if "DATASUM" in header else 0
                if _astropy_checksum(header, datasum) != header["CHECKSUM"]:
                    failure = "Checksum verification failed for HDU ('PRIMARY', 1)."
            if "DATASUM" in header and failure is None:
                if ones_complement_sum(data, header_bytes, padded) != int(header["DATASUM"]):
                    failure = "Datasum verification failed for HDU ('PRIMARY', 1)."
    except Exception:  # astropy's own reading gives the reason
        return None
    if caught:  # any warning while parsing (astropy's reading says what it means)
        return None
    pixels = np.frombuffer(data, dtype=">u2", count=nx * ny, offset=header_bytes).reshape(ny, nx)
    pixels = np.bitwise_xor(pixels, np.uint16(0x8000), dtype=np.uint16)   # BZERO 32768: int16 -> uint16
    return header, pixels, failure


def _read_with_astropy(data: bytes) -> tuple[fits.Header, np.ndarray | None]:
    """Header and pixels of a FITS file through ``fits.open`` (any layout astropy reads: fpack, extra
    HDUs, other BITPIX), CHECKSUM/DATASUM verified, truncation detected.

    Raises
    ------
    FrameRejected
        ``checksum``, ``truncated``, ``unreadable`` or ``bad_shape``.
    """
    size = len(data)
    caught: list = []
    try:
        with catch_warnings(record=True, action="always") as caught:
            with fits.open(io.BytesIO(data), memmap=False, checksum=True, do_not_scale_image_data=False,
                           uint=True) as hdul:
                hdu = image_hdu(hdul)
                header = hdu.header.copy()
                bitpix, bzero = header.get("BITPIX"), header.get("BZERO", 0)
                if isinstance(hdu, fits.CompImageHDU):  # decompressed size from the header, before decompressing
                    declared = abs(int(bitpix)) // 8
                    for axis in range(1, int(header.get("NAXIS", 0)) + 1):
                        declared *= int(header[f"NAXIS{axis}"])
                    if declared > MAX_DELIVERY_BYTES:
                        raise FrameRejected("bad_shape", f"the compressed image declares {declared} bytes, more than "
                                                         "any raw frame")
                pixels = hdu.data
                pixels = None if pixels is None else np.array(pixels)
    except FrameRejected:
        raise
    except Exception as err:  # astropy raises many types for corrupt files
        _checksum_verdict(caught)  # a failed checksum names the cause better than the error it led to
        text = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        expected = _declared_size(data)
        if expected is not None and size < expected:
            raise FrameRejected(
                "truncated", f"the file has {size} bytes but its header declares {expected}: truncated or still being written"
            ) from None
        cls = "truncated" if "truncat" in text.lower() or "smaller than" in text.lower() else "unreadable"
        raise FrameRejected(cls, f"astropy could not read the FITS file: {text}") from None
    _checksum_verdict(caught)
    for warning in caught:
        message = str(warning.message)
        if "truncat" in message.lower():
            raise FrameRejected("truncated", f"the file is truncated: {message.strip()[:200]}")
    return header, pixels


def read_frame(source: Path | bytes, instrument: Instrument | None = None) -> RawFrame:
    """Open, verify and validate a raw frame.

    ``source`` is a path, or the delivered bytes (what ingest passes: read once, hashed once). A
    gzip-compressed file (``.fits.gz``) is decompressed in memory, bounded; an fpack file
    (``.fits.fz``: an empty primary HDU and a tile-compressed image) is read through astropy.

    Checks, in order: the file is non-empty and a whole number of FITS blocks (after gzip);
    astropy can parse it; the header contract; the declared image size; CHECKSUM/DATASUM match
    when present (of the compressed table for fpack, as written by astropy and fpack -C);
    BITPIX/BZERO give uint16; the shape is the instrument's raw shape; the pixels are not all
    zero or all saturated.

    Raises
    ------
    FrameRejected
        With a readable reason for any failure.
    """
    data = frame_bytes(source)
    size = len(data)
    if size == 0:
        raise FrameRejected("empty", "the file is empty (0 bytes)")
    if size % FITS_BLOCK:
        raise FrameRejected(
            "truncated", f"file size {size} is not a multiple of the FITS block (2880 bytes): truncated or still being written"
        )
    if not data[:30].startswith(b"SIMPLE  =                    T"):
        raise FrameRejected("not_fits", "the file does not start with a FITS primary header (SIMPLE = T)")
    plain = _read_plain_uint16(data)
    if plain is not None:  # one plain uint16 primary HDU: the same checks without astropy's HDU machinery
        header, pixels, failure = plain
        if failure is not None:
            raise FrameRejected("checksum", f"CHECKSUM/DATASUM verification failed: {failure}")
    else:
        header, pixels = _read_with_astropy(data)
    bitpix, bzero = header.get("BITPIX"), header.get("BZERO", 0)
    try:
        values = validate_header(header, instrument)
    except FrameRejected:
        raise
    except Exception as err:  # astropy parses cards lazily: a malformed card fails only when read
        text = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise FrameRejected("bad_header", f"the header has a card astropy cannot parse: {text}") from None
    inst: Instrument = values["_instrument"]
    data = pixels
    if data is None:
        raise FrameRejected("no_data", "the primary HDU has no pixel data")
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise FrameRejected("nonfinite", f"{bad} pixels are NaN or infinite (raw frames must be uint16)")
    if not (bitpix == 16 and bzero == 32768 and data.dtype == np.uint16):
        raise FrameRejected(
            "bad_bitpix", f"pixels are BITPIX={bitpix}, BZERO={bzero} ({data.dtype}); raw frames must be uint16 (BITPIX=16, BZERO=32768)"
        )
    if data.shape != inst.raw_shape:
        raise FrameRejected("bad_shape", f"shape {data.shape} differs from the {inst.name} raw shape {inst.raw_shape}")
    for key in ("DATASEC", "BIASSEC"):
        rows, cols = parse_section(values[key])
        if rows.stop > data.shape[0] or cols.stop > data.shape[1]:
            raise FrameRejected("bad_keyword", f"{key} = {values[key]} reaches outside the {data.shape[1]}x{data.shape[0]} image")
    if not data.any():
        raise FrameRejected("all_zero", "every pixel is zero (dead readout)")
    if np.all(data >= inst.saturation):
        raise FrameRejected("saturated", "every pixel is saturated")
    return RawFrame(
        pixels=data,
        header=header,
        instrument=inst,
        night=values["NIGHT"],
        expid=values["EXPID"],
        camera=values["CAMERA"],
        spectrograph=values["SPECID"],
        arm=values["ARM"],
        obstype=values["OBSTYPE"],
    )
