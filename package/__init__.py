"""fiberlake: a streaming data-lake processor for multi-fiber spectroscopy.

The package is laid out as the user asked: ``schemas/``, ``storage/``, ``ingest/``,
``processors/`` and ``jobs/`` at the repository top level, installed as the
subpackages ``fiberlake.schemas`` ... ``fiberlake.jobs``. This file lives in ``package/``
(installed as ``fiberlake``), not in a root folder named ``fiberlake/``: such a folder would
shadow the installed package whenever Python runs from a checkout (``python -m pytest``).
"""

__version__ = "0.1.0"
