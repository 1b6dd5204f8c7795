"""Processes that use one collection or one output at the same time."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from tests.faults.conftest import blocked_reading_stdin, cli, ingest, messages, one_error_line, start, wait_for

# A worker as `ingest` is one: create the collection or join it, then write its own points.
CREATE_OR_JOIN = """
import os, sys, time
import numpy as np
from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import StoreError
from ragcap.store import open_store, point_id
go, worker = sys.argv[1], sys.argv[2]
while not os.path.exists(go):
    time.sleep(0.001)
store = open_store(wait=120)
try:
    store.create("race", EmbedderInfo("tiny", 8))
except StoreError:
    assert store.exists("race")
captions = [f"worker {worker} caption {i}" for i in range(50)]
vectors = np.random.default_rng(int(worker)).standard_normal((50, 8)).astype(np.float32)
vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
store.upsert("race", [point_id("race", c) for c in captions], vectors, [{"caption": c} for c in captions])
store.close()
"""


def test_concurrent_creates_of_one_collection_never_destroy_each_other(tmp_path, ragcap_home):
    """Issue row: two ingests creating one new collection crashed and left it empty or unopenable."""
    from ragcap.store import open_store

    for trial in range(8):
        go = tmp_path / f"go{trial}"
        workers = [start("-c", CREATE_OR_JOIN, go, w) for w in range(3)]
        go.touch()  # all three start creating at once
        for worker in workers:
            _, err = worker.communicate(timeout=300)
            assert worker.returncode == 0, err
        with open_store() as store:
            assert store.count("race") == 150, f"trial {trial}"
            assert store.check("race").ok
            store.drop("race")
        leftovers = [p.name for p in (ragcap_home / "collections").iterdir() if not p.name.endswith((".lock", ".queue"))]
        assert leftovers == []


def test_shard_workers_start_together_and_fill_one_collection(tmp_path, tiny_clip_dir):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("".join(f"a photo of thing number {i} on a table\n" for i in range(60)))
    workers = [
        start("-m", "ragcap.cli", "ingest", "text", corpus, "-c", "shared", "-m", tiny_clip_dir,
              "--shard", f"{i}/2", "--batch-size", "8", "--json")
        for i in (1, 2)
    ]
    summaries = []
    for worker in workers:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0 and "Traceback" not in err, err
        summaries.append(json.loads(out))
    assert sum(s["stored"] for s in summaries) == 60
    assert max(s["points"] for s in summaries) == 60  # the worker that ended last saw them all


def test_reads_while_an_ingest_holds_the_collection(tmp_path, tiny_clip_dir, ragcap_home):
    """Issue row: `caption`/`collections` while an ingest ran were refused, even read-only."""
    lines = [f"caption {i} of a long running ingest" for i in range(48)]
    ingest = start("-m", "ragcap.cli", "ingest", "text", "-", "-c", "growing", "-m", tiny_clip_dir,
                   "--batch-size", "16", "--json", stdin=subprocess.PIPE)
    ingest.stdin.write("\n".join(lines[:32]) + "\n")
    ingest.stdin.flush()
    record = ragcap_home / "collections" / "growing" / "ragcap.json"
    stored = lambda: record.exists() and json.loads(record.read_text()).get("points") == 32  # noqa: E731
    wait_for(lambda: stored() and blocked_reading_stdin(ingest), "the ingest stored 32 and waits", process=ingest)

    found = cli("search", lines[5], "-c", "growing", "-k", "1", "--json")  # the ingest holds the collection open
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["neighbours"][0]["caption"] == lines[5]
    listed = cli("collections", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["points"] == 32

    ingest.stdin.write("\n".join(lines[32:]) + "\n")  # the ingest takes the collection back
    out, err = ingest.communicate(timeout=300)
    assert ingest.returncode == 0, err
    assert json.loads(out)["points"] == 48


HOLD = """
import sys, time
from ragcap.store import open_store
store = open_store()
store.create("busy", __import__("ragcap.embedder_info").embedder_info.EmbedderInfo("tiny", 8))
for _ in store.scroll("busy"):  # an operation in progress is never interrupted
    pass
with store._use("busy", "holding it"):
    open(sys.argv[1], "w").close()
    time.sleep(600)
"""


def test_a_collection_kept_busy_is_waited_for_and_reported_and_the_rest_listed(tmp_path, tiny_clip_dir):
    ingest("free", ["a cat", "a dog"], tiny_clip_dir)
    held = tmp_path / "held"
    holder = start("-c", HOLD, held)
    try:
        wait_for(held.exists, "the holder holds 'busy'", process=holder)
        line = one_error_line(cli("drop", "busy", "--yes", "--wait", "1"))
        assert f"collection 'busy' is in use by pid {holder.pid}" in line and "--wait" in line
        listed = cli("collections", "--json")
        assert listed.returncode == 0, listed.stderr
        status = {row["name"]: (row["status"], row["problem"]) for row in json.loads(listed.stdout)}
        assert status["free"] == ("ok", "")
        assert status["busy"][0] == "busy" and f"pid {holder.pid}" in status["busy"][1]
    finally:
        holder.kill()
        holder.wait()
    # Its lock died with it (kill -9 included): the collection is free at once.
    assert cli("drop", "busy", "--yes", "--wait", "0").returncode == 0


def test_waiting_is_announced_with_the_reason(tmp_path):
    held = tmp_path / "held"
    holder = start("-c", HOLD, held)
    try:
        wait_for(held.exists, "the holder holds 'busy'", process=holder)
        result = cli("drop", "busy", "--yes", "--wait", "3")
    finally:
        holder.kill()
        holder.wait()
    notice, error = messages(result.stderr)
    assert f"in use by pid {holder.pid}" in notice and "waiting up to 3 s" in notice
    assert error.startswith("ragcap: error:") and result.returncode == 1


@pytest.fixture
def training_collection(tiny_clip_dir):
    ingest("train", [f"a small {c} dog runs on grass" for c in ("red", "blue", "green", "white", "black", "brown")], tiny_clip_dir)
    return "train"


TRAIN = ("train-decoder", "-c", "train", "--layers", "1", "--heads", "2", "--width", "32", "--epochs", "1",
         "--batch-size", "4", "--val-fraction", "0")


def test_train_decoder_locks_its_out(tmp_path, training_collection):
    """Issue row: two train-decoder into one --out died on a shared temporary name."""
    out = tmp_path / "decoder"
    held = tmp_path / "held"
    holder = start("-c", "import sys, time\nfrom ragcap.locks import hold_directory\n"
                   "with hold_directory(sys.argv[1]):\n    open(sys.argv[2], 'w').close()\n    time.sleep(600)\n", out, held)
    try:
        wait_for(held.exists, "another run holds --out", process=holder)
        line = one_error_line(cli(*TRAIN, "--out", out))
        assert f"in use by pid {holder.pid}" in line and str(out) in line
        assert sorted(p.name for p in out.iterdir()) == [".ragcap.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()

    # Two real runs at once: one trains; the other is refused with one line, whichever it meets.
    runs = [start("-m", "ragcap.cli", *TRAIN, "--out", out) for _ in range(2)]
    results = [(run.wait(timeout=600), run.communicate()[1]) for run in runs]
    assert sorted(code for code, _ in results)[0] == 0
    for code, err in results:
        assert "Traceback" not in err
        if code:
            [line] = messages(err)
            assert "is in use by pid" in line or "already holds a decoder" in line
    from ragcap.decoders import load_decoder

    load_decoder(out)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_collection_made_again_with_another_embedder_is_refused_to_whoever_had_it_open(tmp_path, tiny_clip_dir):
    """Issue row: a server kept answering after its collection was dropped and filled again by
    another model: its queries, embedded for the old model, matched the new model's vectors."""
    from ragcap.errors import EmbedderMismatch
    from ragcap.store import open_store
    from tests.helpers import make_tiny_clip

    ingest("mem", ["a cat on a mat", "a dog in a park"], tiny_clip_dir)
    other = make_tiny_clip(tmp_path / "other", seed=1)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a bird on a wire\n")
    with open_store() as store:
        query = np.ones((1, store.embedder("mem").dim), np.float32)
        assert len(store.search("mem", query, 1)[0]) == 1  # open, as a server keeps it
        assert cli("drop", "mem", "--yes").returncode == 0  # handed over, dropped
        made = cli("ingest", "text", corpus, "-c", "mem", "-m", other)
        assert made.returncode == 0, made.stderr
        with pytest.raises(EmbedderMismatch, match="'mem' was made again by another process with embedder 'local:"):
            store.search("mem", query, 1)


def test_a_holders_secrets_are_not_shown_to_those_who_wait():
    from ragcap.locks import _redacted

    args = ["serve", "-c", "x", "--api-key", "K1", "--qdrant-api-key=K2", "--port", "8000", "--hf-token", "T"]
    assert _redacted(args) == ["serve", "-c", "x", "--api-key", "***", "--qdrant-api-key=***", "--port", "8000", "--hf-token", "***"]
