"""qdrant-client backend: a Qdrant server (url), or ":memory:" for tests.

The embedder is kept in the collection's own metadata (Qdrant >= 1.16 / qdrant-client >= 1.16),
so a collection carries its identity wherever the server's data goes. So is a token that ragcap
renews before and after each of its writes: with the point count it is the collection's version,
which says whether a copy of its vectors (ragcap.store.cache, kept under $RAGCAP_HOME) is still
the collection's. Writes by other clients that keep the count (overwriting points in place) are
not seen by it; write to a ragcap collection through ragcap.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import OptionError, RagcapWarning, StoreError
from ragcap.store import (
    RESCORE_OVERSAMPLING,
    CollectionInfo,
    CollectionLayout,
    CollectionVersion,
    Hit,
    Store,
    check_name,
    check_vector_dtype,
    default_home,
    missing_collection,
    new_writes_token,
)

META_KEY = "ragcap_embedder"
WRITES_KEY = "ragcap_writes"
UPSERT_BATCH = 512  # 512 x 512-d floats is ~1 MB of JSON per request
HNSW_M = 16
HNSW_EF_CONSTRUCT = 128
HNSW_EF = 256
CONNECT_TIMEOUT = 5  # seconds for the reachability probe, so a wrong URL fails fast
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # an unencrypted key there never crosses a network


def _with_scheme(url: str) -> str:
    # "localhost:6333" is a common way to write it; qdrant-client needs the scheme.
    return url if "://" in url else f"http://{url}"


def _client(url: str, api_key: str | None, timeout: int) -> QdrantClient:
    # qdrant-client warns of a key over http:// on every client, two lines each; connect says it once.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Api key is used with an insecure connection")
        return QdrantClient(url=url, api_key=api_key, timeout=timeout, check_compatibility=False)


def server_error(err: Exception) -> str:
    """One line for a server's error answer: qdrant-client's own text spans lines (status, then the raw body)."""
    if isinstance(err, UnexpectedResponse):
        try:
            detail = json.loads(err.content)["status"]["error"]
        except (ValueError, KeyError, TypeError):
            detail = err.content.decode("utf-8", "replace").strip().splitlines()[0][:200] if err.content.strip() else ""
        return f"HTTP {err.status_code} {err.reason_phrase}" + (f": {detail}" if detail else "")
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _unusable(url: str, err: Exception) -> StoreError:
    """Why the URL is no Qdrant ragcap can use, and what to do, from the probe's failure."""
    keys = "--qdrant-api-key / RAGCAP_QDRANT_API_KEY"
    if isinstance(err, UnexpectedResponse) and err.status_code in (401, 403):
        return StoreError(f"Qdrant at {url} refused the API key ({server_error(err)}); pass the server's key with {keys}")
    if isinstance(err, UnexpectedResponse) and err.status_code >= 500:
        return StoreError(f"Qdrant at {url} failed to list collections ({server_error(err)}); see the server's log")
    if isinstance(err, (ResponseHandlingException, OSError)):
        tls = " (use http:// for a server without TLS)" if url.startswith("https:") and "SSL" in str(err) else ""
        return StoreError(
            f"cannot reach Qdrant at {url} ({server_error(err)}); start the server, or fix --qdrant-url / RAGCAP_QDRANT_URL{tls}"
        )
    # It answered, but not as Qdrant's REST API does: another service, or Qdrant's gRPC port.
    return StoreError(
        f"{url} is not a Qdrant server's REST API (GET /collections: {server_error(err)}); "
        "point --qdrant-url / RAGCAP_QDRANT_URL at Qdrant's HTTP port (6333 by default)"
    )


class ClientStore(Store):
    def __init__(self, client: QdrantClient, where: str, api_key: str | None = None):
        self.client = client
        self.where = where  # for messages: the URL or ":memory:"
        self.api_key = api_key  # so that other processes (Ray's write tasks) can connect alike
        self._embedders: dict[str, EmbedderInfo] = {}
        self._layouts: dict[str, CollectionLayout] = {}  # for each collection's search parameters
        # Local mode ignores the datatype a server applies: the float16 collections it rounds itself.
        self._rounded_locally: set[str] = set()

    @classmethod
    def in_memory(cls) -> "ClientStore":
        return cls(QdrantClient(location=":memory:"), ":memory:")

    @classmethod
    def connect(cls, url: str, api_key: str | None = None, timeout: int = 60) -> "ClientStore":
        url = _with_scheme(url)
        if api_key is not None and (api_key != api_key.strip() or not api_key.isprintable()):
            # httpx refuses such a header value, which read as "cannot reach" the server.
            raise StoreError(
                "the Qdrant API key has surrounding whitespace or control characters (a line break from a key file?); "
                "pass the key alone in --qdrant-api-key / RAGCAP_QDRANT_API_KEY"
            )
        try:
            probe = _client(url, api_key, CONNECT_TIMEOUT)
            probe.get_collections()
            probe.close()
        except Exception as e:  # noqa: BLE001 - every failure here means "cannot use this URL"
            raise _unusable(url, e) from None
        host = urlsplit(url).hostname or ""
        if api_key and url.startswith("http://") and host not in LOOPBACK_HOSTS:
            warnings.warn(f"the Qdrant API key goes to {url} unencrypted; use https:// unless the network is private "
                          "(as in docker/compose.yaml)", RagcapWarning, stacklevel=2)
        return cls(_client(url, api_key, timeout), url, api_key)

    def collections(self) -> list[CollectionInfo]:
        names = sorted(c.name for c in self.client.get_collections().collections)
        infos = []
        for name in names:
            info = self.client.get_collection(name)
            # None is Qdrant's default, float32; a foreign collection may have named vectors (a dict).
            datatype = getattr(info.config.params.vectors, "datatype", None)
            vector_dtype = "float16" if datatype == models.Datatype.FLOAT16 else "float32"
            layout = self._layout(info)
            try:
                embedder = self._from_metadata(info)
            except (KeyError, TypeError, ValueError) as e:
                infos.append(CollectionInfo(name, info.points_count, None, vector_dtype, "damaged", f"unreadable {META_KEY} metadata ({e!r})", layout))
                continue
            infos.append(CollectionInfo(name, info.points_count or 0, embedder, vector_dtype, layout=layout))
        return infos

    @staticmethod
    def _layout(info: models.CollectionInfo) -> CollectionLayout:
        params = info.config.params
        vectors = params.vectors if isinstance(params.vectors, models.VectorParams) else None
        quantization = (vectors and vectors.quantization_config) or info.config.quantization_config
        kind = "none"
        if isinstance(quantization, models.ScalarQuantization):
            kind = "int8"
        elif isinstance(quantization, models.BinaryQuantization):
            kind = "binary"
        elif quantization is not None:
            kind = type(quantization).__name__
        return CollectionLayout(
            shards=params.shard_number or 1,
            replicas=params.replication_factor or 1,
            write_consistency=params.write_consistency_factor or 1,
            on_disk=bool(vectors and vectors.on_disk),
            quantization=kind,
        )

    def layout(self, name: str) -> CollectionLayout:
        if name not in self._layouts:
            if not self.exists(name):
                raise missing_collection(name)
            self._layouts[name] = self._layout(self.client.get_collection(name))
        return self._layouts[name]

    def check_layout(self, layout: CollectionLayout) -> None:
        super().check_layout(layout)
        if layout.quantization == "turbo4":
            raise OptionError("--quantization turbo4 is the embedded store's; a Qdrant server takes int8, binary or none")

    @staticmethod
    def _from_metadata(info: models.CollectionInfo) -> EmbedderInfo | None:
        meta = info.config.metadata or {}
        return EmbedderInfo.from_dict(meta[META_KEY]) if META_KEY in meta else None

    def exists(self, name: str) -> bool:
        check_name(name)
        return self.client.collection_exists(name)

    def create(
        self, name: str, embedder: EmbedderInfo, vector_dtype: str = "float16", layout: CollectionLayout | None = None
    ) -> None:
        check_vector_dtype(vector_dtype)
        layout = layout or CollectionLayout()
        self.check_layout(layout)
        if self.exists(name):
            raise StoreError(f"collection '{name}' already exists at {self.where}; drop it or choose another name")
        try:
            self.client.create_collection(
                name,
                vectors_config=models.VectorParams(
                    size=embedder.dim,
                    distance=models.Distance.COSINE,
                    datatype=models.Datatype.FLOAT16 if vector_dtype == "float16" else models.Datatype.FLOAT32,
                    hnsw_config=models.HnswConfigDiff(m=HNSW_M, ef_construct=HNSW_EF_CONSTRUCT),
                    on_disk=layout.on_disk or None,
                ),
                # Codes in RAM (always_ram) whatever --on-disk says: scanning them is the search.
                quantization_config={
                    "int8": models.ScalarQuantization(
                        scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, quantile=0.99, always_ram=True)
                    ),
                    "binary": models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True)),
                }.get(layout.quantization),
                shard_number=layout.shards,
                replication_factor=layout.replicas,
                write_consistency_factor=layout.write_consistency,
                metadata={META_KEY: embedder.to_dict(), WRITES_KEY: new_writes_token()},
            )
        except UnexpectedResponse as e:
            # Parallel `--shard` workers race to create the collection; the losers get a conflict.
            if self.client.collection_exists(name):
                raise StoreError(f"collection '{name}' already exists at {self.where}") from e
            raise
        if self._from_metadata(self.client.get_collection(name)) != embedder:
            self.client.delete_collection(name)
            raise StoreError(
                f"Qdrant at {self.where} did not keep collection metadata; ragcap needs Qdrant >= 1.16"
            )
        self._embedders[name] = embedder
        if self.where == ":memory:" and vector_dtype == "float16":
            self._rounded_locally.add(name)

    def embedder(self, name: str) -> EmbedderInfo:
        if name not in self._embedders:
            if not self.exists(name):
                raise missing_collection(name)
            embedder = self._from_metadata(self.client.get_collection(name))
            if embedder is None:
                raise StoreError(
                    f"collection '{name}' at {self.where} was not created by ragcap (no embedder recorded); "
                    f"ingest into another collection"
                )
            self._embedders[name] = embedder
        return self._embedders[name]

    def upsert(self, name: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        vectors = self._check_vectors(name, vectors, "vectors")
        if not (len(ids) == len(vectors) == len(payloads)):
            raise StoreError(f"upsert into '{name}': {len(ids)} ids, {len(vectors)} vectors, {len(payloads)} payloads")
        if name in self._rounded_locally:
            vectors = vectors.astype(np.float16).astype(np.float32)
        self._renew_writes(name)
        starts = range(0, len(ids), UPSERT_BATCH)
        for start in starts:
            stop = start + UPSERT_BATCH
            batch = models.Batch(
                ids=ids[start:stop], vectors=vectors[start:stop].tolist(), payloads=payloads[start:stop]
            )
            # Don't wait for each batch to be indexed; the server applies a collection's
            # updates in order, so waiting on the last one covers them all.
            self.client.upsert(name, points=batch, wait=start == starts[-1])
        self._renew_writes(name)

    def _renew_writes(self, name: str) -> None:
        """Before a write, so that no copy of the vectors outlives it even if the writer dies midway;
        and after, so that none made while it ran matches the result."""
        self.client.update_collection(name, metadata={WRITES_KEY: new_writes_token()})

    def version(self, name: str) -> CollectionVersion:
        self.embedder(name)
        writes = (self.client.get_collection(name).config.metadata or {}).get(WRITES_KEY)
        if not writes:  # made by a ragcap before versions
            writes = new_writes_token()
            self.client.update_collection(name, metadata={WRITES_KEY: writes})
        return CollectionVersion(str(writes), self.count(name))

    def vector_dtype(self, name: str) -> str:
        if name in self._rounded_locally:  # rounded, then normalised again by local mode: float32 values
            return "float32"
        datatype = getattr(self.client.get_collection(name).config.params.vectors, "datatype", None)
        return "float16" if datatype == models.Datatype.FLOAT16 else "float32"

    def cache_dir(self, name: str) -> Path | None:
        """Per server under $RAGCAP_HOME; ":memory:" collections vanish with the process, so their
        copies stay in memory too."""
        if self.where == ":memory:":
            return None
        server = hashlib.sha256(self.where.encode()).hexdigest()[:16]
        return default_home() / "server-caches" / server / name

    def existing(self, name: str, ids: list[str]) -> set[str]:
        self.embedder(name)
        found: set[str] = set()
        for start in range(0, len(ids), 4096):
            records = self.client.retrieve(name, ids[start : start + 4096], with_payload=False, with_vectors=False)
            found.update(str(r.id) for r in records)
        return found

    def _search(
        self, name: str, queries: np.ndarray, k: int, with_vectors: bool, with_payload: bool = True
    ) -> list[list[Hit]]:
        params = None  # local mode is exact and warns about search params
        if self.where != ":memory:":
            oversampling = RESCORE_OVERSAMPLING.get(self.layout(name).quantization)
            rescore = models.QuantizationSearchParams(rescore=True, oversampling=oversampling) if oversampling else None
            params = models.SearchParams(hnsw_ef=HNSW_EF, quantization=rescore)
        requests = [
            models.QueryRequest(
                query=q.tolist(),
                limit=k,
                with_payload=with_payload,
                with_vector=with_vectors,
                params=params,
            )
            for q in queries
        ]
        responses = self.client.query_batch_points(name, requests=requests)
        return [
            [
                Hit(
                    str(p.id),
                    float(p.score),
                    p.payload or {},
                    np.asarray(p.vector, dtype=np.float32) if with_vectors else None,
                )
                for p in response.points
            ]
            for response in responses
        ]

    def scroll(
        self, name: str, batch_size: int = 4096, with_vectors: bool = True, with_payload: bool = True
    ) -> Iterator[tuple[list[str], np.ndarray, list[dict]]]:
        self.embedder(name)
        offset = None
        while True:
            records, offset = self.client.scroll(
                name, limit=batch_size, offset=offset, with_payload=with_payload, with_vectors=with_vectors
            )
            if records:
                vectors = (
                    np.array([r.vector for r in records], dtype=np.float32)
                    if with_vectors
                    else np.empty((len(records), 0), np.float32)
                )
                yield [str(r.id) for r in records], vectors, [r.payload or {} for r in records]
            if offset is None:
                return

    def _scroll_ids(self, name: str) -> Iterator[list[str]]:
        self.embedder(name)
        offset = None
        while True:
            records, offset = self.client.scroll(name, limit=4096, offset=offset, with_payload=False, with_vectors=False)
            yield [str(r.id) for r in records]
            if offset is None:
                return

    def _retrieve(self, name: str, ids: list[str], with_vectors: bool = True) -> list[tuple[str, np.ndarray | None, dict]]:
        self.embedder(name)
        records = self.client.retrieve(name, list(ids), with_payload=True, with_vectors=with_vectors)
        return [(str(r.id), np.asarray(r.vector, dtype=np.float32) if with_vectors else None, r.payload or {}) for r in records]

    def delete(self, name: str, ids: list[str]) -> None:
        self.embedder(name)
        self._renew_writes(name)
        self.client.delete(name, points_selector=models.PointIdsList(points=list(ids)), wait=True)
        self._renew_writes(name)

    def count(self, name: str) -> int:
        self.embedder(name)
        return self.client.count(name, exact=True).count

    def drop(self, name: str, missing_ok: bool = False) -> None:
        if not self.exists(name):
            if missing_ok:
                return
            raise missing_collection(name)
        self.client.delete_collection(name)
        self._embedders.pop(name, None)
        self._layouts.pop(name, None)
        self._rounded_locally.discard(name)

    def close(self) -> None:
        self.client.close()
