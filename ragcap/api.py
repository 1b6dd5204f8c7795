"""ragcap's Python API: the operations behind every command, shared by the CLI and the service.

    from ragcap import CaptionSettings, ingest_corpus, load_captioner, open_store, search
    with open_store() as store:
        ingest_corpus(store, "text", ["captions.txt"], "memory", model="ViT-B-32:openai")
        captioner = load_captioner(store, "memory", CaptionSettings(modes=("pd", "clipre")), decoder="decoders/memory")
        for result in captioner.caption_images(["photo.jpg", png_bytes, pil_image]):
            print(result.source, result.mode, result.caption)
        print(search(store, "memory", ["a dog on a beach", Path("photo.jpg")], k=5)[0].neighbours)

Nothing here prints or parses options: the CLI turns flags into these calls, and the server
turns requests into them, so a behaviour can never live in only one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ragcap.caption import CaptionSettings, Captioner
from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import ImageError, ModelError, RagcapError
from ragcap.export import export_collection, parquet_embedder
from ragcap.images import ImageInput, image_name, load_images
from ragcap.ingest import IngestOptions, IngestSummary
from ragcap.store import Hit, Store, open_store

__all__ = [
    "CaptionSettings",
    "Captioner",
    "IngestOptions",
    "export_collection",
    "find_leakage",
    "ingest_corpus",
    "ingest_embedder",
    "load_captioner",
    "open_store",
    "search",
    "SearchResult",
    "training_data",
]

DEFAULT_MODEL = "ViT-B-32:openai"


def ingest_embedder(
    store: Store,
    collection: str,
    model: str | None = None,
    device: str | None = None,
    vectors_from: str | Path | None = None,
) -> tuple[EmbedderInfo, Callable[[], object]]:
    """The embedder identity for an ingest, and a loader called only if something needs embedding.

    The model is, in order: the one asked for, the collection's own, the one a pre-embedded
    Parquet file (`vectors_from`) records, DEFAULT_MODEL. Loading a Parquet export into a
    server thus needs no model at all.
    """
    from ragcap.embed import load_embedder

    if model is None and store.exists(collection):
        model = store.embedder(collection).spec
    if vectors_from is not None:
        recorded = parquet_embedder(vectors_from)
        if recorded is not None and (model is None or model == recorded.spec):
            return recorded, lambda: load_embedder(recorded.spec, device)
        if model is None:
            raise ModelError(f"{vectors_from} records no embedder; pass --model with the spec its vectors were made with")
    embedder = load_embedder(model or DEFAULT_MODEL, device)
    return embedder.info, lambda: embedder


def ingest_corpus(
    store: Store,
    source: str,
    paths: Sequence[str],
    collection: str,
    model: str | None = None,
    read_options=None,
    options: IngestOptions | None = None,
    device: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[EmbedderInfo, IngestSummary]:
    """Read a corpus with the `source` pipeline and fill `collection` (see ragcap.ingest)."""
    from pipelines import ReadOptions, get_reader
    from ragcap.ingest import ingest

    reader = get_reader(source)
    read_options = read_options or ReadOptions()
    vectors_from = paths[0] if source == "parquet" and read_options.vector_field and paths else None
    info, load = ingest_embedder(store, collection, model, device, vectors_from)
    summary = ingest(reader(paths, read_options), store, collection, info, load, options, on_progress)
    return info, summary


def training_data(
    store: Store | None = None, collection: str | None = None, parquet: str | Path | None = None
) -> tuple[list[str], np.ndarray, EmbedderInfo]:
    """Captions, their stored vectors (float32) and the embedder, from a collection or an export."""
    if (collection is None) == (parquet is None):
        raise RagcapError("pass exactly one of --collection NAME or --parquet FILE")
    if parquet is not None:
        import pyarrow.parquet as pq

        info = parquet_embedder(parquet)
        if info is None:
            raise RagcapError(f"{parquet} records no embedder: train from a `ragcap export` file or from --collection")
        table = pq.read_table(parquet, columns=["caption", "vector"])
        vectors = np.asarray(table.column("vector").combine_chunks().flatten(), dtype=np.float32).reshape(len(table), info.dim)
        return table.column("caption").to_pylist(), vectors, info
    info = store.embedder(collection)
    captions, chunks = [], []
    for _, vectors, payloads in store.scroll(collection, with_vectors=True):
        captions.extend(p["caption"] for p in payloads)
        chunks.append(vectors)
    if not captions:
        raise RagcapError(f"collection '{collection}' is empty: fill it with `ragcap ingest`")
    return captions, np.concatenate(chunks), info


def find_leakage(store: Store, collection: str, image_keys: Iterable[str]) -> int:
    """How many stored captions describe one of the images (normalised ids) under evaluation."""
    from ragcap.evaluate import find_leakage as count_leaked

    payloads = (p for _, _, batch in store.scroll(collection, with_vectors=False) for p in batch)
    return count_leaked(set(image_keys), payloads)


def load_captioner(
    store: Store,
    collection: str,
    settings: CaptionSettings | None = None,
    decoder: str | Path | None = None,
    lm: str = "gpt2",
    model: str | None = None,
    device: str | None = None,
    image_only: bool = True,
) -> Captioner:
    """A Captioner with every resource its modes need, loaded once.

    image_only: load only CLIP's image tower (captioning images never runs the text tower);
    pass False to caption texts.
    """
    from ragcap.embed import load_embedder
    from ragcap.modes import modes_needing

    settings = settings or CaptionSettings()
    embedder = load_embedder(model or store.embedder(collection).spec, device, image_only=image_only)
    loaded_decoder = prompter = None
    if modes_needing("decoder", settings.modes) and decoder is not None:
        from ragcap.decoders import load_decoder

        loaded_decoder = load_decoder(decoder, device=device)
        loaded_decoder.check_embedder(embedder.info, collection)
    if modes_needing("lm", settings.modes):
        from ragcap.decoders.lm_prompt import PromptCaptioner

        prompter = PromptCaptioner(lm, device=device)
    return Captioner(store, collection, embedder, settings, decoder=loaded_decoder, prompter=prompter)


@dataclass
class SearchResult:
    source: str  # the query text, or the image's name
    neighbours: list[Hit] = field(default_factory=list)  # best first; payload["caption"] is the caption
    error: str | None = None  # why an image query could not be read
    exception: ImageError | None = field(default=None, repr=False, compare=False)


def search(
    store: Store,
    collection: str,
    queries: Sequence[str | ImageInput],
    k: int = 10,
    embedder=None,
    max_pixels: int | None = None,
    device: str | None = None,
    names: Sequence[str] | None = None,
) -> list[SearchResult]:
    """The k captions nearest to each query, in query order. A str is a text; a pathlib.Path,
    encoded bytes or a PIL image is an image, and one that cannot be read gets an error result
    in its place. embedder: one already loaded (else the collection's is loaded); names: what
    results call the queries (default: the text, the path, else "image N")."""
    from ragcap.embed import load_embedder

    if k < 1:
        raise RagcapError(f"k must be at least 1, got {k}")
    texts = [i for i, q in enumerate(queries) if isinstance(q, str)]
    pictures = [i for i, q in enumerate(queries) if not isinstance(q, str)]
    if embedder is None:
        embedder = load_embedder(store.embedder(collection).spec, device, image_only=not texts)
    store.check_embedder(collection, embedder.info)
    names = names or [q if isinstance(q, str) else image_name(q, i) for i, q in enumerate(queries)]
    results = [SearchResult(source=name) for name in names]
    found: list[int] = []
    vectors = []
    if texts:
        vectors.append(embedder.encode_text([queries[i] for i in texts]).vectors)
        found += texts
    if pictures:
        images, errors = load_images([(queries[i], results[i].source) for i in pictures], max_pixels)
        for j, err in errors.items():
            results[pictures[j]].error, results[pictures[j]].exception = str(err), err
        if images:
            vectors.append(embedder.encode_images(images))
            found += [i for j, i in enumerate(pictures) if j not in errors]
    if found:
        for i, hits in zip(found, store.search(collection, np.concatenate(vectors), k)):
            results[i].neighbours = hits
    return results
