"""Stage switches for tests that are not about the stages after the products.

Labelling (DRC-Net, RC-Net, template fit) and denoising run by default after a night's products; on a
mini night they cost more than the whole reduction (a default mini night: 242 s without them, 623 s
with them, same loaded machine). Tests of ingest, reduction, faults, Ray and storage turn them off;
tests/test_end_to_end.py keeps the defaults and tests/test_classify_slow.py and
tests/test_denoise_stage.py test the stages themselves.
"""

from __future__ import annotations

#: ReductionParams overrides that turn the stages after the products off.
WITHOUT_LABELS_AND_DENOISING = {"classify.enabled": False, "denoise.enabled": False}

#: The same switches as command-line flags of ``process``, ``reprocess`` and ``watch``.
WITHOUT_LABELS_AND_DENOISING_FLAGS = ["--no-classify", "--no-denoise"]
