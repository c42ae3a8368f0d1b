"""fiberlake: a streaming data-lake processor for multi-fiber spectroscopy.

The package is laid out as the user asked: ``schemas/``, ``storage/``, ``ingest/``,
``processors/`` and ``jobs/`` at the repository top level, installed as the
subpackages ``fiberlake.schemas`` ... ``fiberlake.jobs``.
"""

__version__ = "0.1.0"
