"""Ingest and caption on a Ray cluster (`--engine ray`): one Ray Data pipeline instead of
`--shard I/N` workers started by hand on each machine.

    read     the pipelines/ readers, one task per input file
    prepare  ragcap.ingest's mapper (normalise, filters, point ids) and a look-up that drops
             the ids already stored, so a rerun after a kill embeds only what is missing
    embed    a pool of actors, each loading the model once, on a GPU when the cluster has one
    write    batched, retried upserts to a Qdrant server from the write tasks; with the
             embedded store the driver is the only writer; or Parquet files (`--parquet-out`)

Ray is imported only with `--engine ray` (`pip install 'ragcap[ray]'`): nothing in this
package's __init__ needs it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RayOptions:
    # None: start a Ray cluster on this machine for the run, listening on 127.0.0.1 only.
    # "auto": the cluster `ray start` made here; "HOST:PORT" or "ray://HOST:10001": a remote one.
    address: str | None = None
    actors: int | None = None  # embedding actors; None: one per GPU, else one per CPU left over
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    # None: 1. Fractions are fine: Ray's CPUs are for scheduling, and a CPU actor runs
    # max(1, round(cpus)) torch threads.
    cpus_per_actor: float | None = None
