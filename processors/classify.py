"""Stellar classification of one exposure and spectrograph from both arms (seed 003): arrays in, arrays out.

:func:`classify_exposure` takes each arm's :class:`~fiberlake.processors.stripes.ArmInputs` (or
None for a camera that is missing, e.g. quarantined) and returns, per method, the class
probabilities of every fiber plus what each label rests on:

* both arms usable: ``arms = "br"``, flag ``ok``;
* one arm missing or unusable (dead, masked): the other arm's input alone (the missing arm's
  input is zero, as the networks saw in training through arm dropout), ``arms = "b"`` or ``"r"``,
  flag ``one_arm``;
* neither arm usable: no label (probabilities NaN here, null in the table), flag ``no_stripe``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fiberlake.processors.stripes import ArmInputs


@dataclass
class ExposureLabels:
    """Per method, the fibers' class probabilities; per fiber, the arms used, flag and S/N.

    Attributes
    ----------
    probabilities : dict of str to ndarray, shape (n_fibers, n_classes)
        NaN rows: no label.
    arms : ndarray of str, shape (n_fibers,)
    flag : ndarray of str, shape (n_fibers,)
    snr_b, snr_r : ndarray, shape (n_fibers,)
    """

    probabilities: dict[str, np.ndarray]
    arms: np.ndarray
    flag: np.ndarray
    snr_b: np.ndarray
    snr_r: np.ndarray


def empty_arm(n_fibers: int, rows: int, width: int) -> ArmInputs:
    """Inputs of a missing camera: zeros, nothing usable."""
    return ArmInputs(stripes=np.zeros((n_fibers, rows, width), np.float32), usable=np.zeros(n_fibers, bool),
                     flux=np.zeros((n_fibers, width), np.float32), ivar=np.zeros((n_fibers, width), np.float32),
                     snr=np.zeros(n_fibers, np.float32))


def classify_exposure(blue: ArmInputs | None, red: ArmInputs | None, nets: dict, *, wave_b: np.ndarray | None = None,
                      wave_r: np.ndarray | None = None, template_grid=None, classes: tuple[str, ...],
                      methods: tuple[str, ...] = ("drcnet", "rcnet", "template"), batch: int = 256,
                      device: str = "cpu") -> ExposureLabels:
    """Class probabilities of every fiber of an exposure's spectrograph by each method.

    Parameters
    ----------
    blue, red : ArmInputs or None
        The arms' inputs (:func:`~fiberlake.processors.stripes.arm_inputs`); None: camera missing.
    nets : dict
        ``drcnet`` (:class:`~fiberlake.processors.drcnet.DRCNet`) and ``rcnet`` (``RCNet``) modules.
    wave_b, wave_r : ndarray, shape (n_fibers, w), optional
        Wavelength of each stripe row (the template fit needs them).
    template_grid : TemplateGrid, optional
        Templates of the template fit (``template`` is skipped without it).
    classes : tuple of str
        Class order of the networks' outputs and of the result.
    """
    from fiberlake.processors.drcnet import predict, spectrum_input
    from fiberlake.processors.template_fit import fit_spectra

    ref = blue if blue is not None else red
    if ref is None:
        raise ValueError("an exposure needs at least one arm")
    n, rows = ref.stripes.shape[0], ref.stripes.shape[1]
    cfg = nets["drcnet"].config if "drcnet" in nets else None
    width_b = cfg["width_b"] if cfg else (blue.stripes.shape[2] if blue is not None else red.stripes.shape[2])
    width_r = cfg["width_r"] if cfg else (red.stripes.shape[2] if red is not None else width_b)
    blue = blue if blue is not None else empty_arm(n, rows, width_b)
    red = red if red is not None else empty_arm(n, rows, width_r)
    for name, arm, width in (("blue", blue, width_b), ("red", red, width_r)):
        if arm.stripes.shape[2] != width:
            raise ValueError(f"{name} stripes are {arm.stripes.shape[2]} rows long, the model takes {width}")
    ub, ur = blue.usable, red.usable
    arms = np.where(ub & ur, "br", np.where(ub, "b", np.where(ur, "r", "")))
    flag = np.where(ub & ur, "ok", np.where(ub | ur, "one_arm", "no_stripe"))
    any_arm = ub | ur
    zb = np.where(ub[:, None, None], blue.stripes, 0.0).astype(np.float32)
    zr = np.where(ur[:, None, None], red.stripes, 0.0).astype(np.float32)
    ivar_b = np.where(ub[:, None], blue.ivar, 0.0)
    ivar_r = np.where(ur[:, None], red.ivar, 0.0)
    out: dict[str, np.ndarray] = {}
    idx = np.flatnonzero(any_arm)
    for method in methods:
        probs = np.full((n, len(classes)), np.nan)
        if idx.size and method == "drcnet" and "drcnet" in nets:
            probs[idx] = predict(nets["drcnet"], (zb[idx], zr[idx]), batch, device)
        elif idx.size and method == "rcnet" and "rcnet" in nets:
            spec = spectrum_input(blue.flux[idx], ivar_b[idx], red.flux[idx], ivar_r[idx])
            probs[idx] = predict(nets["rcnet"], (spec,), batch, device)
        elif idx.size and method == "template" and template_grid is not None and wave_b is not None \
                and wave_r is not None:
            p, _ = fit_spectra(wave_b[idx], blue.flux[idx], ivar_b[idx], wave_r[idx], red.flux[idx], ivar_r[idx],
                               template_grid, classes, velocities=np.arange(-120.0, 121.0, 40.0))
            probs[idx] = p
        else:
            continue
        out[method] = probs
    return ExposureLabels(probabilities=out, arms=arms, flag=flag, snr_b=np.where(ub, blue.snr, 0.0),
                          snr_r=np.where(ur, red.snr, 0.0))
