"""Converters from other projects' published checkpoints to ragcap's layouts, by kind.

    IMPORTERS = {"clipcap": import_clipcap, ...}     kind -> fn(source, out, **options) -> out
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ragcap.errors import ModelError
from ragcap.importers.clipcap import import_clipcap

IMPORTERS: dict[str, Callable[..., Path]] = {"clipcap": import_clipcap}


def run_import(kind: str, source: str | Path, out: str | Path, **options) -> Path:
    """Convert `source` with the importer of `kind`; returns the directory written."""
    if kind not in IMPORTERS:
        raise ModelError(f"unknown import kind {kind!r}; known kinds: {', '.join(IMPORTERS)}")
    return IMPORTERS[kind](source, out, **options)
