"""`ragcap serve` over real HTTP: every endpoint, every error path, batching, limits, shutdown."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image

from ragcap.embed import load_embedder
from ragcap.store import open_store
from tests.serving import CAPTIONS, fill, metric, png, serve, tiny_captioner, wait_until

ENDPOINTS = {"/v1/caption", "/v1/caption/text", "/v1/search", "/v1/search/image", "/v1/collections", "/v1/info",
             "/v1/health", "/v1/ready", "/metrics"}


@pytest.fixture(scope="module")
def captioner(tiny_clip_dir, tmp_path_factory):
    with tiny_captioner(tiny_clip_dir, tmp_path_factory.mktemp("decoder")) as captioner:
        yield captioner


@pytest.fixture(scope="module")
def server(captioner):
    running = serve(captioner, max_upload_bytes=300_000, max_pixels=1_000_000, max_images=4)
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def expected(captioner, image: bytes, **settings) -> list:
    """What the API (and so the CLI) gives for the same bytes, one image at a time."""
    from dataclasses import replace

    run = captioner.with_settings(replace(captioner.settings, **settings))
    return [(r.mode, r.caption, rounded(r.neighbours)) for r in next(run.caption_each([image], ["x"]))]


def answered(result: dict) -> list:
    neighbours = None if result["neighbours"] is None else [(n["caption"], n["score"]) for n in result["neighbours"]]
    return [(c["mode"], c["caption"], rounded(neighbours)) for c in result["captions"]]


def rounded(neighbours):
    # Scores of an image encoded in a batch differ from those encoded alone in the 8th decimal.
    return None if neighbours is None else [(c, round(s, 5)) for c, s in neighbours]


def assert_error(response, status: int, type_: str, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and body["error"]["type"] == type_, body
    assert "Traceback" not in response.text
    for word in words:
        assert word in body["error"]["message"], body


def test_openapi_schema_lists_every_endpoint(client):
    schema = client.get("/openapi.json").json()
    assert ENDPOINTS - {"/metrics"} <= set(schema["paths"]) and "/metrics" in schema["paths"]
    assert "multipart/form-data" in schema["paths"]["/v1/caption"]["post"]["requestBody"]["content"]
    assert "/" not in schema["paths"]  # the page is not part of the API


def test_caption_one_image_equals_the_api_and_reports_timing(client, captioner):
    image = png(1)
    response = client.post("/v1/caption", files={"images": ("one.png", image, "image/png")}, data={"neighbours": "3"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["collection"] == "mem" and body["modes"] == ["pd", "clipre"]
    (result,) = body["results"]
    assert result["file"] == "one.png" and result["error"] is None
    assert answered(result) == expected(captioner, image, neighbours=3)
    scores = [n["score"] for n in result["neighbours"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    timing = body["timing"]
    assert timing["batch_items"] >= 1 and timing["total_ms"] >= timing["compute_ms"] > 0


def test_modes_and_k_per_request(client, captioner):
    image = png(2)
    response = client.post("/v1/caption", files={"images": ("a.png", image)}, data={"modes": "clipre,vd", "k": "5"})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert [c["mode"] for c in result["captions"]] == ["clipre", "vd"]
    assert answered(result) == expected(captioner, image, modes=("clipre", "vd"), k=5)
    assert result["captions"][0]["caption"] in CAPTIONS


def test_many_images_one_broken_gets_its_own_error(client, captioner):
    files = [("images", ("a.png", png(3))), ("images", ("broken.jpg", b"\xff\xd8\xff\xe0 not really")), ("images", ("b.png", png(4)))]
    response = client.post("/v1/caption", files=files)
    assert response.status_code == 200, response.text
    a, broken, b = response.json()["results"]
    assert [a["file"], broken["file"], b["file"]] == ["a.png", "broken.jpg", "b.png"]
    assert broken["captions"] == [] and broken["error"]["type"] == "invalid_image" and "broken.jpg" in broken["error"]["message"]
    assert answered(a) == expected(captioner, png(3)) and answered(b) == expected(captioner, png(4))


def test_one_broken_or_empty_image_is_422(client):
    assert_error(client.post("/v1/caption", files={"images": ("notes.png", b"just text")}), 422, "invalid_image", "notes.png", "not an image")
    assert_error(client.post("/v1/caption", files={"images": ("empty.png", b"")}), 422, "invalid_image", "empty")


def test_too_many_pixels_is_413_before_decoding(client):
    bomb = io.BytesIO()
    Image.new("1", (2000, 1000)).save(bomb, format="PNG")  # 2 MP, a few hundred bytes
    response = client.post("/v1/caption", files={"images": ("bomb.png", bomb.getvalue())})
    assert_error(response, 413, "image_too_large", "bomb.png", "2,000,000 pixels", "1,000,000")
    files = [("images", ("bomb.png", bomb.getvalue())), ("images", ("ok.png", png(5)))]
    bomb_result, ok = client.post("/v1/caption", files=files).json()["results"]
    assert bomb_result["error"]["type"] == "image_too_large" and ok["error"] is None


def test_body_over_the_upload_limit_is_413_announced_or_streamed(client):
    big = os.urandom(400_000)
    assert_error(client.post("/v1/caption", files={"images": ("big.jpg", big)}), 413, "request_too_large")

    def chunked():  # no Content-Length: the limit counts the bytes as they arrive
        boundary = b"--x\r\n"
        yield boundary + b'Content-Disposition: form-data; name="images"; filename="big.jpg"\r\n\r\n'
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]
        yield b"\r\n--x--\r\n"

    response = client.post("/v1/caption", content=chunked(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert_error(response, 413, "request_too_large")


def test_too_many_images_is_413(client):
    files = [("images", (f"{i}.png", png(i))) for i in range(5)]
    assert_error(client.post("/v1/caption", files=files), 413, "too_many_images", "at most 4")


def test_bad_options_are_422_with_the_field(client):
    image = {"images": ("a.png", png(6))}
    assert_error(client.post("/v1/caption", files=image, data={"modes": "pd,xyz"}), 422, "invalid_request", "xyz")
    assert_error(client.post("/v1/caption", files=image, data={"modes": "prompt"}), 422, "invalid_request", "prompt", "available")
    assert_error(client.post("/v1/caption", files=image, data={"k": "0"}), 422, "invalid_request", "k")
    assert_error(client.post("/v1/caption", files=image, data={"k": "1000"}), 422, "invalid_request", "larger than collection")
    assert_error(client.post("/v1/caption", files=image, data={"neighbours": "500"}), 422, "invalid_request", "neighbours")
    assert_error(client.post("/v1/caption", data={"modes": "pd"}), 422, "invalid_request", "images")


def test_a_path_in_a_request_is_never_opened(client, tmp_path):
    real = tmp_path / "real.png"
    Image.new("RGB", (32, 32), "red").save(real)
    # A form field that names a file on this machine is not an upload.
    assert_error(client.post("/v1/caption", data={"images": str(real)}), 422, "invalid_request", "images")
    # An upload named after that file is judged by its bytes, not by the name.
    assert_error(client.post("/v1/caption", files={"images": (str(real), b"not an image")}), 422, "invalid_image")
    # A text that is a path is a text.
    found = client.post("/v1/search", json={"text": str(real), "k": 2}).json()
    assert found["kind"] == "text" and found["query"] == str(real)


def test_caption_from_text(client):
    response = client.post("/v1/caption/text", json={"texts": [CAPTIONS[4], CAPTIONS[9]], "modes": ["clipre", "pd"], "neighbours": 2})
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert first["text"] == CAPTIONS[4] and [c["mode"] for c in first["captions"]] == ["clipre", "pd"]
    # A stored caption's nearest neighbour is itself.
    assert first["captions"][0]["caption"] == CAPTIONS[4] and second["captions"][0]["caption"] == CAPTIONS[9]
    assert first["neighbours"][0]["caption"] == CAPTIONS[4]
    assert_error(client.post("/v1/caption/text", json={"texts": []}), 422, "invalid_request", "texts")
    assert_error(client.post("/v1/caption/text", json={"texts": ["x" * 2001]}), 422, "invalid_request", "2001 characters")
    # Refused per request: in the batch it would fail the requests batched with it.
    assert_error(client.post("/v1/caption/text", json={"texts": ["a dog", " "]}), 422, "invalid_request", "text 1 is empty")
    assert_error(client.post("/v1/caption/text", content=b"{not json", headers={"content-type": "application/json"}),
                 422, "invalid_request", "JSON")


def test_search_by_text_and_by_image(client, captioner):
    found = client.post("/v1/search", json={"text": CAPTIONS[7], "k": 3}).json()
    assert found["kind"] == "text" and len(found["neighbours"]) == 3
    best = found["neighbours"][0]
    assert best["caption"] == CAPTIONS[7] and best["score"] == pytest.approx(1.0, abs=1e-3) and best["payload"]["corpus"] == "test"
    image = png(7)
    by_image = client.post("/v1/search/image", files={"image": ("q.png", image)}, data={"k": "4"}).json()
    assert by_image["kind"] == "image" and by_image["query"] == "q.png"
    direct = [(h.payload["caption"], h.score) for h in captioner.store.search("mem", captioner.embedder.encode_images(
        [Image.open(io.BytesIO(image)).convert("RGB")]), 4)[0]]
    assert [(n["caption"], pytest.approx(n["score"], abs=1e-5)) for n in by_image["neighbours"]] == direct
    assert_error(client.post("/v1/search/image", files={"image": ("bad.png", b"nope")}), 422, "invalid_image", "bad.png")
    assert_error(client.post("/v1/search", json={"text": "a", "k": 0}), 422, "invalid_request", "k")
    assert_error(client.post("/v1/search", json={"text": "  "}), 422, "invalid_request", "only spaces")


def test_collections_info_health_ready(client):
    (row,) = client.get("/v1/collections").json()["collections"]
    assert (row["name"], row["points"], row["dim"], row["served"]) == ("mem", len(CAPTIONS), 32, True)
    info = client.get("/v1/info").json()
    assert info["collection"] == "mem" and info["modes"] == ["pd", "clipre"]
    assert info["available_modes"] == ["pd", "nnd", "clipre", "vd"]  # a decoder, no LM
    assert info["limits"]["max_images"] == 4 and info["api_key_required"] is False
    assert client.get("/v1/health").json() == {"status": "ok", "pending": None, "max_queue": None}
    assert client.get("/v1/ready").json()["status"] == "ready"


def test_errors_are_json_for_unknown_routes_and_methods(client):
    assert_error(client.get("/v2/caption"), 404, "not_found")
    assert_error(client.get("/v1/caption"), 405, "method_not_allowed")


def test_metrics_count_requests_errors_latency_and_batches(client):
    before = client.get("/metrics").text
    client.post("/v1/caption", files={"images": ("a.png", png(8))})
    client.post("/v1/caption", files={"images": ("bad.png", b"nope")})
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text

    def grew(name, **labels):
        return metric(text, name, **labels) - metric(before, name, **labels)

    assert grew("ragcap_http_requests_total", route="/v1/caption", method="POST", status="200") == 1
    assert grew("ragcap_http_requests_total", route="/v1/caption", method="POST", status="422") == 1
    assert grew("ragcap_errors_total", type="invalid_image") == 1
    assert grew("ragcap_http_request_duration_seconds_count", route="/v1/caption") == 2
    assert grew("ragcap_batch_items_count", kind="images") == 2 and grew("ragcap_batch_items_sum", kind="images") == 2


def test_internal_errors_hide_the_details(captioner, monkeypatch):
    running = serve(captioner)
    try:
        def broken(*args):
            raise RuntimeError("secret detail in /srv/model")

        monkeypatch.setattr(running.service, "_run", broken)
        monkeypatch.setattr(running.service.batcher, "run", broken)
        response = httpx.post(f"{running.url}/v1/caption", files={"images": ("a.png", png(9))}, timeout=60)
        assert_error(response, 500, "internal_error", "server log")
        assert "secret" not in response.text
    finally:
        running.stop()


def test_api_key_guards_the_api_but_not_the_probes(captioner):
    running = serve(captioner, api_key="s3cret")
    try:
        with httpx.Client(base_url=running.url, timeout=60) as c:
            refused = c.get("/v1/info")
            assert_error(refused, 401, "unauthorized", "Bearer")
            assert refused.headers["www-authenticate"] == "Bearer"
            assert_error(c.get("/v1/info", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
            assert_error(c.get("/metrics"), 401, "unauthorized")
            assert c.get("/v1/info", headers={"Authorization": "Bearer s3cret"}).json()["api_key_required"] is True
            assert c.get("/v1/collections", headers={"X-API-Key": "s3cret"}).status_code == 200
            assert c.get("/v1/health").status_code == 200 and c.get("/v1/ready").status_code == 200
            assert c.get("/").status_code == 200  # the page itself holds no data
    finally:
        running.stop()


def test_no_cors_unless_an_origin_is_named(client, captioner):
    preflight = {"Origin": "http://elsewhere.test", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/v1/caption", headers=preflight).headers
    assert "access-control-allow-origin" not in client.get("/v1/health", headers={"Origin": "http://elsewhere.test"}).headers
    running = serve(captioner, cors_origins=("http://elsewhere.test",))
    try:
        answer = httpx.options(f"{running.url}/v1/caption", headers=preflight)
        assert answer.headers["access-control-allow-origin"] == "http://elsewhere.test"
        other = httpx.options(f"{running.url}/v1/caption", headers={**preflight, "Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        running.stop()


def post_in_thread(url: str, image: bytes, out: dict, key) -> threading.Thread:
    def post():
        out[key] = httpx.post(f"{url}/v1/caption", files={"images": (f"{key}.png", image)}, data={"neighbours": "2"}, timeout=120)

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def test_concurrent_requests_share_one_batch_and_each_gets_its_own_result(captioner):
    images = {i: png(100 + i) for i in range(6)}
    want = {i: expected(captioner, image, neighbours=2) for i, image in images.items()}
    # The batch waits (up to a minute) until all six are queued, so they are one batch by construction.
    running = serve(captioner, max_batch=6, max_wait_ms=60_000)
    try:
        out: dict = {}
        threads = [post_in_thread(running.url, image, out, i) for i, image in images.items()]
        for thread in threads:
            thread.join()
        for i in images:
            (result,) = out[i].json()["results"]
            assert result["file"] == f"{i}.png" and answered(result) == want[i]
            assert out[i].json()["timing"]["batch_items"] == 6
        page = httpx.get(f"{running.url}/metrics").text
        assert metric(page, "ragcap_batch_items_count", kind="images") == 1
        assert metric(page, "ragcap_batch_items_sum", kind="images") == 6
    finally:
        running.stop()


def blocked(running) -> threading.Event:
    """Occupy the model thread until the returned event is set."""
    gate = threading.Event()
    running.service.executor.submit(gate.wait)
    return gate


def test_full_queue_is_503_and_not_ready(captioner):
    running = serve(captioner, max_batch=1, max_wait_ms=0, max_queue=2, max_images=2, max_texts=2)
    gate = blocked(running)
    try:
        out: dict = {}
        threads = [post_in_thread(running.url, png(i), out, i) for i in range(2)]
        wait_until(lambda: running.service.batcher.pending == 2, "two queued requests")
        refused = httpx.post(f"{running.url}/v1/caption", files={"images": ("c.png", png(3))})
        assert_error(refused, 503, "overloaded", "retry")
        assert refused.headers["retry-after"] == "1"
        assert_error(httpx.get(f"{running.url}/v1/ready"), 503, "overloaded")
        gate.set()
        for thread in threads:
            thread.join()
        assert [out[i].status_code for i in range(2)] == [200, 200]
        assert httpx.get(f"{running.url}/v1/ready").status_code == 200
    finally:
        gate.set()
        running.stop()


def test_not_ready_while_the_served_collection_is_gone(tiny_clip_dir, tmp_path):
    # Issue row: /v1/ready said ready after the collection was dropped, and every caption failed.
    with tiny_captioner(tiny_clip_dir, tmp_path) as fresh:
        running = serve(fresh)
        try:
            assert httpx.get(f"{running.url}/v1/ready").status_code == 200
            fresh.store.drop("mem")  # as `ragcap drop` from another process does
            assert_error(httpx.get(f"{running.url}/v1/ready"), 503, "collection_unavailable", "'mem' no longer exists")
            fill(fresh.store, fresh.embedder)
            assert httpx.get(f"{running.url}/v1/ready").status_code == 200
        finally:
            running.stop()


def test_timeout_is_504_and_unstarted_work_is_dropped(captioner):
    running = serve(captioner, max_batch=1, max_wait_ms=0, timeout_s=0.5)
    gate = blocked(running)
    try:
        out: dict = {}
        threads = [post_in_thread(running.url, png(i), out, i) for i in range(2)]
        for thread in threads:
            thread.join()
        for i in range(2):
            assert_error(out[i], 504, "timeout", "within the server's timeout of 0.5 s", "retry later")
        assert_error(httpx.get(f"{running.url}/v1/collections"), 504, "timeout")  # the model thread is busy: no hanging
        # The first was taken into a batch (stuck behind the gate); the second never started.
        assert running.service.batcher.pending == 1
        gate.set()
        wait_until(lambda: running.service.batcher.pending == 0, "the started batch to finish")
        page = httpx.get(f"{running.url}/metrics").text
        assert metric(page, "ragcap_batch_items_count", kind="images") == 1
        assert httpx.post(f"{running.url}/v1/caption", files={"images": ("a.png", png(1))}).status_code == 200
    finally:
        gate.set()
        running.stop()


# ---------------------------------------------------------------------------- the command


def write_memory(tiny_clip_dir):
    from ragcap import api

    with open_store() as store:
        fill(store, load_embedder(str(tiny_clip_dir), image_only=False))
        assert api.search(store, "mem", [CAPTIONS[0]], k=1)[0].neighbours[0].payload["caption"] == CAPTIONS[0]


def start_cli(*args: str) -> tuple[subprocess.Popen, str]:
    """`ragcap serve` in a child process on a free port; returns it and its URL once it is ready."""
    child = subprocess.Popen([sys.executable, "-m", "ragcap.cli", "serve", "--port", "0", *args],
                             stderr=subprocess.PIPE, text=True, env=os.environ)
    seen = []
    while not (seen and "serving collection" in seen[-1]):
        seen.append(child.stderr.readline())
        assert seen[-1], "".join(seen)  # it exited before serving
    line = seen[-1]
    base = line.split(" on ", 1)[1].split("/ ", 1)[0]
    threading.Thread(target=child.stderr.read, daemon=True).start()  # keep the pipe drained
    wait_until(lambda: _ready(base), "the server to be ready")
    return child, base


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/v1/ready").status_code == 200
    except httpx.TransportError:
        return False


def test_sigterm_lets_requests_in_flight_finish_with_the_captions_of_cli_caption(tiny_clip_dir, tmp_path):
    write_memory(tiny_clip_dir)
    images = [tmp_path / f"{i}.png" for i in range(4)]
    for i, path in enumerate(images):
        path.write_bytes(png(i))
    cli = ragcap("caption", *images, "-c", "mem", "--mode", "clipre", "--neighbours", "2", "--json")
    want = {Path(line["file"]).name: line for line in map(json.loads, cli.stdout.splitlines())}
    # A batch would wait a minute for company, so the requests below are queued when SIGTERM comes;
    # shutdown starts their batch at once.
    child, base = start_cli("-c", "mem", "--mode", "clipre", "--model", str(tiny_clip_dir), "--max-batch", "64", "--max-wait-ms", "60000")
    assert base.startswith("http://127.0.0.1:")  # loopback unless asked
    try:
        out: dict = {}
        threads = [post_in_thread(base, path.read_bytes(), out, i) for i, path in enumerate(images)]
        wait_until(lambda: metric(httpx.get(f"{base}/metrics").text, "ragcap_queue_items") == 4, "four queued requests")
        child.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join()
        assert child.wait(120) == 0
        assert all(out[i].json()["timing"]["queue_ms"] < 60_000 for i in range(4))  # not the minute
        for i in range(4):
            assert out[i].status_code == 200
            (result,) = out[i].json()["results"]
            line = want[f"{i}.png"]
            assert result["captions"][0]["caption"] == line["caption"]
            assert [n["caption"] for n in result["neighbours"]] == [n["caption"] for n in line["neighbours"]]
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/v1/health")
    finally:
        child.kill()


def test_cli_refuses_a_busy_port_and_a_missing_collection_in_one_line(tiny_clip_dir):
    from ragcap.serve.server import bind

    write_memory(tiny_clip_dir)
    taken = bind("127.0.0.1", 0)
    port = str(taken.getsockname()[1])
    try:
        for args, words in ((["-c", "mem", "--mode", "clipre", "--port", port], ["cannot listen", port, "--port"]),
                            (["-c", "nope", "--mode", "clipre"], ["no collection 'nope'"])):
            result = ragcap("serve", *args, ok=False)
            assert result.exit_code == 1 and all(w in result.output for w in words), result.output
            assert "Traceback" not in result.output
    finally:
        taken.close()


def test_cli_refuses_a_busy_port_before_loading_the_models(tiny_clip_dir, monkeypatch):
    """Issue row: a busy port was refused only after the models had loaded (minutes with large ones)."""
    from ragcap import api
    from ragcap.serve.server import bind

    write_memory(tiny_clip_dir)
    loaded = []
    monkeypatch.setattr(api, "load_captioner", lambda *args, **kwargs: loaded.append(args) or pytest.fail("models loaded"))
    taken = bind("127.0.0.1", 0)
    try:
        result = ragcap("serve", "-c", "mem", "--mode", "clipre", "--port", taken.getsockname()[1], ok=False)
    finally:
        taken.close()
    assert result.exit_code == 1 and "cannot listen" in result.output and not loaded, result.output


def test_cli_refuses_impossible_limits_before_loading_anything():
    for args, words in ((["--max-batch", "0"], "--max-batch must be a positive number"), (["--max-wait-ms", "-1"], "--max-wait-ms must be >= 0"),
                        (["--port", "70000"], "--port must be in 0..65535"),
                        # Issue rows: each started, then timed out every request, crashed, or told
                        # a 5-image request to retry forever, or no client could send the key.
                        (["--timeout", "nan"], "--timeout must be a positive number, got nan"),
                        (["--max-upload-mb", "inf"], "--max-upload-mb must be a positive number, got inf"),
                        (["--max-queue", "4"], "--max-queue 4 is below --max-images 32, what one request may send; raise it to at least 32, or lower --max-images"),
                        (["--api-key", "KEY\r"], "the API key starts or ends with whitespace")):
        result = ragcap("serve", "-c", "nope", *args, ok=False)
        assert result.exit_code == 1 and words in result.output and "no collection" not in result.output, result.output
    # A queue below the 256 texts a request may send admits fewer texts per request; it used to be refused.
    result = ragcap("serve", "-c", "nope", "--max-queue", "100", "--port", "0", ok=False)
    assert "no collection" in result.output and "max" not in result.output, result.output


def ragcap(*args, ok: bool = True):
    from typer.testing import CliRunner

    from ragcap.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0 or not ok, result.output
    return result


def test_allowed_image_hosts_compare_without_case():
    """Issue row: --allow-image-host LocalHost refused http://localhost/... (URLs' hosts are read lower-cased)."""
    from ragcap.serve.config import ServeConfig

    assert ServeConfig(image_url_hosts=("LocalHost", " Example.ORG ")).image_url_hosts == ("localhost", "example.org")
