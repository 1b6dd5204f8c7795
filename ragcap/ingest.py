"""The ingestion runner: reader -> mapper (normalise, filter, de-duplicate, shard) -> embed -> store.

Point ids are derived from the collection and the normalised caption, so the runner can ask
the store which ids it already holds and embed only the rest: a rerun adds nothing twice and
an interrupted run resumes where it stopped. Nothing is created before the first batch is
ready, so a corpus that yields nothing leaves no empty collection behind. Each batch is written
by a background thread while the next one is read and embedded; the store is never used by both
threads at once.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from pipelines import filters
from pipelines.base import BadRecord, CaptionRecord
from ragcap.embedder_info import CLIP_CONTEXT, LONG_CONTEXT, EmbedderInfo
from ragcap.errors import ModelError, OptionError, SourceError, StoreError
from ragcap.store import CollectionLayout, Store, point_id


@dataclass
class IngestOptions:
    limit: int | None = None  # read at most this many source records (before filters, so every shard sees the same prefix)
    exclude_images: frozenset[str] = frozenset()  # normalised image ids whose captions stay out (e.g. an eval split)
    max_tokens: int | None = None  # drop captions longer than this many tokens of `token_counter`
    token_counter: Callable[[str], int] | None = None
    shard: tuple[int, int] | None = None  # (i, n), 1-based: keep the i-th of n disjoint slices
    # Records embedded and upserted together, also the resume granularity. Large, because the
    # embedder sorts each call's captions by length: at 4096 padding costs ~5%, at 1000 ~30%.
    batch_size: int = 4096
    # Storage of a collection this run creates (see ragcap.store); None: float16. An existing
    # collection keeps its own, and one asked for that differs is refused (api.check_layout).
    vector_dtype: str | None = None
    layout: CollectionLayout = CollectionLayout()  # shards, replicas, on-disk vectors, quantization of one it creates
    # The text encoder's precision (ragcap.precision; None: $RAGCAP_PRECISION, else fp32). bf16
    # is several times faster on a GPU; its vectors drift from fp32's by what benchmarks/gpu.py states.
    precision: str | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise OptionError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise OptionError(f"--limit must be at least 1, not {self.limit}")


@dataclass
class IngestSummary:
    read: int = 0  # records the source yielded (good ones)
    skipped_bad: int = 0  # malformed lines skipped with --skip-bad
    excluded: int = 0  # captions of --exclude-images images
    too_long: int = 0  # over --max-tokens
    other_shards: int = 0  # belong to another --shard slice
    duplicates: int = 0  # same normalised caption seen earlier in this run
    already_stored: int = 0  # stored by an earlier (possibly interrupted) run
    truncated: int = 0  # longer than the embedder's context; embedded truncated
    # Embedded captions longer than CLIP's context and than Long-CLIP's (the embedder's tokens,
    # start and end included): what a 77-token model cuts that a stretched one keeps whole.
    over_77_tokens: int = 0
    over_248_tokens: int = 0
    stored: int = 0  # newly written points
    bad: list[str] = field(default_factory=list)  # first few "location: reason" of skipped lines

    def to_dict(self) -> dict:
        return asdict(self)


MAX_BAD_REPORTED = 20


class _Mapper:
    """Turns source records into (id, record) pairs worth storing, counting what it drops."""

    def __init__(self, collection: str, options: IngestOptions, summary: IngestSummary):
        self.collection = collection
        self.options = options
        self.summary = summary
        # 16-byte digests rather than id strings: a 600k-caption corpus costs ~40 MB, not ~100.
        self.seen: set[bytes] = set()

    def __call__(self, items: Iterable[CaptionRecord | BadRecord]) -> Iterator[tuple[str, CaptionRecord]]:
        opts, summary = self.options, self.summary
        for item in items:
            if isinstance(item, BadRecord):
                summary.skipped_bad += 1
                if len(summary.bad) < MAX_BAD_REPORTED:
                    summary.bad.append(f"{item.location}: {item.reason}")
                continue
            if opts.limit is not None and summary.read >= opts.limit:
                return
            summary.read += 1
            item.caption = filters.normalise_caption(item.caption)
            if not item.caption:
                continue
            if opts.exclude_images and filters.is_excluded(item, opts.exclude_images):
                summary.excluded += 1
                continue
            if opts.max_tokens is not None and opts.token_counter(item.caption) > opts.max_tokens:
                summary.too_long += 1
                continue
            pid = point_id(self.collection, item.caption)
            if opts.shard is not None and filters.shard_of(pid, opts.shard[1]) != opts.shard[0]:
                summary.other_shards += 1
                continue
            digest = bytes.fromhex(pid.replace("-", ""))
            if digest in self.seen:
                summary.duplicates += 1
                continue
            self.seen.add(digest)
            yield pid, item


def _batches(pairs: Iterator[tuple[str, CaptionRecord]], size: int) -> Iterator[list[tuple[str, CaptionRecord]]]:
    while batch := list(itertools.islice(pairs, size)):
        yield batch


def ingest(
    records: Iterable[CaptionRecord | BadRecord],
    store: Store,
    collection: str,
    embedder_info: EmbedderInfo,
    load_embedder: Callable[[], "object"],
    options: IngestOptions | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> IngestSummary:
    """Fill `collection` from `records`; returns what happened.

    `load_embedder` is called only when some record has no pre-computed vector, so loading a
    Parquet export into a server needs no model. `on_progress(n)` is told how many source
    records each batch consumed.
    """
    options = options or IngestOptions()
    summary = IngestSummary()
    # Asked once: afterwards only this run creates it (or joins a parallel worker's, see _create).
    exists = store.exists(collection)
    if exists:
        store.check_embedder(collection, embedder_info)
    embedder = None
    mapper = _Mapper(collection, options, summary)
    # Progress is counted in source records; embedding advances it caption by caption and the
    # rest of each batch (duplicates, filtered, already stored) is settled when it is embedded.
    reported = 0
    tick = on_progress or (lambda n: None)
    writer = ThreadPoolExecutor(1, thread_name_prefix="ragcap-upsert")
    writing: Future = writer.submit(lambda: None)
    # Ids are unique within a run, so only a collection that existed before it can hold any.
    existed = exists
    try:
        for batch in _batches(mapper(records), options.batch_size):
            stored = set()
            if existed:
                writing.result()  # the store serves one thread at a time
                stored = store.existing(collection, [pid for pid, _ in batch])
            summary.already_stored += len(stored)
            todo = [(pid, rec) for pid, rec in batch if pid not in stored]
            embedded = 0
            if todo:
                if any(rec.vector is None for _, rec in todo) and embedder is None:
                    embedder = load_embedder()
                vectors, embedded = _vectors_for(todo, embedder, embedder_info, summary, tick)
                writing.result()  # one batch written at a time; its error stops the run here
                if not exists:
                    _create(store, collection, embedder_info, options.vector_dtype, options.layout)
                    exists = True
                # Written at once, so a source that is slow to yield more holds nothing back.
                writing = writer.submit(_write, store, collection, todo, vectors, summary)
            consumed = summary.read + summary.skipped_bad
            tick(consumed - reported - embedded)
            reported = consumed
        writing.result()
    finally:
        writer.shutdown()  # an error or interrupt waits for the batch being written
    tick(summary.read + summary.skipped_bad - reported)
    if not exists:
        raise SourceError(_nothing_to_store(summary))
    if summary.stored:
        store.optimize(collection)  # build the search index once, not while points stream in
    return summary


def _write(store: Store, collection: str, todo, vectors: np.ndarray, summary: IngestSummary) -> None:
    store.upsert(collection, [pid for pid, _ in todo], vectors, [rec.payload() for _, rec in todo])
    summary.stored += len(todo)


def _create(store: Store, collection: str, info: EmbedderInfo, vector_dtype: str | None, layout: CollectionLayout) -> None:
    """Create the collection, or join it when a parallel worker (--shard) created it first."""
    try:
        store.create(collection, info, vector_dtype or "float16", layout)
    except StoreError:
        if not store.exists(collection):
            raise
        store.check_embedder(collection, info)


def _vectors_for(todo, embedder, info: EmbedderInfo, summary: IngestSummary, tick) -> tuple[np.ndarray, int]:
    """Vectors for the records to store (given ones checked, the rest embedded); and how many were embedded."""
    vectors = np.empty((len(todo), info.dim), dtype=np.float32)
    to_embed = [i for i, (_, rec) in enumerate(todo) if rec.vector is None]
    for i, (_, rec) in enumerate(todo):
        if rec.vector is not None:
            if len(rec.vector) != info.dim:
                raise SourceError(
                    f"{rec.location}: vector has {len(rec.vector)} dimensions but embedder "
                    f"{info.spec} has {info.dim}; pass the --model the vectors were made with"
                )
            vectors[i] = rec.vector
    if to_embed:
        encoded = embedder.encode_text([todo[i][1].caption for i in to_embed], on_batch=tick)
        broken = np.flatnonzero(~np.isfinite(encoded.vectors).all(axis=1))
        if len(broken):  # before anything is created or written: a damaged model, or an overflow at its precision
            raise ModelError(
                f"{todo[to_embed[broken[0]]][1].location}: the embedder gave NaN or infinity for {len(broken)} caption(s) of "
                "this batch; check the model's weights, or run it at --precision fp32"
            )
        vectors[to_embed] = encoded.vectors
        summary.truncated += int(np.count_nonzero(encoded.truncated))
        summary.over_77_tokens += int(np.count_nonzero(encoded.lengths > CLIP_CONTEXT))
        summary.over_248_tokens += int(np.count_nonzero(encoded.lengths > LONG_CONTEXT))
    return vectors, len(to_embed)


def _nothing_to_store(summary: IngestSummary) -> str:
    if summary.read == 0:
        hint = "the source yielded no captions: check the file (is it empty?), the source kind (`ragcap ingest SOURCE`) and --text-field"
        if summary.skipped_bad:
            hint = f"every line was malformed ({summary.skipped_bad} skipped)"
        return f"nothing to ingest: {hint}; no collection was created"
    dropped = {k: v for k, v in summary.to_dict().items() if k in ("excluded", "too_long", "other_shards") and v}
    return f"nothing to ingest: all {summary.read} captions were filtered out ({dropped}); no collection was created"
