"""The driver of `ingest --engine ray`: it alone checks or creates the collection, builds the
pipeline (see ragcap.distributed), and adds up what the tasks report.

Where the points go decides who writes them:
  - a Qdrant server: the write tasks, in parallel, each batch upserted with retries;
  - the embedded store: this process, its only writer (many GPUs in one box: the vectors
    come to the driver, the store takes ~17k points/s); refused on a multi-node cluster;
  - --parquet-out DIR: the write tasks, one `ragcap export`-format file per batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from ragcap.distributed import RayOptions
from ragcap.distributed.cluster import READ_CPUS, WRITE_CPUS, connect, plan_actors, ragcap_error
from ragcap.distributed.source import ReadJob, file_groups, prepared_captions
from ragcap.distributed.write import ServerIds, ServerTarget, StoredIds, counts, worker_store, write_batch, write_parquet_part
from ragcap.errors import SourceError, StoreError
from ragcap.ingest import IngestSummary, _create, _nothing_to_store
from ragcap.store import Store

MAX_BAD_REPORTED = 20


def ingest_on_ray(
    job: ReadJob,
    paths: list[str],
    store: Store,
    ray_options: RayOptions,
    parquet_out: Path | None = None,
    device: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> IngestSummary:
    """Fill job.collection of `store` (or write Parquet parts to `parquet_out`) from `paths`."""
    sink = _sink(store, parquet_out)
    # Ray is imported inside connect, after it has kept a local cluster on 127.0.0.1.
    with connect(ray_options.address) as cluster:
        if sink == "embedded" and cluster.nodes > 1:
            raise StoreError(
                f"the embedded store lives on this machine and only this process may write it, but the Ray cluster "
                f"has {cluster.nodes} nodes, whose every vector would cross the network to this one writer: write to a "
                "Qdrant server every node reaches (--qdrant-url URL; docker/compose.cluster.yaml runs a 3-node one), or "
                "write Parquet (--parquet-out DIR) and load it with `ragcap ingest parquet DIR/*.parquet --text-field "
                "caption --vector-field vector`"
            )
        plan = None if job.given_vectors else plan_actors(ray_options, cluster, write_tasks=sink != "embedded")
        return _run(job, paths, store, sink, parquet_out, plan, device, on_progress)


def _sink(store: Store, parquet_out: Path | None) -> str:
    from ragcap.store.client import ClientStore

    if parquet_out is not None:
        return "parquet"
    worker_store(store)  # refuses qdrant-client's in-memory store, which no worker reaches
    return "server" if isinstance(store, ClientStore) else "embedded"


def _run(job: ReadJob, paths, store: Store, sink: str, parquet_out, plan, device, on_progress) -> IngestSummary:
    import ray

    from ragcap.distributed.embed import Tally

    _quiet_ray_data()
    collection, options = job.collection, job.options
    exists = sink != "parquet" and store.exists(collection)
    if exists:
        store.check_embedder(collection, job.info)
    target = ServerTarget(store.where, store.api_key) if sink == "server" else None
    stored = _stored_lookup(store, sink, exists, target, job, parquet_out)
    created = sink == "server" and not exists
    if created:  # before any write task needs it
        _create(store, collection, job.info, options.vector_dtype, options.layout)
    tally = ray.remote(num_cpus=0)(Tally).remote()
    batches = _pipeline(job, paths, stored, tally, plan, device, sink, target, parquet_out)
    summary = IngestSummary()
    tick = on_progress or (lambda n: None)
    reported = 0
    try:
        with warnings.catch_warnings():
            # e.g. "the operator only received 0 inputs" when a rerun finds everything stored
            warnings.filterwarnings("ignore", module=r"ray\.data")
            for batch in batches:
                if sink == "embedded":
                    batch = _write_here(store, job, batch)
                _add(summary, batch)
                consumed = ray.get(tally.progress.remote())
                tick(consumed - reported)
                reported = consumed
    except Exception as e:
        raise ragcap_error(e) or e
    finally:
        if created and not summary.stored:
            _drop_if_empty(store, collection)
    tick(ray.get(tally.progress.remote()) - reported)
    _merge(summary, ray.get(tally.summaries.remote()))
    if sink == "parquet" and not (summary.stored or summary.already_stored):
        raise SourceError(_nothing_to_store(summary).replace("no collection was created", "no file was written"))
    if sink != "parquet" and not store.exists(collection):
        raise SourceError(_nothing_to_store(summary))
    if summary.stored and sink == "embedded":
        store.optimize(collection)  # build the search index once, as the single-process ingest does
    return summary


def _stored_lookup(store: Store, sink: str, exists: bool, target, job: ReadJob, parquet_out):
    """How the read tasks learn which ids are stored: a server answers them itself; the
    embedded store (only this process may read it) and Parquet parts are read here once, into
    Ray's object store, where every task on a node shares one copy."""
    import ray

    if sink == "server":
        return ServerIds(target, job.collection) if exists else StoredIds.from_ids([])
    if sink == "parquet":
        return ray.put(_parquet_ids(Path(parquet_out), job))
    return ray.put(StoredIds.from_ids(store.ids(job.collection)) if exists else StoredIds.from_ids([]))


def _pipeline(job: ReadJob, paths, stored, tally, plan, device, sink: str, target, parquet_out):
    """read -> prepare -> embed (unless the records carry vectors) -> write (unless this process
    writes); the batches that come out."""
    import ray

    from ragcap.distributed.embed import CaptionEmbedder

    options = job.options
    ds = ray.data.read_datasource(prepared_captions(job, file_groups(paths, options), stored, tally), num_cpus=READ_CPUS)
    if plan is not None:
        ds = ds.map_batches(
            CaptionEmbedder,
            fn_constructor_kwargs={"spec": job.info.spec, "device": device, "threads": plan.threads, "precision": options.precision},
            batch_size=options.batch_size, compute=ray.data.ActorPoolStrategy(size=plan.actors), num_cpus=plan.cpus,
            num_gpus=plan.gpus or None, batch_format="numpy",
        )
    if sink == "server":
        ds = ds.map_batches(write_batch, fn_kwargs={"open_store": target.open, "collection": job.collection},
                            batch_size=None, num_cpus=WRITE_CPUS, batch_format="numpy")
    elif sink == "parquet":
        ds = ds.map_batches(write_parquet_part, fn_kwargs={"out_dir": str(parquet_out), "info": job.info},
                            batch_size=None, num_cpus=WRITE_CPUS, batch_format="numpy")
    return ds.iter_batches(batch_size=None, batch_format="numpy")


def _write_here(store: Store, job: ReadJob, batch: dict) -> dict:
    """The embedded store's writer is this process: create the collection with the first batch
    (a corpus that yields nothing leaves none behind), store the batch, return its counts."""
    if not store.exists(job.collection):
        _create(store, job.collection, job.info, job.options.vector_dtype, job.options.layout)
    payloads = [json.loads(p) for p in batch["payload"]]
    store.upsert(job.collection, batch["id"].tolist(), np.asarray(batch["vector"], np.float32), payloads)
    return {"stored": np.array([len(payloads)]), **counts(batch)}


def _drop_if_empty(store: Store, collection: str) -> None:
    """Drop the collection this run created for its write tasks, if none of them wrote to it.
    Best effort: after a failure the server may be gone, and an empty collection is harmless
    (the rerun fills it)."""
    try:
        if store.count(collection) == 0:
            store.drop(collection)
    except Exception:
        pass


def _parquet_ids(out_dir: Path, job: ReadJob) -> StoredIds:
    """What earlier runs wrote into --parquet-out (a rerun adds only the rest), once its
    embedder is shown to be this run's."""
    from ragcap.export import parquet_embedder

    out_dir.mkdir(parents=True, exist_ok=True)
    parts = sorted(out_dir.glob("part-*.parquet"))
    if parts and parquet_embedder(parts[0]) != job.info:
        raise StoreError(
            f"{out_dir} holds Parquet parts made with {parquet_embedder(parts[0]).spec}, not {job.info.spec}: "
            "pass another --parquet-out, or --model of those parts"
        )
    return StoredIds.from_parquet(out_dir)


def _add(summary: IngestSummary, row: dict) -> None:
    """Add one write's counts (numpy columns of one row) to the summary."""
    for name in ("stored", "truncated", "over_77_tokens", "over_248_tokens"):
        setattr(summary, name, getattr(summary, name) + int(np.sum(row[name])))


def _merge(summary: IngestSummary, parts: list[IngestSummary]) -> None:
    """The read tasks' counts: a sum, since each task read its own files."""
    for field in dataclasses.fields(IngestSummary):
        if field.name in ("stored", "truncated", "over_77_tokens", "over_248_tokens"):
            continue
        if field.name == "bad":
            summary.bad = [line for part in parts for line in part.bad][:MAX_BAD_REPORTED]
        else:
            setattr(summary, field.name, sum(getattr(part, field.name) for part in parts))


def _quiet_ray_data() -> None:
    """ragcap's own progress bar and summary line instead of Ray Data's bars and plan logs."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # A task's error also reaches the driver as an exception, which ragcap reports in one line;
    # Ray Data would log it first with its whole traceback (RAGCAP_DEBUG=1 prints that).
    debug = os.environ.get("RAGCAP_DEBUG", "") not in ("", "0")
    logging.getLogger("ray.data").setLevel(logging.ERROR if debug else logging.CRITICAL)
