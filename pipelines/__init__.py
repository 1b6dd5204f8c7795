"""Ingestion readers, one per corpus kind, found by name (`ragcap ingest NAME PATH...`).

Each is a Reader: (paths, ReadOptions) -> a stream of CaptionRecord (or BadRecord with
skip_bad). Readers only read; ragcap.ingest normalises, filters, embeds and stores.
"""

from __future__ import annotations

from pipelines.base import BadRecord, CaptionRecord, Reader, ReadOptions
from pipelines.cc3m import read_cc3m
from pipelines.clip_retrieval import read_clip_retrieval
from pipelines.coco import read_coco
from pipelines.flickr import read_flickr
from pipelines.hf import read_hf
from pipelines.tables import read_csv, read_jsonl, read_parquet
from pipelines.text import read_text
from ragcap.errors import SourceError

SOURCES: dict[str, Reader] = {
    "coco-captions": read_coco,
    "flickr": read_flickr,
    "cc3m": read_cc3m,
    "text": read_text,
    "jsonl": read_jsonl,
    "csv": read_csv,
    "parquet": read_parquet,
    "hf": read_hf,
    "clip-retrieval": read_clip_retrieval,
}
# Sources whose every record carries its vector: ingesting them needs the embedder's name, not its weights.
PRE_EMBEDDED = frozenset({"clip-retrieval"})


# Sources that also read a Hugging Face hub data set named ORG/NAME.
HUB_SOURCES = frozenset({"coco-captions", "hf"})


def check_paths(source: str, paths: list[str]) -> None:
    """Every path must exist (but `-`, stdin, and a hub name where the source reads the hub):
    checked before any model loads, so a typo costs a second, not a model load."""
    from pathlib import Path

    from pipelines.files import STDIN

    for path in paths:
        hub_name = source in HUB_SOURCES and path.count("/") == 1 and not path.startswith((".", "/", "~"))
        if path != STDIN and not hub_name and not Path(path).expanduser().exists():
            raise SourceError(f"{path}: no such file or directory")


def get_reader(name: str) -> Reader:
    try:
        return SOURCES[name]
    except KeyError:
        raise SourceError(f"unknown source {name!r}; sources: {', '.join(SOURCES)}") from None


__all__ = ["HUB_SOURCES", "PRE_EMBEDDED", "SOURCES", "check_paths", "get_reader", "BadRecord", "CaptionRecord", "ReadOptions", "Reader"]
