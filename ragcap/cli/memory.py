"""Commands on the caption memory: ingest, collections, search, drop, check, export."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ragcap.cli.common import (
    DEFAULT_WAIT_S, Actors, Collection, CpusPerActor, Device, Engine, GpusPerActor, Json, Model, Precision, QdrantKey, QdrantUrl, RayAddress,
    Wait, app, command, one_of, ray_options, store,
)
from ragcap.errors import OptionError, RagcapError, SourceError


@command(app, interrupted="interrupted; the batches stored so far are kept: rerun the same command to resume")
def ingest(
    source: Annotated[str, typer.Argument(help="Corpus kind: coco-captions, flickr, cc3m, text, jsonl, csv, parquet, hf, clip-retrieval.")],
    paths: Annotated[Optional[list[str]], typer.Argument(help="Files, a directory (clip-retrieval: its output folder), or a Hugging Face data set name.")] = None,
    collection: Collection = "captions",
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Embedder spec [default: the collection's; for a new one $RAGCAP_MODEL, the config file's model, else ViT-B-32:openai].")] = None,
    text_field: Annotated[Optional[str], typer.Option(help="jsonl/csv/parquet/hf: the caption field (clip-retrieval: default caption).")] = None,
    id_field: Annotated[Optional[str], typer.Option(help="jsonl/csv/parquet/hf: the image id field.")] = None,
    vector_field: Annotated[Optional[str], typer.Option(help="parquet: pre-computed vectors (from `ragcap export`); no re-embedding.")] = None,
    split: Annotated[Optional[str], typer.Option(help="coco-captions (Karpathy), flickr, hf: the split to read.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Read at most N captions from the source.")] = None,
    exclude_images: Annotated[Optional[Path], typer.Option(help="File of image ids (one per line or a JSON list) whose captions stay out.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Skip captions longer than N GPT-2 tokens (SmallCap uses 25).")] = None,
    tokenizer: Annotated[str, typer.Option(help="GPT-2 tokenizer (hub name or directory) for --max-tokens.")] = "gpt2",
    skip_bad: Annotated[bool, typer.Option(help="Skip and count malformed lines instead of stopping.")] = False,
    shard: Annotated[Optional[str], typer.Option(help="I/N: ingest only the I-th of N disjoint slices (parallel workers).")] = None,
    batch_size: Annotated[int, typer.Option(help="Captions embedded and upserted together (the resume granularity).")] = 4096,
    vector_dtype: Annotated[Optional[str], typer.Option(metavar=one_of("float16", "float32"), help="Storage of a new collection: float16 (half the memory) or float32 [default: float16].")] = None,
    shards: Annotated[Optional[int], typer.Option(help="Qdrant server: shards of a new collection, spread over the cluster's nodes.")] = None,
    replicas: Annotated[Optional[int], typer.Option(help="Qdrant server: copies of each shard of a new collection (2 survives losing a node).")] = None,
    write_consistency: Annotated[Optional[int], typer.Option(help="Qdrant server: replicas that must confirm each write.")] = None,
    on_disk: Annotated[bool, typer.Option("--on-disk", help="Keep a new collection's vectors on disk (memory-mapped); quantized codes stay in RAM.")] = False,
    quantization: Annotated[Optional[str], typer.Option(help="Codes searched first, then rescored: int8, binary, none, or turbo4 (embedded store) [default: embedded turbo4, server none].")] = None,
    engine: Engine = None,
    ray_address: RayAddress = None,
    actors: Actors = None,
    gpus_per_actor: GpusPerActor = None,
    cpus_per_actor: CpusPerActor = None,
    parquet_out: Annotated[Optional[Path], typer.Option(help="With --engine ray: write Parquet parts (the `ragcap export` format) to this folder instead of a collection.")] = None,
    device: Device = None,
    precision: Precision = None,
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
    wait: Wait = -1,
    json_out: Json = False,
):
    """Read a caption corpus, embed every caption and store it in a Qdrant collection.

    Workers (--shard) and readers may use the collection at the same time: on the embedded
    store they take turns, and an ingest waits for its turn as long as it takes (--wait).
    With --engine ray the corpus is read, embedded and written by a Ray cluster's tasks."""
    from pipelines import PRE_EMBEDDED, ReadOptions, check_paths, check_read_options, filters, get_reader
    from ragcap import api
    from ragcap.embed import check_available
    from ragcap.ingest import IngestOptions
    from ragcap.precision import resolve_precision
    from ragcap.report import emit_json, progress
    from ragcap.store import CollectionLayout, check_vector_dtype

    reader = get_reader(source)
    paths = paths or []
    check_paths(source, paths)
    if model is not None and source not in PRE_EMBEDDED:
        check_available(model)  # a bad or (offline) missing model fails before the corpus is read
    read_options = ReadOptions(text_field=text_field, id_field=id_field, vector_field=vector_field, split=split, skip_bad=skip_bad)
    check_read_options(source, read_options)
    if vector_dtype is not None:
        check_vector_dtype(vector_dtype)
    engine_options = ray_options(engine, ray_address, actors, gpus_per_actor, cpus_per_actor)
    layout = CollectionLayout(shards, replicas, write_consistency, on_disk, quantization)
    layout.check()
    options = IngestOptions(limit=limit, batch_size=batch_size, vector_dtype=vector_dtype, layout=layout,
                            precision=resolve_precision(precision))
    if exclude_images is not None:
        options.exclude_images = frozenset(filters.load_image_ids(exclude_images))
    if max_tokens is not None:
        counter = filters.GPT2TokenCounter(tokenizer)
        options.max_tokens, options.token_counter = max_tokens, lambda caption: counter.count([caption])[0]
    if shard is not None:
        options.shard = filters.parse_shard(shard)

    # A first pass over regular files counts the records for the progress bar's ETA (and fails
    # fast on a bad path); parsing is cheap next to embedding on one machine, not next to a
    # cluster's. Pipes and hub names are read once.
    total = None
    if engine_options is None and paths and all(os.path.isfile(p) for p in paths):
        total = sum(1 for _ in reader(paths, ReadOptions(**{**vars(read_options), "skip_bad": True})))
    if limit is not None:
        total = limit if total is None else min(total, limit)
    with store(qdrant_url, qdrant_api_key, wait) as st, progress(total, f"ingest {collection}", "captions") as bar:
        info, summary = api.ingest_corpus(st, source, paths, collection, model, read_options, options, device, bar.update,
                                          engine_options, parquet_out)
        points = st.count(collection) if parquet_out is None else summary.stored + summary.already_stored
    result = {"collection": collection, "embedder": info.spec, "points": points, **summary.to_dict(),
              "engine": engine or "local", **({"parquet_out": str(parquet_out)} if parquet_out is not None else {})}
    if json_out:
        emit_json(result)
    else:
        typer.echo(
            f"{collection}: read {summary.read}, stored {summary.stored}, already stored {summary.already_stored}, "
            f"duplicates {summary.duplicates}, excluded {summary.excluded}, too long {summary.too_long}, "
            f"other shards {summary.other_shards}, skipped bad {summary.skipped_bad}, truncated {summary.truncated} "
            f"(over 77 tokens {summary.over_77_tokens}, over 248 {summary.over_248_tokens}); "
            + (f"{points} points in the collection" if parquet_out is None else f"{points} points in {parquet_out}")
        )
        for line in summary.bad:
            typer.echo(f"  skipped {line}", err=True)


@command(app)
def collections(qdrant_url: QdrantUrl = None, qdrant_api_key: QdrantKey = None, json_out: Json = False):
    """List collections with their size, the embedder that filled them, how they are laid out
    (vectors on disk, quantization; a server's shards, replicas, write consistency), and their status.

    A collection another process is using is listed as busy, a damaged one as damaged (with
    what is wrong); the exit status is 1 if any is damaged."""
    from ragcap.report import emit_json, print_table
    from ragcap.store import VECTOR_DTYPES

    with store(qdrant_url, qdrant_api_key) as st:
        listed = st.collections()
    # Unknown values (a damaged or busy collection) are JSON null, "?" in the table; a layout
    # value that does not apply (a server's shards in the embedded store) is null, "-".
    rows = [
        {
            "name": c.name,
            "points": c.points,
            "embedder": c.embedder.spec if c.embedder else None,
            "dim": c.embedder.dim if c.embedder else None,
            "vectors": c.vector_dtype if c.vector_dtype in VECTOR_DTYPES else None,
            **_layout_columns(c.layout),
            "status": c.status,
            "problem": c.problem,
        }
        for c in listed
    ]
    if json_out:
        emit_json(rows)
    elif rows:
        shown = [
            {k: ("?" if k in {"points", "embedder", "dim", "vectors"} or c.layout is None else "-") if v is None else v for k, v in row.items()}
            for c, row in zip(listed, rows)
        ]
        print_table(shown, ["name", "points", "embedder", "dim", "vectors", "on_disk", "quantization", "shards", "replicas", "write_consistency", "status"])
        for row in rows:
            if row["problem"]:
                typer.echo(f"ragcap: {row['name']}: {row['problem']}", err=True)
    else:
        typer.echo("no collections; create one with `ragcap ingest`")
    if any(row["status"] == "damaged" for row in rows):
        raise typer.Exit(1)


def _layout_columns(layout) -> dict:
    names = ("shards", "replicas", "write_consistency", "on_disk", "quantization")
    if layout is None:  # unreadable: unknown
        return dict.fromkeys(names)
    return {name: getattr(layout, name) for name in names}  # None: not a server's collection


@command(app)
def search(
    query: Annotated[str, typer.Argument(help="Query text, or the path of an image.")],
    collection: Collection = "captions",
    k: Annotated[int, typer.Option("--k", "-k", help="Number of neighbours.")] = 10,
    model: Model = None,
    device: Device = None,
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
    wait: Wait = DEFAULT_WAIT_S,
    json_out: Json = False,
):
    """Show the captions nearest to a text or an image."""
    if k < 1:  # before any model loads
        raise OptionError(f"--k must be at least 1, got {k}")
    from ragcap import api
    from ragcap.embed import load_embedder
    from ragcap.images import IMAGE_EXTENSIONS
    from ragcap.report import emit_json

    # An image file name that names no file is a typo, not a text to search for: searched as the
    # words 'photo.jpg' it would answer, exit 0, with captions unrelated to the photo.
    names_image = Path(query).suffix.lower() in IMAGE_EXTENSIONS and not any(c.isspace() for c in query)
    if names_image and not _is_file(query):
        raise SourceError(f"{query}: no such image file (to search for these words as text, put a space in the query)")
    is_image = names_image or _is_file(query)  # an existing file is the image it names, as caption takes it
    with store(qdrant_url, qdrant_api_key, wait) as st:
        embedder = load_embedder(model, device) if model else None
        (found,) = api.search(st, collection, [Path(query) if is_image else query], k, embedder, device=device)
    if found.exception is not None:
        raise found.exception
    rows = [{"score": round(float(h.score), 6), **h.payload} for h in found.neighbours]
    if json_out:
        emit_json({"query": query, "kind": "image" if is_image else "text", "neighbours": rows})
    else:
        for row in rows:
            typer.echo(f"{row['score']:.4f}  {row['caption']}")


def _is_file(text: str) -> bool:
    """Whether a query names an existing file; a long text (over the OS's 255-byte name limit) or
    one holding a NUL names none, rather than failing."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


@command(app)
def drop(
    name: Annotated[str, typer.Argument(help="Collection to delete.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
    wait: Wait = DEFAULT_WAIT_S,
):
    """Delete a collection, also a damaged one (it is not opened)."""
    from ragcap.store import check_name, missing_collection

    check_name(name)
    with store(qdrant_url, qdrant_api_key, wait) as st:
        listed = {c.name: c for c in st.collections()}
        info = listed.get(name)
        if info is None:  # said before asking, not after a question about a collection that is not there
            raise missing_collection(name)
        what = "?" if info.points is None else info.points
        state = f", {info.status}" if info.status != "ok" else ""
        if not yes and not _confirmed(f"delete collection '{name}' ({what} points{state})?"):
            raise RagcapError(f"not confirmed; collection '{name}' was not dropped")
        st.drop(name)
    typer.echo(f"dropped {name} ({what} points)")


@command(app)
def check(
    name: Annotated[str, typer.Argument(help="Collection to verify.")],
    repair: Annotated[bool, typer.Option(help="Delete the damaged points (rerunning the ingest then re-embeds exactly those).")] = False,
    restore_record: Annotated[bool, typer.Option(help="Rewrite a lost or unreadable record for --model, after checking that it reproduces the stored vectors.")] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="With --restore-record: the embedder that filled the collection.")] = None,
    device: Device = None,
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
    wait: Wait = DEFAULT_WAIT_S,
    json_out: Json = False,
):
    """Verify a collection: its record, counts, readable payloads, finite unit-norm vectors, ids."""
    from ragcap import api
    from ragcap.report import emit_json

    if restore_record and not model:
        raise RagcapError("--restore-record needs --model SPEC: the embedder that filled the collection")
    with store(qdrant_url, qdrant_api_key, wait) as st:
        if restore_record:
            points = api.restore_record(st, name, model, device)
            typer.echo(f"{name}: record restored for {model} ({points} points)", err=True)
        report, deleted = api.check_collection(st, name, repair)
    if json_out:
        emit_json({"collection": name, "ok": report.ok, "points": report.points, "problems": report.problems,
                   "damaged_points": len(report.damaged_ids), "lost": report.lost, "deleted": deleted,
                   "repairable": report.repairable})
    elif report.ok:
        typer.echo(f"{name}: ok ({report.points} points)")
    else:
        typer.echo(f"{name}: {len(report.problems)} problem(s)")
        for problem in report.problems:
            typer.echo(f"  {problem}")
    if deleted:
        typer.echo(f"ragcap: deleted {deleted} damaged points; rerun the ingest that filled '{name}' to re-embed them", err=True)
    if report.ok:
        return
    if report.repairable and (report.damaged_ids or report.lost):
        fixes = [f"deletes the {len(report.damaged_ids)} damaged points"] if report.damaged_ids else []
        fixes += [f"accepts the loss of {report.lost} points"] if report.lost else []
        hint = f"`ragcap check {name} --repair` {' and '.join(fixes)}; rerunning the ingest then re-embeds exactly the missing ones"
    elif report.record_lost:  # the points may be intact: only the record names their embedder
        hint = (f"`ragcap check {name} --restore-record --model SPEC` rebuilds the record once SPEC reproduces the "
                f"stored vectors; without the model, restore a `ragcap export` backup or drop it and re-ingest")
    else:
        hint = (f"this cannot be repaired in place: restore a `ragcap export` backup (`ragcap drop {name}`, then "
                f"`ragcap ingest parquet FILE --vector-field vector -c {name}`), or drop it and re-ingest")
    typer.echo(f"ragcap: {hint}", err=True)
    raise typer.Exit(1)


def _confirmed(question: str) -> bool:
    try:
        return typer.confirm(question)
    except typer.Abort:  # no answer: stdin closed or not a terminal
        raise RagcapError("not confirmed (nothing answered on stdin); pass --yes to drop without asking") from None


@command(app)
def export(
    name: Annotated[str, typer.Argument(help="Collection to export.")],
    out: Annotated[Path, typer.Argument(help="Parquet file to write.")],
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
    wait: Wait = DEFAULT_WAIT_S,
    json_out: Json = False,
):
    """Write captions, payloads and vectors to Parquet (load elsewhere with `ingest parquet --vector-field vector`)."""
    from ragcap.export import export_collection
    from ragcap.report import emit_json, is_stdout, progress

    with store(qdrant_url, qdrant_api_key, wait) as st, progress(st.count(name), f"export {name}", "points") as bar:
        rows = export_collection(st, name, out, bar.update)
        spec = st.embedder(name).spec
    if is_stdout(out):  # the Parquet went to stdout: a summary after it would corrupt it
        typer.echo(f"wrote {rows} points of {name} to stdout", err=True)
    elif json_out:
        emit_json({"collection": name, "file": str(out), "points": rows, "embedder": spec})
    else:
        typer.echo(f"wrote {rows} points of {name} to {out}")
