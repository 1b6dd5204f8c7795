"""The captioning pipeline: DeCap's projection, the modes' inputs, batching, bad images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.base import CaptionRecord
from ragcap.caption import CaptionSettings, Captioner, iter_inputs
from ragcap.decoders import Caption
from ragcap.modes import parse_modes
from ragcap.embed import load_embedder
from ragcap.errors import RagcapError
from ragcap.ingest import IngestOptions, ingest
from ragcap.retrieve import FullMemory, project_hits
from ragcap.store import open_store

CAPTIONS = [f"{animal} {verb} on the {place}" for animal in ("a dog", "two cats", "a bird", "a horse")
            for verb in ("sleeping", "running", "sitting") for place in ("grass", "sofa", "beach")]


def decap_formula(query: np.ndarray, memory: np.ndarray, tau: float) -> np.ndarray:
    """DeCap eq. 3 written out directly: softmax over cosine/tau, weighted sum, renormalised."""
    sims = memory.astype(np.float64) @ query.astype(np.float64)
    w = np.exp((sims - sims.max()) / tau)
    w /= w.sum()
    p = w @ memory.astype(np.float64)
    return p / np.linalg.norm(p)


class RecordingDecoder:
    """Stands in for the trained decoder: remembers its inputs, 'decodes' to a fingerprint."""

    def __init__(self):
        self.prefixes = []

    def caption(self, prefixes, options=None):
        self.prefixes.append(prefixes.numpy().copy())
        return [[Caption(f"{float(p.sum()):.6f}", 0.0)] for p in prefixes]


@pytest.fixture(scope="module")
def embedder(tiny_clip_dir):
    return load_embedder(str(tiny_clip_dir))


@pytest.fixture
def store(embedder):
    s = open_store(memory=True)
    items = (CaptionRecord(caption=c, corpus="test") for c in CAPTIONS)
    ingest(items, s, "mem", embedder.info, lambda: embedder, IngestOptions())
    yield s
    s.close()


def memory_of(store):
    return np.concatenate([v for _, v, _ in store.scroll("mem")])


def test_projection_equals_decap_formula_on_the_same_neighbours(store, embedder):
    query = embedder.encode_text(["a dog on the beach"]).vectors
    hits = store.search("mem", query, 8, with_vectors=True)[0]
    neighbours = np.stack([h.vector for h in hits])
    np.testing.assert_allclose(project_hits(hits, 0.05), decap_formula(query[0], neighbours, 0.05), atol=1e-6)


def test_full_memory_equals_formula_over_whole_memory(store, embedder):
    queries = embedder.encode_text(["a cat", "a horse running"]).vectors
    got = FullMemory(store, "mem").project(queries, 0.01)
    for q, p in zip(queries, got):
        np.testing.assert_allclose(p, decap_formula(q, memory_of(store), 0.01), atol=1e-6)


def test_modes_receive_the_right_prefixes(store, embedder):
    decoder = RecordingDecoder()
    settings = CaptionSettings(modes=("pd", "nnd", "vd", "clipre"), k=len(CAPTIONS), tau=0.02)
    texts = ["a dog sleeping", "a bird on the sofa"]
    results = list(Captioner(store, "mem", embedder, settings, decoder=decoder).caption_texts(texts))
    queries = embedder.encode_text(texts).vectors
    memory = memory_of(store)
    (prefixes,) = decoder.prefixes
    pd, nnd, vd = np.split(prefixes, 3)
    for i, q in enumerate(queries):
        np.testing.assert_allclose(pd[i], decap_formula(q, memory, 0.02), atol=1e-5)
        nearest = memory[np.argmax(memory @ q)]
        np.testing.assert_allclose(nnd[i], nearest, atol=1e-6)
    np.testing.assert_allclose(vd, queries, atol=1e-6)
    by_mode = {(r.source, r.mode): r.caption for r in results}
    assert by_mode[(texts[0], "clipre")] in CAPTIONS
    assert [r.mode for r in results] == ["pd", "nnd", "vd", "clipre"] * 2


def test_batched_equals_one_at_a_time_and_modes_together_equal_separately(store, embedder, tmp_path):
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))

    def captions(modes, batch_size):
        settings = CaptionSettings(modes=modes, k=10, batch_size=batch_size)
        run = Captioner(store, "mem", embedder, settings, decoder=RecordingDecoder()).caption_images(paths)
        return {(r.source, r.mode): r.caption for r in run}

    def assert_same(a, b):  # fingerprints of prefixes: the batch shape changes float32 matmul rounding
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == b[key] if key[1] == "clipre" else float(a[key]) == pytest.approx(float(b[key]), abs=1e-5)

    together = captions(("pd", "clipre", "vd"), batch_size=4)
    assert_same(together, captions(("pd", "clipre", "vd"), batch_size=1))
    assert_same(together, {**captions(("pd",), 2), **captions(("clipre",), 3), **captions(("vd",), 5)})


def test_bad_files_are_reported_and_the_rest_captioned(store, embedder, tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (32, 32), "red").save(good)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    inputs = [str(tmp_path / "empty.jpg"), str(good), str(tmp_path / "notes.png"), str(tmp_path / "missing.jpg")]
    settings = CaptionSettings(modes=("clipre",), batch_size=2)
    results = list(Captioner(store, "mem", embedder, settings).caption_images(inputs))
    errors = {r.source: r.error for r in results if r.error}
    assert set(errors) == {inputs[0], inputs[2], inputs[3]}
    assert [r.source for r in results] == inputs  # input order, one result per input and mode
    assert [r.caption in CAPTIONS for r in results if r.error is None] == [True]


def test_clear_errors_for_impossible_requests(store, embedder):
    with pytest.raises(RagcapError, match="larger than collection"):
        Captioner(store, "mem", embedder, CaptionSettings(modes=("pd",), k=1000), decoder=RecordingDecoder())
    with pytest.raises(RagcapError, match="--decoder"):
        Captioner(store, "mem", embedder, CaptionSettings(modes=("vd",)))
    with pytest.raises(RagcapError, match="no collection"):
        Captioner(store, "nope", embedder, CaptionSettings(modes=("clipre",)))
    with pytest.raises(RagcapError, match="unknown mode"):
        parse_modes("pd,xyz")


def test_inputs_expand_directories_globs_and_lists(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.PNG", "sub/c.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    listed = tmp_path / "list.txt"
    listed.write_text(f"{tmp_path / 'b.jpg'}\n\n")
    got = list(iter_inputs([str(tmp_path), str(tmp_path / "*.jpg"), f"@{listed}"]))
    assert got == [str(tmp_path / "a.PNG"), str(tmp_path / "b.jpg"), str(tmp_path / "sub" / "c.webp"),
                   str(tmp_path / "b.jpg"), str(tmp_path / "b.jpg")]


def test_default_k_is_capped_by_a_small_collection(store, embedder):
    decoder = RecordingDecoder()
    captioner = Captioner(store, "mem", embedder, CaptionSettings(modes=("pd",)), decoder=decoder)
    assert captioner.k == len(CAPTIONS)
    list(captioner.caption_texts(["a dog"]))
    query = embedder.encode_text(["a dog"]).vectors[0]
    np.testing.assert_allclose(decoder.prefixes[0][0], decap_formula(query, memory_of(store), 0.01), atol=1e-5)


def test_a_decoder_of_the_wrong_kind_is_named_with_the_modes_it_serves():
    # Before: "--mode pd --decoder SMALLCAP_DIR" said "pass --decoder DIR", which the user had done.
    from ragcap.caption import require_resources
    from ragcap.errors import RagcapError

    with pytest.raises(RagcapError, match="mode pd needs a trained decoder.*; models/sc is a smallcap decoder, for --mode smallcap$"):
        require_resources(["pd"], None, None, "models/sc", {"models/sc": "smallcap"})
    with pytest.raises(RagcapError, match="needs a SmallCap model.*; dec is a decap decoder, for --mode pd, nnd or vd$"):
        require_resources(["smallcap"], "dec", None, None, {"dec": "decap"})
