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

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from ragcap.config import ENV_OF, setting
from ragcap.embedder_info import EmbedderInfo
from ragcap.distributed import RayOptions
from ragcap.errors import EmbedderMismatch, ImageError, ModelError, OptionError, RagcapError, SourceError
from ragcap.export import export_collection, parquet_embedder
from ragcap.images import ImageInput, image_name, load_images
from ragcap.ingest import IngestOptions, IngestSummary
from ragcap.store import CheckReport, CollectionLayout, Hit, Store, check_vector_dtype, open_store
from ragcap.util import many

if TYPE_CHECKING:  # imported where used: ingesting pre-computed vectors needs no torch (~3 s to import)
    from ragcap.caption import CaptionSettings, Captioner

__all__ = [
    "CollectionLayout",
    "IngestOptions",
    "RayOptions",
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
MODEL_ENV = ENV_OF["model"]  # the embedder of new collections and feature files when -m is not given


def default_model() -> str:
    """$RAGCAP_MODEL, else the config file's `model`, else DEFAULT_MODEL: set it once instead of
    passing -m to every new collection."""
    return setting("model")[0] or DEFAULT_MODEL


def collection_model(store: Store, collection: str, model: str | None = None) -> str:
    """The embedder spec to load for a collection: `model` if given, else the one it records.

    A local model recorded at a path that no longer exists (moved, or the collection copied to
    another machine) is looked for at $RAGCAP_MODEL or the config file's `model`; either way its
    digest is then checked.
    """
    if model:
        return model
    recorded = store.embedder(collection)
    gone = recorded.spec.startswith("local:") and not Path(recorded.spec.removeprefix("local:")).is_dir()
    if not gone:
        return recorded.spec
    configured, _ = setting("model")
    if configured:
        return configured
    raise ModelError(
        f"collection '{collection}' was filled by the local model {recorded.spec.removeprefix('local:')}, which is not there "
        f"any more; pass --model DIR (or set {MODEL_ENV} or the config file's model) with that model wherever it is now: a moved or copied "
        "directory is recognised by its contents (digest), a changed one is refused"
    )


def ingest_embedder(
    store: Store,
    collection: str,
    model: str | None = None,
    device: str | None = None,
    vectors_from: Sequence[str | Path] | None = None,
    pre_embedded: bool = False,
    load: bool = True,
    precision: str | None = None,
) -> tuple[EmbedderInfo, Callable[[], object]]:
    """The embedder identity for an ingest, and a loader called only if something needs embedding.

    Pre-embedded Parquet files that record their embedder (`vectors_from`, ragcap's exports)
    fix the identity, and a collection or --model of another embedder is refused. Otherwise the
    model is, in order: the one asked for, the collection's own, default_model(). A source whose records all carry
    vectors (`pre_embedded`) needs no model at all, only its identity: loading a Parquet export
    or clip-retrieval's embeddings into a server loads no weights. load=False: the identity
    alone, read from the model's config (Ray's actors load the weights, not the driver).
    """
    from ragcap.embed import check_available, describe_embedder, load_embedder, parse_spec

    asked = model
    exists = store.exists(collection)
    if model is None and exists:
        model = collection_model(store, collection)
    recorded = files_embedder(vectors_from) if vectors_from else None
    if recorded is not None:
        where, info = recorded
        # The file's vectors are what they are: a collection or --model of another embedder
        # would file them under the wrong model, where every search of them comes out wrong.
        expected = [(store.embedder(collection), f"collection '{collection}' was filled by")] if exists else []
        if asked is not None:
            expected.append((describe_embedder(asked), "--model is"))
        for other, whose in expected:
            if not info.matches(other):
                raise EmbedderMismatch(
                    f"{where} holds vectors of embedder '{info.spec}' (dim {info.dim}), but {whose} '{other.spec}' "
                    f"(dim {other.dim}); ingest it into a collection of '{info.spec}', or re-embed its captions "
                    "(ingest it without --vector-field)"
                )
        spec = model or info.spec
        return info, lambda: load_embedder(spec, device, precision=precision)
    if pre_embedded:
        if model is None:
            where = ", ".join(map(str, vectors_from)) if vectors_from else "the source"
            raise ModelError(f"{where} records no embedder; pass --model with the spec its vectors were made with (e.g. ViT-L-14:openai)")
        info = describe_embedder(model)
        return info, lambda: load_embedder(model, device, precision=precision)
    spec = model or default_model()
    if parse_spec(spec).kind == "st" and load:  # its dimension is known only once loaded
        embedder = load_embedder(spec, device, precision=precision)
        return embedder.info, lambda: embedder
    # Checked now (a missing directory, or offline without the weights), loaded only once
    # something needs embedding: an empty corpus or a resumed ingest loads no weights.
    check_available(spec)
    return describe_embedder(spec), lambda: load_embedder(spec, device, precision=precision)


def files_embedder(paths: Sequence[str | Path]) -> tuple[str, EmbedderInfo] | None:
    """(a file, the embedder it records) of pre-embedded Parquet files, or None if none records
    one; SourceError when two record different embedders (their vectors cannot share a collection)."""
    found = None
    for path in paths:
        info = parquet_embedder(path)
        if info is None:
            continue
        if found is not None and not found[1].matches(info):
            raise SourceError(
                f"{found[0]} and {path} hold vectors of different embedders ('{found[1].spec}', '{info.spec}'): "
                "ingest them into separate collections"
            )
        found = found or (str(path), info)
    return found


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
    engine: RayOptions | None = None,
    parquet_out: str | Path | None = None,
) -> tuple[EmbedderInfo, IngestSummary]:
    """Read a corpus with the `source` pipeline and fill `collection` (see ragcap.ingest); with
    `engine`, on a Ray cluster (see ragcap.distributed), optionally into Parquet parts instead."""
    from pipelines import PRE_EMBEDDED, ReadOptions, check_paths, check_read_options, get_reader
    from ragcap.ingest import ingest

    reader = get_reader(source)
    paths = [str(path) for path in many(paths, "paths", "ingest_corpus")]
    check_paths(source, paths)  # as the CLI does: no paths, or a missing one, is said before any model loads
    read_options = read_options or ReadOptions()
    check_read_options(source, read_options)
    options = options or IngestOptions()
    if parquet_out is not None and engine is None:
        raise OptionError("--parquet-out writes from Ray's tasks: add --engine ray")
    if parquet_out is None:
        check_layout(store, collection, options.layout, options.vector_dtype)
    given_vectors = source == "parquet" and read_options.vector_field is not None
    vectors_from = list(paths) if given_vectors else None
    pre_embedded = given_vectors or source in PRE_EMBEDDED
    info, load = ingest_embedder(store, collection, model, device, vectors_from, pre_embedded, load=engine is None,
                                 precision=options.precision)
    if engine is None:
        return info, ingest(reader(paths, read_options), store, collection, info, load, options, on_progress)
    from ragcap.distributed.ingest import ingest_on_ray
    from ragcap.distributed.source import ReadJob

    job = ReadJob(source, collection, info, read_options, options, given_vectors=pre_embedded)
    out = Path(parquet_out) if parquet_out is not None else None
    return info, ingest_on_ray(job, list(paths), store, engine, out, device, on_progress)


def check_layout(store: Store, collection: str, layout: CollectionLayout, vector_dtype: str | None = None) -> None:
    """Before any work: OptionError unless `store` can lay out a new collection so, or the
    existing one already is (--shards, --vector-dtype and the rest apply when a collection is created)."""
    store.check_layout(layout)
    if vector_dtype is not None:
        check_vector_dtype(vector_dtype)
    if not store.exists(collection):
        return
    have = {f.name: getattr(store.layout(collection), f.name) for f in fields(layout)}
    asked = {f.name: getattr(layout, f.name) for f in fields(layout) if getattr(layout, f.name) not in (None, False)}
    if vector_dtype is not None:
        have["vector_dtype"], asked["vector_dtype"] = store.vector_dtype(collection), vector_dtype
    differ = {k: v for k, v in asked.items() if have[k] != v}
    if differ:
        wanted = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in differ.items())
        held = ", ".join(f"{k.replace('_', '-')} {have[k]}" for k in differ)
        raise OptionError(
            f"collection '{collection}' exists with {held}, not {wanted}; these apply when a collection is "
            "created: drop it (or ingest into another name) to change them"
        )


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
    engine: RayOptions | None = None,
    patches: bool = False,
):
    """Encode the referenced images into a features file (ragcap.features.embed_images), with
    their patch features if asked, in this process or (`engine`) on a Ray cluster's actors. The
    embedder is, in order: the one asked for, the one an existing `out` records, default_model()."""
    from ragcap import features
    from ragcap.embed import describe_embedder, load_embedder, parse_spec, text_only_error

    spec = model or (features.read_features(out).embedder.spec if Path(out).is_file() else default_model())
    if parse_spec(spec).kind == "st":  # refused by name, before seconds of loading it
        raise text_only_error(parse_spec(spec).canonical)
    if engine is not None:
        from ragcap.distributed.images import encode_on_ray

        with encode_on_ray(spec, device, engine, patches) as encode:
            return features.embed_images(refs, pairs, describe_embedder(spec), encode, out, batch_size, on_progress, patches)
    embedder = load_embedder(spec, device, image_only=True)

    def encode(batches):
        return (features.encode_files(embedder, files, patches=patches) for files in batches)

    return features.embed_images(refs, pairs, embedder.info, encode, out, batch_size, on_progress, patches)


def find_leakage(store: Store, collection: str, image_keys: Iterable[str], references: Iterable[str] = ()) -> int:
    """How many stored captions describe one of the images (normalised ids) under evaluation, or
    are one of their reference captions (ragcap.evaluate.find_leakage)."""
    from ragcap.evaluate import find_leakage as count_leaked

    payloads = (p for _, _, batch in store.scroll(collection, with_vectors=False) for p in batch)
    return count_leaked(set(image_keys), payloads, references)


def load_captioner(
    store: Store,
    collection: str,
    settings: CaptionSettings | None = None,
    decoder: str | Path | Sequence[str | Path] | None = None,
    lm: str = "gpt2",
    model: str | None = None,
    device: str | None = None,
    image_only: bool = True,
    precision: str | None = None,
) -> Captioner:
    """A Captioner with every resource its modes need, loaded once.

    decoder: a decoder directory, or several of different uses (an embedding decoder for pd,
    nnd and vd; a SmallCap model for smallcap), each put where its kind serves.
    image_only: load only CLIP's image tower (captioning images never runs the text tower);
    pass False to caption texts.
    precision: every model's forward passes (ragcap.precision; default $RAGCAP_PRECISION, else fp32).
    """
    from ragcap.caption import CaptionSettings, Captioner, require_resources
    from ragcap.decoders import check_decoder
    from ragcap.decoders.lm import check_causal_lm
    from ragcap.embed import check_available, load_embedder
    from ragcap.modes import modes_needing
    from ragcap.precision import resolve_precision

    settings = settings or CaptionSettings()
    directories = [] if decoder is None else [decoder] if isinstance(decoder, (str, Path)) else list(decoder)
    # Every resource of every mode is checked before the first model loads (seconds, not a
    # load of CLIP followed by an error about the decoder or an LM that is not there).
    spec = collection_model(store, collection, model)
    kinds = {directory: check_decoder(directory)[0].kind for directory in directories}
    require_resources(settings.modes, next((d for d, k in kinds.items() if k != "smallcap"), None), lm,
                      next((d for d, k in kinds.items() if k == "smallcap"), None), kinds)
    if modes_needing("lm", settings.modes):
        check_causal_lm(lm)
    check_available(spec)
    precision = resolve_precision(precision)
    embedder = load_embedder(spec, device, image_only=image_only, precision=precision)
    loaded: dict[str, object] = {}  # "decoder" / "smallcap" -> the model serving those modes
    if directories and (modes_needing("decoder", settings.modes) or modes_needing("smallcap", settings.modes)):
        from ragcap.decoders import load_decoder

        for directory in directories:
            found = load_decoder(directory, device=device, precision=precision)
            use = "smallcap" if found.kind == "smallcap" else "decoder"
            if use in loaded:
                raise RagcapError(f"--decoder {directory} and --decoder {loaded[use].source} serve the same modes; pass one of them")
            found.check_embedder(embedder.info, collection)
            loaded[use] = found
    prompter = None
    if modes_needing("lm", settings.modes):
        from ragcap.decoders.lm_prompt import PromptCaptioner

        # On a GPU the LM takes the images' batches whole (--batch-size: 256 prompts at a time, not
        # 32); on a CPU 32 at a time (ragcap.decoders.lm.CPU_LM_BATCH).
        prompter = PromptCaptioner(lm, device=device, batch_size=settings.batch_size, precision=precision)
    return Captioner(store, collection, embedder, settings, decoder=loaded.get("decoder"), prompter=prompter, smallcap=loaded.get("smallcap"))


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
    from ragcap.caption import check_texts
    from ragcap.embed import load_embedder

    if k < 1:
        raise RagcapError(f"k must be at least 1, got {k}")
    many(queries, "queries", "search")
    check_texts(queries, "query")
    if names is not None and len(names) != len(queries):
        raise OptionError(f"{len(names)} names for {len(queries)} queries: pass one name per query, in the same order")
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
    embedder = load_embedder(model, device, precision="fp32")  # the check compares with vectors made at fp32
    return store.restore_record(name, embedder.info, lambda captions: embedder.encode_text(captions).vectors)
