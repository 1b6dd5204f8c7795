"""Where a distributed ingest's points go, and how its tasks learn which ones are there already.

Every function here runs in Ray's worker processes as well as in-process (tests, the driver):
each takes what it writes to, not a Ray handle.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import StoreError
from ragcap.store import Store

# Waits between attempts of an upsert that failed for a reason that passes: a node restarting,
# a shard moving, an overloaded server (429/5xx), a dropped connection. About 30 s in all, as
# long as a Qdrant node takes to come back; a refusal (4xx) is not retried.
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class ServerTarget:
    """A Qdrant server as the write tasks reach it: each worker process connects once."""

    url: str
    api_key: str | None

    def open(self) -> Store:
        key = (self.url, self.api_key)
        if key not in _CONNECTIONS:
            from ragcap.store.client import ClientStore

            _CONNECTIONS[key] = ClientStore.connect(self.url, self.api_key)
        return _CONNECTIONS[key]


_CONNECTIONS: dict[tuple[str, str | None], Store] = {}  # per worker process, reused across its tasks


def worker_store(store: Store) -> Callable[[], Store]:
    """How Ray's worker processes open `store` themselves: a server by its URL, the embedded
    store by its folder (only on this machine); never qdrant-client's in-memory store."""
    from functools import partial

    from ragcap.store import open_store
    from ragcap.store.client import ClientStore

    if not isinstance(store, ClientStore):
        return partial(open_store, path=store.root, wait=store.wait)
    if store.where == ":memory:":
        raise StoreError(
            "--engine ray works in other processes, which cannot reach qdrant-client's in-memory store: "
            "pass --qdrant-url, or use the embedded store"
        )
    return ServerTarget(store.where, store.api_key).open


def is_transient(error: BaseException) -> bool:
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if isinstance(error, UnexpectedResponse):
        return error.status_code in TRANSIENT_STATUS
    return isinstance(error, (ResponseHandlingException, ConnectionError, TimeoutError))


def upsert_retrying(
    store: Store, collection: str, ids: list[str], vectors: np.ndarray, payloads: list[dict],
    delays: tuple[float, ...] = RETRY_DELAYS_S, sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Upsert, retrying transient failures; returns the retries it took. Ids are deterministic,
    so an attempt that half-succeeded, or a task Ray runs again, writes the same points again."""
    for attempt in itertools.count():
        try:
            store.upsert(collection, ids, vectors, payloads)
            return attempt
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == len(delays):
                raise StoreError(
                    f"writing {len(ids)} points to collection '{collection}' failed {attempt + 1} times, last: {e}; "
                    "the batches written so far are kept: rerun the same command to resume"
                ) from None
            sleep(delays[attempt])


def write_batch(batch: dict, open_store: Callable[[], Store], collection: str) -> dict:
    """A write task: store one batch of embedded captions; one row of counts comes back."""
    ids = batch["id"].tolist()
    payloads = [json.loads(p) for p in batch["payload"]]
    retries = upsert_retrying(open_store(), collection, ids, np.asarray(batch["vector"], np.float32), payloads)
    return {"stored": np.array([len(ids)]), "retries": np.array([retries]), **counts(batch)}


def write_parquet_part(batch: dict, out_dir: str, info: EmbedderInfo) -> dict:
    """A write task for --parquet-out: one file of `ragcap export`'s format per batch, written
    whole or not at all, named by its ids (a batch written again replaces its own file)."""
    import pyarrow.parquet as pq

    from ragcap.export import export_table
    from ragcap.util import write_atomic

    ids = batch["id"].tolist()
    table = export_table(ids, [json.loads(p) for p in batch["payload"]], np.asarray(batch["vector"], np.float32), info)
    name = hashlib.blake2b("\n".join(ids).encode(), digest_size=12).hexdigest()
    write_atomic(Path(out_dir) / f"part-{name}.parquet", lambda tmp: pq.write_table(table, tmp))
    return {"stored": np.array([len(ids)]), "retries": np.array([0]), **counts(batch)}


def counts(batch: dict) -> dict:
    """The embedder's per-caption counts of a batch, summed (one row); zeros for given vectors."""
    from ragcap.embedder_info import CLIP_CONTEXT, LONG_CONTEXT

    tokens = batch.get("tokens")
    if tokens is None:
        return {"truncated": np.array([0]), "over_77_tokens": np.array([0]), "over_248_tokens": np.array([0])}
    return {
        "truncated": np.array([int(np.count_nonzero(batch["truncated"]))]),
        "over_77_tokens": np.array([int(np.count_nonzero(tokens > CLIP_CONTEXT))]),
        "over_248_tokens": np.array([int(np.count_nonzero(tokens > LONG_CONTEXT))]),
    }


# ---------------------------------------------------------------------------------------------
# which ids are stored already


class StoredIds:
    """A sorted array of 16-byte ids: what the driver read from an embedded collection (which
    only it may open) or from earlier Parquet parts. 16 bytes an id: 10M points take 160 MB."""

    def __init__(self, digests: np.ndarray):
        self.digests = np.sort(digests)

    @classmethod
    def from_ids(cls, batches) -> "StoredIds":
        parts = [np.array([_digest(i) for i in batch], dtype="S16") for batch in batches if batch]
        return cls(np.concatenate(parts) if parts else np.empty(0, dtype="S16"))

    @classmethod
    def from_parquet(cls, out_dir: Path) -> "StoredIds":
        import pyarrow.parquet as pq

        return cls.from_ids(pq.read_table(f, columns=["id"]).column("id").to_pylist() for f in sorted(out_dir.glob("part-*.parquet")))

    def __len__(self) -> int:
        return len(self.digests)

    def existing(self, ids: list[str]) -> set[str]:
        if not len(self.digests) or not ids:
            return set()
        wanted = np.array([_digest(i) for i in ids], dtype="S16")
        at = np.minimum(np.searchsorted(self.digests, wanted), len(self.digests) - 1)
        return {i for i, hit in zip(ids, self.digests[at] == wanted) if hit}


@dataclass(frozen=True)
class ServerIds:
    """Asks the server, batch by batch, from the read tasks: a server collection can hold far
    more ids than a snapshot should."""

    target: ServerTarget
    collection: str

    def existing(self, ids: list[str]) -> set[str]:
        return self.target.open().existing(self.collection, ids)


def _digest(point_id: str) -> bytes:
    return bytes.fromhex(point_id.replace("-", ""))
