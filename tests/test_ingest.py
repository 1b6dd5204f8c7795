"""The ingestion runner: counts, de-duplication, resume, exclusion, shards, refusal of a foreign embedder."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pipelines.base import BadRecord, CaptionRecord
from ragcap.embed import load_embedder
from ragcap.errors import EmbedderMismatch, ModelError, SourceError, StoreError
from ragcap.ingest import IngestOptions, ingest
from ragcap.store import open_store, point_id

CAPTIONS = [f"a photo of object number {i} on a table" for i in range(60)]


def records(captions, image_ids=None):
    for i, caption in enumerate(captions):
        image_id = image_ids[i] if image_ids else str(i // 5)
        yield CaptionRecord(caption=caption, corpus="test", image_id=image_id, location=f"mem:{i + 1}")


@pytest.fixture
def store():
    s = open_store(memory=True)
    yield s
    s.close()


@pytest.fixture(scope="module")
def embedder(tiny_clip_dir):
    return load_embedder(str(tiny_clip_dir))


def run(store, embedder, items, collection="c", **options):
    return ingest(items, store, collection, embedder.info, lambda: embedder, IngestOptions(batch_size=16, **options))


def test_progress_accounts_for_every_source_record(store, embedder):
    ticks = []
    noisy = CAPTIONS + CAPTIONS[:10]
    ingest(records(noisy), store, "c", embedder.info, lambda: embedder, IngestOptions(batch_size=16), ticks.append)
    assert all(t >= 0 for t in ticks) and sum(ticks) == 70


def test_stores_each_normalised_caption_once_and_rerun_adds_nothing(store, embedder):
    noisy = CAPTIONS + ["  a photo of object number 3\ton a   table "] + CAPTIONS[:10]
    first = run(store, embedder, records(noisy))
    assert (first.read, first.stored, first.duplicates) == (71, 60, 11)
    assert store.count("c") == 60
    again = run(store, embedder, records(noisy))
    assert (again.stored, again.already_stored) == (0, 60)
    assert store.count("c") == 60


def test_vectors_equal_the_embedders_and_payload_keeps_metadata(store, embedder):
    run(store, embedder, records(CAPTIONS[:5]))
    hits = store.search("c", embedder.encode_text([CAPTIONS[2]]).vectors, 1, with_vectors=True)[0]
    assert hits[0].payload == {"caption": CAPTIONS[2], "corpus": "test", "image_id": "0"}
    expected = embedder.encode_text([CAPTIONS[2]]).vectors[0].astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(hits[0].vector, expected, rtol=5e-4, atol=1e-6)  # float16 by default; ":memory:" renormalises
    assert hits[0].id == point_id("c", CAPTIONS[2])


def test_interrupted_ingest_resumes_without_reembedding(store, embedder):
    def dies_after(n):
        for i, rec in enumerate(records(CAPTIONS)):
            if i == n:
                raise KeyboardInterrupt
            yield rec

    with pytest.raises(KeyboardInterrupt):
        run(store, embedder, dies_after(40))
    stored_before = store.count("c")
    assert 0 < stored_before < 60

    calls = []

    class Counting:
        info = embedder.info

        def encode_text(self, texts, batch_size=256, on_batch=None):
            calls.extend(texts)
            return embedder.encode_text(texts, on_batch=on_batch)

    summary = ingest(records(CAPTIONS), store, "c", embedder.info, lambda: Counting(), IngestOptions(batch_size=16))
    assert summary.already_stored == stored_before
    assert len(calls) == summary.stored == 60 - stored_before
    assert store.count("c") == 60


def test_an_embedder_that_gives_nan_stops_the_run_before_anything_is_created(store, embedder):
    class Overflowing:
        info = embedder.info

        def encode_text(self, texts, batch_size=256, on_batch=None):
            encoded = embedder.encode_text(texts, on_batch=on_batch)
            encoded.vectors[3] = np.nan
            return encoded

    with pytest.raises(ModelError, match=r"mem:4: the embedder gave NaN or infinity for 1 caption\(s\)"):
        ingest(records(CAPTIONS), store, "c", embedder.info, lambda: Overflowing(), IngestOptions(batch_size=16))
    assert not store.exists("c")


def test_excluded_images_stay_out(store, embedder):
    summary = run(store, embedder, records(CAPTIONS), exclude_images=frozenset({"0", "3"}))
    assert summary.excluded == 10
    assert store.count("c") == 50
    stored_ids = {p["image_id"] for _, _, payloads in store.scroll("c") for p in payloads}
    assert stored_ids.isdisjoint({"0", "3"})


def test_shards_are_disjoint_and_complete(store, embedder):
    stored = [run(store, embedder, records(CAPTIONS), shard=(i, 3)).stored for i in (1, 2, 3)]
    assert all(n > 0 for n in stored)
    assert sum(stored) == store.count("c") == 60


def test_limit_counts_source_records(store, embedder):
    summary = run(store, embedder, records(CAPTIONS), limit=7)
    assert summary.read == 7 and store.count("c") == 7


def test_bad_records_are_counted(store, embedder):
    items = [*records(CAPTIONS[:3]), BadRecord("f.jsonl:4", "not JSON"), *records(CAPTIONS[3:5])]
    summary = run(store, embedder, iter(items))
    assert (summary.skipped_bad, summary.stored, summary.bad) == (1, 5, ["f.jsonl:4: not JSON"])


def test_empty_corpus_is_an_error_and_leaves_no_collection(store, embedder):
    with pytest.raises(SourceError, match="no collection was created"):
        run(store, embedder, iter([]))
    assert not store.exists("c")
    with pytest.raises(SourceError, match="filtered out"):
        run(store, embedder, records(CAPTIONS[:5]), exclude_images=frozenset({"0"}))
    assert not store.exists("c")


def test_collection_of_another_embedder_is_refused(store, embedder, tmp_path):
    from tests.helpers import make_tiny_clip

    run(store, embedder, records(CAPTIONS[:5]))
    other = load_embedder(str(make_tiny_clip(tmp_path / "other", seed=1)))
    with pytest.raises(EmbedderMismatch) as err:
        ingest(records(CAPTIONS), store, "c", other.info, lambda: other, IngestOptions())
    assert embedder.info.spec in str(err.value) and other.info.spec in str(err.value)
    assert store.count("c") == 5


def test_precomputed_vectors_are_stored_without_an_embedder(store, embedder):
    vectors = embedder.encode_text(CAPTIONS[:4]).vectors
    items = [CaptionRecord(caption=c, corpus="test", vector=v.tolist()) for c, v in zip(CAPTIONS, vectors)]

    def no_model():
        raise AssertionError("the embedder must not be loaded")

    summary = ingest(iter(items), store, "c", embedder.info, no_model, IngestOptions())
    assert summary.stored == 4
    _, stored, payloads = next(store.scroll("c"))
    by_caption = {p["caption"]: v for p, v in zip(payloads, stored)}
    expected = vectors[1].astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(by_caption[CAPTIONS[1]], expected, rtol=5e-4, atol=1e-6)  # float16; ":memory:" renormalises


def test_a_worker_joins_a_collection_another_worker_created_meanwhile(store, embedder):
    """Parallel --shard workers race to create the collection; the loser joins it."""

    class Racing:
        """A store where someone else creates the collection just before we do."""

        def __getattr__(self, name):
            return getattr(store, name)

        def create(self, name, info, vector_dtype, layout=None):
            store.create(name, info, vector_dtype, layout)
            raise StoreError(f"collection '{name}' already exists")

    summary = ingest(records(CAPTIONS[:8]), Racing(), "c", embedder.info, lambda: embedder, IngestOptions())
    assert summary.stored == 8 and store.count("c") == 8


class OneAtATime:
    """A store that fails a test if two threads use it at once, and notes who wrote."""

    def __init__(self, store, fail_upsert: int | None = None):
        self.store, self.fail_upsert = store, fail_upsert
        self.busy, self.upsert_threads = threading.Lock(), []

    def __getattr__(self, name):
        method = getattr(self.store, name)

        def guarded(*args, **kwargs):
            assert self.busy.acquire(blocking=False), f"{name} called while the store was in use"
            try:
                if name == "upsert":
                    self.upsert_threads.append(threading.current_thread())
                    if len(self.upsert_threads) == self.fail_upsert:
                        raise StoreError("disk full")
                return method(*args, **kwargs)
            finally:
                self.busy.release()

        return guarded


def test_batches_are_written_in_the_background_never_alongside_another_store_call(store, embedder):
    guarded = OneAtATime(store)
    summary = run(guarded, embedder, records(CAPTIONS))
    assert summary.stored == store.count("c") == 60
    assert len(guarded.upsert_threads) == 4 and threading.main_thread() not in guarded.upsert_threads
    again = run(guarded, embedder, records(CAPTIONS + ["one more caption"]))  # existing() between the writes
    assert (again.already_stored, again.stored) == (60, 1)


def test_a_failed_background_write_stops_the_ingest_with_its_error(store, embedder):
    with pytest.raises(StoreError, match="disk full"):
        run(OneAtATime(store, fail_upsert=2), embedder, records(CAPTIONS))
    assert store.count("c") == 16  # the first batch; the rerun resumes from there
    assert run(store, embedder, records(CAPTIONS)).already_stored == 16
