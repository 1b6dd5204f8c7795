"""Ingestion readers, one per corpus kind, found by name (`ragcap ingest --source NAME`).

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


def get_reader(name: str) -> Reader:
    try:
        return SOURCES[name]
    except KeyError:
        raise SourceError(f"unknown source {name!r}; sources: {', '.join(SOURCES)}") from None


__all__ = ["PRE_EMBEDDED", "SOURCES", "get_reader", "BadRecord", "CaptionRecord", "ReadOptions", "Reader"]
