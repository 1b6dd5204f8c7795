"""How collections are laid out: shards, replicas and write consistency on a server; vectors on
disk and quantization (with rescoring) on both stores; what `collections` shows; refusals."""

from __future__ import annotations

import numpy as np
import pytest
from qdrant_client import QdrantClient, models
from typer.testing import CliRunner

from ragcap import api
from ragcap.cli import app
from ragcap.errors import OptionError
from ragcap.store import CollectionLayout, EmbedderInfo, open_store, point_id
from ragcap.store.client import ClientStore

INFO = EmbedderInfo("random-64", 64)
runner = CliRunner()


def unit_vectors(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def fill(store, name: str, n: int = 300) -> np.ndarray:
    vectors = unit_vectors(n)
    captions = [f"caption {i}" for i in range(n)]
    store.upsert(name, [point_id(name, c) for c in captions], vectors, [{"caption": c} for c in captions])
    return vectors


@pytest.mark.parametrize("quantization", ["int8", "binary", "none"])
def test_embedded_store_keeps_each_collections_quantization_and_finds_neighbours(tmp_path, quantization):
    with open_store(path=tmp_path) as store:
        store.create("q", INFO, layout=CollectionLayout(on_disk=True, quantization=quantization))
        store.create("default", INFO)
        vectors = fill(store, "q")
        store.optimize("q")
        hits = store.search("q", vectors[:20], 5)
        # rescored with the stored vectors: each vector's own point comes first at cosine ~1
        assert [h[0].payload["caption"] for h in hits] == [f"caption {i}" for i in range(20)]
        assert all(h[0].score == pytest.approx(1.0, abs=2e-3) for h in hits)
    with open_store(path=tmp_path) as store:  # read back from the files, not from memory
        listed = {c.name: c.layout for c in store.collections()}
    assert listed["q"] == CollectionLayout(on_disk=True, quantization=quantization)
    assert listed["default"] == CollectionLayout(on_disk=False, quantization="turbo4")


def test_embedded_store_refuses_cluster_layout_before_anything_is_made(tmp_path):
    with open_store(path=tmp_path) as store:
        for layout in (CollectionLayout(shards=2), CollectionLayout(replicas=2), CollectionLayout(write_consistency=1)):
            with pytest.raises(OptionError, match="--qdrant-url"):
                store.create("c", INFO, layout=layout)
        assert not store.exists("c") and store.collections() == []


def test_cli_shards_on_the_embedded_store_is_refused_and_nothing_written(tmp_path, ragcap_home, tiny_clip_dir):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red car\na blue cup\n")
    result = runner.invoke(app, ["ingest", "text", str(corpus), "-c", "c", "-m", str(tiny_clip_dir), "--shards", "3"])
    assert result.exit_code == 1
    assert "--shards" in result.output and "--qdrant-url" in result.output
    assert not (ragcap_home / "collections" / "c").exists()


def test_bad_layout_values_are_refused():
    with pytest.raises(OptionError, match="--replicas"):
        CollectionLayout(replicas=2, write_consistency=3).check()
    with pytest.raises(OptionError, match="--shards 0"):
        CollectionLayout(shards=0).check()
    with pytest.raises(OptionError, match="int8, binary"):
        CollectionLayout(quantization="pq").check()
    with pytest.raises(OptionError, match="turbo4 is the embedded store's"):
        ClientStore.in_memory().check_layout(CollectionLayout(quantization="turbo4"))


class RecordingClient(QdrantClient):
    """qdrant-client's local mode, recording the requests a server would get."""

    def __init__(self):
        super().__init__(location=":memory:")
        self.created: dict = {}
        self.queries: list = []

    def create_collection(self, collection_name, **kwargs):
        self.created = kwargs
        return super().create_collection(collection_name, **kwargs)

    def query_batch_points(self, collection_name, requests, **kwargs):
        self.queries.extend(requests)
        return super().query_batch_points(collection_name, requests, **kwargs)


@pytest.mark.filterwarnings("ignore:Local mode performs exact")
def test_server_collection_is_created_with_shards_replicas_consistency_and_quantized_codes_in_ram():
    client = RecordingClient()
    store = ClientStore(client, "http://qdrant:6333")  # the server code path, answered by local mode
    store.create("c", INFO, layout=CollectionLayout(shards=6, replicas=2, write_consistency=2, on_disk=True, quantization="int8"))
    sent = client.created
    assert (sent["shard_number"], sent["replication_factor"], sent["write_consistency_factor"]) == (6, 2, 2)
    assert sent["vectors_config"].on_disk is True
    assert sent["quantization_config"].scalar.type == models.ScalarType.INT8 and sent["quantization_config"].scalar.always_ram
    store._layouts["c"] = CollectionLayout(6, 2, 2, True, "int8")  # what a server reports (local mode keeps none of it)
    fill(store, "c", 20)
    store.search("c", unit_vectors(2, seed=1), 3)
    rescoring = client.queries[-1].params.quantization
    assert rescoring.rescore is True and rescoring.oversampling >= 1
    plain = RecordingClient()
    ClientStore(plain, "http://qdrant:6333").create("p", INFO)
    assert plain.created["quantization_config"] is None and plain.created["shard_number"] is None


def test_server_layout_is_read_from_its_collection_info():
    """The `collections` columns from a GET /collections/NAME answer of a 3-node cluster."""
    answer = models.CollectionInfo.model_validate({
        "status": "green", "optimizer_status": "ok", "segments_count": 6, "points_count": 10,
        "indexed_vectors_count": 10, "payload_schema": {},
        "config": {
            "params": {"vectors": {"size": 64, "distance": "Cosine", "on_disk": True}, "shard_number": 6,
                       "replication_factor": 2, "write_consistency_factor": 2, "on_disk_payload": True},
            "hnsw_config": {"m": 16, "ef_construct": 128, "full_scan_threshold": 10000},
            "optimizer_config": {"deleted_threshold": 0.2, "vacuum_min_vector_number": 1000, "default_segment_number": 0,
                                 "flush_interval_sec": 5},
            "quantization_config": {"binary": {"always_ram": True}},
        },
    })
    assert ClientStore._layout(answer) == CollectionLayout(6, 2, 2, True, "binary")


def test_layout_of_an_existing_collection_cannot_be_changed_by_a_later_ingest(tmp_path):
    with open_store(path=tmp_path) as store:
        store.create("c", INFO, layout=CollectionLayout(quantization="int8"))
        api.check_layout(store, "c", CollectionLayout(quantization="int8"))  # the same: fine
        api.check_layout(store, "c", CollectionLayout())  # nothing asked: fine
        with pytest.raises(OptionError, match="exists with on-disk False, quantization int8"):
            api.check_layout(store, "c", CollectionLayout(on_disk=True, quantization="binary"))


def test_collections_lists_the_layout(tmp_path, ragcap_home, tiny_clip_dir):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red car\na blue cup\n")
    ok = runner.invoke(app, ["ingest", "text", str(corpus), "-c", "c", "-m", str(tiny_clip_dir), "--on-disk", "--quantization", "binary"])
    assert ok.exit_code == 0, ok.output
    listed = runner.invoke(app, ["collections"])
    header, row = listed.stdout.splitlines()[:2]
    assert header.split() == ["name", "points", "embedder", "dim", "vectors", "on_disk", "quantization", "shards", "replicas",
                              "write_consistency", "status"]
    assert row.split()[5:] == ["True", "binary", "-", "-", "-", "ok"]
