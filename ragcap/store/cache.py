"""A copy of a collection's vectors kept beside it, for exact search over the whole memory.

DeCap's projection is a softmax over every stored caption (ragcap.retrieve). Asking Qdrant for
each query's top 1,024 neighbours with their vectors made that search most of `pd`'s time;
multiplying a batch of queries by every stored vector is exact, and for a memory that fits in
RAM (200,000 x 512 float16 is 200 MB) faster. So ragcap keeps the vectors as one matrix.

Files, in the store's `cache_dir(name)` (the embedded store: inside the collection's directory):
    vectors-<build>.npy   (points, dim) as the collection stores them (float16 by default)
    ids-<build>.npy       (points,) the point ids, row for row
    cache.json            {"format", "writes", "points", "build", ...}: written last
A copy is used only while the collection's version (`Store.version`: a token every write renews,
and the point count) is the one it was made from; otherwise it is made again from a scroll of
the collection, so it is never stale. Processes that make one at the same time each write files
of their own build, and the last cache.json wins.
"""

from __future__ import annotations

import json
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ragcap.errors import RagcapError, RagcapWarning, StoreError
from ragcap.store import CollectionVersion, Store
from ragcap.util import atomic_path, write_atomic

FORMAT = 1
META = "cache.json"
# A collection that changes while it is read is read again; one that changes every time (an
# ingest writing batch after batch) is searched through Qdrant until it settles.
READ_ATTEMPTS = 3


@dataclass
class VectorCache:
    version: CollectionVersion  # of the collection it was made from
    ids: np.ndarray  # (points,) str
    vectors: np.ndarray  # (points, dim), memory-mapped when kept on disk

    @property
    def nbytes(self) -> int:
        return self.vectors.nbytes


def cache_bytes(store: Store, name: str, version: CollectionVersion) -> int:
    """What the copy of a collection takes in memory."""
    itemsize = 2 if store.vector_dtype(name) == "float16" else 4
    return version.points * store.embedder(name).dim * itemsize


def load_vectors(store: Store, name: str, on_read: Callable[[int], None] | None = None) -> VectorCache:
    """The collection's vectors: the kept copy if it is current, else a new one read from the
    store (and kept, where the store has a place for it). on_read(n) is told of each batch read."""
    directory = store.cache_dir(name)
    if directory is not None:
        found = _open(directory, store.version(name))
        if found is not None:
            return found
    cache = _read(store, name, on_read)
    if directory is not None and cache.version.writes:
        try:
            return _keep(directory, cache)
        except (OSError, RagcapError) as e:  # a full or read-only disk costs a re-read next time, not this run
            warnings.warn(f"could not keep the vectors of collection '{name}' in {directory} ({e}); using them from memory", RagcapWarning, stacklevel=2)
    return cache


def _read(store: Store, name: str, on_read: Callable[[int], None] | None) -> VectorCache:
    dtype = np.float16 if store.vector_dtype(name) == "float16" else np.float32
    dim = store.embedder(name).dim
    for _ in range(READ_ATTEMPTS):
        before = store.version(name)
        ids: list[str] = []
        vectors = np.empty((before.points, dim), dtype)
        for batch_ids, batch, _ in store.scroll(name, with_vectors=True, with_payload=False):
            if len(ids) + len(batch_ids) > len(vectors):
                break  # more points than the version said: it changed
            vectors[len(ids) : len(ids) + len(batch)] = batch
            ids.extend(batch_ids)
            if on_read is not None:
                on_read(len(batch_ids))
        after = store.version(name)
        # Equal versions around the scroll (the embedded store holds the collection through it)
        # and every point read: the copy is exactly the collection's.
        if before == after and len(ids) == after.points:
            return VectorCache(after, np.array(ids, dtype=str), vectors)
    raise StoreError(
        f"collection '{name}' changed every time its vectors were read ({READ_ATTEMPTS} times); "
        f"wait for the writes to end, or search it through Qdrant (--memory qdrant)"
    )


def _open(directory: Path, version: CollectionVersion) -> VectorCache | None:
    """The kept copy, if it was made from `version` and its files are whole."""
    try:
        meta = json.loads((directory / META).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or CollectionVersion(meta["writes"], meta["points"]) != version:
            return None
        # Copy-on-write maps: torch wants writable arrays, and nothing is ever written back.
        vectors = np.load(directory / f"vectors-{meta['build']}.npy", mmap_mode="c")
        ids = np.load(directory / f"ids-{meta['build']}.npy", mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, or left by a process killed while it wrote: made again
    if vectors.ndim != 2 or len(vectors) != version.points or ids.shape != (version.points,):
        return None
    return VectorCache(version, ids, vectors)


def _keep(directory: Path, cache: VectorCache) -> VectorCache:
    """Write the copy beside the collection (each file whole or not at all, cache.json last)."""
    directory.mkdir(parents=True, exist_ok=True)
    build = uuid.uuid4().hex[:12]
    for kind, array in (("vectors", cache.vectors), ("ids", cache.ids)):
        with atomic_path(directory / f"{kind}-{build}.npy", need_bytes=array.nbytes + (1 << 20)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, array)
    meta = {"format": FORMAT, "writes": cache.version.writes, "points": cache.version.points, "build": build,
            "dim": int(cache.vectors.shape[1]), "dtype": str(cache.vectors.dtype)}
    write_atomic(directory / META, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8"))
    for old in [*directory.glob("vectors-*.npy"), *directory.glob("ids-*.npy")]:
        if not old.name.endswith(f"-{build}.npy"):
            old.unlink(missing_ok=True)  # open maps of it stay valid until they are closed
    kept = _open(directory, cache.version)
    if kept is None:
        raise StoreError(f"the vectors just written to {directory} do not read back")
    return kept
