"""What every ingestion pipeline yields, and the registry that finds pipelines by name.

A pipeline is a reader (clip-retrieval's split): it turns files into CaptionRecords and
knows nothing of embedding or storage. ragcap.ingest maps and writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence


@dataclass
class CaptionRecord:
    caption: str
    corpus: str  # pipeline name, e.g. "coco-captions"
    image_id: str | None = None  # as a string, so COCO's ints and Flickr's names compare alike
    file: str | None = None  # image file name (basename) when the corpus gives one
    split: str | None = None
    location: str = ""  # "path:line" (or "path:row N"), for error messages
    # Only for pre-embedded sources (parquet --vector-field, clip-retrieval): float32, checked
    # by the reader (pipelines.files.vector_or_bad), so a bad one is reported at its row.
    vector: Sequence[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the --id-field value as "source_id"

    def payload(self) -> dict[str, Any]:
        """The metadata stored next to the vector in Qdrant."""
        out: dict[str, Any] = {"caption": self.caption, "corpus": self.corpus}
        for key in ("image_id", "file", "split"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out.update(self.extra)
        return out


@dataclass
class BadRecord:
    """A line or row that could not be read; yielded instead of raising when skip_bad is on."""

    location: str
    reason: str


@dataclass
class ReadOptions:
    text_field: str | None = None  # jsonl/csv/parquet/hf: the caption column
    id_field: str | None = None  # jsonl/csv/parquet/hf: an image/source id column
    vector_field: str | None = None  # parquet: pre-computed embeddings (ragcap export output)
    split: str | None = None  # Karpathy split / HF split
    skip_bad: bool = False  # yield BadRecord and continue instead of raising SourceError


Reader = Callable[[Sequence[str], ReadOptions], Iterator["CaptionRecord | BadRecord"]]
