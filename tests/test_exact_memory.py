"""Exact search over the whole memory from the vector cache kept beside a collection: equal to the
formula, never stale (rebuilt after every write, a drop, a killed writer), and what the modes use."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from ragcap.caption import CaptionSettings, Captioner
from ragcap.embedder_info import EmbedderInfo
from ragcap.retrieve import ExactMemory, FullMemory
from ragcap.store import open_store, point_id
from ragcap.store import cache as vector_cache
from tests.faults.conftest import start, wait_for
from tests.test_caption import CAPTIONS, RecordingDecoder

DIM = 16
INFO = EmbedderInfo("tiny", DIM)


def unit_vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill(store, name: str, n: int, seed: int = 0, start_at: int = 0, create: bool = True, vector_dtype: str = "float16") -> None:
    captions = [f"caption {i}" for i in range(start_at, start_at + n)]
    if create:
        store.create(name, INFO, vector_dtype)
    store.upsert(name, [point_id(name, c) for c in captions], unit_vectors(n, seed), [{"caption": c} for c in captions])


@pytest.fixture(params=["edge", "memory"])
def store(request, tmp_path):
    s = open_store(path=tmp_path / "home") if request.param == "edge" else open_store(memory=True)
    yield s
    s.close()


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 7 rows for 5 queries (fewer for more), so that the online softmax and the top-k
    merge cross many blocks."""
    monkeypatch.setattr(ExactMemory, "BLOCK_SIMILARITIES", 35)
    monkeypatch.setattr(ExactMemory, "MIN_BLOCK_ROWS", 1)


def test_far_captions_weigh_next_to_nothing_and_near_ones_exactly(store):
    """Queries close to some stored captions and far (cosine ~0, softmax arguments ~ -100) from
    the rest, where the search clamps the arguments of exp: still DeCap's formula to 1e-6."""
    fill(store, "mem", 100, vector_dtype="float32")
    stored = np.concatenate([v for _, v, _ in store.scroll("mem")])
    mixed = stored[:3] + 0.05 * unit_vectors(3, seed=6)
    queries = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
    projections = ExactMemory(store, "mem").search(queries, tau=0.01)[2]
    full = FullMemory(store, "mem").project(queries, 0.01)
    np.testing.assert_allclose(projections, full, atol=1e-6)
    assert (np.sum(full * stored[:3], axis=1) > 0.99).all()  # the near caption dominates: the case is what it says


def test_a_query_gets_the_same_answer_in_any_batch(store, small_blocks):
    """Blocks shrink as batches grow (1 query: 35 rows a block, 35 queries: 1); each query's
    projection and neighbours stay those it gets alone."""
    fill(store, "mem", 100)
    queries = unit_vectors(35, seed=4)
    memory = ExactMemory(store, "mem")
    scores, rows, projections = memory.search(queries, k=3, tau=0.01)
    for i in (0, 17, 34):
        alone = memory.search(queries[i : i + 1], k=3, tau=0.01)
        np.testing.assert_allclose(alone[2][0], projections[i], atol=1e-6)
        np.testing.assert_allclose(alone[0][0], scores[i], atol=1e-6)
        assert list(alone[1][0]) == list(rows[i])


@pytest.mark.parametrize("vector_dtype", ["float16", "float32"])
def test_exact_projection_and_neighbours_equal_the_whole_memory_formula(store, small_blocks, vector_dtype):
    fill(store, "mem", 100, vector_dtype=vector_dtype)
    queries = unit_vectors(5, seed=9)
    memory = ExactMemory(store, "mem")
    scores, rows, projections = memory.search(queries, k=6, tau=0.01)
    np.testing.assert_allclose(projections, FullMemory(store, "mem").project(queries, 0.01), atol=1e-6)
    stored = np.concatenate([v for _, v, _ in store.scroll("mem")])
    sims = queries @ stored.T
    np.testing.assert_allclose(scores, -np.sort(-sims, axis=1)[:, :6], atol=1e-6)
    hits = memory.hits(scores, rows, with_vectors=True)
    by_id = {pid: (v, p) for ids, vs, ps in store.scroll("mem") for pid, v, p in zip(ids, vs, ps)}
    for query_hits in hits:
        for hit in query_hits:
            np.testing.assert_array_equal(hit.vector, by_id[hit.id][0])
            assert hit.payload == by_id[hit.id][1]


def test_the_cache_is_kept_beside_the_collection_and_reused(tmp_path, monkeypatch):
    store = open_store(path=tmp_path / "home")
    fill(store, "mem", 50)
    first = ExactMemory(store, "mem")
    assert (tmp_path / "home" / "collections" / "mem" / "cache" / "cache.json").is_file()
    monkeypatch.setattr(type(store), "scroll", lambda *a, **k: pytest.fail("read the collection again"))
    again = ExactMemory(store, "mem")
    np.testing.assert_array_equal(again.cache.vectors, first.cache.vectors)
    store.close()


def test_the_cache_is_rebuilt_after_writes_deletes_and_a_drop(store):
    fill(store, "mem", 40)
    memory = ExactMemory(store, "mem")
    before = memory.cache.version
    fill(store, "mem", 10, seed=1, start_at=40, create=False)  # an ingest adding points
    memory.refresh()
    assert memory.size == 50 and memory.cache.version != before
    new_id = point_id("mem", "caption 45")
    [[hit]] = memory.hits(*memory.search(unit_vectors(10, seed=1)[5:6], k=1)[:2])
    assert hit.id == new_id
    # Overwriting points keeps the count: the token alone says the vectors changed.
    ids = [point_id("mem", f"caption {i}") for i in range(10)]
    store.upsert("mem", ids, unit_vectors(10, seed=2), [{"caption": f"caption {i}"} for i in range(10)])
    memory.refresh()
    row = list(memory.cache.ids).index(ids[3])
    np.testing.assert_allclose(np.asarray(memory.cache.vectors[row], np.float32), unit_vectors(10, seed=2)[3], atol=1e-3)
    store.delete("mem", ids[:4])
    memory.refresh()
    assert memory.size == 46 and not set(ids[:4]) & set(memory.cache.ids)
    # Dropped and made again with as many points: other vectors, another version.
    store.drop("mem")
    fill(store, "mem", 46, seed=3)
    memory.refresh()
    np.testing.assert_allclose(memory.search(unit_vectors(46, seed=3)[:3], k=1)[0][:, 0], 1.0, atol=1e-3)


def test_a_server_collection_cache_follows_its_metadata_token_and_count(tmp_path, monkeypatch):
    """The rule for Qdrant servers, checked on qdrant-client's local mode with a cache directory."""
    from ragcap.store.client import WRITES_KEY, ClientStore

    store = open_store(memory=True)
    monkeypatch.setattr(ClientStore, "cache_dir", lambda self, name: tmp_path / "caches" / name)
    fill(store, "mem", 30)
    first = vector_cache.load_vectors(store, "mem")
    assert first.version == store.version("mem") and (tmp_path / "caches" / "mem" / "cache.json").is_file()
    assert vector_cache.load_vectors(store, "mem").version == first.version  # reused, same version
    # Overwriting a point keeps the count; the token ragcap renews around each write tells.
    ids = [point_id("mem", "caption 0")]
    store.upsert("mem", ids, unit_vectors(1, seed=5), [{"caption": "caption 0"}])
    assert store.version("mem") != first.version
    again = vector_cache.load_vectors(store, "mem")
    row = list(again.ids).index(ids[0])
    np.testing.assert_allclose(again.vectors[row], unit_vectors(1, seed=5)[0], atol=1e-3)  # float16
    # A collection from before versions gets a token on first use, and keeps it.
    store.client.update_collection("mem", metadata={WRITES_KEY: ""})
    assert store.version("mem").writes and store.version("mem") == store.version("mem")
    store.close()


def test_a_collection_changing_during_every_read_is_refused(store, monkeypatch):
    from ragcap.errors import StoreError

    fill(store, "mem", 20)
    versions = iter(range(1000))
    monkeypatch.setattr(type(store), "version", lambda self, name: vector_cache.CollectionVersion(str(next(versions)), 20))
    with pytest.raises(StoreError, match="changed every time"):
        vector_cache.load_vectors(store, "mem")


KILLED_UPSERT = """
import sys
import numpy as np
from tests.faults.stopper import stop_at
from tests.test_exact_memory import INFO, unit_vectors
from ragcap.store import open_store, point_id
store = open_store()
captions = [f"new {i}" for i in range(1500)] + ["stop here"]
stop_at(sys.argv[1], "qdrant_edge:Point:stop here")
store.upsert("mem", [point_id("mem", c) for c in captions], unit_vectors(len(captions), 7), [{"caption": c} for c in captions])
"""


def test_a_writer_killed_midway_leaves_no_cache_that_matches(tmp_path, ragcap_home):
    with open_store(wait=0) as store:
        fill(store, "mem", 30)
        assert ExactMemory(store, "mem").size == 30
    process = start("-c", KILLED_UPSERT, tmp_path / "stopped")
    wait_for((tmp_path / "stopped").exists, "the writer stored its first batch", process=process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with open_store(wait=0) as store:
        memory = ExactMemory(store, "mem")  # the record still counts 30, but its token was renewed
        stored = store.count("mem")
        assert stored > 30 and memory.size == stored


@pytest.fixture
def captioning(tiny_clip_dir):
    from pipelines.base import CaptionRecord
    from ragcap.embed import load_embedder
    from ragcap.ingest import ingest

    embedder = load_embedder(str(tiny_clip_dir))
    store = open_store()
    ingest((CaptionRecord(caption=c, corpus="test") for c in CAPTIONS), store, "mem", embedder.info, lambda: embedder)
    yield store, embedder
    store.close()


def test_exact_search_serves_every_mode_without_asking_qdrant(captioning, monkeypatch):
    store, embedder = captioning
    texts = ["a dog sleeping", "a bird on the sofa"]
    settings = CaptionSettings(modes=("pd", "nnd", "clipre"), tau=0.02, neighbours=3, memory="qdrant", k=len(CAPTIONS))
    through_qdrant = list(Captioner(store, "mem", embedder, settings, decoder=RecordingDecoder()).caption_texts(texts))
    monkeypatch.setattr(type(store), "_search", lambda *a, **k: pytest.fail("searched through Qdrant"))
    exact = Captioner(store, "mem", embedder, CaptionSettings(**{**vars(settings), "memory": "exact"}), decoder=RecordingDecoder())
    assert exact.exact is not None and exact.search_k == 3
    exactly = list(exact.caption_texts(texts))
    for a, b in zip(through_qdrant, exactly):
        assert (a.source, a.mode) == (b.source, b.mode)
        assert [c for c, _ in a.neighbours] == [c for c, _ in b.neighbours]
        if a.mode == "clipre":
            assert a.caption == b.caption
        else:  # the decoder's fingerprint of its prefix: pd over all captions equals pd over k = all of them
            assert float(a.caption) == pytest.approx(float(b.caption), abs=1e-4)


def test_auto_searches_exactly_only_within_the_budget(captioning):
    store, embedder = captioning
    decoder = RecordingDecoder()
    assert Captioner(store, "mem", embedder, CaptionSettings(), decoder=decoder).exact is not None
    over = Captioner(store, "mem", embedder, CaptionSettings(exact_max_bytes=100), decoder=decoder)
    assert over.exact is None and over.search_k == len(CAPTIONS)


def test_a_captioner_kept_across_an_ingest_captions_from_the_new_memory(captioning):
    from pipelines.base import CaptionRecord
    from ragcap.ingest import ingest

    store, embedder = captioning
    captioner = Captioner(store, "mem", embedder, CaptionSettings(modes=("clipre",)))
    query = "a zebra grazing in the snow"
    assert next(captioner.caption_texts([query])).caption != query
    ingest([CaptionRecord(caption=query, corpus="test")], store, "mem", embedder.info, lambda: embedder)
    assert next(captioner.caption_texts([query])).caption == query
