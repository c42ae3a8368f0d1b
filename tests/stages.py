"""Stage switches for tests that are not about the stages after the frames.

Labelling (DRC-Net, RC-Net, template fit) and denoising run by default after a night's products; on a
mini night they cost more than the whole reduction (a default mini night: 242 s without them, 623 s
with them, same loaded machine). The flux calibration's stellar fits are the largest share of what is
left: 22.5 of the 37.5 s of a four-frame mini night (one camera, 8 standards a fit of ~2.8 s each,
cProfile, one core). Tests of ingest, reduction, faults, Ray and storage turn the labels and the
denoising off and fit two standards per exposure and spectrograph (the flux calibration still runs,
commits and is compared, at a quarter of its fits); tests/test_end_to_end.py keeps the defaults, and
tests/test_fluxcal.py, tests/test_classify_slow.py and tests/test_denoise_stage.py test the stages
themselves.
"""

from __future__ import annotations

#: ReductionParams overrides that turn the stages after the products off.
WITHOUT_LABELS_AND_DENOISING = {"classify.enabled": False, "denoise.enabled": False}

#: The same switches as command-line flags of ``process``, ``reprocess`` and ``watch``.
WITHOUT_LABELS_AND_DENOISING_FLAGS = ["--no-classify", "--no-denoise"]

#: Labels and denoising off, two standards fitted per exposure and spectrograph (the default is 8).
LIGHT_PRODUCTS = WITHOUT_LABELS_AND_DENOISING | {"fluxcal.max_standards": 2}

#: The same as command-line flags.
LIGHT_PRODUCTS_FLAGS = [*WITHOUT_LABELS_AND_DENOISING_FLAGS, "--fluxcal-max-standards", "2"]
