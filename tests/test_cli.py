"""End-to-end: the `ragcap` command on the embedded store, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from ragcap.cli import app
from tests.conftest import shared_path

runner = CliRunner()
CAPTIONS = [f"a {color} {thing} next to a window" for color in ("red", "blue", "green", "white") for thing in ("car", "cup", "chair", "kite", "boat")]


def ragcap(*args: str, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def last_json(result):
    """The JSON document a --json command printed (progress bars go to stderr)."""
    return json.loads(result.stdout)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS + CAPTIONS[:3]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def filled(corpus, tiny_clip_dir):
    ragcap("ingest", "text", corpus, "--collection", "things", "--model", tiny_clip_dir)
    return "things"


def test_ingest_reports_counts_and_reruns_add_nothing(corpus, tiny_clip_dir):
    first = last_json(ragcap("ingest", "text", corpus, "-c", "things", "-m", tiny_clip_dir, "--json"))
    assert (first["read"], first["stored"], first["duplicates"], first["points"]) == (23, 20, 3, 20)
    again = last_json(ragcap("ingest", "text", corpus, "-c", "things", "--json"))
    assert (again["stored"], again["already_stored"], again["points"]) == (0, 20, 20)
    listed = last_json(ragcap("collections", "--json"))
    assert listed == [{"name": "things", "points": 20, "embedder": first["embedder"], "dim": 32, "vectors": "float16",
                       "shards": None, "replicas": None, "write_consistency": None, "on_disk": False,
                       "quantization": "turbo4", "status": "ok", "problem": ""}]


def test_search_text_and_image(filled, tmp_path):
    result = last_json(ragcap("search", CAPTIONS[7], "-c", filled, "--k", "3", "--json"))
    assert result["kind"] == "text" and len(result["neighbours"]) == 3
    assert result["neighbours"][0]["caption"] == CAPTIONS[7]
    assert result["neighbours"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    image = tmp_path / "q.png"
    Image.new("RGB", (64, 48), "blue").save(image)
    result = last_json(ragcap("search", image, "-c", filled, "--k", "2", "--json"))
    assert result["kind"] == "image" and len(result["neighbours"]) == 2



def test_search_refuses_a_missing_image_and_an_empty_query(filled, tmp_path, monkeypatch):
    """`search photo.jpg` with a typo used to search for the words 'photo.jpg' and exit 0, and
    an empty or blank query answered neighbours of nothing; a file without an image extension
    was searched as its path's words."""
    monkeypatch.chdir(tmp_path)
    for query, message in (("photoo.jpg", "photoo.jpg: no such image file"), ("", "query is empty"), ("  ", "query is empty")):
        result = ragcap("search", query, "-c", filled, ok=False)
        assert result.exit_code == 1 and message in result.output, result.output
    assert last_json(ragcap("search", " photoo.jpg", "-c", filled, "--json"))["kind"] == "text"  # as words, on request
    Image.new("RGB", (64, 48), "blue").save(tmp_path / "scan", format="PNG")
    assert last_json(ragcap("search", "scan", "-c", filled, "--k", "2", "--json"))["kind"] == "image"
    (tmp_path / "notes.txt").write_text("a red car")
    result = ragcap("search", "notes.txt", "-c", filled, ok=False)
    assert result.exit_code == 1 and "notes.txt: not an image" in result.output
    result = ragcap("search", "a red car", "-c", filled, "--k", "0", ok=False)
    assert result.exit_code == 1 and "--k must be at least 1, got 0" in result.output
    long_text = " ".join(["a red car next to a window"] * 20)  # over the OS's 255-byte file name limit
    assert last_json(ragcap("search", long_text, "-c", filled, "--json"))["kind"] == "text"


def test_caption_refuses_a_blank_text_before_loading(filled):
    result = ragcap("caption", "--text", CAPTIONS[0], "--text", " ", "-c", filled, "--mode", "clipre", ok=False)
    assert result.exit_code == 1 and "--text 2 of 2 is empty" in result.output and "running on" not in result.output

def test_export_then_import_round_trip_is_exact(filled, tmp_path):
    out = tmp_path / "things.parquet"
    ragcap("export", filled, out)
    table = pq.read_table(out)
    assert table.num_rows == 20 and set(table.column_names) == {"id", "caption", "payload", "vector"}
    imported = last_json(ragcap("ingest", "parquet", out, "-c", "copy", "--text-field", "caption", "--vector-field", "vector", "--json"))
    assert imported["stored"] == 20
    original = {c: v for c, v in zip(table.column("caption").to_pylist(), table.column("vector").to_pylist())}
    ragcap("export", "copy", tmp_path / "copy.parquet")
    copy = pq.read_table(tmp_path / "copy.parquet")
    for caption, vector in zip(copy.column("caption").to_pylist(), copy.column("vector").to_pylist()):
        np.testing.assert_array_equal(np.float32(vector), np.float32(original[caption]))


def test_vector_dtype_float16_by_default_float32_on_request(filled, corpus, tiny_clip_dir, tmp_path):
    from ragcap.embed import load_embedder

    ragcap("ingest", "text", corpus, "-c", "exact", "-m", tiny_clip_dir, "--vector-dtype", "float32")
    embedded = load_embedder(str(tiny_clip_dir)).encode_text(CAPTIONS).vectors
    for name, expected in (("exact", embedded), (filled, embedded.astype(np.float16).astype(np.float32))):
        ragcap("export", name, tmp_path / f"{name}.parquet")
        table = pq.read_table(tmp_path / f"{name}.parquet")
        stored = dict(zip(table.column("caption").to_pylist(), table.column("vector").to_pylist()))
        np.testing.assert_allclose([stored[c] for c in CAPTIONS], expected, rtol=0, atol=1e-7)
    result = ragcap("ingest", "text", corpus, "-c", "bad", "-m", tiny_clip_dir, "--vector-dtype", "int8", ok=False)
    assert result.exit_code == 1 and "unknown vector dtype 'int8'; choose from float16, float32" in result.output


def test_drop(filled):
    unanswered = runner.invoke(app, ["drop", filled], input="")  # stdin closed: no answer is no
    assert unanswered.exit_code == 1 and "not confirmed (nothing answered on stdin); pass --yes" in unanswered.output
    declined = runner.invoke(app, ["drop", filled], input="n\n")
    assert declined.exit_code == 1 and [c["name"] for c in last_json(ragcap("collections", "--json"))] == [filled]
    assert "not confirmed; collection 'things' was not dropped" in declined.output
    ragcap("drop", filled, "--yes")
    assert last_json(ragcap("collections", "--json")) == []


def test_drop_of_a_missing_collection_says_so_without_asking():
    """`drop nope` asked 'delete collection 'nope' (? points)? [y/N]' and, answered, said 'not confirmed'."""
    result = runner.invoke(app, ["drop", "nope"], input="y\n")
    assert result.exit_code == 1 and "[y/N]" not in result.output
    assert "no collection 'nope'; `ragcap collections` lists them" in result.output


def test_collections_json_gives_null_for_what_a_damaged_collection_does_not_say(filled, ragcap_home):
    """A collection without its record was listed with "vectors": "?" and "on_disk": "?" (truthy to a script)."""
    (ragcap_home / "collections" / "stray").mkdir()
    result = ragcap("collections", "--json", ok=False)
    assert result.exit_code == 1
    stray = next(c for c in last_json(result) if c["name"] == "stray")
    assert stray["status"] == "damaged"
    assert [stray[k] for k in ("points", "vectors", "shards", "replicas", "write_consistency", "on_disk", "quantization")] == [None] * 7
    table = ragcap("collections", ok=False).stdout.splitlines()
    assert next(line for line in table if line.startswith("stray")).split()[1:-1] == ["?"] * 9


def test_unknown_source_lists_the_sources(corpus):
    result = ragcap("ingest", "nonsense", corpus, ok=False)
    assert result.exit_code == 1
    for name in ("coco-captions", "flickr", "cc3m", "text", "jsonl", "csv", "parquet", "hf"):
        assert name in result.output


@pytest.mark.parametrize("args,message", [
    (["text", "{corpus}", "--split", "test"], "--split does not apply to text sources (it is read by coco-captions, flickr, hf)"),
    (["jsonl", "{corpus}", "--text-field", "t", "--vector-field", "v"], "--vector-field does not apply to jsonl sources (it is read by parquet)"),
    (["cc3m", "{corpus}", "--text-field", "t"], "--text-field does not apply to cc3m sources"),
    (["text"], "no PATH: give the text files to read, or - to read stdin"),
    (["text", "-", "-"], "stdin (-) is given more than once"),
    (["coco-captions", "-"], "coco-captions does not read stdin (-)"),
    (["text", "{corpus}", "--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["text", "{corpus}", "--limit", "-3"], "--limit must be at least 1, not -3"),
])
def test_options_a_source_would_ignore_or_cannot_use_are_refused(corpus, tiny_clip_dir, args, message):
    """Each would have run and done something else than asked: ignored the option, or read nothing."""
    args = [str(corpus) if a == "{corpus}" else a for a in args]
    result = ragcap("ingest", *args, "-c", "refused", "-m", tiny_clip_dir, ok=False)
    assert result.exit_code == 1 and message in result.output, result.output
    assert last_json(ragcap("collections", "--json")) == []


def test_vector_dtype_of_an_existing_collection_cannot_change(filled, corpus):
    result = ragcap("ingest", "text", corpus, "-c", filled, "--vector-dtype", "float32", ok=False)
    assert result.exit_code == 1 and f"collection '{filled}' exists with vector-dtype float16, not vector-dtype float32" in result.output
    assert last_json(ragcap("ingest", "text", corpus, "-c", filled, "--vector-dtype", "float16", "--json"))["already_stored"] == 20


def test_a_training_run_that_fails_before_writing_leaves_no_out_folder(filled, tmp_path):
    """Issue rows: a wrong collection left an empty --out holding only the lock file; an --out
    that is a file gave a bare 'File exists'."""
    out = tmp_path / "decoder"
    result = ragcap("train-decoder", "-c", "nosuch", "--out", out, ok=False)
    assert result.exit_code == 1 and "no collection 'nosuch'" in result.output and not out.exists()
    nested = tmp_path / "new" / "decoders" / "coco"  # the folders made above --out go too
    result = ragcap("train-decoder", "-c", "nosuch", "--out", nested, ok=False)
    assert result.exit_code == 1 and not (tmp_path / "new").exists()
    afile = tmp_path / "afile"
    afile.write_text("notes")
    result = ragcap("train-decoder", "-c", filled, "--out", afile, ok=False)
    assert result.exit_code == 1 and f"--out {afile}: {afile} is a file; give a folder" in result.output
    assert afile.read_text() == "notes"
    # An --out holding a decoder is refused before the collection is read (which takes minutes
    # on a large memory): "nosuch" would fail there.
    held = tmp_path / "held"
    held.mkdir()
    (held / "config.json").write_text("{}")
    result = ragcap("train-decoder", "-c", "nosuch", "--out", held, ok=False)
    assert result.exit_code == 1 and "already holds a decoder" in result.output and "nosuch" not in result.output


def test_missing_file_is_a_clear_error(tmp_path, tiny_clip_dir):
    result = ragcap("ingest", "text", tmp_path / "nope.txt", "-m", tiny_clip_dir, ok=False)
    assert result.exit_code == 1 and "nope.txt" in result.output and "Traceback" not in result.output


def test_a_model_folder_holding_another_models_weights_is_one_line(corpus, tiny_clip_dir, tmp_path):
    # torch's load_state_dict error spans lines; the CLI promises one line on stderr.
    import shutil

    from tests.helpers import make_tiny_clip

    wider = make_tiny_clip(tmp_path / "wider", embed_dim=48)
    mixed = shutil.copytree(tiny_clip_dir, tmp_path / "mixed")
    shutil.copy(wider / "open_clip_model.safetensors", mixed / "open_clip_model.safetensors")
    result = ragcap("ingest", "text", corpus, "-c", "mixed", "-m", mixed, ok=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("ragcap: error:") or line.startswith("\t")]
    assert result.exit_code == 1 and len(lines) == 1 and "size mismatch" in lines[0] and "Traceback" not in result.output
    assert last_json(ragcap("collections", "--json")) == []


def test_empty_corpus_leaves_no_collection(tmp_path, tiny_clip_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = ragcap("ingest", "text", empty, "-c", "empty", "-m", tiny_clip_dir, ok=False)
    assert result.exit_code == 1 and "no collection was created" in result.output
    assert last_json(ragcap("collections", "--json")) == []


def test_malformed_line_names_file_and_line_and_skip_bad_counts(tmp_path, tiny_clip_dir):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a cat on a mat"}\n{"text": broken\n{"text": "a dog in a fog"}\n')
    result = ragcap("ingest", "jsonl", path, "--text-field", "text", "-m", tiny_clip_dir, ok=False)
    assert result.exit_code == 1 and f"{path}:2" in result.output
    summary = last_json(ragcap("ingest", "jsonl", path, "--text-field", "text", "-m", tiny_clip_dir, "--skip-bad", "--json"))
    assert (summary["skipped_bad"], summary["stored"]) == (1, 2)


def test_unreachable_server_names_the_url():
    result = ragcap("collections", "--qdrant-url", "http://127.0.0.1:9", ok=False)
    assert result.exit_code == 1
    assert "http://127.0.0.1:9" in result.output and "Traceback" not in result.output


def test_collection_of_another_embedder_is_refused(filled, corpus, tmp_path):
    other = tmp_path / "other"
    ragcap("models", "save-random", tiny_config(tmp_path), other, "--seed", "3")
    result = ragcap("ingest", "text", corpus, "-c", filled, "-m", other, ok=False)
    assert result.exit_code == 1 and str(other.resolve()) in result.output


def test_exported_vectors_of_another_embedder_are_refused(filled, corpus, tmp_path):
    """An export's vectors belong to the model that made them: into a collection, or under a
    --model, of another embedder of the same dimension they would be stored as that model's."""
    other = tmp_path / "other"
    ragcap("models", "save-random", tiny_config(tmp_path), other, "--seed", "3")
    ragcap("ingest", "text", corpus, "-c", "theirs", "-m", other)
    ours, theirs = tmp_path / "ours.parquet", tmp_path / "theirs.parquet"
    ragcap("export", filled, ours)
    ragcap("export", "theirs", theirs)
    vectors = ["--text-field", "caption", "--vector-field", "vector"]

    result = ragcap("ingest", "parquet", ours, "-c", "theirs", *vectors, ok=False)
    assert result.exit_code == 1 and f"{ours} holds vectors of embedder 'local:" in result.output
    assert "but collection 'theirs' was filled by" in result.output
    result = ragcap("ingest", "parquet", ours, "-c", "new", "-m", other, *vectors, ok=False)
    assert result.exit_code == 1 and "but --model is" in result.output
    result = ragcap("ingest", "parquet", ours, theirs, "-c", "new", *vectors, ok=False)
    assert result.exit_code == 1 and f"{ours} and {theirs} hold vectors of different embedders" in result.output
    assert [c["name"] for c in last_json(ragcap("collections", "--json"))] == sorted([filled, "theirs"])
    assert last_json(ragcap("ingest", "parquet", theirs, "-c", "theirs", *vectors, "--json"))["already_stored"] == 20
    result = ragcap("ingest", "parquet", tmp_path, "-c", "new", *vectors, ok=False)
    assert result.exit_code == 1 and f"{tmp_path}: is a directory, expected a file" in result.output


def tiny_config(tmp_path):
    from tests.helpers import TINY_CLIP_CONFIG

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    return path


def test_caption_folder_reports_bad_files_and_exits_nonzero(filled, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i, color in enumerate(("red", "green")):
        Image.new("RGB", (40, 30), color).save(images / f"{i}.jpg")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    result = ragcap("caption", images, "-c", filled, "--mode", "clipre", "--format", "jsonl", "--neighbours", "2", ok=False)
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {l["file"].rsplit("/", 1)[-1] for l in lines if "error" in l} == {"broken.jpg"}
    good = [l for l in lines if "error" not in l]
    assert len(good) == 2 and all(l["caption"] in CAPTIONS and len(l["neighbours"]) == 2 for l in good)


def test_flickr_csv_real_corpus_end_to_end(tiny_clip_dir, tmp_path):
    captions = shared_path("data", "flickr8k", "captions.txt")
    test_ids = tmp_path / "exclude.txt"
    test_ids.write_text("1000268201_693b08cb0e.jpg\n")
    summary = last_json(ragcap("ingest", "flickr", captions, "-c", "f8k", "-m", tiny_clip_dir, "--limit", "200",
                               "--exclude-images", test_ids, "--json"))
    assert summary["read"] == 200 and summary["excluded"] == 5
    assert summary["points"] == summary["stored"] == 200 - 5 - summary["duplicates"]


def test_prompt_mode_completes_with_a_small_gpt2(filled, tmp_path):
    tokenizer = shared_path("models", "gpt2-tokenizer")
    lm = tmp_path / "lm"
    ragcap("models", "save-random-lm", lm, "--tokenizer", tokenizer, "--layers", "2", "--width", "64", "--heads", "2")
    result = ragcap("caption", "--text", "a red car", "--text", "a blue boat", "-c", filled, "--mode", "prompt,clipre",
                    "--lm", lm, "--json", "--neighbours", "4")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(l["text"], l["mode"]) for l in lines] == [("a red car", "prompt"), ("a red car", "clipre"),
                                                       ("a blue boat", "prompt"), ("a blue boat", "clipre")]
    for line in lines:
        assert isinstance(line["caption"], str) and "\n" not in line["caption"]
        assert [n["caption"] for n in line["neighbours"]][0] in CAPTIONS


def test_trained_decoder_reproduces_real_coco_captions_from_their_embeddings(tiny_clip_dir, tmp_path):
    """DeCap's text-only training, end to end: ~200 real COCO captions in, a small decoder trained
    on the collection, and `caption --mode vd --text` writes >= 90% of them back exactly."""
    coco = shared_path("data", "coco", "captions_val2017.json")
    ragcap("ingest", "coco-captions", coco, "-c", "coco", "-m", tiny_clip_dir, "--limit", "200")
    decoder = tmp_path / "decoder"
    trained = last_json(ragcap("train-decoder", "-c", "coco", "--out", decoder, "--layers", "1", "--heads", "2", "--width", "128",
                               "--epochs", "60", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "20",
                               "--label-smoothing", "0", "--dropout", "0", "--val-fraction", "0", "--json"))
    assert trained["captions"] >= 195 and trained["epochs"][-1]["train_loss"] < trained["epochs"][0]["train_loss"]
    exported = tmp_path / "coco.parquet"
    ragcap("export", "coco", exported)
    stored = pq.read_table(exported).column("caption").to_pylist()
    args = [a for c in stored for a in ("--text", c)]
    result = ragcap("caption", *args, "-c", "coco", "--mode", "vd", "--decoder", decoder, "--json")
    generated = {l["text"]: l["caption"] for l in map(json.loads, result.stdout.splitlines())}

    from ragcap.decoders import load_decoder

    tokenizer = load_decoder(decoder).tokenizer
    exact = sum(generated[c] == tokenizer.decode(tokenizer.encode(c)[:20]) for c in stored)
    assert exact >= 0.9 * len(stored), f"only {exact}/{len(stored)} reproduced"


def test_killed_ingest_resumes_to_exactly_the_right_count(tiny_clip_dir, tmp_path, ragcap_home):
    """SIGKILL a real `ragcap ingest` mid-corpus; the rerun stores exactly the rest.

    The ingest reads a pipe that stays open. It is killed once it blocks reading the pipe (which
    /proc shows) and its collection's record counts the first 48 lines (three batches) stored:
    batches are written by a background thread, so the read can block before the last write ends.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    lines = [f"caption number {i} of a killed ingest" for i in range(64)]
    cmd = [sys.executable, "-m", "ragcap.cli", "ingest", "text", "-", "-c", "killed", "-m", str(tiny_clip_dir), "--batch-size", "16"]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, text=True, env=os.environ)
    child.stdin.write("\n".join(lines[:48]) + "\n")
    child.stdin.flush()
    sidecar = ragcap_home / "collections" / "killed" / "ragcap.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        waiting = "pipe" in Path(f"/proc/{child.pid}/wchan").read_text()
        if waiting and sidecar.exists() and json.loads(sidecar.read_text())["points"] == 48:
            break
        time.sleep(0.1)
    assert child.poll() is None, "the ingest ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()

    corpus = tmp_path / "all.txt"
    corpus.write_text("\n".join(lines) + "\n")
    summary = last_json(ragcap("ingest", "text", corpus, "-c", "killed", "--json"))
    assert (summary["already_stored"], summary["stored"], summary["points"]) == (48, 16, 64)


def test_decoder_of_another_embedder_and_empty_collection_are_refused(filled, tmp_path):
    from ragcap.decoders import DeCapConfig, DeCapDecoder
    from ragcap.embedder_info import EmbedderInfo
    from ragcap.store import open_store

    other = EmbedderInfo(spec="st:some-other-model", dim=32)
    DeCapDecoder(DeCapConfig(embed_dim=32, n_layer=1, n_head=2, n_embd=32, max_tokens=8), other).save(tmp_path / "dec")
    result = ragcap("caption", "--text", "a cup", "-c", filled, "--mode", "vd", "--decoder", tmp_path / "dec", ok=False)
    assert result.exit_code == 1 and "st:some-other-model" in result.output and "train-decoder" in result.output

    with open_store() as store:
        store.create("hollow", store.embedder(filled))
    result = ragcap("caption", "--text", "a cup", "-c", "hollow", "--mode", "clipre", ok=False)
    assert result.exit_code == 1 and "'hollow' is empty" in result.output


def test_decoding_options_reach_every_embedding_mode(filled, tmp_path):
    """--num-captions lists n-best captions with scores; sampling with a seed repeats; bad
    combinations are refused with one line."""
    import torch

    from ragcap.decoders import DeCapConfig, DeCapDecoder
    from ragcap.store import open_store

    with open_store() as store:
        info = store.embedder(filled)
    torch.manual_seed(0)
    DeCapDecoder(DeCapConfig(embed_dim=info.dim, n_layer=1, n_head=2, n_embd=32, max_tokens=6), info).save(tmp_path / "dec")
    common = ["--text", "a red cup", "--text", "a kite", "-c", filled, "--mode", "vd,pd", "--decoder", tmp_path / "dec", "--json"]

    lines = [json.loads(l) for l in ragcap("caption", *common, "--num-captions", "3").stdout.splitlines()]
    assert [(l["text"], l["mode"]) for l in lines] == [("a red cup", "vd"), ("a red cup", "pd"), ("a kite", "vd"), ("a kite", "pd")]
    for line in lines:
        scores = [c["score"] for c in line["captions"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert line["captions"][0] == {"caption": line["caption"], "score": line["score"]}

    sampled = ["--top-p", "0.9", "--temperature", "1.5", "--seed", "5", "--num-captions", "2"]
    assert ragcap("caption", *common, *sampled).stdout == ragcap("caption", *common, *sampled).stdout

    refused = ragcap("caption", *common, "--beam", "2", "--num-captions", "3", ok=False)
    assert refused.exit_code == 1 and "beam of at least 3" in refused.output and "Traceback" not in refused.output
    refused = ragcap("caption", *common, "--beam", "2", "--top-k", "5", ok=False)
    assert refused.exit_code == 1 and "exclude each other" in refused.output


def test_caption_says_where_it_runs_on_stderr_and_in_json(filled):
    import torch

    result = ragcap("caption", "--text", "a red car", "--text", "a cup", "-c", filled, "--mode", "clipre", "--json", "--device", "cpu")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2 and all(l["device"] == "cpu" and l["precision"] == "float32" for l in lines)
    said = [line for line in result.stderr.splitlines() if line.startswith("ragcap: running on")]
    assert said == [f"ragcap: running on cpu, float32, {torch.get_num_threads()} threads"
                    + ("" if torch.cuda.is_available() else " (no CUDA GPU found)")]


def test_caption_and_eval_batch_by_the_library_default():
    """The CLI's --batch-size defaults are CaptionSettings' (written twice: the CLI does not import
    torch to build its help)."""
    import inspect

    from ragcap.caption import CaptionSettings
    from ragcap.cli import decode

    for command in (decode.caption, decode.evaluate):
        assert inspect.signature(command).parameters["batch_size"].default == CaptionSettings().batch_size


def test_captioning_an_image_imports_none_of_the_libraries_that_cost_a_cold_start_seconds(filled, tmp_path, ragcap_home):
    """`ragcap caption IMAGE --mode pd` as a new process: open_clip, torchvision, transformers and
    torch._dynamo would each add seconds before the first caption (BENCHMARKS.md, cold start)."""
    import os
    import subprocess
    import sys

    from ragcap.decoders import DeCapConfig, DeCapDecoder
    from ragcap.store import open_store

    with open_store() as store:
        info = store.embedder(filled)
    DeCapDecoder(DeCapConfig(embed_dim=info.dim, n_layer=1, n_head=2, n_embd=32, max_tokens=6), info).save(tmp_path / "dec")
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(image)
    heavy = ("open_clip", "torchvision", "timm", "transformers", "torch._dynamo", "sentence_transformers")
    script = (
        "import sys\nfrom ragcap.cli import main\n"
        f"sys.argv = ['ragcap', 'caption', {str(image)!r}, '-c', {filled!r}, '--mode', 'pd,clipre', '--decoder', {str(tmp_path / 'dec')!r}, '--json']\n"
        "try:\n    main()\nexcept SystemExit as done:\n    assert not done.code, done.code\n"
        f"print('imported:', sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAGCAP_HOME": str(ragcap_home)})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert [json.loads(line)["mode"] for line in lines[:-1]] == ["pd", "clipre"]
    assert lines[-1] == "imported: []"


def test_models_list_filters_and_says_when_nothing_matches():
    assert "ViT-B-32:openai" in ragcap("models", "list", "vit-b-32").stdout.split()
    assert ragcap("models", "list", "zzz").stdout == "no open_clip spec contains 'zzz'; `ragcap models list` shows all of them\n"
    assert last_json(ragcap("models", "list", "zzz", "--json")) == []


def test_export_to_a_descriptor_link_writes_the_file_it_names(filled, tmp_path):
    """`ragcap export C /dev/stdout > out.parquet` (stdout a regular file) renamed a temporary over
    /dev/stdout, replacing the system's link with a file, and left out.parquet empty. Here a link
    to /proc/self/fd/N stands for /dev/stdout."""
    out = tmp_path / "out.parquet"
    link = tmp_path / "stdout"
    with open(out, "wb") as opened:
        link.symlink_to(f"/proc/self/fd/{opened.fileno()}")
        ragcap("export", filled, link)
    assert link.is_symlink() and pq.read_table(out).num_rows == 20


def test_check_of_a_lost_record_points_to_restore_record_not_to_a_backup(filled, ragcap_home):
    """check said a collection without its record 'cannot be repaired in place' (restore a backup),
    although `--restore-record --model SPEC` rebuilds it with every point kept."""
    (ragcap_home / "collections" / filled / "ragcap.json").unlink()
    result = ragcap("check", filled, ok=False)
    assert result.exit_code == 1 and "cannot be repaired in place" not in result.output
    assert f"ragcap: `ragcap check {filled} --restore-record --model SPEC` rebuilds the record" in result.output
