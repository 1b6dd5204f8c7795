"""The embedded default store: Qdrant's own engine in-process (qdrant-edge-py).

Layout under <root>/collections/:
    <name>/shard/        one EdgeShard
    <name>/ragcap.json   the record: embedder, vector storage, points after the last write, a
                         token renewed by every write, and a stamp of the shard's files at the
                         last clean close (see edge_files)
    <name>/cache/        a copy of the vectors for exact search (ragcap.store.cache), valid while
                         the record's token and points are those it was made from
    .<name>.lock         held by the one process using the collection (.queue: by those waiting)

A collection is built under a hidden staging name and renamed into place with its record, so a
directory <name>/ without ragcap.json was damaged, never half-made: it is refused, never deleted
or overwritten (`ragcap check` can rebuild the record, `ragcap drop` deletes it).

Qdrant Edge lets one process open a collection. ragcap's lock queues the others, and a store
hands a collection over whenever another process waits for it and this one is between
operations (embedding a batch, decoding captions): `--shard` workers embed in parallel and
take turns to write, and a caption run can read while an ingest writes. A handover reopens the
collection (1.5x the time of a free open, benchmarks/handover.py), so it happens only when
someone waits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import qdrant_edge as qe

from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import CollectionBusy, DamagedCollection, EmbedderMismatch, OptionError, RagcapError, StoreError
from ragcap.locks import Lock, LockBusy
from ragcap.store import (
    DEFAULT_WAIT_S,
    RESCORE_OVERSAMPLING,
    CheckReport,
    CollectionInfo,
    CollectionLayout,
    CollectionVersion,
    Hit,
    Store,
    check_name,
    check_vector_dtype,
    missing_collection,
    new_writes_token,
)
from ragcap.store import edge_files as files
from ragcap.store.edge_files import RECORD

HANDOVER_CHECK_S = 0.1  # how often an idle holder looks for someone waiting
HANDOVER_GRACE_S = 0.5  # after handing over, leave the lock to the waiter this long (it polls every 20 ms)
# Re-embedding a stored caption with the model that filled the collection gives cosine ~0.9999
# (float16 storage, CPU vs GPU kernels); another model gives far less.
RESTORE_MIN_COSINE = 0.99
BUSY_HINT = (
    "; the embedded store lets one process use a collection at a time and hands it over between "
    "operations, but this one kept it longer than --wait: pass a longer --wait, or share a Qdrant "
    "server (--qdrant-url)"
)


@dataclass(frozen=True)
class EdgeIndexConfig:
    # Full scan over 4-bit TurboQuant codes, then rescoring of the best k * oversampling
    # with the stored vectors. Measured on 200k random 512-d vectors (benchmarks/store.py):
    # ~6 ms per query at recall@10 = 1.0 (float32) / 0.9995 (float16), index built in ~6 s.
    # HNSW (m=16) reached only recall 0.58 at ef=512 on such data and took a minute per 50k
    # points to build on 2 cores; int8 scalar codes give the same recall but scan twice the
    # bytes (~9 ms). A collection created with another --quantization keeps its own.
    quantization: str = "turbo4"  # "turbo4" | "int8" | "binary" | "none" (plain scan of the stored vectors)
    oversampling: float = RESCORE_OVERSAMPLING["turbo4"]  # of the default quantization (see RESCORE_OVERSAMPLING)
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

    @staticmethod
    def quantization_config(quantization: str):
        # Codes pinned in RAM whether or not the vectors are: scanning them is the search.
        if quantization == "turbo4":
            return qe.TurboQuantQuantizationConfig(bits=qe.TurboQuantBitSize.Bits4, memory=qe.Memory.Pinned)
        if quantization == "int8":
            return qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, memory=qe.Memory.Pinned)
        if quantization == "binary":
            return qe.BinaryQuantizationConfig(memory=qe.Memory.Pinned)
        if quantization == "none":
            return None
        raise ValueError(f"unknown quantization {quantization!r}: use turbo4, int8, binary or none")

    def shard_config(self, dim: int, vector_dtype: str = "float16", layout: CollectionLayout | None = None) -> qe.EdgeConfig:
        layout = layout or CollectionLayout()
        datatype = {"float16": qe.VectorStorageDatatype.Float16, "float32": qe.VectorStorageDatatype.Float32}
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(
                size=dim, distance=qe.Distance.Cosine, datatype=datatype[vector_dtype], on_disk=layout.on_disk or None
            ),
            # full_scan_threshold is in KB: with m=0 every segment is scanned anyway.
            hnsw_config=qe.HnswIndexConfig(
                m=self.hnsw_m, ef_construct=self.hnsw_ef_construct, full_scan_threshold=10_000
            ),
            quantization_config=self.quantization_config(layout.quantization or self.quantization),
            # One segment: a 2-core machine gains nothing from splitting the scan.
            optimizers=qe.EdgeOptimizersConfig(
                default_segment_number=1, indexing_threshold=self.indexing_threshold_kb
            ),
        )

    def search_params(self, quantization: str) -> qe.SearchParams:
        rescore = None
        if quantization != "none":
            oversampling = self.oversampling if quantization == self.quantization else RESCORE_OVERSAMPLING[quantization]
            rescore = qe.QuantizationSearchParams(rescore=True, oversampling=oversampling)
        return qe.SearchParams(hnsw_ef=self.hnsw_ef, quantization=rescore)


def _vector(v) -> np.ndarray:
    # A point whose vector is flagged deleted comes back with {} for it.
    return np.asarray(v if isinstance(v, list) else [], dtype=np.float32)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Lease:
    """One collection this store uses: its lock and, while the lock is held, the open shard."""

    def __init__(self, lock: Lock):
        self.lock = lock
        self.shard: qe.EdgeShard | None = None
        self.record: dict | None = None  # as read when opened, kept current by our writes
        self.points = 0  # what the engine counted when it was opened, kept current by our writes
        self.busy = 0  # operations in progress (a scroll counts until it ends)
        self.mutex = threading.RLock()
        self.handed_over_at = 0.0
        self.error: BaseException | None = None  # from a handover in the watcher thread


class EdgeStore(Store):
    def __init__(
        self,
        root: Path,
        config: EdgeIndexConfig | None = None,
        wait: float | None = DEFAULT_WAIT_S,
        on_wait: Callable[[str], None] | None = None,
    ):
        self.root = Path(root)
        self.config = config or EdgeIndexConfig()
        self.wait, self.on_wait = wait, on_wait  # for a collection another process holds
        self._leases: dict[str, _Lease] = {}
        self._embedders: dict[str, EmbedderInfo] = {}
        self._vector_dtypes: dict[str, str] = {}  # read with the embedder, from the record
        self._layouts: dict[str, CollectionLayout] = {}  # read from the shard's config
        self._maybe_unindexed: set[str] = set()
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None
        try:
            (self.root / "collections").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the ragcap store at {self.root}: {e}; choose a writable folder (RAGCAP_HOME, or path= of open_store)") from None

    # ------------------------------------------------------------------ names and records

    def _dir(self, name: str) -> Path:
        check_name(name)
        return self.root / "collections" / name

    def _lease(self, name: str) -> _Lease:
        if name not in self._leases:
            lock = Lock(self.root / "collections" / f".{name}.lock", f"collection '{name}'")
            self._leases[name] = _Lease(lock)
        return self._leases[name]

    def exists(self, name: str) -> bool:
        return (self._dir(name) / RECORD).is_file()

    def embedder(self, name: str) -> EmbedderInfo:
        if name not in self._embedders:
            d = self._dir(name)
            if not d.is_dir():
                raise missing_collection(name)
            record = files.read_record(d, name)
            self._embedders[name] = EmbedderInfo.from_dict(record["embedder"])
            # Collections from before float16 storage have no entry: they are float32.
            self._vector_dtypes[name] = record.get("vector_dtype", "float32")
        return self._embedders[name]

    def _check_same_embedder(self, name: str, record: dict) -> None:
        """EmbedderMismatch if another process dropped the collection and made it again with
        another embedder since this one read it: a long-running process (the server) would go
        on embedding queries for the old model and get answers that mean nothing. Refused on
        every reopen until it restarts, since its loaded model is the old one."""
        now = EmbedderInfo.from_dict(record["embedder"])
        before = self._embedders.get(name)
        if before is not None and not before.matches(now):
            raise EmbedderMismatch(
                f"collection '{name}' was made again by another process with embedder '{now.spec}' (dim {now.dim}); "
                f"this process uses '{before.spec}' (dim {before.dim}): restart it to use the new collection"
            )
        self._vector_dtypes[name] = record.get("vector_dtype", "float32")

    def vector_dtype(self, name: str) -> str:
        self.embedder(name)  # reads the record, which holds both
        return self._vector_dtypes[name]

    def version(self, name: str) -> CollectionVersion:
        """From the record on disk, without opening the collection (another process may hold it):
        every write renews its token, before and after it touches the points, so a writer killed
        midway leaves a version no copy was made from."""
        record = files.read_record(self._dir(name), name)
        return CollectionVersion(str(record.get("writes") or ""), int(record.get("points") or 0))

    def cache_dir(self, name: str) -> Path:
        return self._dir(name) / "cache"  # inside the collection: dropped with it

    def collections(self) -> list[CollectionInfo]:
        """Every collection directory: a busy or damaged one is listed as such, from its files
        alone (nothing is opened, so the listing never waits and never fails as a whole)."""
        names = sorted(p.name for p in (self.root / "collections").iterdir() if p.is_dir() and not p.name.startswith("."))
        return [self._describe(name) for name in names]

    def _describe(self, name: str) -> CollectionInfo:
        try:
            d = self._dir(name)
            record = files.read_record(d, name)
        except StoreError as e:
            return CollectionInfo(name, None, None, "?", "damaged", str(e))
        embedder = EmbedderInfo.from_dict(record["embedder"])
        info = CollectionInfo(name, record.get("points"), embedder, record.get("vector_dtype", "float32"))
        problems = files.metadata_problems(d / "shard")
        if not problems:
            info.layout = self.layout(name)
        if problems:
            info.status, info.problem = "damaged", f"{problems[0]}; `ragcap check {name}` says more"
        elif not self._lease(name).lock.held and self._lease(name).lock.in_use():
            info.status, info.problem = "busy", f"in use by {self._lease(name).lock.holder()}"
        elif info.points is None:  # made by a ragcap that did not record the count
            try:
                info.points = self.count(name)
            except StoreError as e:
                info.status, info.problem = ("busy" if isinstance(e, CollectionBusy) else "damaged"), str(e)
        return info

    # ------------------------------------------------------------------ holding a collection

    def _acquire(self, name: str, lease: _Lease) -> None:
        if lease.lock.held:
            return
        # Just handed over: let the waiter take it before queueing for it again.
        while time.monotonic() - lease.handed_over_at < HANDOVER_GRACE_S and lease.lock.wanted():
            time.sleep(0.02)
        try:
            lease.lock.acquire(self.wait, self.on_wait, hint=BUSY_HINT)
        except LockBusy as e:
            raise CollectionBusy(str(e)) from None
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._hand_over_when_asked, name="ragcap-handover", daemon=True)
            self._watcher.start()

    def _open(self, name: str, lease: _Lease, allow_loss: bool = False) -> None:
        self._acquire(name, lease)
        try:
            d = self._dir(name)
            if not d.is_dir():
                raise missing_collection(name)
            record = files.read_record(d, name)  # again: another process may have changed it
            self._check_same_embedder(name, record)
            for stale in d.glob(f".{RECORD}.*.tmp"):  # a record being rewritten by a killed process
                stale.unlink(missing_ok=True)
            shard_dir = d / "shard"
            files.ensure_room(shard_dir, files.need_to_open(shard_dir), f"opening collection '{name}'")
            if record.get("stamp") != files.files_stamp(shard_dir):
                # Not as the last clean close left it (a killed writer, a copy, damage): let a
                # child process find out whether the engine can open it at all.
                problems = files.metadata_problems(shard_dir)
                if problems:
                    raise DamagedCollection(f"collection '{name}' is damaged: {problems[0]}; `ragcap check {name}` tells more")
                files.probe(shard_dir, name)
            try:
                lease.shard = qe.EdgeShard.load(str(shard_dir))
            except Exception as e:  # the bindings raise plain Exception
                raise DamagedCollection(
                    f"cannot open collection '{name}' ({files.describe_engine_error(e)}); `ragcap check {name}` tells more"
                ) from None
            lease.record = record
            lease.points = lease.shard.info().points_count
            recorded = record.setdefault("points", lease.points)  # older records have no count
            if lease.points < recorded and not allow_loss:
                raise DamagedCollection(
                    f"collection '{name}' holds {lease.points} points but {recorded} were stored: its files are "
                    f"damaged; `ragcap check {name}` tells more"
                )
            if lease.points > recorded or not record.get("writes"):
                # A writer killed after storing points but before counting them, or a record
                # from before tokens: count what is there under a new token.
                record["points"], record["writes"] = lease.points, new_writes_token()
                files.write_record(d, record)
            self._maybe_unindexed.add(name)
        except BaseException:
            if lease.shard is not None:
                lease.shard.close()
                lease.shard = None
            lease.lock.release()
            raise

    def _close_shard(self, name: str, lease: _Lease, restamp: bool = True) -> None:
        """Flush and close the shard; stamp the record so the next open trusts the files."""
        shard, lease.shard = lease.shard, None
        if shard is None:
            return
        shard.flush()
        shard.close()
        if restamp and lease.record is not None:
            d = self._dir(name)
            lease.record["stamp"] = files.files_stamp(d / "shard")
            try:
                files.write_record(d, lease.record)
            except RagcapError:
                pass  # a full disk: the old stamp only makes the next open check the files first

    @contextmanager
    def _use(self, name: str, doing: str) -> Iterator[qe.EdgeShard]:
        """The open shard for one operation; engine errors become DamagedCollection."""
        lease = self._lease(name)
        with lease.mutex:
            if lease.error is not None:
                error, lease.error = lease.error, None
                raise error
            if lease.shard is None:
                self.embedder(name)  # "no collection" before any waiting
                self._open(name, lease)
            lease.busy += 1
        try:
            yield lease.shard
        except BaseException as e:
            # The bindings raise plain Exception; a Rust panic arrives as pyo3's PanicException,
            # a BaseException. Anything else is not the engine's.
            if type(e) is Exception or type(e).__name__ == "PanicException":
                raise DamagedCollection(
                    f"collection '{name}': the store engine failed {doing} ({files.describe_engine_error(e)}); "
                    f"`ragcap check {name}` says what is damaged"
                ) from None
            raise
        finally:
            with lease.mutex:
                lease.busy -= 1

    def _hand_over_when_asked(self) -> None:
        while not self._closing.wait(HANDOVER_CHECK_S):
            for name, lease in list(self._leases.items()):
                if not lease.lock.held or lease.busy or not lease.mutex.acquire(blocking=False):
                    continue
                try:
                    if lease.lock.held and not lease.busy and lease.lock.wanted():
                        try:
                            self._close_shard(name, lease)
                        except BaseException as e:  # reported by this store's next operation
                            lease.error = e
                        lease.lock.release()
                        lease.handed_over_at = time.monotonic()
                finally:
                    lease.mutex.release()

    # ------------------------------------------------------------------ create and drop

    def check_layout(self, layout: CollectionLayout) -> None:
        super().check_layout(layout)
        if layout.clustered:
            raise OptionError(
                "--shards, --replicas and --write-consistency lay a collection out over a Qdrant server cluster; "
                "the embedded store keeps each collection in one shard on this machine: drop them, or pass --qdrant-url"
            )

    def layout(self, name: str) -> CollectionLayout:
        """Read from the shard's own config, which the engine follows."""
        if name not in self._layouts:
            shard = self._dir(name) / "shard"
            try:
                on_disk, quantization = files.shard_storage(shard)
            except (OSError, ValueError, KeyError) as e:
                raise DamagedCollection(f"collection '{name}' is damaged: {shard / 'edge_config.json'} is unreadable ({e}); "
                                        f"`ragcap check {name}` tells more") from None
            self._layouts[name] = CollectionLayout(on_disk=on_disk, quantization=quantization)
        return self._layouts[name]

    def create(
        self, name: str, embedder: EmbedderInfo, vector_dtype: str = "float16", layout: CollectionLayout | None = None
    ) -> None:
        check_vector_dtype(vector_dtype)
        layout = layout or CollectionLayout()
        self.check_layout(layout)
        d = self._dir(name)
        lease = self._lease(name)
        with lease.mutex:
            self._acquire(name, lease)  # a concurrent create waits here, then finds it made
            if (d / RECORD).is_file():
                raise StoreError(f"collection '{name}' already exists at {d}; drop it or choose another name")
            if d.exists():
                files.read_record(d, name)  # raises: a directory without its record is refused
            self._clear_leftovers(name)
            staging = d.with_name(f".{name}.creating-{os.getpid()}")
            files.ensure_room(d.parent, files.RESERVE_BYTES, f"creating collection '{name}'")
            try:
                shard = qe.EdgeShard.create(str(staging / "shard"), self.config.shard_config(embedder.dim, vector_dtype, layout))
                shard.close()
                files.ensure_room(staging / "shard", files.need_to_open(staging / "shard"), f"creating collection '{name}'")
                record = files.new_record(embedder.to_dict(), vector_dtype)
                record["stamp"] = files.files_stamp(staging / "shard")
                files.write_record(staging, record)
                os.rename(staging, d)  # the collection appears whole: shard and record
                _fsync_dir(d.parent)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        self._embedders[name] = embedder
        self._vector_dtypes[name] = vector_dtype

    def _clear_leftovers(self, name: str) -> None:
        """Staging and dropped directories of `name` left by killed processes (the caller holds
        the lock, so none of them is still being made)."""
        pattern = re.compile(rf"\.{re.escape(name)}\.(creating|dropping)-\d+")
        for path in (self.root / "collections").iterdir():
            if pattern.fullmatch(path.name) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    def drop(self, name: str, missing_ok: bool = False) -> None:
        """Delete a collection without opening it, so a damaged one can be dropped too."""
        d = self._dir(name)
        if not d.exists():
            if missing_ok:
                return
            raise missing_collection(name)
        lease = self._lease(name)
        with lease.mutex:
            self._acquire(name, lease)
            try:
                try:
                    self._close_shard(name, lease, restamp=False)
                except Exception:
                    pass  # it is being deleted
                if d.exists():
                    # One rename makes it vanish whole; the files go afterwards.
                    trash = d.with_name(f".{name}.dropping-{os.getpid()}")
                    os.rename(d, trash)
                    _fsync_dir(d.parent)
                self._clear_leftovers(name)
            finally:
                lease.lock.release()
        self._embedders.pop(name, None)
        self._vector_dtypes.pop(name, None)
        self._layouts.pop(name, None)
        self._maybe_unindexed.discard(name)

    # ------------------------------------------------------------------ points

    def upsert(self, name: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> None:
        vectors = self._check_vectors(name, vectors, "vectors")
        if not (len(ids) == len(vectors) == len(payloads)):
            raise StoreError(f"upsert into '{name}': {len(ids)} ids, {len(vectors)} vectors, {len(payloads)} payloads")
        payload_bytes = len(json.dumps(payloads, ensure_ascii=False).encode()) // max(1, len(payloads))
        new_bytes = len(ids) * files.point_bytes(vectors.shape[1], self.vector_dtype(name), payload_bytes)
        step = self.config.upsert_batch
        with self._use(name, "writing points") as shard:
            shard_dir = self._dir(name) / "shard"
            held = self._lease(name).points
            files.ensure_room(
                shard_dir, files.need_to_write(shard_dir, new_bytes), f"storing {len(ids)} more points in collection '{name}'",
                f"; the {held} points stored so far are intact, and rerunning the ingest resumes",
            )
            self._renew_writes(name)
            for start in range(0, len(ids), step):
                # Lists cross into Rust faster than numpy rows, which go element by element.
                rows = vectors[start : start + step].tolist()
                batch = zip(ids[start : start + step], rows, payloads[start : start + step])
                points = [qe.Point(i, v, p) for i, v, p in batch]
                shard.update(qe.UpdateOperation.upsert_points(points))
            self._record_points(name, shard)
        self._maybe_unindexed.add(name)

    def delete(self, name: str, ids: list[str]) -> None:
        with self._use(name, "deleting points") as shard:
            shard_dir = self._dir(name) / "shard"
            files.ensure_room(shard_dir, files.need_to_write(shard_dir, 64 * len(ids)), f"deleting points of collection '{name}'")
            self._renew_writes(name)
            shard.update(qe.UpdateOperation.delete_points(list(ids)))
            self._record_points(name, shard)

    def _record_points(self, name: str, shard: qe.EdgeShard) -> None:
        """Keep the record's count current: listings read it without opening the collection, and
        `check` compares it with what the engine finds."""
        # info()'s count: 0.02 ms at 200k points where an exact count takes 16 ms, and the same
        # number after upserts, overwrites, deletes and optimisation.
        lease = self._lease(name)
        lease.points = lease.record["points"] = shard.info().points_count
        lease.record["writes"] = new_writes_token()
        files.write_record(self._dir(name), lease.record)

    def _renew_writes(self, name: str) -> None:
        """Before a write: copies of the vectors made until now no longer match the record, even
        if this process is killed before the write ends (and _record_points renews it again)."""
        lease = self._lease(name)
        lease.record["writes"] = new_writes_token()
        files.write_record(self._dir(name), lease.record)

    def recount(self, name: str) -> None:
        """Accept the points the collection holds now as its size (after `check` reported some
        lost), so that it opens again; re-ingesting its corpus restores the lost ones."""
        lease = self._lease(name)
        with lease.mutex:
            if lease.shard is None:
                self._open(name, lease, allow_loss=True)
            self._record_points(name, lease.shard)

    def existing(self, name: str, ids: list[str]) -> set[str]:
        found: set[str] = set()
        with self._use(name, "looking up ids") as shard:
            for start in range(0, len(ids), 4096):
                records = shard.retrieve(ids[start : start + 4096], with_payload=False, with_vector=False)
                found.update(str(r.id) for r in records)
        return found

    def _retrieve(self, name: str, ids: list[str], with_vectors: bool = True) -> list[tuple[str, np.ndarray | None, dict]]:
        with self._use(name, "reading points") as shard:
            records = shard.retrieve(list(ids), with_payload=True, with_vector=with_vectors)
        return [(str(r.id), _vector(r.vector) if with_vectors else None, r.payload or {}) for r in records]

    def optimize(self, name: str) -> None:
        with self._use(name, "building the index") as shard:
            shard_dir = self._dir(name) / "shard"
            files.ensure_room(shard_dir, files.need_to_optimize(shard_dir), f"building the search index of collection '{name}'")
            shard.optimize()
            shard.flush()
        self._maybe_unindexed.discard(name)

    def _search(
        self, name: str, queries: np.ndarray, k: int, with_vectors: bool, with_payload: bool = True
    ) -> list[list[Hit]]:
        if name in self._maybe_unindexed:
            with self._use(name, "searching") as shard:
                info = shard.info()
                waiting = info.points_count - info.indexed_vectors_count
            if waiting > self.config.index_after:
                self.optimize(name)
            self._maybe_unindexed.discard(name)
        with self._use(name, "searching") as shard:
            # The layout is read from the shard's config once opening has found it sound.
            params = self.config.search_params(self.layout(name).quantization)
            requests = [
                qe.QueryRequest(
                    limit=k, query=qe.Query.Nearest(q), with_payload=with_payload, with_vector=with_vectors, params=params
                )
                for q in queries
            ]
            results = shard.query_batch(qe.QueryBatchRequest(requests))
            held = self._lease(name).points
        if any(len(points) < min(k, held) for points in results):
            raise DamagedCollection(
                f"collection '{name}' returned fewer than {min(k, held)} neighbours although it holds "
                f"{held} points: its files are damaged; run `ragcap check {name}`"
            )
        return [
            [
                Hit(str(p.id), float(p.score), p.payload or {}, _vector(p.vector) if with_vectors else None)
                for p in points
            ]
            for points in results
        ]

    def scroll(
        self, name: str, batch_size: int = 4096, with_vectors: bool = True, with_payload: bool = True
    ) -> Iterator[tuple[list[str], np.ndarray, list[dict]]]:
        offset = None
        # Held for the whole scroll (no handover midway), so it sees one consistent collection.
        with self._use(name, "reading points") as shard:
            while True:
                records, offset = shard.scroll(
                    qe.ScrollRequest(offset=offset, limit=batch_size, with_payload=with_payload, with_vector=with_vectors)
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

    def _scroll_ids(self, name: str) -> Iterator[list[str]]:
        offset = None
        with self._use(name, "listing ids") as shard:
            while True:
                records, offset = shard.scroll(
                    qe.ScrollRequest(offset=offset, limit=4096, with_payload=False, with_vector=False)
                )
                yield [str(r.id) for r in records]
                if offset is None:
                    return

    def count(self, name: str) -> int:
        with self._use(name, "counting points") as shard:
            return shard.count(qe.CountRequest(exact=True))

    # ------------------------------------------------------------------ damage

    def check(self, name: str, batch_size: int = 1024) -> CheckReport:
        """The record and the engine's metadata files first, then the engine in a child process
        (it may abort on damaged files), then every point (Store.check)."""
        d = self._dir(name)
        if not d.is_dir():
            raise missing_collection(name)
        report = CheckReport(name, repairable=False)
        try:
            files.read_record(d, name)
        except DamagedCollection as e:
            report.problems.append(str(e))
            report.record_lost = True
            return report
        report.problems += files.metadata_problems(d / "shard")
        lease = self._lease(name)
        with lease.mutex:
            if lease.shard is None and not report.problems:
                self._acquire(name, lease)
                try:
                    files.probe(d / "shard", name)
                    self._open(name, lease, allow_loss=True)  # held open for the checks below
                except DamagedCollection as e:
                    report.problems.append(str(e))
                    lease.lock.release()
        if report.problems:
            return report
        report = super().check(name, batch_size)
        recorded = lease.record.get("points", 0)
        if report.points is not None and report.points < recorded:
            report.lost = recorded - report.points
            report.problems.append(
                f"{recorded} points were stored but {report.points} are left: {report.lost} were lost; "
                f"`--repair` accepts the loss, and re-ingesting the corpus then restores them"
            )
        return report

    def restore_record(self, name: str, embedder: EmbedderInfo, encode: Callable[[list[str]], np.ndarray]) -> int:
        """Rewrite a lost or unreadable record for `embedder`, after checking that it reproduces
        stored vectors from their captions (encode(captions) -> unit vectors); returns the points."""
        d = self._dir(name)
        shard_dir = d / "shard"
        if not d.is_dir():
            raise missing_collection(name)
        lease = self._lease(name)
        with lease.mutex:
            self._acquire(name, lease)
            try:
                if (d / RECORD).is_file():
                    try:
                        files.read_record(d, name)
                        raise StoreError(f"collection '{name}' has a readable record already; nothing to restore")
                    except DamagedCollection:
                        pass
                problems = files.metadata_problems(shard_dir)
                if problems:
                    raise DamagedCollection(f"collection '{name}' is damaged beyond its record: {problems[0]}")
                dim, vector_dtype = files.shard_vectors(shard_dir)
                if dim != embedder.dim:
                    raise StoreError(f"collection '{name}' holds {dim}-d vectors; {embedder.spec} makes {embedder.dim}-d ones")
                files.probe(shard_dir, name)
                shard = qe.EdgeShard.load(str(shard_dir))
                try:
                    sample, _ = shard.scroll(qe.ScrollRequest(limit=16, with_payload=True, with_vector=True))
                    points = shard.count(qe.CountRequest(exact=True))
                finally:
                    shard.close()
                captions = [(r.payload or {}).get("caption") for r in sample]
                if sample and all(isinstance(c, str) for c in captions):
                    stored = np.array([r.vector for r in sample], dtype=np.float32)
                    worst = float(np.min(np.sum(np.asarray(encode(captions), np.float32) * stored, axis=1)))
                    if worst < RESTORE_MIN_COSINE:
                        raise StoreError(
                            f"{embedder.spec} does not reproduce the vectors stored in '{name}' from their captions "
                            f"(cosine {worst:.3f}): it is not the model that filled it; nothing was written"
                        )
                record = files.new_record(embedder.to_dict(), vector_dtype)
                record["points"] = points
                files.write_record(d, record)
            finally:
                lease.lock.release()
        self._embedders.pop(name, None)
        return points

    def close(self) -> None:
        self._closing.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        errors = []
        for name, lease in self._leases.items():
            with lease.mutex:
                try:
                    self._close_shard(name, lease)
                except Exception as e:
                    errors.append(e)
                lease.lock.release()
        self._leases.clear()
        self._closing.clear()
        if errors:
            raise errors[0]
