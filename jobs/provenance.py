"""What made a product: the code version (package version and git commit)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from fiberlake import __version__


@functools.cache
def code_version() -> str:
    """fiberlake version plus the git commit of the source tree when available."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__
