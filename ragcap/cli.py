"""The `ragcap` command. Each command is thin: parse options, call the stage modules, report."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from ragcap.errors import RagcapError

app = typer.Typer(
    help="Retrieval-augmented image captioning with a Qdrant caption memory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Make models for offline use and benchmarks.", no_args_is_help=True)
app.add_typer(models_app, name="models")

QdrantUrl = Annotated[
    Optional[str],
    typer.Option("--qdrant-url", envvar="RAGCAP_QDRANT_URL", help="Qdrant server URL (default: the embedded store under $RAGCAP_HOME)."),
]
QdrantKey = Annotated[Optional[str], typer.Option("--qdrant-api-key", envvar="RAGCAP_QDRANT_API_KEY", help="API key for --qdrant-url.")]
Collection = Annotated[str, typer.Option("--collection", "-c", help="Collection name.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
Device = Annotated[Optional[str], typer.Option("--device", help="torch device (default: cuda if available, else cpu).")]


def _command(app_: typer.Typer, name: str | None = None) -> Callable:
    """Register a command whose RagcapErrors become one-line messages and exit status 1."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except RagcapError as err:
                typer.echo(f"ragcap: error: {err}", err=True)
                raise typer.Exit(1) from None
            except _server_errors() as err:
                typer.echo(f"ragcap: error: the Qdrant server failed: {err}", err=True)
                raise typer.Exit(1) from None
            except KeyboardInterrupt:
                typer.echo("ragcap: interrupted; rerun the same command to resume", err=True)
                raise typer.Exit(130) from None

        return app_.command(name)(run)

    return register


def _server_errors() -> tuple[type[Exception], ...]:
    """qdrant-client's errors for a server that answers badly (the store reports unreachable ones)."""
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    return (UnexpectedResponse, ResponseHandlingException)


def _store(url: str | None, api_key: str | None):
    from ragcap.store import open_store

    return open_store(url=url, api_key=api_key)


# ---------------------------------------------------------------------------- ingest


@_command(app)
def ingest(
    source: Annotated[str, typer.Argument(help="Corpus kind: coco-captions, flickr, cc3m, text, jsonl, csv, parquet, hf.")],
    paths: Annotated[Optional[list[str]], typer.Argument(help="Files, a directory, or a Hugging Face data set name.")] = None,
    collection: Collection = "captions",
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Embedder spec (default: the collection's, else ViT-B-32:openai).")] = None,
    text_field: Annotated[Optional[str], typer.Option(help="jsonl/csv/parquet/hf: the caption field.")] = None,
    id_field: Annotated[Optional[str], typer.Option(help="jsonl/csv/parquet/hf: the image id field.")] = None,
    vector_field: Annotated[Optional[str], typer.Option(help="parquet: pre-computed vectors (from `ragcap export`); no re-embedding.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Karpathy or Hugging Face split.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Read at most N captions from the source.")] = None,
    exclude_images: Annotated[Optional[Path], typer.Option(help="File of image ids (one per line or a JSON list) whose captions stay out.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Skip captions longer than N GPT-2 tokens (SmallCap uses 25).")] = None,
    tokenizer: Annotated[str, typer.Option(help="GPT-2 tokenizer (hub name or directory) for --max-tokens.")] = "gpt2",
    skip_bad: Annotated[bool, typer.Option(help="Skip and count malformed lines instead of stopping.")] = False,
    shard: Annotated[Optional[str], typer.Option(help="I/N: ingest only the I-th of N disjoint slices (parallel workers).")] = None,
    batch_size: Annotated[int, typer.Option(help="Captions embedded and upserted together (the resume granularity).")] = 4096,
    vector_dtype: Annotated[str, typer.Option(help="Storage of a new collection: float16 (half the memory) or float32.")] = "float16",
    device: Device = None,
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
    json_out: Json = False,
):
    """Read a caption corpus, embed every caption and store it in a Qdrant collection."""
    from pipelines import get_reader
    from pipelines import filters
    from pipelines.base import ReadOptions
    from ragcap.ingest import IngestOptions, ingest as run_ingest
    from ragcap.report import emit_json, progress
    from ragcap.store import check_vector_dtype

    reader = get_reader(source)
    paths = paths or []
    read_options = ReadOptions(text_field=text_field, id_field=id_field, vector_field=vector_field, split=split, skip_bad=skip_bad)
    check_vector_dtype(vector_dtype)
    options = IngestOptions(limit=limit, batch_size=batch_size, vector_dtype=vector_dtype)
    if exclude_images is not None:
        options.exclude_images = frozenset(filters.load_image_ids(exclude_images))
    if max_tokens is not None:
        counter = filters.GPT2TokenCounter(tokenizer)
        options.max_tokens, options.token_counter = max_tokens, lambda caption: counter.count([caption])[0]
    if shard is not None:
        options.shard = filters.parse_shard(shard)

    # A first pass over regular files counts the records for the progress bar's ETA (and fails
    # fast on a bad path); parsing is cheap next to embedding. Pipes and hub names are read once.
    total = None
    if paths and all(os.path.isfile(p) for p in paths):
        total = sum(1 for _ in reader(paths, ReadOptions(**{**vars(read_options), "skip_bad": True})))
    if limit is not None:
        total = limit if total is None else min(total, limit)
    store = _store(qdrant_url, qdrant_api_key)
    try:
        info, load = _ingest_embedder(store, collection, model, device, source, paths, vector_field)
        with progress(total, f"ingest {collection}", "captions") as bar:
            summary = run_ingest(reader(paths, read_options), store, collection, info, load, options, bar.update)
        points = store.count(collection)
    finally:
        store.close()
    result = {"collection": collection, "embedder": info.spec, "points": points, **summary.to_dict()}
    if json_out:
        emit_json(result)
    else:
        typer.echo(
            f"{collection}: read {summary.read}, stored {summary.stored}, already stored {summary.already_stored}, "
            f"duplicates {summary.duplicates}, excluded {summary.excluded}, too long {summary.too_long}, "
            f"other shards {summary.other_shards}, skipped bad {summary.skipped_bad}, truncated {summary.truncated}; "
            f"{points} points in the collection"
        )
        for line in summary.bad:
            typer.echo(f"  skipped {line}", err=True)


def _ingest_embedder(store, collection, model, device, source, paths, vector_field):
    """The embedder identity for an ingest, and a loader called only if something needs embedding."""
    from ragcap.embed import load_embedder
    from ragcap.embedder_info import EmbedderInfo

    if model is None and store.exists(collection):
        model = store.embedder(collection).spec
    if vector_field is not None and source == "parquet":
        recorded = _parquet_embedder(paths)
        if recorded is not None and (model is None or model == recorded.spec):
            return recorded, lambda: load_embedder(recorded.spec, device)
        if model is None:
            raise RagcapError(f"{paths[0]} records no embedder; pass --model with the spec its vectors were made with")
    embedder = load_embedder(model or "ViT-B-32:openai", device)
    info: EmbedderInfo = embedder.info
    return info, lambda: embedder


EMBEDDER_METADATA_KEY = b"ragcap.embedder"


def _parquet_embedder(paths):
    import pyarrow.parquet as pq

    from ragcap.embedder_info import EmbedderInfo

    metadata = pq.read_schema(paths[0]).metadata or {}
    raw = metadata.get(EMBEDDER_METADATA_KEY)
    return EmbedderInfo.from_dict(json.loads(raw)) if raw else None


# ---------------------------------------------------------------------------- collections


@_command(app)
def collections(qdrant_url: QdrantUrl = None, qdrant_api_key: QdrantKey = None, json_out: Json = False):
    """List collections with their size and the embedder that filled them."""
    from ragcap.report import emit_json, print_table

    store = _store(qdrant_url, qdrant_api_key)
    try:
        rows = [
            {
                "name": c.name,
                "points": c.points,
                "embedder": c.embedder.spec if c.embedder else "?",
                "dim": c.embedder.dim if c.embedder else "?",
                "vectors": c.vector_dtype,
            }
            for c in store.collections()
        ]
    finally:
        store.close()
    if json_out:
        emit_json(rows)
    elif rows:
        print_table(rows, ["name", "points", "embedder", "dim", "vectors"])
    else:
        typer.echo("no collections; create one with `ragcap ingest`")


@_command(app)
def search(
    query: Annotated[str, typer.Argument(help="Query text, or the path of an image.")],
    collection: Collection = "captions",
    k: Annotated[int, typer.Option("--k", "-k", help="Number of neighbours.")] = 10,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Embedder (default: the collection's).")] = None,
    device: Device = None,
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
    json_out: Json = False,
):
    """Show the captions nearest to a text or an image."""
    from ragcap.embed import load_embedder
    from ragcap.images import IMAGE_EXTENSIONS, load_image
    from ragcap.report import emit_json

    store = _store(qdrant_url, qdrant_api_key)
    try:
        embedder = load_embedder(model or store.embedder(collection).spec, device)
        store.check_embedder(collection, embedder.info)
        is_image = Path(query).suffix.lower() in IMAGE_EXTENSIONS and Path(query).exists()
        vector = embedder.encode_images([load_image(query)]) if is_image else embedder.encode_text([query]).vectors
        hits = store.search(collection, vector, k)[0]
    finally:
        store.close()
    rows = [{"score": round(float(h.score), 6), **h.payload} for h in hits]
    if json_out:
        emit_json({"query": query, "kind": "image" if is_image else "text", "neighbours": rows})
    else:
        for row in rows:
            typer.echo(f"{row['score']:.4f}  {row['caption']}")


@_command(app)
def drop(
    name: Annotated[str, typer.Argument(help="Collection to delete.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
):
    """Delete a collection."""
    store = _store(qdrant_url, qdrant_api_key)
    try:
        points = store.count(name)
        if not yes and not typer.confirm(f"delete collection '{name}' ({points} points)?"):
            raise typer.Exit(1)
        store.drop(name)
    finally:
        store.close()
    typer.echo(f"dropped {name} ({points} points)")


@_command(app)
def export(
    name: Annotated[str, typer.Argument(help="Collection to export.")],
    out: Annotated[Path, typer.Argument(help="Parquet file to write.")],
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
    json_out: Json = False,
):
    """Write captions, payloads and vectors to Parquet (load elsewhere with `ingest parquet --vector-field vector`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ragcap.report import emit_json, progress

    store = _store(qdrant_url, qdrant_api_key)
    tmp = out.with_name(out.name + ".partial")
    try:
        info = store.embedder(name)
        schema = pa.schema(
            [("id", pa.string()), ("caption", pa.string()), ("payload", pa.string()), ("vector", pa.list_(pa.float32(), info.dim))],
            metadata={EMBEDDER_METADATA_KEY: json.dumps(info.to_dict())},
        )
        rows = 0
        with pq.ParquetWriter(tmp, schema) as writer, progress(store.count(name), f"export {name}", "points") as bar:
            for ids, vectors, payloads in store.scroll(name, with_vectors=True):
                columns = [
                    pa.array(ids, pa.string()),
                    pa.array([p["caption"] for p in payloads], pa.string()),
                    pa.array([json.dumps(p, ensure_ascii=False) for p in payloads], pa.string()),
                    pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), info.dim),
                ]
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))
                rows += len(ids)
                bar.update(len(ids))
        os.replace(tmp, out)  # nothing half-written under the real name
    finally:
        tmp.unlink(missing_ok=True)
        store.close()
    if json_out:
        emit_json({"collection": name, "file": str(out), "points": rows, "embedder": info.spec})
    else:
        typer.echo(f"wrote {rows} points of {name} to {out}")


# ---------------------------------------------------------------------------- decode


@_command(app, "train-decoder")
def train_decoder(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the trained decoder (and its checkpoints).")],
    collection: Annotated[Optional[str], typer.Option("--collection", "-c", help="Train on this collection's captions and vectors.")] = None,
    parquet: Annotated[Optional[Path], typer.Option(help="Or train on a `ragcap export` Parquet file.")] = None,
    layers: Annotated[int, typer.Option(help="Decoder layers (DeCap: 4).")] = 4,
    heads: Annotated[int, typer.Option(help="Attention heads (DeCap: 4).")] = 4,
    width: Annotated[int, typer.Option(help="Hidden size (DeCap: 768).")] = 768,
    max_tokens: Annotated[Optional[int], typer.Option(help="Captions are cut to this many tokens.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Captions per step.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak AdamW learning rate.")] = None,
    noise: Annotated[Optional[float], typer.Option(help="Std of Gaussian noise on the embeddings (CapDec); 0 = off.")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help="Label smoothing of the cross-entropy (DeCap: 0.1).")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout in the decoder (GPT-2: 0.1).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear warm-up steps (at most 10% of the run).")] = None,
    prune_vocab: Annotated[bool, typer.Option("--prune-vocab/--full-vocab", help="Output only the CLIP tokens the captions use (same captions, several times faster).")] = True,
    val_fraction: Annotated[Optional[float], typer.Option(help="Held-out fraction for the per-epoch validation loss.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for the split, initialisation and batches.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last complete epoch in --out.")] = False,
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
    json_out: Json = False,
):
    """Train DeCap's decoder on text only: reproduce each caption from its own stored embedding."""
    from ragcap.report import emit_json, progress
    from ragcap.train import TrainConfig, train_decoder as train

    if (collection is None) == (parquet is None):
        raise RagcapError("pass exactly one of --collection NAME or --parquet FILE")
    captions, vectors, info = _training_data(collection, parquet, qdrant_url, qdrant_api_key)
    given = dict(n_layer=layers, n_head=heads, n_embd=width, max_tokens=max_tokens, epochs=epochs, batch_size=batch_size,
                 lr=lr, noise_std=noise, val_fraction=val_fraction, seed=seed, label_smoothing=label_smoothing,
                 dropout=dropout, warmup_steps=warmup_steps, prune_vocab=prune_vocab)
    config = TrainConfig(**{k: v for k, v in given.items() if v is not None})
    bar = progress(None, "train-decoder", "steps")

    def report(step: int, total: int, loss: float) -> None:
        bar.total = total
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.refresh()

    with bar:
        result = train(captions, vectors, info, out, config, resume=resume, progress=report)
    if json_out:
        emit_json({"out": str(out), "captions": len(captions), "embedder": info.spec, **result})
    else:
        typer.echo(f"decoder for {info.spec} written to {out} ({len(captions)} captions)")


def _training_data(collection, parquet, url, api_key):
    import numpy as np

    if parquet is not None:
        import pyarrow.parquet as pq

        info = _parquet_embedder([str(parquet)])
        if info is None:
            raise RagcapError(f"{parquet} records no embedder: train from a `ragcap export` file or from --collection")
        table = pq.read_table(parquet, columns=["caption", "vector"])
        vectors = np.asarray(table.column("vector").combine_chunks().flatten(), dtype=np.float32).reshape(len(table), info.dim)
        return table.column("caption").to_pylist(), vectors, info
    store = _store(url, api_key)
    try:
        info = store.embedder(collection)
        captions, chunks = [], []
        for _, vectors, payloads in store.scroll(collection, with_vectors=True):
            captions.extend(p["caption"] for p in payloads)
            chunks.append(vectors)
    finally:
        store.close()
    if not captions:
        raise RagcapError(f"collection '{collection}' is empty: fill it with `ragcap ingest`")
    return captions, np.concatenate(chunks), info


@_command(app)
def caption(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="Images, directories, globs, @list files, or - for paths on stdin.")] = None,
    collection: Collection = "captions",
    mode: Annotated[str, typer.Option("--mode", help="Comma-separated: pd, nnd, clipre, vd, prompt.")] = "pd",
    decoder: Annotated[Optional[Path], typer.Option(help="Trained decoder directory (pd, nnd, vd).")] = None,
    lm: Annotated[str, typer.Option(help="Causal LM for prompt mode: hub name or directory.")] = "gpt2",
    text: Annotated[Optional[list[str]], typer.Option("--text", help="Caption from this text instead of images (repeatable).")] = None,
    k: Annotated[Optional[int], typer.Option("--k", "-k", help="Neighbours in the pd projection [default: 1024, or the whole collection if smaller].")] = None,
    tau: Annotated[float, typer.Option(help="Softmax temperature of the projection (DeCap: 0.01).")] = 0.01,
    beam: Annotated[int, typer.Option(help="Decoder beam size (1 = greedy).")] = 1,
    max_tokens: Annotated[Optional[int], typer.Option(help="Decoder length cap (default: its training length).")] = None,
    prompt_k: Annotated[int, typer.Option(help="Retrieved captions in the prompt (SmallCap: 4).")] = 4,
    full_memory: Annotated[bool, typer.Option(help="Exact pd over every stored caption (slow; for checking).")] = False,
    neighbours: Annotated[int, typer.Option(help="Also report this many retrieved captions with scores.")] = 0,
    fmt: Annotated[str, typer.Option("--format", help="text, jsonl or csv.")] = "text",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write results here instead of stdout.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Embedder (default: the collection's).")] = None,
    device: Device = None,
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
    json_out: Annotated[bool, typer.Option("--json", help="Same as --format jsonl.")] = False,
):
    """Caption images (or texts) with one or more modes."""
    from ragcap.caption import CaptionSettings, iter_inputs, parse_modes
    from ragcap.report import CAPTION_FORMATS, CaptionWriter, progress, write_all

    fmt = "jsonl" if json_out else fmt
    if fmt not in CAPTION_FORMATS:
        raise RagcapError(f"unknown --format {fmt!r}; choose from {', '.join(CAPTION_FORMATS)}")
    if not inputs and not text:
        raise RagcapError("nothing to caption: give image paths, a directory, - for stdin, or --text")
    settings = CaptionSettings(modes=parse_modes(mode), k=k, tau=tau, beam_size=beam, max_tokens=max_tokens,
                               prompt_k=prompt_k, full_memory=full_memory, batch_size=batch_size, neighbours=neighbours)
    paths = list(iter_inputs(inputs or []))
    store = _store(qdrant_url, qdrant_api_key)
    out = open(output, "w", encoding="utf-8", newline="") if output else sys.stdout
    try:
        captioner = _captioner(store, collection, settings, decoder, lm, model, device, image_only=not text)
        writer = CaptionWriter(out, fmt, key="text" if text else "file")
        failed = write_all(captioner.caption_texts(text), writer) if text else 0
        if paths:
            with progress(len(paths), "caption", "images") as bar:
                results = captioner.caption_images(paths)
                failed += write_all(_counting(results, bar), writer)
    finally:
        if output:
            out.close()
        store.close()
    if failed:
        typer.echo(f"ragcap: {failed} input(s) failed; see the error lines", err=True)
        raise typer.Exit(1)


def _counting(results, bar):
    """Advance the bar once per input (a failed input has one result, a captioned one one per mode)."""
    last = None
    for result in results:
        if result.source != last:
            bar.update(1)
            last = result.source
        yield result


def _captioner(store, collection, settings, decoder_dir, lm, model, device, image_only):
    from ragcap.caption import DECODER_MODES, Captioner
    from ragcap.embed import load_embedder

    modes = set(settings.modes)
    embedder = load_embedder(model or store.embedder(collection).spec, device, image_only=image_only)
    decoder = prompter = None
    if modes & set(DECODER_MODES) and decoder_dir is not None:
        from ragcap.decoder import CaptionDecoder, check_compatible

        decoder = CaptionDecoder.load(decoder_dir, device=device)
        check_compatible(decoder, embedder.info, collection)
    if "prompt" in modes:
        from transformers.utils import logging as hf_logging

        from ragcap.prompt import PromptCaptioner

        hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with ours
        prompter = PromptCaptioner(lm, device=device)
    return Captioner(store, collection, embedder, settings, decoder=decoder, prompter=prompter)


# ---------------------------------------------------------------------------- evaluate


@_command(app, "eval")
def evaluate(
    references: Annotated[Path, typer.Argument(help="Human references: COCO JSON, Karpathy JSON, COCO by-image JSON, Flickr token/CSV, or a JSONL manifest.")],
    images: Annotated[Path, typer.Option("--images", help="Folder of the images to caption (matched to references by id or file name).")],
    collection: Collection = "captions",
    mode: Annotated[str, typer.Option("--mode", help="Comma-separated modes to score: pd, nnd, clipre, vd, prompt.")] = "pd",
    decoder: Annotated[Optional[Path], typer.Option(help="Trained decoder directory (pd, nnd, vd).")] = None,
    lm: Annotated[str, typer.Option(help="Causal LM for prompt mode.")] = "gpt2",
    ref_format: Annotated[Optional[str], typer.Option("--ref-format", help="Reference format (default: detected).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Karpathy split to score (default: test).")] = None,
    k: Annotated[Optional[int], typer.Option("--k", "-k", help="Neighbours in the pd projection [default: 1024, or the whole collection if smaller].")] = None,
    tau: Annotated[float, typer.Option(help="Softmax temperature of the projection.")] = 0.01,
    beam: Annotated[int, typer.Option(help="Decoder beam size (1 = greedy).")] = 1,
    spice: Annotated[bool, typer.Option(help="Also score SPICE when its jars are installed (slow).")] = True,
    allow_leakage: Annotated[bool, typer.Option(help="Score even if the memory holds the evaluated images' own captions.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Embedder (default: the collection's).")] = None,
    device: Device = None,
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print scores and per-image captions as JSON.")] = False,
):
    """Caption a set of images with one or more modes and score them with the COCO metrics."""
    from ragcap import evaluate as ev
    from ragcap.caption import CaptionSettings, parse_modes
    from ragcap.report import emit_json, progress

    ev.require_java()  # fail before minutes of captioning, not after
    refs = ev.load_references(references, ref_format, split)
    matched = ev.match_images(refs, images)
    absent = sorted(set(refs) - set(matched.pairs))
    if not matched.pairs:
        raise RagcapError(f"none of the {len(refs)} images in {references} is in {images}; check --images and --split")
    settings = CaptionSettings(modes=parse_modes(mode), k=k, tau=tau, beam_size=beam, batch_size=batch_size)
    store = _store(qdrant_url, qdrant_api_key)
    try:
        if not allow_leakage:
            payloads = (p for _, _, batch in store.scroll(collection, with_vectors=False) for p in batch)
            leaked = ev.find_leakage(set(matched.pairs), payloads)
            if leaked:
                raise RagcapError(
                    f"collection '{collection}' holds {leaked} captions of the {len(matched.pairs)} images under evaluation, "
                    "which inflates every score; rebuild it with `ragcap ingest ... --exclude-images FILE` "
                    "(a file of the evaluated image ids) or pass --allow-leakage"
                )
        captioner = _captioner(store, collection, settings, decoder, lm, model, device, image_only=True)
        key_of = {str(path): key for key, path in matched.pairs.items()}
        captions: dict[str, dict[str, str]] = {m: {} for m in settings.modes}
        failed: dict[str, str] = {}
        with progress(len(key_of), "caption", "images") as bar:
            for result in _counting(captioner.caption_images(list(key_of)), bar):
                if result.error is not None:
                    failed[result.source] = result.error
                else:
                    captions[result.mode][key_of[result.source]] = result.caption
    finally:
        store.close()
    if not any(captions.values()):
        raise RagcapError(f"no image could be captioned ({len(failed)} failed)")
    scores = {m: ev.score(captions[m], refs, spice=spice) for m in settings.modes}
    if json_out:
        emit_json({
            "references": str(references), "collection": collection, "images_scored": len(next(iter(captions.values()))),
            "images_missing": absent, "images_failed": failed,
            "scores": {m: s.to_dict() for m, s in scores.items()},
            "captions": {key: {m: captions[m].get(key) for m in settings.modes} for key in sorted(matched.pairs)},
        })
    else:
        typer.echo(ev.format_table(scores))
    for path, error in failed.items():
        typer.echo(f"ragcap: could not caption {path}: {error}", err=True)
    if absent:
        typer.echo(f"ragcap: {len(absent)} referenced images are not in {images} (e.g. {', '.join(absent[:3])}); scored the rest", err=True)
    if failed or absent:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------- models


@_command(models_app, "list")
def list_models(
    contains: Annotated[Optional[str], typer.Argument(help="Only specs containing this text (case-insensitive).")] = None,
    json_out: Json = False,
):
    """Every open_clip ARCH:TAG spec (weights download on first use)."""
    from ragcap.embed import list_pretrained_specs
    from ragcap.report import emit_json

    specs = [s for s in list_pretrained_specs() if contains is None or contains.lower() in s.lower()]
    if json_out:
        emit_json(specs)
    else:
        typer.echo("\n".join(specs))


@_command(models_app, "save-random")
def save_random(
    arch: Annotated[str, typer.Argument(help="open_clip architecture (e.g. ViT-B-32) or a model-config JSON file.")],
    out: Annotated[Path, typer.Argument(help="Directory to write (a local checkpoint, usable as --model DIR).")],
    seed: Annotated[int, typer.Option(help="Initialisation seed.")] = 0,
):
    """Write a randomly initialised open_clip model in the on-disk form of a real checkpoint."""
    from ragcap.embed import save_random as write

    typer.echo(str(write(arch, out, seed=seed)))


@_command(models_app, "save-random-lm")
def save_random_lm(
    out: Annotated[Path, typer.Argument(help="Directory to write (usable as --lm DIR).")],
    tokenizer: Annotated[Path, typer.Option(help="Directory with GPT-2's vocab.json and merges.txt.")],
    layers: Annotated[int, typer.Option(help="Transformer layers (GPT-2 small: 12).")] = 12,
    width: Annotated[int, typer.Option(help="Hidden size (GPT-2 small: 768).")] = 768,
    heads: Annotated[int, typer.Option(help="Attention heads (GPT-2 small: 12).")] = 12,
    seed: Annotated[int, typer.Option(help="Initialisation seed.")] = 0,
):
    """Write a randomly initialised GPT-2 with a real tokenizer (for offline tests and benchmarks)."""
    from ragcap.prompt import save_random_lm as write

    typer.echo(str(write(out, tokenizer, n_layer=layers, n_embd=width, n_head=heads, seed=seed)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
