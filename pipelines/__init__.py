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
from ragcap.errors import OptionError, SourceError

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
# The ReadOptions each source reads. One given to a source that ignores it is refused: a --split
# that selects nothing, or a --vector-field whose vectors are re-embedded anyway, would pass unseen.
READ_OPTIONS: dict[str, frozenset[str]] = {
    "coco-captions": frozenset({"split", "text_field", "id_field"}),  # the fields: of a hub data set
    "flickr": frozenset({"split"}),
    "cc3m": frozenset(),
    "text": frozenset(),
    "jsonl": frozenset({"text_field", "id_field"}),
    "csv": frozenset({"text_field", "id_field"}),
    "parquet": frozenset({"text_field", "id_field", "vector_field"}),
    "hf": frozenset({"text_field", "id_field", "split"}),
    "clip-retrieval": frozenset({"text_field", "id_field"}),
}
# Sources whose every record carries its vector: ingesting them needs the embedder's name, not its weights.
PRE_EMBEDDED = frozenset({"clip-retrieval"})


# Sources that also read a Hugging Face hub data set named ORG/NAME.
HUB_SOURCES = frozenset({"coco-captions", "hf"})
# Line formats, which also read a pipe given as `-`.
STDIN_SOURCES = frozenset({"text", "jsonl", "csv", "flickr", "cc3m"})


def check_paths(source: str, paths: list[str]) -> None:
    """At least one path, and every one must exist (but `-`, stdin, for a line format, and a hub
    name where the source reads the hub): checked before any model loads, so a typo costs a
    second, not a model load."""
    from pathlib import Path

    from pipelines.files import STDIN

    if not paths:
        stdin = ", or - to read stdin" if source in STDIN_SOURCES else ""
        raise OptionError(f"no PATH: give the {source} files to read{stdin}")
    if STDIN in paths and source not in STDIN_SOURCES:
        raise OptionError(f"{source} does not read stdin (-): give its files; {', '.join(sorted(STDIN_SOURCES))} do")
    if paths.count(STDIN) > 1:
        raise OptionError("stdin (-) is given more than once; it can be read once")
    for path in paths:
        hub_name = source in HUB_SOURCES and path.count("/") == 1 and not path.startswith((".", "/", "~"))
        if path != STDIN and not hub_name and not Path(path).expanduser().exists():
            raise SourceError(f"{path}: no such file or directory")


def check_read_options(source: str, options: ReadOptions) -> None:
    """OptionError naming the first option `options` sets that `source` does not read."""
    for name in ("text_field", "id_field", "vector_field", "split"):
        if getattr(options, name) is not None and name not in READ_OPTIONS[source]:
            takes = sorted(s for s, read in READ_OPTIONS.items() if name in read)
            flag = "--" + name.replace("_", "-")
            raise OptionError(f"{flag} does not apply to {source} sources (it is read by {', '.join(takes)}); leave it out")


def get_reader(name: str) -> Reader:
    try:
        return SOURCES[name]
    except KeyError:
        raise SourceError(f"unknown source {name!r}; sources: {', '.join(SOURCES)}") from None


__all__ = ["HUB_SOURCES", "PRE_EMBEDDED", "READ_OPTIONS", "SOURCES", "check_paths", "check_read_options", "get_reader", "BadRecord", "CaptionRecord", "ReadOptions", "Reader"]
