"""Importers: other projects' published checkpoints converted to ragcap model directories.

`ragcap models import KIND SOURCE OUT` looks KIND up in IMPORTERS. SOURCE is a checkpoint file,
or hf-hub:ORG/NAME for the checkpoint of a Hugging Face repository (read from the local hub
cache, or downloaded when the hub is reachable); import_model resolves it to a local file, so
every importer is a function (file, out, source=SOURCE, **options) -> the directory it wrote.
Adding a kind is one module here and one entry below.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from ragcap.errors import ModelError
from ragcap.importers.clipcap import import_clipcap
from ragcap.importers.decap import import_decap
from ragcap.importers.longclip import import_longclip

IMPORTERS: dict[str, Callable[..., Path]] = {
    "longclip": import_longclip,  # Long-CLIP-B/L (beichenzbc/Long-CLIP): OpenAI-CLIP state dicts, 248 tokens
    "clipcap": import_clipcap,  # ClipCap (rmokady/CLIP_prefix_caption): mapping network + GPT-2, as a decoder
    "decap": import_decap,  # DeCap (dhg-wei/DeCap): its text-only decoder, as a decap decoder
}

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def import_model(kind: str, source: str, out: str | Path, **options) -> Path:
    if kind not in IMPORTERS:
        raise ModelError(f"unknown checkpoint kind {kind!r}; ragcap imports: {', '.join(sorted(IMPORTERS))}")
    importer = IMPORTERS[kind]
    foreign = [name for name in options if name not in inspect.signature(importer).parameters]
    if foreign:  # e.g. --mapping given for a Long-CLIP checkpoint
        raise ModelError(f"--{foreign[0].replace('_', '-')} does not apply to {kind} checkpoints")
    return importer(checkpoint_file(source), out, source=source, **options)


def checkpoint_file(source: str, suffixes: tuple[str, ...] = CHECKPOINT_SUFFIXES) -> Path:
    """The local file a SOURCE names: a path, or the one checkpoint file of an hf-hub:ORG/NAME repository."""
    if not source.startswith("hf-hub:"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelError(f"{path}: no such checkpoint file (give a file, or hf-hub:ORG/NAME)")
        return path
    repo = source.removeprefix("hf-hub:")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ModelError(f"{source!r}: expected hf-hub:ORG/NAME, e.g. hf-hub:BeichenZhang/LongCLIP-B")
    from huggingface_hub import snapshot_download

    from pipelines.files import hub_reachable

    try:
        folder = Path(snapshot_download(repo, allow_patterns=[f"*{s}" for s in suffixes], local_files_only=not hub_reachable()))
    except Exception as e:  # huggingface_hub raises several kinds for "not cached and not reachable"
        raise ModelError(
            f"{source}: not in the local Hugging Face cache and the hub cannot be reached ({type(e).__name__}); "
            "download the checkpoint elsewhere and pass its file"
        ) from e
    files = sorted(p for p in folder.rglob("*") if p.suffix in suffixes)
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise ModelError(f"{source}: expected one checkpoint file ({'/'.join(suffixes)}) in the repository, found {found}; pass the file itself")
    return files[0]
