"""`ragcap ingest clip-retrieval DIR`: clip-retrieval's embeddings + metadata become a memory
without re-embedding (and without loading the model)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ragcap import api, embed
from ragcap.cli import app
from ragcap.store import open_store

runner = CliRunner()
DIM = 32  # the tiny CLIP's


def write_output(folder, parts, dim=DIM, dtype=np.float16, seed=0):
    """clip-retrieval's layout: text_emb/text_emb_N.npy + metadata/metadata_N.parquet."""
    rng = np.random.default_rng(seed)
    (folder / "text_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    everything = {}
    for n, captions in enumerate(parts):
        vectors = rng.standard_normal((len(captions), dim))
        vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(dtype)
        np.save(folder / "text_emb" / f"text_emb_{n}.npy", vectors)
        table = pa.table({"caption": captions, "url": [f"http://x/{n}/{i}.jpg" for i in range(len(captions))]})
        pq.write_table(table, folder / "metadata" / f"metadata_{n}.parquet")
        everything.update(zip(captions, vectors))
    return everything


def ingest(*args, ok=True):
    result = runner.invoke(app, ["ingest", "clip-retrieval", *map(str, args), "--json"])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_memory_from_clip_retrieval_output_without_loading_the_model(tmp_path, tiny_clip_dir, monkeypatch):
    parts = [[f"caption {i} of part {n}" for i in range(size)] for n, size in enumerate((7, 12, 5))]
    expected = write_output(tmp_path / "out", parts)
    monkeypatch.setattr(embed, "load_embedder", lambda *a, **k: pytest.fail("the model must not be loaded"))
    summary = json.loads(ingest(tmp_path / "out", "-c", "laion", "-m", tiny_clip_dir).stdout)
    assert (summary["read"], summary["stored"], summary["points"]) == (24, 24, 24)
    with open_store() as store:
        assert store.embedder("laion").dim == DIM
        for _, vectors, payloads in store.scroll("laion"):
            for vector, payload in zip(vectors, payloads):
                stored = expected[payload["caption"]].astype(np.float32)
                np.testing.assert_allclose(vector, stored / np.linalg.norm(stored), atol=1e-3)  # float16 storage
                assert payload["corpus"] == "clip-retrieval"
    again = json.loads(ingest(tmp_path / "out", "-c", "laion").stdout)  # the collection knows its embedder
    assert (again["stored"], again["already_stored"]) == (0, 24)


def test_a_flat_folder_of_named_pairs_works_too(tmp_path, tiny_clip_dir):
    folder = tmp_path / "flat"
    folder.mkdir()
    np.save(folder / "shard-a.npy", np.eye(3, DIM, dtype=np.float32))
    pq.write_table(pa.table({"text": ["one", "two", "three"]}), folder / "shard-a.parquet")
    summary = json.loads(ingest(folder, "-c", "flat", "-m", tiny_clip_dir, "--text-field", "text").stdout)
    assert summary["stored"] == 3


@pytest.mark.parametrize(
    "damage,message",
    [
        ("rows", "has 5 rows but .* has 4 embeddings"),
        ("dim", "vector has 8 dimensions but embedder .* has 32"),
        ("truncated", "not a readable .npy"),
        ("pickle", "not a readable .npy"),
        ("lonely", "no partner for text_emb_1.npy"),
        ("column", "no column 'caption'"),
    ],
)
def test_damaged_outputs_are_refused_naming_the_file(tmp_path, tiny_clip_dir, damage, message):
    out = tmp_path / "out"
    write_output(out, [["a", "b", "c", "d"]], dim=8 if damage == "dim" else DIM)
    npy, meta = out / "text_emb" / "text_emb_0.npy", out / "metadata" / "metadata_0.parquet"
    if damage == "rows":
        pq.write_table(pa.table({"caption": list("abcde")}), meta)
    elif damage == "truncated":
        npy.write_bytes(npy.read_bytes()[:-40])
    elif damage == "pickle":
        np.save(npy, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    elif damage == "lonely":
        np.save(out / "text_emb" / "text_emb_1.npy", np.zeros((1, DIM), np.float32))
    elif damage == "column":
        pq.write_table(pa.table({"text": list("abcd")}), meta)
    result = ingest(out, "-c", "bad", "-m", tiny_clip_dir, ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert __import__("re").search(message, result.output), result.output
    with open_store() as store:
        assert not store.exists("bad")  # nothing half-written


def test_zero_and_nan_embeddings_are_bad_rows(tmp_path, tiny_clip_dir):
    """Stored, a zero vector has no direction to normalise and a NaN one breaks every search:
    each is refused at its row, or skipped and counted with --skip-bad."""
    out = tmp_path / "out"
    write_output(out, [["a", "b", "c", "d"]], dtype=np.float32)
    npy = out / "text_emb" / "text_emb_0.npy"
    vectors = np.load(npy)
    vectors[1], vectors[3, 5] = 0, np.nan
    np.save(npy, vectors)
    result = ingest(out, "-c", "bad", "-m", tiny_clip_dir, ok=False)
    assert result.exit_code == 1 and "metadata_0.parquet:row 2: text_emb_0.npy row 2 is all zeros" in result.output
    with open_store() as store:
        assert not store.exists("bad")
    summary = json.loads(ingest(out, "-c", "good", "-m", tiny_clip_dir, "--skip-bad").stdout)
    assert (summary["stored"], summary["skipped_bad"]) == (2, 2)
    assert any("row 4: text_emb_0.npy row 4 holds NaN or infinity" in bad for bad in summary["bad"])


def test_the_embedder_must_be_named(tmp_path):
    write_output(tmp_path / "out", [["a"]])
    with open_store() as store, pytest.raises(Exception, match="pass --model"):
        api.ingest_corpus(store, "clip-retrieval", [str(tmp_path / "out")], "nameless")
