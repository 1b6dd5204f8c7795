"""The caption memory: collections of (caption vector, payload) points in Qdrant.

One interface, two backends:
  - edge (default): Qdrant's own engine embedded in-process (qdrant-edge-py), one shard
    directory per collection under $RAGCAP_HOME. qdrant-client's local mode is a pure-Python
    reimplementation that upserted ~350 points/s and answered ~3 queries/s at 100k points,
    too slow to be the default (see benchmarks/store.py).
  - client: qdrant-client against a Qdrant server (url), or its ":memory:" mode for tests.

Every collection records the EmbedderInfo of the model that filled it, so vectors from
another model are refused instead of silently returning nonsense neighbours.

Vectors are stored as float16 unless a collection is created with vector_dtype="float32", as
clip-retrieval keeps CLIP embeddings: half the disk and page cache, and the rounding (relative
2^-11 per component) moves a cosine by ~1e-5, which with DeCap's tau = 0.01 shifts projection
weights by ~0.1%. ":memory:" ignores Qdrant's datatype, so ClientStore rounds for it.

A store never returns what it cannot vouch for: similarities outside [-1, 1] or missing
neighbours mean damaged files and raise DamagedCollection, and `check` verifies a whole
collection (readable payloads, finite unit vectors, ids that match their captions).
"""

from __future__ import annotations

import os
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import DamagedCollection, EmbedderMismatch, StoreError

__all__ = [
    "CheckReport",
    "CollectionInfo",
    "CollectionLayout",
    "CollectionVersion",
    "EmbedderInfo",
    "Hit",
    "Store",
    "default_home",
    "open_store",
    "point_id",
]

# Fixed namespace so ids are the same on every machine and in every release.
_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/ragcap/ragcap/point")
VECTOR_DTYPES = ("float16", "float32")
VECTORS_PER_CALL = 2048  # returned vectors per search call (see Store.search)
# Collection names become directory names in the embedded store: keep them path-safe (and
# never hidden: the store's own lock and staging files start with a dot).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
NAME_RULE = "1 to 128 characters: letters, digits, '_', '-' or '.', starting with a letter or digit"
# How long a command waits for a collection another process is using (the CLI's --wait).
DEFAULT_WAIT_S = 60.0
# Stored vectors are unit vectors, so similarities lie in [-1, 1]; float16 storage moves them
# by ~1e-3 at most. Anything further out comes from damaged vectors.
SCORE_TOLERANCE = 0.01
NORM_TOLERANCE = 0.01


@dataclass
class Hit:
    id: str
    score: float  # cosine similarity, higher is better
    payload: dict
    vector: np.ndarray | None = None  # float32 (dim,) when asked for


QUANTIZATIONS = ("int8", "binary", "turbo4", "none")
# Candidates rescored with the stored vectors per neighbour asked for, by quantization, for both
# stores (they run the same engine). turbo4: 4.0 gave recall@10 0.999 on random 512-d vectors,
# 8.0 gave 1.0 at the same latency (benchmarks/store.py). On 200k random 512-d vectors
# (benchmarks/quantization.py, docs/scale.md): int8 reached float16's own recall@10 (0.9994) at
# 2.0 (0.94 at 1.0); binary only 0.18 at 8.0 and 0.25 at 16.0: it suits wider embeddings.
RESCORE_OVERSAMPLING = {"turbo4": 8.0, "int8": 2.0, "binary": 8.0}


@dataclass(frozen=True)
class CollectionLayout:
    """Where a new collection's points live: spread over a server cluster, in RAM or on disk.

    None means the store's own default. The cluster fields are a Qdrant server's; the embedded
    store keeps each collection in one shard on one machine and refuses them.
    """

    shards: int | None = None  # pieces spread over the cluster's nodes (Qdrant's default: 1)
    replicas: int | None = None  # copies of each shard; 2 keeps serving while one node is down
    write_consistency: int | None = None  # replicas that must confirm a write before it returns
    # Original vectors memory-mapped from disk instead of held in RAM; the quantized codes
    # stay in RAM and only the k x oversampling candidates of each query are read back.
    on_disk: bool = False
    # Compressed codes scanned first, then the best candidates rescored with the stored vectors.
    # None: the embedded store's turbo4 (see EdgeIndexConfig), none on a server.
    quantization: str | None = None

    def check(self) -> None:
        from ragcap.errors import OptionError

        for flag, value in (("--shards", self.shards), ("--replicas", self.replicas), ("--write-consistency", self.write_consistency)):
            if value is not None and value < 1:
                raise OptionError(f"{flag} {value}: must be at least 1")
        if self.write_consistency is not None and self.write_consistency > (self.replicas or 1):
            raise OptionError(
                f"--write-consistency {self.write_consistency} exceeds the {self.replicas or 1} replica(s) of each shard; "
                "pass --replicas at least as large"
            )
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise OptionError(f"unknown --quantization {self.quantization!r}; choose from {', '.join(QUANTIZATIONS)}")

    @property
    def clustered(self) -> bool:
        return any(v is not None for v in (self.shards, self.replicas, self.write_consistency))


@dataclass(frozen=True)
class CollectionVersion:
    """What a collection holds, as far as a copy of its vectors is concerned (ragcap.store.cache):
    `writes` changes with every write to its points, so equal versions mean equal points."""

    writes: str
    points: int


def new_writes_token() -> str:
    return uuid.uuid4().hex


@dataclass
class CollectionInfo:
    name: str
    points: int | None  # None: unknown (a damaged collection)
    embedder: EmbedderInfo | None  # None: a collection on a shared server that ragcap did not create
    vector_dtype: str  # "float16" or "float32", how its vectors are stored
    status: str = "ok"  # "ok", "busy" (another process is using it) or "damaged"
    problem: str = ""  # what is wrong or who is using it
    layout: CollectionLayout | None = None  # as created (None: unreadable)


@dataclass
class CheckReport:
    """What `Store.check` found: problems (one line each) and the ids of points that are damaged."""

    name: str
    points: int | None = None
    problems: list[str] = field(default_factory=list)
    damaged_ids: list[str] = field(default_factory=list)
    lost: int = 0  # points stored once that are gone (embedded store: counted in its record)
    repairable: bool = True  # whether deleting damaged_ids (then re-ingesting) fixes it
    record_lost: bool = False  # the record is missing or unreadable: --restore-record rebuilds it

    @property
    def ok(self) -> bool:
        return not self.problems


def point_id(collection: str, normalised_caption: str) -> str:
    """Deterministic id, so re-running an ingest overwrites instead of duplicating, and a
    resumed ingest can ask which captions are already stored before embedding them."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{collection}\x00{normalised_caption}"))


def default_home() -> Path:
    """$RAGCAP_HOME, else the per-user data directory (e.g. ~/.local/share/ragcap)."""
    env = os.environ.get("RAGCAP_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("ragcap"))


def missing_collection(name: str) -> StoreError:
    return StoreError(f"no collection '{name}'; `ragcap collections` lists them")


def check_vector_dtype(vector_dtype: str) -> None:
    if vector_dtype not in VECTOR_DTYPES:
        raise StoreError(f"unknown vector dtype {vector_dtype!r}; choose from {', '.join(VECTOR_DTYPES)}")


def check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise StoreError(f"bad collection name {name!r}: use {NAME_RULE}")


def _check_payload(name: str, pid: str, payload: dict) -> None:
    """Every stored point has its caption: a payload without one (damaged payload files read back
    as {}) would otherwise fail later as a KeyError far from its cause."""
    if not isinstance(payload, dict) or not isinstance(payload.get("caption"), str):
        raise DamagedCollection(
            f"collection '{name}' returned point {pid} without its caption: its payloads are damaged; run `ragcap check {name}`"
        )


class Store(ABC):
    """A set of named collections of L2-normalised vectors with payloads (at least "caption")."""

    @abstractmethod
    def collections(self) -> list[CollectionInfo]: ...

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def create(
        self, name: str, embedder: EmbedderInfo, vector_dtype: str = "float16", layout: CollectionLayout | None = None
    ) -> None:
        """Create an empty collection recording `embedder`; StoreError if it exists."""

    def check_layout(self, layout: CollectionLayout) -> None:
        """OptionError unless this store can create a collection with `layout` (asked before any work)."""
        layout.check()

    @abstractmethod
    def layout(self, name: str) -> CollectionLayout:
        """How `name` was created (shards, replicas, on-disk vectors, quantization)."""

    def ids(self, name: str) -> Iterator[list[str]]:
        """Every stored id, in batches: what a distributed ingest need not embed again."""
        return self._scroll_ids(name)

    @abstractmethod
    def embedder(self, name: str) -> EmbedderInfo:
        """The embedder that filled `name`; StoreError if there is no such collection."""

    @abstractmethod
    def upsert(self, name: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        """Insert or overwrite points (batched internally)."""

    @abstractmethod
    def existing(self, name: str, ids: list[str]) -> set[str]:
        """Which of `ids` are stored: lets an interrupted ingest skip what it already embedded."""

    def search(self, name: str, queries: np.ndarray, k: int, with_vectors: bool = False) -> list[list[Hit]]:
        """Top-k neighbours of each row of `queries` (b, dim), best first, in batched calls."""
        queries = self._check_vectors(name, queries, "queries")
        # One call per batch, except that returned vectors arrive as Python lists (~32 bytes a
        # component until converted): 32 queries x k=1024 x 512-d would be ~500 MB at once.
        step = max(1, VECTORS_PER_CALL // k) if with_vectors else max(1, len(queries))
        results = [
            hits
            for start in range(0, len(queries), step)
            for hits in self._search(name, queries[start : start + step], k, with_vectors)
        ]
        for hits in results:
            for hit in hits:
                if not abs(hit.score) <= 1 + SCORE_TOLERANCE or (hit.vector is not None and not np.isfinite(hit.vector).all()):
                    raise DamagedCollection(
                        f"collection '{name}' returned a similarity of {hit.score:.4g} for point {hit.id}, "
                        f"outside [-1, 1]: its stored vectors are damaged; run `ragcap check {name}`"
                    )
                _check_payload(name, hit.id, hit.payload)
        return results

    @abstractmethod
    def _search(
        self, name: str, queries: np.ndarray, k: int, with_vectors: bool, with_payload: bool = True
    ) -> list[list[Hit]]:
        """search() for validated float32 queries, in one batched call."""

    @abstractmethod
    def scroll(
        self, name: str, batch_size: int = 4096, with_vectors: bool = True, with_payload: bool = True
    ) -> Iterator[tuple[list[str], np.ndarray, list[dict]]]:
        """Every point once, in batches of (ids, float32 vectors (b, dim) or (b, 0), payloads or {})."""

    @abstractmethod
    def _scroll_ids(self, name: str) -> Iterator[list[str]]:
        """Every id once, in batches, reading nothing else (so damaged payloads cannot stop it)."""

    @abstractmethod
    def _retrieve(self, name: str, ids: list[str], with_vectors: bool = True) -> list[tuple[str, np.ndarray | None, dict]]:
        """(id, float32 vector or None, payload) of each of `ids` that is stored."""

    def payloads(self, name: str, ids: list[str]) -> list[dict]:
        """The payloads of stored points, in the order of `ids` (neighbours found in a vector cache)."""
        found = {pid: payload for pid, _, payload in self._retrieve(name, list(dict.fromkeys(ids)), with_vectors=False)}
        missing = [pid for pid in ids if pid not in found]
        if missing:
            raise DamagedCollection(
                f"collection '{name}' has no point {missing[0]} although its version lists it: its files are "
                f"damaged; run `ragcap check {name}`"
            )
        for pid in ids:
            _check_payload(name, pid, found[pid])
        return [found[pid] for pid in ids]

    @abstractmethod
    def version(self, name: str) -> CollectionVersion:
        """The collection's current version, read without opening it where the store can."""

    def vector_dtype(self, name: str) -> str:
        """How the collection's vectors come back: "float16" when each is exactly a float16 value."""
        return "float32"

    def cache_dir(self, name: str) -> Path | None:
        """Where a copy of the collection's vectors may be kept (None: in memory only)."""
        return None

    @abstractmethod
    def delete(self, name: str, ids: list[str]) -> None:
        """Remove points (`ragcap check --repair` removes damaged ones, which a re-ingest restores)."""

    @abstractmethod
    def count(self, name: str) -> int: ...

    def recount(self, name: str) -> None:
        """Accept a loss `check` reported (the embedded store records its size; servers count)."""

    @abstractmethod
    def drop(self, name: str, missing_ok: bool = False) -> None:
        """Delete a collection, also one left half-created by an interrupted `create`."""

    @abstractmethod
    def close(self) -> None: ...

    def optimize(self, name: str) -> None:
        """Build the search index now (call at the end of an ingest). Servers do this themselves."""

    def check(self, name: str, batch_size: int = 1024) -> CheckReport:
        """Read every point back: payloads readable with a caption, vectors finite and unit-norm,
        ids those of their captions, and each point found by searching for its own vector."""
        report = CheckReport(name)
        dim = self.embedder(name).dim
        ids = [i for batch in self._scroll_ids(name) for i in batch]
        report.points = len(ids)
        counted = self.count(name)
        if counted != len(ids):
            report.problems.append(f"the collection counts {counted} points but lists {len(ids)}")
            report.repairable = False
        good: list[tuple[str, np.ndarray]] = []
        for start in range(0, len(ids), batch_size):
            for pid, vector, problem in self._check_points(name, ids[start : start + batch_size], dim):
                if problem:
                    report.damaged_ids.append(pid)
                    if len(report.problems) < 20:
                        report.problems.append(f"point {pid}: {problem}")
                elif len(good) < 16:
                    good.append((pid, vector))
        if len(report.damaged_ids) > 20:
            report.problems.append(f"... {len(report.damaged_ids)} damaged points in all")
        if good:
            k = min(10, len(ids))
            try:
                found = self._search(name, np.stack([v for _, v in good]), k, False, with_payload=False)
            except StoreError as e:
                found = []
                report.problems.append(str(e))
                report.repairable = False
            for (pid, _), hits in zip(good, found):
                if len(hits) < k or hits[0].score < 1 - SCORE_TOLERANCE:
                    report.problems.append(f"searching for point {pid}'s own vector returns {len(hits)} of {k} neighbours, best {hits[0].score if hits else None}: the index or the deleted-points flags are damaged")
                    report.repairable = False
                    break
        return report

    def _check_points(self, name: str, ids: list[str], dim: int) -> Iterator[tuple[str, np.ndarray | None, str]]:
        """(id, vector, problem or "") per id; a batch the engine cannot read is split to find the culprits."""
        try:
            records = {pid: (vector, payload) for pid, vector, payload in self._retrieve(name, ids)}
        except StoreError as e:
            if len(ids) == 1:
                yield ids[0], None, f"unreadable ({e})"
                return
            half = len(ids) // 2
            yield from self._check_points(name, ids[:half], dim)
            yield from self._check_points(name, ids[half:], dim)
            return
        for pid in ids:
            if pid not in records:
                yield pid, None, "listed but cannot be read"
                continue
            vector, payload = records[pid]
            caption = payload.get("caption")
            if not isinstance(caption, str):
                problem = "its payload has no caption"
            elif vector.shape != (dim,) or not np.isfinite(vector).all():
                problem = f"its vector is not {dim} finite numbers"
            elif abs(float(np.linalg.norm(vector)) - 1) > NORM_TOLERANCE:
                problem = f"its vector has norm {float(np.linalg.norm(vector)):.4g}, not 1"
            elif pid != point_id(name, caption):
                problem = "its id is not its caption's (a damaged id map or payload)"
            else:
                problem = ""
            yield pid, vector, problem

    def check_embedder(self, name: str, embedder: EmbedderInfo) -> None:
        stored = self.embedder(name)
        if not stored.matches(embedder):
            raise EmbedderMismatch(
                f"collection '{name}' was filled by embedder '{stored.spec}' (dim {stored.dim}), "
                f"not '{embedder.spec}' (dim {embedder.dim}){_digests(stored, embedder)}; use --model {stored.spec} "
                f"or ingest into another collection"
            )

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Shared validation: a wrong shape here is a mismatch between model and collection.
    def _check_vectors(self, name: str, vectors: np.ndarray, what: str) -> np.ndarray:
        dim = self.embedder(name).dim
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != dim:
            raise StoreError(f"{what} for collection '{name}' must have shape (n, {dim}), got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise StoreError(f"{what} for collection '{name}' contain NaN or infinity")
        return vectors


def open_store(
    url: str | None = None,
    api_key: str | None = None,
    path: Path | str | None = None,
    memory: bool = False,
    wait: float | None = DEFAULT_WAIT_S,
    on_wait: Callable[[str], None] | None = None,
) -> Store:
    """url -> Qdrant server; memory -> qdrant-client ":memory:"; otherwise the embedded store
    under `path` or default_home(). With no explicit choice, RAGCAP_QDRANT_URL (and
    RAGCAP_QDRANT_API_KEY), or the config file's qdrant_url (and qdrant_api_key), select a server. wait: seconds to wait for a collection of the
    embedded store that another process is using (None: as long as it takes); on_wait(message)
    is told when a wait begins to last."""
    if memory:
        from ragcap.store.client import ClientStore

        return ClientStore.in_memory()
    from ragcap.config import setting

    if not url and path is None:
        url = setting("qdrant_url")[0]
    if url:
        from ragcap.store.client import ClientStore

        return ClientStore.connect(url, api_key or setting("qdrant_api_key")[0])
    from ragcap.store.edge import EdgeStore

    return EdgeStore(Path(path) if path is not None else default_home(), wait=wait, on_wait=on_wait)


def _digests(stored: EmbedderInfo, given: EmbedderInfo) -> str:
    """For two local models: the directory's contents differ, whatever their paths."""
    if stored.digest and given.digest and stored.digest != given.digest:
        return f" (its config or weights differ: digest {given.digest[:12]}, recorded {stored.digest[:12]})"
    return ""
