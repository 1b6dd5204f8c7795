"""The embedded default store: Qdrant's own engine in-process (qdrant-edge-py).

Layout: <root>/collections/<name>/shard/ is one EdgeShard, <name>/ragcap.json records the
embedder. ragcap.json is written last and atomically, so a directory without it is a
half-created collection: invisible to collections()/exists() and removed by create()/drop().
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import qdrant_edge as qe

from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import StoreError
from ragcap.store import CollectionInfo, Hit, Store, check_name, check_vector_dtype, missing_collection

SIDECAR = "ragcap.json"
FORMAT = 1


@dataclass(frozen=True)
class EdgeIndexConfig:
    # Full scan over 4-bit TurboQuant codes, then rescoring of the best k * oversampling
    # with the stored vectors. Measured on 200k random 512-d vectors (benchmarks/store.py):
    # ~6 ms per query at recall@10 = 1.0 (float32) / 0.9995 (float16), index built in ~6 s.
    # HNSW (m=16) reached only recall 0.58 at ef=512 on such data and took a minute per 50k
    # points to build on 2 cores; int8 scalar codes give the same recall but scan twice the
    # bytes (~9 ms).
    quantization: str = "turbo4"  # "turbo4" | "int8" | "none" (plain scan of the stored vectors)
    oversampling: float = 8.0  # 4.0 gave recall 0.999, 8.0 gave 1.0 at the same latency
    # 0 = no graph. Set e.g. 16 for memories of millions of points, where a linear scan of
    # even compressed codes grows past tens of ms; real embeddings (low intrinsic dimension)
    # suit HNSW far better than uniform random vectors do.
    hnsw_m: int = 0
    hnsw_ef_construct: int = 128
    hnsw_ef: int = 256
    # Freshly upserted points sit in an unindexed (plain) segment until optimize();
    # search builds the index first when more than this many are waiting (~3 ms of plain scan).
    index_after: int = 20_000
    # Segments above this many KB get compressed codes on optimize(): small, so that nearly
    # every point is in the fast path (1000 KB = ~500 points of 512-d float32).
    indexing_threshold_kb: int = 1000
    upsert_batch: int = 1024  # points per update call: amortises the Python->Rust crossing

    def quantization_config(self):
        if self.quantization == "turbo4":
            return qe.TurboQuantQuantizationConfig(bits=qe.TurboQuantBitSize.Bits4, memory=qe.Memory.Pinned)
        if self.quantization == "int8":
            return qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, memory=qe.Memory.Pinned)
        if self.quantization == "none":
            return None
        raise ValueError(f"unknown quantization {self.quantization!r}: use turbo4, int8 or none")

    def shard_config(self, dim: int, vector_dtype: str = "float16") -> qe.EdgeConfig:
        datatype = {"float16": qe.VectorStorageDatatype.Float16, "float32": qe.VectorStorageDatatype.Float32}
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine, datatype=datatype[vector_dtype]),
            # full_scan_threshold is in KB: with m=0 every segment is scanned anyway.
            hnsw_config=qe.HnswIndexConfig(
                m=self.hnsw_m, ef_construct=self.hnsw_ef_construct, full_scan_threshold=10_000
            ),
            quantization_config=self.quantization_config(),
            # One segment: a 2-core machine gains nothing from splitting the scan.
            optimizers=qe.EdgeOptimizersConfig(
                default_segment_number=1, indexing_threshold=self.indexing_threshold_kb
            ),
        )

    def search_params(self) -> qe.SearchParams:
        quantization = None
        if self.quantization != "none":
            quantization = qe.QuantizationSearchParams(rescore=True, oversampling=self.oversampling)
        return qe.SearchParams(hnsw_ef=self.hnsw_ef, quantization=quantization)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _vector(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


class EdgeStore(Store):
    def __init__(self, root: Path, config: EdgeIndexConfig | None = None):
        self.root = Path(root)
        self.config = config or EdgeIndexConfig()
        self._shards: dict[str, qe.EdgeShard] = {}
        self._embedders: dict[str, EmbedderInfo] = {}
        self._vector_dtypes: dict[str, str] = {}  # read with the embedder, from the sidecar
        self._maybe_unindexed: set[str] = set()
        try:
            (self.root / "collections").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the ragcap store at {self.root}: {e}; set RAGCAP_HOME") from None

    def _dir(self, name: str) -> Path:
        check_name(name)
        return self.root / "collections" / name

    def collections(self) -> list[CollectionInfo]:
        names = sorted(p.parent.name for p in (self.root / "collections").glob(f"*/{SIDECAR}"))
        return [CollectionInfo(n, self.count(n), self.embedder(n), self._vector_dtype(n)) for n in names]

    def exists(self, name: str) -> bool:
        return (self._dir(name) / SIDECAR).is_file()

    def create(self, name: str, embedder: EmbedderInfo, vector_dtype: str = "float16") -> None:
        check_vector_dtype(vector_dtype)
        d = self._dir(name)
        if self.exists(name):
            raise StoreError(f"collection '{name}' already exists at {d}; drop it or choose another name")
        if d.exists():  # left half-created by an interrupted create
            shutil.rmtree(d)
        d.mkdir(parents=True)
        try:
            self._shards[name] = qe.EdgeShard.create(str(d / "shard"), self.config.shard_config(embedder.dim, vector_dtype))
            sidecar = {"format": FORMAT, "embedder": embedder.to_dict(), "vector_dtype": vector_dtype}
            _write_atomic(d / SIDECAR, json.dumps(sidecar, indent=2) + "\n")
        except BaseException:
            self.drop(name, missing_ok=True)
            raise
        self._embedders[name] = embedder
        self._vector_dtypes[name] = vector_dtype

    def embedder(self, name: str) -> EmbedderInfo:
        if name not in self._embedders:
            path = self._dir(name) / SIDECAR
            try:
                sidecar = json.loads(path.read_text())
                self._embedders[name] = EmbedderInfo.from_dict(sidecar["embedder"])
                # Collections from before float16 storage have no entry: they are float32.
                self._vector_dtypes[name] = sidecar.get("vector_dtype", "float32")
            except FileNotFoundError:
                raise missing_collection(name) from None
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise StoreError(f"{path}: unreadable collection record ({e!r}); drop the collection") from None
        return self._embedders[name]

    def _vector_dtype(self, name: str) -> str:
        self.embedder(name)  # reads the sidecar, which records both
        return self._vector_dtypes[name]

    def _shard(self, name: str) -> qe.EdgeShard:
        shard = self._shards.get(name)
        if shard is None:
            self.embedder(name)  # raises the "no collection" error first
            path = self._dir(name) / "shard"
            try:
                shard = qe.EdgeShard.load(str(path))
            except Exception as e:  # the bindings raise plain Exception
                if "WouldBlock" in str(e) or "lock" in str(e).lower():
                    raise StoreError(
                        f"collection '{name}' ({path}) is in use by another process (or another open "
                        f"store); the embedded store allows one user at a time: wait for it to finish, "
                        f"or share a Qdrant server (--qdrant-url / RAGCAP_QDRANT_URL)"
                    ) from None
                raise StoreError(f"cannot open collection '{name}' at {path}: {e}") from None
            self._shards[name] = shard
            self._maybe_unindexed.add(name)
        return shard

    def upsert(self, name: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        vectors = self._check_vectors(name, vectors, "vectors")
        if not (len(ids) == len(vectors) == len(payloads)):
            raise StoreError(f"upsert into '{name}': {len(ids)} ids, {len(vectors)} vectors, {len(payloads)} payloads")
        shard = self._shard(name)
        step = self.config.upsert_batch
        for start in range(0, len(ids), step):
            # Lists cross into Rust faster than numpy rows, which go element by element.
            rows = vectors[start : start + step].tolist()
            batch = zip(ids[start : start + step], rows, payloads[start : start + step])
            points = [qe.Point(i, v, p) for i, v, p in batch]
            shard.update(qe.UpdateOperation.upsert_points(points))
        self._maybe_unindexed.add(name)

    def existing(self, name: str, ids: list[str]) -> set[str]:
        shard = self._shard(name)
        found: set[str] = set()
        for start in range(0, len(ids), 4096):
            records = shard.retrieve(ids[start : start + 4096], with_payload=False, with_vector=False)
            found.update(str(r.id) for r in records)
        return found

    def optimize(self, name: str) -> None:
        shard = self._shard(name)
        shard.optimize()
        shard.flush()
        self._maybe_unindexed.discard(name)

    def _search(self, name: str, queries: np.ndarray, k: int, with_vectors: bool) -> list[list[Hit]]:
        shard = self._shard(name)
        if name in self._maybe_unindexed:
            info = shard.info()
            if info.points_count - info.indexed_vectors_count > self.config.index_after:
                self.optimize(name)
            self._maybe_unindexed.discard(name)
        params = self.config.search_params()
        requests = [
            qe.QueryRequest(
                limit=k, query=qe.Query.Nearest(q), with_payload=True, with_vector=with_vectors, params=params
            )
            for q in queries
        ]
        results = shard.query_batch(qe.QueryBatchRequest(requests))
        return [
            [
                Hit(str(p.id), float(p.score), p.payload or {}, _vector(p.vector) if with_vectors else None)
                for p in points
            ]
            for points in results
        ]

    def scroll(
        self, name: str, batch_size: int = 4096, with_vectors: bool = True
    ) -> Iterator[tuple[list[str], np.ndarray, list[dict]]]:
        shard = self._shard(name)
        offset = None
        while True:
            records, offset = shard.scroll(
                qe.ScrollRequest(offset=offset, limit=batch_size, with_payload=True, with_vector=with_vectors)
            )
            if records:
                ids = [str(r.id) for r in records]
                vectors = (
                    np.array([r.vector for r in records], dtype=np.float32)
                    if with_vectors
                    else np.empty((len(records), 0), np.float32)
                )
                yield ids, vectors, [r.payload or {} for r in records]
            if offset is None:
                return

    def count(self, name: str) -> int:
        return self._shard(name).count(qe.CountRequest(exact=True))

    def drop(self, name: str, missing_ok: bool = False) -> None:
        d = self._dir(name)
        if not d.exists():
            if missing_ok:
                return
            raise missing_collection(name)
        if (d / SIDECAR).is_file():
            self._shard(name)  # refuses to delete a collection another process has open
        shard = self._shards.pop(name, None)
        if shard is not None:
            shard.close()
        self._embedders.pop(name, None)
        self._vector_dtypes.pop(name, None)
        self._maybe_unindexed.discard(name)
        # Sidecar first: if rmtree is interrupted, what remains is a half-created
        # collection that nothing lists and the next create() clears.
        (d / SIDECAR).unlink(missing_ok=True)
        shutil.rmtree(d)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.flush()
            shard.close()
        self._shards.clear()
