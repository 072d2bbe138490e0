"""Fail early on an output folder that cannot be written, instead of after hours of training."""

from __future__ import annotations

import os
from pathlib import Path


def ensure_writable_dir(folder: str | Path, what: str) -> Path:
    """Create ``folder`` if needed; a ``ValueError`` naming ``what`` and the folder if files cannot be created in it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what}={str(folder)!r} is a file; expected a folder to write into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{what}={str(folder)!r} cannot be created: {err.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what}={str(folder)!r} is not writable")
    return folder
