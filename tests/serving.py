"""Test helpers for `ragcap serve`: a small caption memory, a running server, images as bytes."""

from __future__ import annotations

import io
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pipelines.base import CaptionRecord
from ragcap.caption import CaptionSettings
from ragcap.decoders import DeCapConfig, DeCapDecoder
from ragcap.ingest import IngestOptions, ingest
from ragcap.serve import ServeConfig, create_app
from ragcap.serve.server import bind, url

CAPTIONS = [f"{animal} {verb} on the {place}" for animal in ("a dog", "two cats", "a bird", "a horse")
            for verb in ("sleeping", "running", "sitting") for place in ("grass", "sofa", "beach")]


def fill(store, embedder, captions=CAPTIONS, collection: str = "mem") -> None:
    ingest((CaptionRecord(caption=c, corpus="test") for c in captions), store, collection, embedder.info, lambda: embedder, IngestOptions())


def tiny_decoder(directory: Path, embedder) -> Path:
    """A random one-layer DeCap decoder saved as `train-decoder` saves one (pd/nnd/vd run for real)."""
    config = DeCapConfig(embed_dim=embedder.info.dim, n_layer=1, n_head=2, n_embd=32, max_tokens=6)
    return DeCapDecoder(config, embedder.info).save(directory)


def load(store, clip_dir: Path, decoder_dir: Path, modes=("pd", "clipre"), collection: str = "mem"):
    from ragcap import api

    return api.load_captioner(store, collection, CaptionSettings(modes=modes), decoder=decoder_dir, model=str(clip_dir), image_only=False)


@contextmanager
def tiny_captioner(clip_dir: Path, decoder_dir: Path):
    """pd and clipre over an in-memory store of CAPTIONS, with a tiny random decoder."""
    from ragcap.embed import load_embedder
    from ragcap.store import open_store

    embedder = load_embedder(str(clip_dir))
    store = open_store(memory=True)
    try:
        fill(store, embedder)
        yield load(store, clip_dir, tiny_decoder(decoder_dir, embedder))
    finally:
        store.close()


def png(seed: int, size=(48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


class Running:
    """An app served by uvicorn on a free loopback port in a background thread."""

    def __init__(self, app):
        self.app = app
        sock = bind("127.0.0.1", 0)
        self.url = url(sock)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    @property
    def service(self):
        return self.app.state.service

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def serve(captioner, **config) -> Running:
    return Running(create_app(captioner, ServeConfig(**config)))


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in a Prometheus text page (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_until(condition, what: str, seconds: float = 60) -> None:
    """Poll until condition() holds; a deadline only so a broken build fails instead of hanging."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)
