"""Checks on where a command will write, made before anything is written."""

from __future__ import annotations

import os
from pathlib import Path


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` (absolute) if it exists, else its nearest existing parent: the folder whose
    type and permissions decide whether ``path`` can be created."""
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing
