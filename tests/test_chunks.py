"""A frame cut into fiber bundles reduces to the same spectra as the whole frame."""

from __future__ import annotations

import numpy as np
import pytest

from fiberlake.ingest.simulate import make_expid, simulate_frame
from fiberlake.processors import ccd
from fiberlake.processors.chunks import bundle_columns, n_bundles, plan_bundles, subset_psf, subset_traces
from fiberlake.processors.pipeline import ReductionParams, build_calibration, reduce_frame
from fiberlake.schemas.containers import PSFModel, TraceSet
from fiberlake.schemas.instrument import MINI
from fiberlake.schemas.maskbits import Mask

NIGHT = "2026-04-19"
SEED = 7219  # used by no other test


@pytest.mark.parametrize("n_fibers,per,margin", [(250, 25, 2), (32, 8, 2), (32, 5, 3), (32, 0, 2), (32, 40, 2), (1, 1, 0)])
def test_bundles_tile_the_slit(n_fibers, per, margin):
    bundles = plan_bundles(n_fibers, per, margin)
    assert len(bundles) == n_bundles(n_fibers, per)
    assert bundles[0].core[0] == 0 and bundles[-1].core[1] == n_fibers
    for a, b in zip(bundles, bundles[1:]):
        assert a.core[1] == b.core[0]
    for b in bundles:
        assert b.fibers[0] == max(0, b.core[0] - margin) and b.fibers[1] == min(n_fibers, b.core[1] + margin)
        assert b.keep.stop - b.keep.start == b.core[1] - b.core[0]
    with pytest.raises(ValueError):
        plan_bundles(n_fibers, -1)


def test_slab_coordinates():
    rng = np.random.default_rng(1)
    coeffs = np.zeros((10, 4))
    coeffs[:, 0] = 20 + 16 * np.arange(10)
    coeffs[:, 1:] = rng.normal(0, 2, (10, 3))
    traces = TraceSet(coeffs=coeffs, ny=100, dead=np.zeros(10, bool), rms=np.zeros(10), sigma=np.ones(10))
    sub = subset_traces(traces, (3, 7), 50)
    np.testing.assert_allclose(sub.x() + 50, traces.x()[3:7], atol=1e-9)
    bundle = plan_bundles(10, 4, 1)[1]
    c0, c1 = bundle_columns(traces, bundle, 7.0, 200)
    x = traces.x()[bundle.fibers[0]:bundle.fibers[1]]
    assert c0 <= x.min() - 7 and c1 >= x.max() + 8 and 0 <= c0 < c1 <= 200
    psf = PSFModel.gaussian(1.0, 1.2, ny=100, nx=200)
    psf.xsf.focus = np.linspace(0, 0.1, 10)
    seen = subset_psf(psf, (3, 7), 50)
    s_full, _ = psf.xsf.params(*psf._uv(np.array([90.0]), np.array([40.0])), np.array([4]))
    s_sub, _ = seen.xsf.params(*seen._uv(np.array([40.0]), np.array([40.0])), np.array([1]))
    np.testing.assert_allclose(s_sub, s_full)


@pytest.mark.slow  # builds a calibration set and reduces a simulated frame whole and in bundles
def test_bundles_reduce_like_the_whole_frame():
    pytest.importorskip("torch")
    frames = {}
    for seq, obstype in enumerate(("BIAS", "FLAT", "ARC", "SCIENCE"), start=1):
        frames[obstype] = simulate_frame(MINI, "b1", obstype, night=NIGHT, expid=make_expid(NIGHT, seq), seed=SEED)
    params = ccd.CCDParams.from_header(dict(frames["FLAT"].header), saturation=65535)
    whole = ReductionParams().updated({"extractions": ("box", "optimal", "deconv"), "execution.chunk_fibers": 0})
    calib = build_calibration([frames["BIAS"].raw], [frames["FLAT"].raw], [frames["ARC"].raw], params, MINI, "b", whole)
    sci = frames["SCIENCE"]
    sky = np.asarray(sci.truth["TARGETS"]["OBJTYPE"]) == "SKY"
    ref = reduce_frame(sci.raw, params, calib, sky, whole)
    out = reduce_frame(sci.raw, params, calib, sky, whole.updated({"execution.chunk_fibers": 7,
                                                                        "execution.chunk_margin": 2}))
    for method, tol in (("box", 0.0), ("optimal", 5e-3), ("deconv", 0.01)):
        a, b = ref[method].spectra, out[method].spectra
        # differences in units of the noise: box is identical, the simultaneous fits nearly so (optimal:
        # 0.003 sigma at worst on this scene since the target mix draws white dwarfs and carbon stars)
        worst = float(np.max(np.abs(a.flux - b.flux) * np.sqrt(a.ivar)))
        assert worst <= tol, (method, worst)
        np.testing.assert_allclose(b.ivar, a.ivar, rtol=5e-3)  # 2 of 31456 pixels differ by 0.4 % on this scene
        # the one flag that may differ: BAD2DFIT's threshold is a median over the fibers fitted together
        np.testing.assert_array_equal(a.mask & ~np.uint32(Mask.BAD2DFIT), b.mask & ~np.uint32(Mask.BAD2DFIT))
        assert np.mean(a.mask != b.mask) < 1e-3, method
        np.testing.assert_allclose(out[method].metrics["snr_eq15"], ref[method].metrics["snr_eq15"], rtol=1e-3)
    assert out["deconv"].resolution.shape == ref["deconv"].resolution.shape
    np.testing.assert_allclose(out["deconv"].resolution, ref["deconv"].resolution, atol=1e-3)
    # sky was fitted from every sky fiber of the frame, not per bundle
    np.testing.assert_allclose(out["box"].sky.flux, ref["box"].sky.flux)


def test_tiles_correct_like_the_whole_frame(monkeypatch):
    """Cosmic rays and rectification per column tile (with margins) against the whole frame at once."""
    from fiberlake.processors import frame_tiles
    from fiberlake.processors.rectify_map import Frame, LegendreMap, MapConfig

    assert frame_tiles.tile_count(4096, 8) == 8 and frame_tiles.tile_count(608, 8) == 1  # LAMOST, mini
    monkeypatch.setattr(frame_tiles, "MIN_TILE_COLUMNS", 64)  # tiles of ~120 columns on this mini frame

    sci = simulate_frame(MINI, "b1", "SCIENCE", night=NIGHT, expid=make_expid(NIGHT, 4), seed=SEED)
    params = ccd.CCDParams.from_header(dict(sci.header), saturation=65535)
    adu, mask = ccd.correct_counts(sci.raw, params)
    adu, mask = adu[:256].copy(), mask[:256].copy()  # a band of rows keeps the test short
    ny, nx = adu.shape
    # bad pixels across the first tile edge: a saturated blob, a non-finite run along a row
    mask[100:104, 115:131] |= np.uint32(Mask.SATURATED)
    mask[200, 118:127] |= np.uint32(Mask.NONFINITE)
    adu[200, 118:127] = 0.0
    whole_cr = frame_tiles.correct_frame(adu, mask, params, cosmics=True, n_tiles=1)
    tiled_cr = frame_tiles.correct_frame(adu, mask, params, cosmics=True, n_tiles=5, threads=2)
    n_cosmic = np.count_nonzero(whole_cr.mask & np.uint32(Mask.COSMIC))
    assert n_cosmic > 20  # the simulated hits are there, and flagged the same
    for name in ("image", "ivar", "mask"):
        np.testing.assert_array_equal(getattr(tiled_cr, name), getattr(whole_cr, name), err_msg=name)
    # an aberration map of a few pixels (2D Legendre; its inverse approximately the opposite)
    c = np.zeros((2, 4, 4))
    c[0, 0, 2], c[0, 1, 1], c[0, 2, 0], c[1, 1, 0] = 2.5, 1.5, -1.0, 0.8
    rmap = LegendreMap(Frame(ny, nx), MapConfig(kind="legendre", deg=3), {}, fwd=c, inv=-c)
    whole = frame_tiles.correct_frame(adu, mask, params, cosmics=True, rmap=rmap, n_tiles=1)
    tiled = frame_tiles.correct_frame(adu, mask, params, cosmics=True, rmap=rmap, n_tiles=5, threads=2)
    assert tiled.image.shape == whole.image.shape == (ny, nx)
    # stated tolerances: float32 rounding of the cumulative sums (1e-5 sigma, 1e-5 relative ivar);
    # beside a run of bad pixels along a row longer than FILL_MARGIN that crosses a tile's outer
    # source column, whose fill sees other neighbours, 0.05 sigma
    diff = np.abs(tiled.image - whole.image) * np.sqrt(whole.ivar)
    from scipy.ndimage import binary_dilation
    near_bad = binary_dilation(whole.mask != 0, structure=np.ones((3, 9), bool))
    assert float(np.max(diff[~near_bad])) < 1e-5, float(np.max(diff[~near_bad]))
    assert float(np.max(diff)) < 0.05, float(np.max(diff))
    np.testing.assert_allclose(tiled.ivar, whole.ivar, rtol=1e-5)
    np.testing.assert_array_equal(tiled.mask, whole.mask)
    assert np.count_nonzero(whole.mask & np.uint32(Mask.SATURATED)) > 0
    # a tile whose source columns miss what its outputs need is refused, not silently wrong
    tile = frame_tiles.plan_tiles(nx, 5, rmap)[2]
    short = frame_tiles.Tile(index=2, out=tile.out, src=(tile.src[0] + frame_tiles.FILL_MARGIN + 8, tile.src[1]),
                             read=tile.read)
    cols = slice(*short.read)
    with pytest.raises(ValueError, match="do not cover"):
        frame_tiles.correct_tile(adu[:, cols], mask[:, cols], short, params, cosmics=False, rmap=rmap)
