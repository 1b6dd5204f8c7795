"""The caption memory, run against both the embedded edge store and qdrant-client ":memory:"."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import DamagedCollection, EmbedderMismatch, RagcapWarning, StoreError
from ragcap.store import open_store, point_id
from ragcap.store.edge import RECORD, EdgeIndexConfig, EdgeStore

DIM = 32
CLIP = EmbedderInfo("ViT-B-32:openai", DIM)
REPO = Path(__file__).resolve().parents[1]


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill(store, name: str = "mem", n: int = 300, seed: int = 0, vector_dtype: str = "float32"):
    """float32 by default: these tests compare with exact arithmetic on the inserted vectors."""
    vectors = unit_vectors(n, seed)
    captions = [f"caption {i}" for i in range(n)]
    ids = [point_id(name, c) for c in captions]
    store.create(name, CLIP, vector_dtype)
    store.upsert(name, ids, vectors, [{"caption": c, "i": i} for i, c in enumerate(captions)])
    return ids, vectors


@pytest.fixture(params=["edge", "memory"])
def store(request, tmp_path):
    s = open_store(path=tmp_path / "home") if request.param == "edge" else open_store(memory=True)
    yield s
    s.close()


def indexed(store: EdgeStore, name: str = "mem") -> int:
    with store._use(name, "reading its info") as shard:
        return shard.info().indexed_vectors_count


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_point_id_is_deterministic_uuid_and_collection_dependent():
    a = point_id("coco", "a dog on a bench")
    assert a == point_id("coco", "a dog on a bench")
    assert uuid.UUID(a).version == 5
    assert a != point_id("flickr", "a dog on a bench")
    assert a != point_id("coco", "a dog on a bench.")


def test_open_store_defaults_to_edge_under_ragcap_home(ragcap_home):
    with open_store() as s:
        assert isinstance(s, EdgeStore)
        s.create("c", CLIP)
    assert (ragcap_home / "collections" / "c" / RECORD).is_file()


def test_create_records_embedder_and_lists_collection(store):
    store.create("coco", CLIP)
    assert store.exists("coco") and not store.exists("other")
    assert store.embedder("coco") == CLIP
    [info] = store.collections()
    assert (info.name, info.points, info.embedder) == ("coco", 0, CLIP)
    with pytest.raises(StoreError, match="already exists"):
        store.create("coco", CLIP)


def test_other_embedder_is_refused_naming_both(store):
    store.create("coco", CLIP)
    store.check_embedder("coco", EmbedderInfo("ViT-B-32:openai", DIM))
    with pytest.raises(EmbedderMismatch) as e:
        store.check_embedder("coco", EmbedderInfo("st:all-MiniLM-L6-v2", 384))
    assert "ViT-B-32:openai" in str(e.value) and "st:all-MiniLM-L6-v2" in str(e.value)


def test_missing_collection_message(store):
    for call in (lambda: store.embedder("nope"), lambda: store.count("nope"),
                 lambda: store.search("nope", unit_vectors(1), 3), lambda: store.drop("nope")):
        with pytest.raises(StoreError, match=r"no collection 'nope'; `ragcap collections` lists them"):
            call()


def test_bad_name_and_wrong_dim_are_store_errors(store):
    with pytest.raises(StoreError, match="bad collection name"):
        store.create("../escape", CLIP)
    store.create("c", CLIP)
    with pytest.raises(StoreError, match=r"shape \(n, 32\)"):
        store.upsert("c", ["x"], np.zeros((1, 8), np.float32), [{"caption": "x"}])


def test_upsert_twice_adds_nothing_and_overwrites_payload(store):
    ids, vectors = fill(store)
    assert store.count("mem") == 300
    store.upsert("mem", ids[:50], vectors[:50], [{"caption": "new"}] * 50)
    assert store.count("mem") == 300
    [[hit]] = store.search("mem", vectors[:1], 1)
    assert hit.id == ids[0] and hit.payload == {"caption": "new"}


def test_existing_tells_which_ids_are_stored(store):
    ids, _ = fill(store, n=40)
    absent = [point_id("mem", "never stored"), point_id("other", "caption 3")]
    assert store.existing("mem", ids[10:20] + absent) == set(ids[10:20])
    assert store.existing("mem", []) == set()


def test_search_matches_brute_force_order_and_scores(store):
    ids, vectors = fill(store)
    queries = unit_vectors(7, seed=1)
    exact = queries @ vectors.T
    results = store.search("mem", queries, k=10)
    store.optimize("mem")  # edge: the compressed index path must give the same answer
    for hits in (results, store.search("mem", queries, k=10)):
        assert len(hits) == 7
        for row, row_hits in zip(exact, hits):
            order = np.argsort(-row)[:10]
            assert [h.id for h in row_hits] == [ids[i] for i in order]
            np.testing.assert_allclose([h.score for h in row_hits], row[order], atol=1e-5)
            assert row_hits[0].payload["caption"] == f"caption {order[0]}"


@pytest.mark.parametrize("quantization", ["turbo4", "int8", "none"])
def test_edge_compressed_index_keeps_exact_top_k(tmp_path, quantization):
    # A 1 KB threshold makes optimize() compress even this small collection, so the
    # quantized scan + rescoring path is the one answering.
    config = EdgeIndexConfig(quantization=quantization, indexing_threshold_kb=1)
    with EdgeStore(tmp_path, config) as s:
        ids, vectors = fill(s, n=2000)
        s.optimize("mem")
        assert indexed(s) == 2000
        queries = unit_vectors(20, seed=4)
        exact = queries @ vectors.T
        for row, hits in zip(exact, s.search("mem", queries, k=10)):
            assert [h.id for h in hits] == [ids[i] for i in np.argsort(-row)[:10]]


def test_edge_search_builds_index_when_many_points_wait(tmp_path):
    config = EdgeIndexConfig(index_after=100, indexing_threshold_kb=1)
    with EdgeStore(tmp_path, config) as s:
        fill(s, n=500)
    with EdgeStore(tmp_path, config) as s:  # a fresh process that never saw the upserts
        assert indexed(s) == 0
        s.search("mem", unit_vectors(1), k=3)
        assert indexed(s) == 500


def test_batched_search_equals_single_queries(store):
    fill(store)
    queries = unit_vectors(5, seed=2)
    batched = store.search("mem", queries, k=4)
    single = [store.search("mem", q[None], k=4)[0] for q in queries]
    assert [[h.id for h in hs] for hs in batched] == [[h.id for h in hs] for hs in single]


def test_with_vectors_returns_stored_float32_vectors(store):
    ids, vectors = fill(store)
    stored = {i: v for batch_ids, batch_vectors, _ in store.scroll("mem") for i, v in zip(batch_ids, batch_vectors)}
    by_id = dict(zip(ids, vectors))
    for hits in store.search("mem", unit_vectors(3, seed=3), k=5, with_vectors=True):
        for h in hits:
            assert h.vector.dtype == np.float32 and h.vector.shape == (DIM,)
            # Within an ulp: qdrant-client's local mode renormalises on some paths but not others.
            np.testing.assert_allclose(h.vector, stored[h.id], rtol=0, atol=6e-8)
            np.testing.assert_allclose(h.vector, by_id[h.id], atol=1e-6)
    assert all(h.vector is None for h in store.search("mem", vectors[:1], k=2)[0])


def test_float16_collections_store_rounded_vectors_and_rank_by_them(store):
    def stored(name, ids):
        rows = {i: v for batch_ids, batch_vectors, _ in store.scroll(name) for i, v in zip(batch_ids, batch_vectors)}
        return np.stack([rows[i] for i in ids])

    ids, vectors = fill(store, "f16", vector_dtype="float16")
    half, full = stored("f16", ids), stored("f32", fill(store, "f32", vector_dtype="float32")[0])
    assert [(c.name, c.vector_dtype) for c in store.collections()] == [("f16", "float16"), ("f32", "float32")]
    np.testing.assert_allclose(full, vectors, rtol=0, atol=1e-7)
    assert np.abs(half - vectors).max() > 3e-5  # rounded, not kept
    # Qdrant stores float16 exactly; ":memory:" renormalises the rounded vector (relative ~2e-4).
    np.testing.assert_allclose(half, vectors.astype(np.float16).astype(np.float32), rtol=5e-4, atol=1e-6)
    queries = unit_vectors(5, seed=7)
    for row, hits in zip(queries @ half.T, store.search("f16", queries, k=10)):
        assert [h.id for h in hits] == [ids[i] for i in np.argsort(-row)[:10]]
        # Qdrant also scores with a float16 copy of the query
        np.testing.assert_allclose([h.score for h in hits], np.sort(row)[::-1][:10], atol=5e-4)


def test_unknown_vector_dtype_is_refused(store):
    with pytest.raises(StoreError, match="unknown vector dtype 'int4'; choose from float16, float32"):
        store.create("mem", CLIP, "int4")
    assert not store.exists("mem")


def test_scroll_yields_every_point_once(store):
    ids, vectors = fill(store)
    batches = list(store.scroll("mem", batch_size=64))
    assert len(batches) == 5
    seen = [i for batch_ids, _, _ in batches for i in batch_ids]
    assert sorted(seen) == sorted(ids)
    by_id = dict(zip(ids, range(len(ids))))
    for batch_ids, batch_vectors, payloads in batches:
        assert batch_vectors.dtype == np.float32
        for i, v, p in zip(batch_ids, batch_vectors, payloads):
            assert p["i"] == by_id[i]
            np.testing.assert_allclose(v, vectors[by_id[i]], atol=1e-6)
    ids_only = list(store.scroll("mem", batch_size=1000, with_vectors=False))
    assert ids_only[0][1].shape == (300, 0)


def test_drop_removes_collection(store):
    fill(store, n=10)
    store.drop("mem")
    assert not store.exists("mem") and store.collections() == []
    store.drop("mem", missing_ok=True)
    fill(store, n=5)
    assert store.count("mem") == 5


def test_edge_directory_without_record_is_refused_listed_and_droppable(tmp_path):
    root = tmp_path / "home"
    with open_store(path=root) as s:
        (root / "collections" / "half" / "shard").mkdir(parents=True)
        assert not s.exists("half")
        [info] = s.collections()
        assert (info.name, info.status) == ("half", "damaged") and "no record" in info.problem
        with pytest.raises(DamagedCollection, match="restore-record"):
            s.create("half", CLIP)
        assert (root / "collections" / "half" / "shard").is_dir()  # refused, not deleted
        s.drop("half")
        assert not (root / "collections" / "half").exists()
        s.create("half", CLIP)
        assert s.embedder("half") == CLIP


def test_edge_vector_dtype_survives_reopen_and_older_collections_are_float32(tmp_path):
    with EdgeStore(tmp_path) as s:
        fill(s, "half", n=5, vector_dtype="float16")
        fill(s, "old", n=5)
    sidecar = tmp_path / "collections" / "old" / RECORD  # as written before float16 storage
    record = json.loads(sidecar.read_text())
    del record["vector_dtype"]
    sidecar.write_text(json.dumps(record))
    with EdgeStore(tmp_path) as s:
        assert {c.name: c.vector_dtype for c in s.collections()} == {"half": "float16", "old": "float32"}


def test_edge_persists_across_reopen_and_processes(tmp_path):
    root = tmp_path / "home"
    with open_store(path=root) as s:
        ids, vectors = fill(s, n=200)
        s.optimize("mem")
        expected = [h.id for h in s.search("mem", vectors[:1], 5)[0]]
    with open_store(path=root) as s:
        assert s.count("mem") == 200 and s.embedder("mem") == CLIP
        assert [h.id for h in s.search("mem", vectors[:1], 5)[0]] == expected
    code = (
        "import json, sys, numpy as np\n"
        "from ragcap.store import open_store\n"
        f"s = open_store(path={str(root)!r})\n"
        "q = np.array(json.loads(sys.stdin.read()), dtype=np.float32)\n"
        "print(json.dumps([s.count('mem'), [h.id for h in s.search('mem', q, 5)[0]]]))\n"
        "s.close()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(vectors[:1].tolist()),
        capture_output=True, text=True, cwd=REPO, check=True,
    )
    assert json.loads(out.stdout) == [200, expected]


def test_edge_collection_is_handed_to_another_process_between_operations(tmp_path):
    """Qdrant Edge lets one process open a collection; an idle holder hands it over to a
    process that waits, and takes it back for its own next operation."""
    root = tmp_path / "home"
    with open_store(path=root) as s:
        fill(s, n=3)
        assert s.count("mem") == 3  # holds it open
        code = (
            "from ragcap.store import open_store\n"
            f"s = open_store(path={str(root)!r}, wait=30)\n"
            "print(s.count('mem'))\n"
            "s.close()\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
        assert out.stdout.strip() == "3"
        assert s.count("mem") == 3  # reopened after the handover


def test_edge_busy_collection_error_names_the_holder_after_wait(tmp_path):
    root = tmp_path / "home"
    with open_store(path=root) as s:
        fill(s, n=3)
        with s._use("mem", "holding it"):  # an operation in progress is never interrupted
            code = (
                "from ragcap.errors import CollectionBusy\n"
                "from ragcap.store import open_store\n"
                f"s = open_store(path={str(root)!r}, wait=0.3)\n"
                "try:\n    s.count('mem')\nexcept CollectionBusy as e:\n    print(e)\n"
            )
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert f"in use by pid {os.getpid()}" in out.stdout and "--wait" in out.stdout


@pytest.mark.parametrize("written,shown", [("http://127.0.0.1:{port}", "http://127.0.0.1:{port}"),
                                           ("127.0.0.1:{port}", "http://127.0.0.1:{port}")])
def test_unreachable_url_names_it(written, shown):
    port = closed_port()
    with pytest.raises(StoreError) as e:
        open_store(url=written.format(port=port))
    assert shown.format(port=port) in str(e.value) and "cannot reach Qdrant" in str(e.value)


@contextlib.contextmanager
def http_server(status: int, body: bytes, content_type: str = "application/json"):
    """A server that answers every request alike: what a wrong port or a refused key looks like."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "status,body,content_type,said",
    [
        (401, b"Must provide an API key or an Authorization bearer token", "text/plain", "refused the API key (HTTP 401 Unauthorized: Must provide"),
        (403, b'{"status": {"error": "Forbidden"}, "time": 0}', "application/json", "refused the API key (HTTP 403"),
        (404, b"<html>not found</html>", "text/html", "is not a Qdrant server's REST API (GET /collections: HTTP 404"),
        (200, b"<html>hello</html>", "text/html", "is not a Qdrant server's REST API"),
        (500, b'{"status": {"error": "boom"}, "time": 0}', "application/json", "failed to list collections (HTTP 500 Internal Server Error: boom)"),
    ],
)
def test_a_url_that_answers_but_cannot_be_used_says_why(status, body, content_type, said):
    with http_server(status, body, content_type) as url, pytest.raises(StoreError) as e:
        open_store(url=url, api_key="key")
    message = str(e.value)
    assert url in message and said in message and "\n" not in message and "cannot reach" not in message


def test_an_api_key_with_a_line_break_is_named_not_unreachable():
    with http_server(200, b"{}") as url, pytest.raises(StoreError, match="API key has surrounding whitespace"):
        open_store(url=url, api_key="secret\n")


def test_an_api_key_over_plain_http_is_one_warning_line(monkeypatch):
    # Issue row: qdrant-client's two-line "insecure connection" warning came twice per command.
    import warnings

    from typer.testing import CliRunner

    import ragcap.store.client as client
    from ragcap.cli import app

    listing = b'{"result": {"collections": []}, "status": "ok", "time": 0}'
    with http_server(200, listing) as url:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            open_store(url=url, api_key="key").close()  # a loopback server: the key never crosses a network
        assert [str(w.message) for w in seen] == []
        monkeypatch.setattr(client, "LOOPBACK_HOSTS", ())  # as if the server were another machine
        result = CliRunner().invoke(app, ["collections", "--qdrant-url", url, "--qdrant-api-key", "key"])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if "warning" in line.lower()]
    assert warned == [f"ragcap: warning: the Qdrant API key goes to {url} unencrypted; use https:// unless the network "
                      "is private (as in docker/compose.yaml)"]


def test_a_server_error_is_one_line():
    from qdrant_client.http.exceptions import UnexpectedResponse

    from ragcap.cli.common import describe_error

    err = UnexpectedResponse(400, "Bad Request", b'{"status": {"error": "Wrong input: Vector dimension error"}}', None)
    assert describe_error(err) == "the Qdrant server failed: HTTP 400 Bad Request: Wrong input: Vector dimension error"


def test_url_and_api_key_come_from_env(monkeypatch, tmp_path):
    import ragcap.store.client as client

    seen = []

    class FakeClient:
        def __init__(self, **kwargs):
            seen.append(kwargs)

        def get_collections(self):
            return None

        def close(self):
            pass

    monkeypatch.setattr(client, "QdrantClient", FakeClient)
    monkeypatch.setenv("RAGCAP_QDRANT_URL", "https://qdrant.example:6333")
    monkeypatch.setenv("RAGCAP_QDRANT_API_KEY", "secret")
    s = open_store()
    assert isinstance(s, client.ClientStore) and s.where == "https://qdrant.example:6333"
    assert all(k["url"] == "https://qdrant.example:6333" and k["api_key"] == "secret" for k in seen)
    with pytest.warns(RagcapWarning, match="API key goes to http://other:6333 unencrypted"):  # https above: none
        open_store(url="http://other:6333", api_key="k2")
    assert seen[-1]["url"] == "http://other:6333" and seen[-1]["api_key"] == "k2"
    # An explicit path means the embedded store even when a server is configured.
    with open_store(path=tmp_path) as edge:
        assert isinstance(edge, EdgeStore)


def test_check_passes_a_sound_collection_and_finds_a_bad_point(store):
    from ragcap.api import check_collection

    ids, vectors = fill(store, n=50)
    report = store.check("mem")
    assert report.ok and report.points == 50 and report.damaged_ids == []
    stray = point_id("mem", "caption 0 with another text")  # an id that is not its caption's
    store.upsert("mem", [stray], vectors[:1], [{"no caption": True}])
    report = store.check("mem")
    assert report.damaged_ids == [stray] and "has no caption" in report.problems[0] and report.repairable
    repaired, deleted = check_collection(store, "mem", repair=True)
    assert deleted == 1 and repaired.ok and store.count("mem") == 50


def test_search_refuses_a_point_whose_payload_lost_its_caption(store):
    """A truncated payload tracker reads back payloads as {}: `ragcap search` and `caption` then
    ended in "unexpected KeyError: 'caption' (a bug in ragcap)" instead of pointing to check."""
    ids, vectors = fill(store, n=20)
    store.upsert("mem", ids[:1], vectors[:1], [{}])
    with pytest.raises(DamagedCollection, match=f"point {ids[0]} without its caption.*ragcap check mem"):
        store.search("mem", vectors[:1], k=3)
    with pytest.raises(DamagedCollection, match=f"point {ids[0]} without its caption"):
        store.payloads("mem", ids[:2])


def test_search_refuses_similarities_outside_the_unit_interval(store, monkeypatch):
    from ragcap.store import Hit

    fill(store, n=20)
    monkeypatch.setattr(type(store), "_search", lambda self, *a, **k: [[Hit("x", 15.6, {"caption": "?"})]])
    with pytest.raises(DamagedCollection, match=r"15.6 .*outside \[-1, 1\].*ragcap check mem"):
        store.search("mem", unit_vectors(1), k=1)


def test_a_read_only_store_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    """A read-only RAGCAP_HOME made search, check, export and drop fail with the bare
    'Read-only file system: .../collections/.NAME.lock'."""
    import errno
    import os

    from ragcap.errors import RagcapError

    store = open_store(path=tmp_path / "home")
    fill(store, n=5)
    store.close()
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    store = open_store(path=tmp_path / "home")
    with pytest.raises(RagcapError, match=r"cannot use collection 'mem': .*collections is not writable \(Read-only file system\).*RAGCAP_HOME"):
        store.count("mem")
