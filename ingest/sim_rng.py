"""Deterministic random streams for the simulator.

Every random quantity is drawn from its own generator, seeded by ``numpy.random.SeedSequence``
from the user's seed, a purpose tag and the identifiers it depends on (night, exposure, camera,
target...). So the same seed gives the same bytes, a frame does not depend on which other frames
were simulated before it, and quantities shared by several frames (a camera's optics, a target's
spectrum, an exposure's sky) are identical wherever they appear.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class TAG(IntEnum):
    """Purpose of a random stream (part of its seed)."""

    DESIGN = 1        # per camera, every night: optics design
    NIGHTLY = 2       # per camera and night: flexure
    FIBERS = 3        # per spectrograph: fiber throughputs, dead fibers
    FIBERS_NIGHT = 4  # per spectrograph and night
    FIBERS_ARM = 5    # per camera: arm-dependent throughput
    DETECTOR = 6      # per camera: gain, read noise, bias pattern, PRNU
    EXPOSURE = 7      # per exposure: airmass, sky, transparency, per-fiber aperture losses
    NOISE = 8         # per exposure and camera: photon and read noise
    COSMICS = 9       # per exposure and camera: cosmic rays
    PLATE = 10        # per plate: fiber assignment, magnitudes, positions
    TARGET = 11       # per target id: stellar parameters
    LAMP = 12         # per camera and night: arc-lamp line intensities
    BIAS_DRIFT = 13   # per exposure and camera: bias level and row drift
    TYPING = 14       # typing data set (ingest.typing_dataset): nights, cameras, frame variants


def _as_int(key) -> int:
    if isinstance(key, (bool, np.bool_)):
        return int(key)
    if isinstance(key, (int, np.integer)):
        key = int(key)
        return 2 * key if key >= 0 else -2 * key - 1
    if isinstance(key, str):
        return int.from_bytes(key.encode("utf-8"), "big")
    raise TypeError(f"cannot seed from {type(key).__name__}")


def rng_for(seed: int, tag: TAG, *keys) -> np.random.Generator:
    """Generator for one purpose, reproducible from ``(seed, tag, *keys)``.

    Parameters
    ----------
    seed : int
        The user's seed.
    tag : TAG
        What the stream is for.
    *keys : int or str
        Identifiers the stream depends on (night, expid, camera, ...).

    Examples
    --------
    >>> a = rng_for(0, TAG.NOISE, "2024-01-01", 1, "b1").normal()
    >>> b = rng_for(0, TAG.NOISE, "2024-01-01", 1, "b1").normal()
    >>> a == b
    True
    """
    entropy = [_as_int(seed), int(tag)] + [_as_int(k) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))
