"""Data set of the stellar classifier (seed 003): stripes and 1D spectra cut from simulated frames.

Each :class:`ExposureSpec` is one simulated ``mini`` science exposure (both arms) on a plate of
its own: the frames are rendered by the instrument simulator (optics, PSF, sky, cosmic rays,
noise, dead fibers), corrected like any raw frame (overscan, gain; the cosmic-ray mask is the
simulator's truth mask of hits above 3 read-noise sigma, standing in for L.A.Cosmic, which costs
~5 s per frame here), and every star's 11-pixel stripes are cut around the camera's true traces
(:func:`fiberlake.processors.stripes.arm_inputs`). The label is the truth's ``SPECTYPE``.

Training nights use a flat class mix (every class equally likely, DA and carbon included) so the
network sees every class; held-out nights use the simulator's default survey mix unless told
otherwise. Exposure times and plate brightness (``mag_offset``) spread the S/N.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from fiberlake.ingest.sim_params import SimParams
from fiberlake.ingest.sim_rng import TAG, rng_for
from fiberlake.ingest.sim_spectra import STAR_CLASSES
from fiberlake.ingest.sim_variety import FrameVariant
from fiberlake.processors import ccd
from fiberlake.processors.stripes import arm_inputs, stripe_window

CLASSES: tuple[str, ...] = STAR_CLASSES
"""Classes of the classifier, in the order of its outputs."""
FLAT_MIX = {
    "target_class_probs": tuple((c, 0.2) for c in ("A", "F", "G", "K", "M")),
    "exotic_class_probs": (("DA", 1.0 / 7.0), ("C", 1.0 / 7.0)),
}
"""Simulator class mix of training nights: the seven classes equally likely."""


@dataclass(frozen=True)
class ExposureSpec:
    """One simulated exposure of the data set."""

    night: str
    seed: int
    expid: int
    plate: int
    exptime: float
    mag_offset: float = 0.0
    stellar_model: str = "analytic"
    flat_mix: bool = True

    def to_dict(self) -> dict:
        """Plain dict (for model cards)."""
        return asdict(self)

    def sim_params(self) -> SimParams:
        """The simulator's parameters of this exposure."""
        mix = FLAT_MIX if self.flat_mix else {}
        return SimParams(stellar_model=self.stellar_model, **mix)


DESIGN_STRIDE = 10000
"""Seed step between the instrument designs of one data set (design ``k`` uses ``seed + k * DESIGN_STRIDE``)."""


def plan_exposures(seed: int, n_exposures: int, *, stellar_model: str = "analytic", flat_mix: bool = True,
                   mag_offset: tuple[float, float] = (0.0, 0.0), exptime: tuple[float, float] = (600.0, 2400.0),
                   exposures_per_night: int = 8, designs: int = 1) -> list[ExposureSpec]:
    """Exposures of a data set: ``exposures_per_night`` per night, nights spread over ``designs`` instruments.

    The simulator draws a camera's design (PSF and its focus per fiber, trace and line curvature,
    dispersion shape, detector) from the simulation seed, and only small nightly terms (flexure,
    throughput) from the night, so the nights of one seed share one 2D PSF. Night ``j`` uses the
    seed ``seed + (j mod designs) * DESIGN_STRIDE``: with ``designs`` > 1 a data set sees that many
    instruments (a network on 2D stripes otherwise learns one PSF).

    Parameters
    ----------
    seed : int
        Simulation seed of the first design (a held-out set uses seeds the training never saw).
    designs : int
        Instrument designs (simulation seeds) the nights cycle through.
    mag_offset : (lo, hi)
        Range of the plate's magnitude offset (negative: brighter stars, higher S/N).
    exptime : (lo, hi)
        Range of exposure times (s), log-uniform.
    """
    rng = rng_for(seed, TAG.TYPING, "classify-plan", stellar_model)
    out = []
    for i in range(n_exposures):
        night_no, k = divmod(i, exposures_per_night)
        night = f"2027-{1 + night_no // 28:02d}-{1 + night_no % 28:02d}"
        out.append(ExposureSpec(night=night, seed=seed + (night_no % max(designs, 1)) * DESIGN_STRIDE,
                                expid=1000 + i, plate=k,
                                exptime=float(np.exp(rng.uniform(np.log(exptime[0]), np.log(exptime[1])))),
                                mag_offset=float(rng.uniform(*mag_offset)), stellar_model=stellar_model,
                                flat_mix=flat_mix))
    return out


def _camera_models(inst, night: str, seed: int, params: SimParams, cache: dict) -> dict:
    from fiberlake.ingest.sim_detector import build_detector
    from fiberlake.ingest.sim_optics import build_camera_model

    key = (night, seed, params)
    if key not in cache:
        cache.clear()
        cache[key] = {cam: (build_camera_model(inst, cam, night, seed, params), build_detector(inst, cam, seed, params))
                      for cam in inst.cameras if cam.endswith("1")}
    return cache[key]


_CACHE: dict = {}


def simulate_exposure(spec: ExposureSpec, instrument: str = "mini", with_raw: bool = False) -> dict[str, np.ndarray]:
    """Samples (one per star with usable stripes in both arms) of one exposure.

    ``with_raw``: also the sky-subtracted stripes in electrons with their variance (what the
    noise augmentation of training needs): ``signal_*``, ``var_*``, ``bkg_*`` (float32),
    ``good_*`` (bool), ``(n, 11, w)``.

    Returns
    -------
    dict of ndarray
        ``stripes_b``, ``stripes_r`` (float16, ``(n, 11, w)``), ``flux_b``, ``ivar_b``,
        ``flux_r``, ``ivar_r`` (float32, ``(n, w)``), ``wave_b``, ``wave_r`` (float32, true
        wavelength of each row), ``label`` (index into :data:`CLASSES`), ``snr_r``, ``snr_b``,
        ``teff``, ``logg``, ``mag``, ``expid``, ``fiber``, ``targetid``.
    """
    from fiberlake.ingest import simulate as sim
    from fiberlake.schemas.instrument import get_instrument

    inst = get_instrument(instrument)
    params = spec.sim_params()
    fm = sim.make_fibermap(inst, spec.night, spec.seed, "SCIENCE", spec.plate, expid=spec.expid, sim_params=params)
    models = _camera_models(inst, spec.night, spec.seed, params, _CACHE)
    variant = FrameVariant(mag_offset=spec.mag_offset) if spec.mag_offset else None
    arms, targets = {}, None
    for camera, (cm, dm) in sorted(models.items()):
        frame = sim.simulate_frame(inst, camera, "SCIENCE", night=spec.night, expid=spec.expid, seed=spec.seed,
                                   exptime=spec.exptime, fibermap=fm, params=params, camera_model=cm, detector=dm,
                                   variant=variant)
        image = ccd.preprocess(frame.raw, ccd.CCDParams.from_header(frame.header), cosmics=False)
        bad = ((frame.truth["CRMASK"] & 2) != 0) | ((image.mask & ccd.MASK_DTYPE(ccd.FATAL)) != 0)
        targets = frame.truth["TARGETS"]
        sky = np.asarray(targets["OBJTYPE"]) == "SKY"
        inputs = arm_inputs(image.image, image.ivar, bad, cm.trace_x, sky, dead=cm.dead)
        r0, r1 = stripe_window(inst.ny)
        arms[camera[0]] = (inputs, cm.wave[:, r0:r1].astype(np.float32))
    (b, wave_b), (r, wave_r) = arms["b"], arms["r"]
    spectype = np.asarray(targets["SPECTYPE"]).astype(str)
    keep = np.flatnonzero(np.isin(spectype, CLASSES) & b.usable & r.usable)
    raw = {}
    if with_raw:
        for a, inp in (("b", b), ("r", r)):
            raw |= {f"signal_{a}": inp.signal[keep], f"var_{a}": inp.var[keep],
                    f"bkg_{a}": inp.background_var[keep], f"good_{a}": inp.good[keep]}
    return raw | {
        "stripes_b": b.stripes[keep].astype(np.float16), "stripes_r": r.stripes[keep].astype(np.float16),
        "flux_b": b.flux[keep], "ivar_b": b.ivar[keep], "flux_r": r.flux[keep], "ivar_r": r.ivar[keep],
        "wave_b": wave_b[keep], "wave_r": wave_r[keep],
        "label": np.array([CLASSES.index(s) for s in spectype[keep]], dtype=np.int64),
        "snr_r": r.snr[keep], "snr_b": b.snr[keep],
        "teff": np.asarray(targets["TEFF"], dtype=np.float32)[keep],
        "logg": np.asarray(targets["LOGG"], dtype=np.float32)[keep],
        "mag": np.asarray(targets["MAG"], dtype=np.float32)[keep],
        "expid": np.full(keep.size, spec.expid, dtype=np.int64),
        "fiber": np.asarray(targets["FIBER"], dtype=np.int64)[keep],
        "targetid": np.asarray(targets["TARGETID"], dtype=np.int64)[keep],
    }


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def build_dataset(specs: list[ExposureSpec], workers: int = 1, progress: bool = False,
                  with_raw: bool = False) -> dict[str, np.ndarray]:
    """Samples of every exposure of ``specs`` (in order), simulated by ``workers`` processes."""
    from functools import partial

    simulate = partial(simulate_exposure, with_raw=with_raw)
    if workers <= 1:
        it = map(simulate, specs)
        parts = list(_progress(it, len(specs), progress))
    else:
        # Exposures of one night go to one worker in a row (its camera models are cached).
        import multiprocessing

        # spawn, not fork: the caller may hold torch's thread pools, which a forked child must not inherit
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(_progress(pool.map(simulate, specs, chunksize=4), len(specs), progress))
    return _concat(parts)


def _progress(it, total: int, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="classify data", unit="exposure")


DATA_VERSION = "2"
"""Version of the sample layout (part of the cache key)."""


def dataset_key(specs: list[ExposureSpec], instrument: str = "mini", with_raw: bool = False) -> str:
    """Content key of a data set: its exposures, the simulator's version and the sample layout."""
    import hashlib
    import json

    from fiberlake.ingest.sim_params import SIM_VERSION

    text = json.dumps({"specs": [s.to_dict() for s in specs], "instrument": instrument, "sim": SIM_VERSION,
                       "layout": DATA_VERSION, "raw": with_raw}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_or_build(specs: list[ExposureSpec], cache=None, workers: int = 1, progress: bool = False,
                  instrument: str = "mini", with_raw: bool = False) -> tuple[dict[str, np.ndarray], bool]:
    """A data set from ``cache/classify-<key>.npz`` when there, else simulated (and cached).

    Returns
    -------
    data : dict of ndarray
    cached : bool
    """
    from pathlib import Path

    path = None if cache is None else Path(cache) / f"classify-{dataset_key(specs, instrument, with_raw)}.npz"
    if path is not None and path.exists():
        with np.load(path) as npz:
            return {k: npz[k] for k in npz.files}, True
    data = build_dataset(specs, workers=workers, progress=progress, with_raw=with_raw)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **data)
        tmp.replace(path)
    return data, False
