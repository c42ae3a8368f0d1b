"""Property tests of header parsing: whatever a header holds, the reader answers with typed
values or a FrameRejected that names the problem, and what it accepts is safe in a path."""

from __future__ import annotations

import string

import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_raw_header
from fiberlake.ingest.fitsreader import FrameRejected, validate_header
from fiberlake.schemas.header import REQUIRED_KEYWORDS, parse_section
from fiberlake.storage.layout import Lake, safe_component

PRINTABLE = st.text(alphabet=string.printable.strip() + " ", max_size=80)
FITS_VALUES = st.one_of(
    PRINTABLE,
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.booleans(),
    st.sampled_from(["../../etc", "/abs/path", "b1/../r1", "..", "2026-11-21/..", "b" * 70, "", " ", "r17", "b0"]),
)
KEYS = [kw.name for kw in REQUIRED_KEYWORDS]


def _header(overrides: dict) -> fits.Header | None:
    try:
        return make_raw_header(**overrides)
    except (ValueError, TypeError):
        return None  # astropy itself refuses to write such a card: not a header a file can carry


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), st.one_of(st.none(), FITS_VALUES), max_size=4))
def test_validate_header_accepts_or_rejects_with_a_reason(overrides):
    header = _header(overrides)
    if header is None:
        return
    try:
        values = validate_header(header)
    except FrameRejected as rejected:
        assert rejected.error_class and len(rejected.reason) > 10
        return
    # accepted: every value that ends up in a lake path is a safe path component
    lake = Lake.at("/tmp/fuzz-lake")
    rel = lake.raw_relpath(values["NIGHT"], values["EXPID"], values["CAMERA"], 1)
    assert ".." not in rel and not rel.startswith("/")
    safe_component(values["NIGHT"], "night")
    safe_component(values["CAMERA"], "camera")


@settings(max_examples=300, deadline=None)
@given(st.one_of(PRINTABLE, st.builds(lambda a, b, c, d: f"[{a}:{b},{c}:{d}]", *[st.integers(-5, 5000)] * 4)))
def test_parse_section_returns_slices_or_value_error(text):
    try:
        rows, cols = parse_section(text)
    except ValueError as err:
        assert "section" in str(err)
        return
    assert 0 <= rows.start < rows.stop and 0 <= cols.start < cols.stop


def test_known_escapes_are_refused():
    for key, value in (("NIGHT", "../../etc"), ("CAMERA", "/etc"), ("ARM", "b/.."), ("OBSTYPE", "x" * 100)):
        with pytest.raises(FrameRejected):
            validate_header(make_raw_header(**{key: value}))
