"""Tests of schemas/containers.py: the one array serialisation of every data container, and a full
calibration set through it and through the calibration store."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest

from fiberlake.processors.pipeline import Calibration
from fiberlake.processors.rectify import RectifyConfig, fit_rectification
from fiberlake.processors.rectify_map import Frame, LegendreMap, MapConfig, MLPMap, map_from_arrays
from fiberlake.schemas.containers import (CLASS_KEY, ArrayContainer, GHField, ProfileModel, PSFModel, Spectra1D,
                                          TraceSet, WaveSolution, array_text, from_arrays, to_arrays, transient)
from fiberlake.storage.calibstore import read_calib_set, write_calib_set

RNG = np.random.default_rng(11)
NF, NY, NX = 6, 40, 90


def assert_same(a, b, where="value"):
    """Exact equality: same types, arrays with the same dtype, shape and values (NaN == NaN)."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), f"{where}: {type(b).__name__} instead of an ndarray"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {b.dtype}{b.shape} != {a.dtype}{a.shape}"
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), f"{where}: values differ"
        return
    assert type(a) is type(b), f"{where}: {type(b).__name__} != {type(a).__name__}"
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(b)} != {sorted(a)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    else:
        assert a == b, f"{where}: {b!r} != {a!r}"


def traces(nf=NF, ny=NY) -> TraceSet:
    coeffs = np.zeros((nf, 3))
    coeffs[:, 0] = 10.0 + 14.0 * np.arange(nf)
    coeffs[:, 1:] = RNG.normal(0, 0.5, (nf, 2))
    dead = np.zeros(nf, bool)
    dead[2] = True
    return TraceSet(coeffs=coeffs, ny=ny, dead=dead, rms=RNG.uniform(0, 0.1, nf), sigma=RNG.uniform(1.5, 2.5, nf))


def wave() -> WaveSolution:
    return WaveSolution(coeffs=RNG.normal(5000, 10, (NF, 4)), ny=NY, rms=RNG.uniform(0, 0.05, NF),
                        n_lines=RNG.integers(5, 20, NF), row_range=np.tile([2.0, NY - 3.0], (NF, 1)))


def spectra(with_fit: bool = False) -> Spectra1D:
    flux = RNG.normal(1, 0.1, (NF, NY))
    flux[0, 3] = np.nan
    extra = dict(chi2=RNG.uniform(0, 2, (NF, NY)).astype(np.float32), npix=np.full((NF, NY), 5, np.float32))
    return Spectra1D(flux, np.ones((NF, NY)), RNG.integers(0, 4, (NF, NY)), **(extra if with_fit else {}))


def psf(rms=0.012, sigma_rms=0.25) -> PSFModel:
    lsf = GHField(halfwidth=6, sigma_coef=RNG.uniform(1, 2, (3, 3)), coef=RNG.normal(0, 0.05, (4, 3, 3)),
                  focus=RNG.normal(0, 0.01, NF), rms=rms, n_samples=321)
    return PSFModel(lsf=lsf, xsf=GHField.gaussian(1.8, 9, order=2), ny=NY, nx=NX,
                    info={"n_lsf_lines": 12, "lsf_sigma_rms": sigma_rms, "note": "fit", "deg": [2, 2]})


def rectification():
    t = traces(ny=200)
    return fit_rectification(t, 100, RectifyConfig(n_samples=600, map=MapConfig(kind="legendre", deg=2)),
                             nominal_x=t.coeffs[:, 0])


def calibration(**changes) -> Calibration:
    cal = Calibration(
        master_bias=RNG.normal(0, 1, (NY, NX)).astype(np.float32), master_flat=RNG.uniform(0, 1e4, (NY, NX)),
        master_flat_ivar=RNG.uniform(0, 1, (NY, NX)).astype(np.float32), traces=traces(), wave=wave(),
        fiberflats={"box": spectra(), "optimal": spectra(with_fit=True)}, grid=np.linspace(4000, 6000, 57),
        profile=ProfileModel(RNG.uniform(1, 2, (NF, NY)), np.zeros((NF, NY)), RNG.normal(0, 1, (NF, NY)), 1.7),
        info={"n_bias": 3, "rectify": {"applied": True}}, psf=psf(), rectification=rectification())
    return dataclasses.replace(cal, **changes)


def test_containers_round_trip_exactly():
    for obj in (traces(), wave(), spectra(), spectra(with_fit=True), psf(), psf().xsf,
                ProfileModel(np.ones((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)), np.full((2, 3), 2.0)),
                TraceSet(np.zeros((1, 2)), 5, np.zeros(1, bool), np.zeros(1))):
        arrays = obj.to_arrays()
        assert all(isinstance(v, np.ndarray) for v in arrays.values())
        assert_same(obj, type(obj).from_arrays(arrays), type(obj).__name__)
    # what each kind becomes; numpy scalars in a float field or in info come back as Python numbers
    arrays = psf(rms=np.float64(0.012), sigma_rms=np.float32(0.25)).to_arrays()
    assert arrays["ny"].dtype == np.int64 and arrays["ny"].shape == ()
    assert arrays["invariant"].dtype == np.bool_ and arrays["lsf/rms"].dtype == np.float64
    assert arrays["info"].dtype == np.uint8 and "x_offset" not in arrays  # transient
    back = PSFModel.from_arrays(arrays)
    assert back.info == {"n_lsf_lines": 12, "lsf_sigma_rms": 0.25, "note": "fit", "deg": [2, 2]}
    assert type(back.lsf.rms) is float and back.lsf.rms == 0.012
    assert "chi2" not in spectra().to_arrays() and Spectra1D.from_arrays(spectra().to_arrays()).chi2 is None
    assert type(ProfileModel.from_arrays(ProfileModel(np.ones(2), np.zeros(2), np.zeros(2)).to_arrays()).wing_ratio) \
        is float


def test_derived_containers_say_their_class():
    m = LegendreMap(Frame(30, 20), MapConfig(kind="legendre", deg=1), {"fwd_rms": 0.1},
                    fwd=RNG.normal(0, 1, (2, 2, 2)), inv=RNG.normal(0, 1, (2, 2, 2)))
    net = {"w1": RNG.normal(size=(4, 2)).astype(np.float32), "b1": np.zeros(4, np.float32),
           "w2": RNG.normal(size=(2, 4)).astype(np.float32), "b2": np.zeros(2), "scale": np.ones(2)}
    mlp = MLPMap(Frame(30, 20), MapConfig(kind="mlp", hidden=4, device="cpu"), {"torch": "x"}, fwd=net,
                 inv={k: v * 2 for k, v in net.items()})
    for obj in (m, mlp):
        arrays = obj.to_arrays()
        assert array_text(arrays[CLASS_KEY]) == type(obj).__name__
        assert_same(obj, map_from_arrays(arrays), type(obj).__name__)
    assert "fwd/w1" in mlp.to_arrays() and "config/device" not in m.to_arrays()  # None writes nothing
    col, row = np.array([3.0, 17.5]), np.array([2.0, 25.0])
    back = map_from_arrays(mlp.to_arrays())
    np.testing.assert_array_equal(back.forward(col, row), mlp.forward(col, row))


@dataclass
class _Info(ArrayContainer):
    label: str
    flags: dict
    counts: dict[str, np.ndarray]
    scratch: list = transient(default_factory=list)
    maybe: float | None = None


def test_generic_rules():
    obj = _Info("é/ü", {"a": [1, 2], "nested": {"x": None}}, {"b": np.arange(3, dtype=np.int16)}, [1])
    arrays = to_arrays(obj)
    assert sorted(arrays) == ["counts/b", "flags", "label"]
    back = from_arrays(_Info, arrays)
    assert back.label == "é/ü" and back.flags == obj.flags and back.scratch == [] and back.maybe is None
    assert_same(obj.counts, back.counts)
    assert from_arrays(_Info, to_arrays(_Info("", {}, {}))).counts == {}  # an empty mapping writes nothing
    with pytest.raises(ValueError, match="without '/'"):
        to_arrays(_Info("x", {}, {"a/b": np.zeros(1)}))
    with pytest.raises(KeyError, match="label"):
        from_arrays(_Info, {"flags": arrays["flags"]})


def test_calibration_round_trip_through_arrays_and_the_store(tmp_path):
    cal = calibration()
    arrays = cal.to_arrays()
    assert {"layout", "master_bias", "fiberflats/box/flux", "fiberflats/optimal/chi2", "profile/wing_ratio", "psf/lsf/coef",
            "rectification/map/fwd", "rectification/map/class", "rectification/traces_raw/coeffs",
            "rectification/config/map/kind"} <= set(arrays)
    assert not any(k.startswith("info") for k in arrays)  # the set's metadata carries it
    assert_same(cal, Calibration.from_arrays(arrays, cal.info), "calibration")

    path = tmp_path / "calib" / "2026-11-21" / "b1"
    write_calib_set(path, arrays, {"night": "2026-11-21", **cal.info})
    stored, meta = read_calib_set(path)
    assert stored.keys() == arrays.keys()
    back = Calibration.from_arrays(stored, cal.info)
    assert_same(cal, back, "stored calibration")
    assert meta["n_bias"] == 3
    np.testing.assert_array_equal(back.rectification.map.forward(5.0, 7.0), cal.rectification.map.forward(5.0, 7.0))

    # a set of the hand-written layout before (no "layout" array) is refused, not misread
    old = {k: v for k, v in stored.items() if k != "layout"}
    with pytest.raises(ValueError, match="layout 1"):
        Calibration.from_arrays(old, meta)

    # the optional products are optional; a set without them comes back without them
    bare = calibration(profile=None, psf=None, rectification=None, fiberflats={}, info={})
    write_calib_set(path, bare.to_arrays(), {})
    assert_same(bare, Calibration.from_arrays(read_calib_set(path)[0]), "bare calibration")
