"""`ragcap serve`'s OpenAI-style chat endpoint, driven by the real `openai` client and by
huggingface_hub's InferenceClient; and several captions per input on the service's own endpoints."""

from __future__ import annotations

import base64
import concurrent.futures
import http.server
import socket
import threading
import time
from dataclasses import replace

import httpx
import openai
import pytest

from ragcap.generation import SearchOptions
from tests.serving import png, serve, tiny_captioner

KEY = "s3cret"


@pytest.fixture(scope="module")
def captioner(tiny_clip_dir, tmp_path_factory):
    with tiny_captioner(tiny_clip_dir, tmp_path_factory.mktemp("decoder")) as captioner:
        yield captioner


@pytest.fixture(scope="module")
def image_host():
    """A plain HTTP server on 127.0.0.1 with one PNG at /photo.png (an allowed image host)."""
    photo = png(7)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow.png":  # a byte every 0.3 s: each read is quick, the whole is not
                self.send_response(200)
                self.send_header("Content-Length", str(len(photo)))
                self.end_headers()
                try:
                    for byte in photo[:40]:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.3)
                except OSError:  # the server gave up and closed the connection
                    pass
                return
            found = self.path == "/photo.png"
            self.send_response(200 if found else 404)
            self.send_header("Content-Length", str(len(photo) if found else 0))
            self.end_headers()
            if found:
                self.wfile.write(photo)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", photo
    server.shutdown()


@pytest.fixture(scope="module")
def server(captioner):
    running = serve(captioner, api_key=KEY, image_url_hosts=("127.0.0.1",), max_captions=4)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def ask(url: str, text: str = "What is in this image?") -> list[dict]:
    return [{"role": "system", "content": "You caption images."},
            {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


def expected(captioner, image: bytes, mode: str, n: int = 1, **search) -> list[str]:
    """What the Python API gives for the same bytes and options."""
    options = replace(captioner.settings.search, num_return=n, **search)
    run = captioner.with_settings(replace(captioner.settings, modes=(mode,), search=options))
    (result,) = next(run.caption_each([image], ["x"]))
    return [text for text, _ in result.alternatives] if n > 1 else [result.caption]


@pytest.mark.parametrize("mode", ["pd", "clipre"])
def test_openai_client_gets_the_caption_of_the_api(client, captioner, mode):
    image = png(1)
    answer = client.chat.completions.create(model=mode, messages=ask(data_url(image)))
    assert answer.object == "chat.completion" and answer.model == mode and answer.id.startswith("chatcmpl-")
    assert [c.message.content for c in answer.choices] == expected(captioner, image, mode)
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].finish_reason == "stop"


def test_n_gives_n_choices_as_num_captions_does(client, captioner):
    image = png(2)
    for mode in ("pd", "clipre"):
        answer = client.chat.completions.create(model=mode, messages=ask(data_url(image)), n=3)
        captions = [c.message.content for c in answer.choices]
        assert [c.index for c in answer.choices] == [0, 1, 2] and captions == expected(captioner, image, mode, 3)
        assert len(set(captions)) == 3  # three beams / three nearest captions, not one repeated


def test_sampling_with_a_seed_repeats_and_bare_base64_is_read(client, captioner):
    image = png(3)
    bare = base64.b64encode(image).decode()
    first, again = (client.chat.completions.create(model="pd", messages=ask(url), n=2, temperature=1.5, seed=11)
                    for url in (data_url(image), bare))
    captions = [c.message.content for c in first.choices]
    assert captions == [c.message.content for c in again.choices]
    assert captions == expected(captioner, image, "pd", 2, sample=True, temperature=1.5, seed=11, beam=None)
    short = client.chat.completions.create(model="pd", messages=ask(data_url(image)), max_tokens=2)
    assert short.choices[0].message.content == expected(captioner, image, "pd", max_tokens=2)[0]


def test_a_seed_repeats_even_when_other_requests_arrive_with_it(captioner):
    # Issue row: concurrent requests share a batch and its one generator, so the second request's
    # draws depended on the first; a seeded request now runs alone.
    image = png(3)
    wanted = expected(captioner, image, "pd", 2, sample=True, temperature=1.5, seed=11, beam=None)
    running = serve(captioner, max_wait_ms=2000, max_captions=4)
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="-", max_retries=0, timeout=60)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: client.chat.completions.create(
                model="pd", messages=ask(data_url(image)), n=2, temperature=1.5, seed=11), range(2)))
    finally:
        running.stop()
    assert [[c.message.content for c in answer.choices] for answer in answers] == [wanted, wanted]


def test_streaming_delivers_the_same_captions(client):
    image = png(4)
    whole = client.chat.completions.create(model="pd", messages=ask(data_url(image)), n=2)
    streamed, finished = {}, set()
    for chunk in client.chat.completions.create(model="pd", messages=ask(data_url(image)), n=2, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason == "stop":
                finished.add(choice.index)
    assert streamed == {c.index: c.message.content for c in whole.choices} and finished == {0, 1}


def test_models_lists_the_modes_the_server_runs(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"pd", "nnd", "clipre", "vd"}  # prompt: no LM loaded
    assert models["pd"].owned_by == "ragcap" and models["pd"].model_extra["decoder"] == "decap"
    assert models["clipre"].model_extra["decoder"] is None


def test_huggingface_inference_client_talks_to_it(server, captioner, monkeypatch):
    from huggingface_hub import InferenceClient, constants

    # The tests run with HF_HUB_OFFLINE=1, which blocks every request the client makes, even to
    # this loopback server; no hub is contacted here.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    image = png(5)
    answer = InferenceClient(base_url=f"{server.url}/v1", api_key=KEY).chat_completion(messages=ask(data_url(image)), model="pd")
    assert answer.choices[0].message.content == expected(captioner, image, "pd")[0]


def test_allowed_image_host_is_fetched_others_are_refused(client, captioner, image_host):
    base, photo = image_host
    fetched = client.chat.completions.create(model="pd", messages=ask(f"{base}/photo.png"))
    assert fetched.choices[0].message.content == expected(captioner, photo, "pd")[0]
    with pytest.raises(openai.UnprocessableEntityError, match="does not fetch images from 'localhost'.*data: URL"):
        client.chat.completions.create(model="pd", messages=ask(base.replace("127.0.0.1", "localhost") + "/photo.png"))
    with pytest.raises(openai.UnprocessableEntityError, match="answered HTTP 404"):
        client.chat.completions.create(model="pd", messages=ask(f"{base}/missing.png"))
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(openai.UnprocessableEntityError, match=r"messages\[1\].content\[1\].image_url: .* could not be fetched"):
        client.chat.completions.create(model="pd", messages=ask(f"http://127.0.0.1:{port}/photo.png"))


def test_an_image_host_that_drips_is_cut_off_at_the_fetch_timeout(captioner, image_host):
    # Issue row: httpx's timeout bounds each read, so a byte every 0.3 s held the request for as
    # long as the host liked (12 s here, or for ever), then failed on the truncated image, and a shutdown waited for it.
    base, _ = image_host
    running = serve(captioner, image_url_hosts=("127.0.0.1",), image_url_timeout_s=1)
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="-", max_retries=0, timeout=60)
        with pytest.raises(openai.UnprocessableEntityError, match="slow.png did not send the image within 1 s"):
            client.chat.completions.create(model="pd", messages=ask(f"{base}/slow.png"))
    finally:
        running.stop()


def test_bad_requests_get_clear_errors_and_the_server_keeps_answering(client, server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).chat.completions.create(model="pd", messages=ask(data_url(png(1))))
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' is not served here; available: pd, nnd, clipre, vd"):
        client.chat.completions.create(model="gpt-4o", messages=ask(data_url(png(1))))
    with pytest.raises(openai.UnprocessableEntityError, match=r"messages\[0\]: the last user message has 0 image_url parts"):
        client.chat.completions.create(model="pd", messages=[{"role": "user", "content": "caption my photo"}])
    with pytest.raises(openai.UnprocessableEntityError, match="neither an http\\(s\\) URL nor valid base64"):
        client.chat.completions.create(model="pd", messages=ask("not an image at all"))
    with pytest.raises(openai.UnprocessableEntityError, match="image_url: not an image|image_url: corrupt or truncated"):
        client.chat.completions.create(model="pd", messages=ask(data_url(b"GIF89a broken")))
    with pytest.raises(openai.UnprocessableEntityError, match="number of captions must be in 1..4, got 9"):
        client.chat.completions.create(model="pd", messages=ask(data_url(png(1))), n=9)
    # Issue rows: each drew NaN probabilities or overflowed torch's seed, and answered 500.
    with pytest.raises(openai.UnprocessableEntityError, match="temperature must be a finite number of at least 1e-6, got 1e-300"):
        client.chat.completions.create(model="pd", messages=ask(data_url(png(1))), temperature=1e-300)
    for seed in (2**64, -1):
        with pytest.raises(openai.UnprocessableEntityError, match="seed"):
            client.chat.completions.create(model="pd", messages=ask(data_url(png(1))), temperature=0.8, seed=seed)
    assert client.chat.completions.create(model="clipre", messages=ask(data_url(png(1)))).choices[0].message.content


def test_num_captions_on_the_services_own_endpoints(server, captioner):
    image = png(6)
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, timeout=60, headers=headers) as c:
        answer = c.post("/v1/caption", files={"images": ("a.png", image)}, data={"modes": "pd", "num_captions": "3"}).json()
        captions = answer["results"][0]["captions"][0]
        assert [a["caption"] for a in captions["alternatives"]] == expected(captioner, image, "pd", 3)
        assert captions["caption"] == captions["alternatives"][0]["caption"]
        text = c.post("/v1/caption/text", json={"texts": ["a dog on the grass"], "modes": ["clipre"], "num_captions": 2}).json()
        assert len(text["results"][0]["captions"][0]["alternatives"]) == 2
        refused = c.post("/v1/caption/text", json={"texts": ["a dog"], "num_captions": 5})
        assert refused.status_code == 422 and "1..4" in refused.json()["error"]["message"]


def test_num_captions_in_the_python_api(captioner):
    settings = replace(captioner.settings, modes=("pd",), search=SearchOptions(num_return=2))
    (result,) = list(captioner.with_settings(settings).caption_texts(["a horse"]))
    assert len(result.alternatives) == 2 and result.caption == result.alternatives[0][0]


def test_info_says_where_the_models_run(server):
    info = httpx.get(f"{server.url}/v1/info", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()
    assert (info["device"], info["precision"]) == ("cpu", "float32")
