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

import os
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
from ragcap.store import CheckReport, Hit, Store, open_store

__all__ = [
    "CaptionSettings",
    "Captioner",
    "IngestOptions",
    "TrainingExamples",
    "check_collection",
    "embed_images",
    "export_collection",
    "find_leakage",
    "ingest_corpus",
    "ingest_embedder",
    "load_captioner",
    "open_store",
    "restore_record",
    "search",
    "SearchResult",
    "training_data",
    "training_examples",
]

DEFAULT_MODEL = "ViT-B-32:openai"
MODEL_ENV = "RAGCAP_MODEL"  # the embedder of new collections and feature files when -m is not given


def default_model() -> str:
    """$RAGCAP_MODEL, else DEFAULT_MODEL: set it once instead of passing -m to every new collection."""
    return os.environ.get(MODEL_ENV, "").strip() or DEFAULT_MODEL


def collection_model(store: Store, collection: str, model: str | None = None) -> str:
    """The embedder spec to load for a collection: `model` if given, else the one it records.

    A local model recorded at a path that no longer exists (moved, or the collection copied to
    another machine) is looked for at $RAGCAP_MODEL; either way its digest is then checked.
    """
    if model:
        return model
    recorded = store.embedder(collection)
    gone = recorded.spec.startswith("local:") and not Path(recorded.spec.removeprefix("local:")).is_dir()
    if not gone:
        return recorded.spec
    if os.environ.get(MODEL_ENV, "").strip():
        return os.environ[MODEL_ENV].strip()
    raise ModelError(
        f"collection '{collection}' was filled by the local model {recorded.spec.removeprefix('local:')}, which is not there "
        f"any more; pass --model DIR (or set {MODEL_ENV}) with that model wherever it is now: a moved or copied "
        "directory is recognised by its contents (digest), a changed one is refused"
    )


def ingest_embedder(
    store: Store,
    collection: str,
    model: str | None = None,
    device: str | None = None,
    vectors_from: str | Path | None = None,
    pre_embedded: bool = False,
) -> tuple[EmbedderInfo, Callable[[], object]]:
    """The embedder identity for an ingest, and a loader called only if something needs embedding.

    The model is, in order: the one asked for, the collection's own, the one a pre-embedded
    Parquet file (`vectors_from`) records, default_model(). A source whose records all carry
    vectors (`pre_embedded`) needs no model at all, only its identity: loading a Parquet export
    or clip-retrieval's embeddings into a server loads no weights.
    """
    from ragcap.embed import check_available, describe_embedder, load_embedder, parse_spec

    if model is None and store.exists(collection):
        model = collection_model(store, collection)
    if vectors_from is not None:
        recorded = parquet_embedder(vectors_from)
        if recorded is not None and (model is None or model == recorded.spec):
            return recorded, lambda: load_embedder(recorded.spec, device)
    if pre_embedded:
        if model is None:
            where = vectors_from or "the source"
            raise ModelError(f"{where} records no embedder; pass --model with the spec its vectors were made with (e.g. ViT-L-14:openai)")
        info = describe_embedder(model)
        return info, lambda: load_embedder(model, device)
    spec = model or default_model()
    if parse_spec(spec).kind == "st":  # its dimension is known only once loaded
        embedder = load_embedder(spec, device)
        return embedder.info, lambda: embedder
    # Checked now (a missing directory, or offline without the weights), loaded only once
    # something needs embedding: an empty corpus or a resumed ingest loads no weights.
    check_available(spec)
    return describe_embedder(spec), lambda: load_embedder(spec, device)


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
    from pipelines import PRE_EMBEDDED

    given_vectors = source == "parquet" and read_options.vector_field is not None
    vectors_from = paths[0] if given_vectors and paths else None
    info, load = ingest_embedder(store, collection, model, device, vectors_from, pre_embedded=given_vectors or source in PRE_EMBEDDED)
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


@dataclass
class TrainingExamples:
    """Captions, one vector each, and what the training loop needs to know about their origin."""

    captions: list[str]
    vectors: np.ndarray  # (n, dim) float32: the image's embedding (paired) or the caption's own (text)
    embedder: EmbedderInfo
    groups: list[str]  # the held-out split keeps a group together: an image's captions
    noisy: np.ndarray  # bool (n,): text rows, which get --noise; image rows get none
    paired: int  # how many rows come from image features


def training_examples(
    store: Store | None = None, collection: str | None = None, parquet: str | Path | None = None, features: str | Path | None = None
) -> TrainingExamples:
    """Paired examples from an `embed-images` features file and/or text-only ones from a
    collection or an export, all of one embedder."""
    if features is None and collection is None and parquet is None:
        raise RagcapError("nothing to train on: pass --features FILE (paired), and/or --collection NAME or --parquet FILE (text only)")
    captions: list[str] = []
    chunks: list[np.ndarray] = []
    groups: list[str] = []
    info = None
    if features is not None:
        from ragcap.features import read_features

        loaded = read_features(features)
        captions, vectors, images = loaded.pairs()
        chunks, groups, info = [vectors], [f"image:{i}" for i in images], loaded.embedder
    paired = len(captions)
    if collection is not None or parquet is not None:
        texts, vectors, text_info = training_data(store, collection, parquet)
        if info is not None and not text_info.matches(info):
            raise RagcapError(f"{features} holds features of {info.spec} (dim {info.dim}) but {collection or parquet} "
                              f"was embedded with {text_info.spec} (dim {text_info.dim}); use data of one embedder")
        captions, info = captions + texts, text_info
        chunks.append(vectors)
        groups += [f"text:{i}" for i in range(len(texts))]
    noisy = np.arange(len(captions)) >= paired
    return TrainingExamples(captions, np.concatenate(chunks), info, groups, noisy, paired)


def embed_images(
    refs,
    pairs: dict[str, Path],
    out: str | Path,
    model: str | None = None,
    device: str | None = None,
    batch_size: int = 64,
    on_progress: Callable[[int], None] | None = None,
):
    """Encode the referenced images into a features file (ragcap.features.embed_images). The
    embedder is, in order: the one asked for, the one an existing `out` records, default_model()."""
    from ragcap.embed import load_embedder
    from ragcap import features

    if model is None and Path(out).is_file():
        model = features.read_features(out).embedder.spec
    embedder = load_embedder(model or default_model(), device, image_only=True)
    return features.embed_images(refs, pairs, embedder, out, batch_size, on_progress)


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
    from ragcap.caption import require_resources
    from ragcap.decoders import check_decoder
    from ragcap.decoders.lm import check_causal_lm
    from ragcap.embed import check_available, load_embedder
    from ragcap.modes import modes_needing

    settings = settings or CaptionSettings()
    # Every resource of every mode is checked before the first model loads (seconds, not a
    # load of CLIP followed by an error about the decoder or an LM that is not there).
    spec = collection_model(store, collection, model)
    require_resources(settings.modes, decoder, lm)
    if modes_needing("decoder", settings.modes):
        check_decoder(decoder)
    if modes_needing("lm", settings.modes):
        check_causal_lm(lm)
    check_available(spec)
    embedder = load_embedder(spec, device, image_only=image_only)
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
        embedder = load_embedder(collection_model(store, collection), device, image_only=not texts)
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


def check_collection(store: Store, name: str, repair: bool = False) -> tuple[CheckReport, int]:
    """Verify a collection; with repair, delete its damaged points (re-running the ingest that
    filled it then re-embeds exactly those) and verify again. Returns (report, points deleted)."""
    report = store.check(name)
    if not (repair and report.repairable and (report.damaged_ids or report.lost)):
        return report, 0
    if report.damaged_ids:
        store.delete(name, report.damaged_ids)
    if report.lost:
        store.recount(name)
    return store.check(name), len(report.damaged_ids)


def restore_record(store: Store, name: str, model: str, device: str | None = None) -> int:
    """Rewrite the lost record of an embedded collection for `model`, once `model` is shown to
    reproduce its stored vectors; returns the number of points."""
    from ragcap.embed import load_embedder
    from ragcap.errors import StoreError
    from ragcap.store.edge import EdgeStore

    if not isinstance(store, EdgeStore):
        raise StoreError("--restore-record is for the embedded store; a Qdrant server keeps the embedder in the collection's metadata")
    embedder = load_embedder(model, device)
    return store.restore_record(name, embedder.info, lambda captions: embedder.encode_text(captions).vectors)
