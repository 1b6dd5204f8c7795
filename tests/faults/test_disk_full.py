"""Full filesystems (a small tmpfs): a clear error and nothing lost, never a signal death.

The embedded store memory-maps pre-sized files; on main a full disk killed ragcap with SIGBUS
(exit 135) during an ingest, and even when opening a collection.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.faults.conftest import blocked_reading_stdin, cli, copy_home, fill, ingest, one_error_line, start, wait_for

MiB = 1 << 20
LINES = [f"caption {i} of an ingest that fills the disk" for i in range(90)]


def test_ingest_stops_cleanly_when_the_disk_fills_and_resumes(small_fs, tiny_clip_dir, tmp_path, monkeypatch):
    fs = small_fs("200m")
    monkeypatch.setenv("RAGCAP_HOME", str(fs / "home"))
    run = start("-m", "ragcap.cli", "ingest", "text", "-", "-c", "full", "-m", tiny_clip_dir, "--batch-size", "30", stdin=subprocess.PIPE)
    run.stdin.write("\n".join(LINES[:30]) + "\n")
    run.stdin.flush()
    record = fs / "home" / "collections" / "full" / "ragcap.json"
    wait_for(lambda: record.exists() and json.loads(record.read_text())["points"] == 30 and blocked_reading_stdin(run),
             "the first batch is stored", process=run)
    filler = fill(fs, leave=24 * MiB)  # something else fills the disk while the ingest runs
    try:
        run.stdin.write("\n".join(LINES[30:]) + "\n")
        run.stdin.close()
    except BrokenPipeError:
        pass  # it stopped reading: it had already stopped
    err = run.stderr.read()
    line = one_error_line(subprocess.CompletedProcess(run.args, run.wait(timeout=300), "", err))
    assert "not enough free space in" in line and str(fs) in line and "it needs" in line and "MiB are free" in line

    assert json.loads(cli("collections", "--json").stdout)[0]["points"] == 30  # still listed, intact
    filler.unlink()
    corpus = tmp_path / "all.txt"
    corpus.write_text("\n".join(LINES) + "\n")
    resumed = json.loads(cli("ingest", "text", corpus, "-c", "full", "--json").stdout)
    assert (resumed["already_stored"], resumed["stored"], resumed["points"]) == (30, 60, 90)
    assert cli("check", "full").returncode == 0


def test_opening_a_collection_on_a_full_tmpfs_is_refused_with_the_space_needed(small_fs, tiny_clip_dir, ragcap_home, monkeypatch):
    """On tmpfs, opening a collection reads its vector storage, which takes memory from the
    filesystem: with no room, main died of SIGBUS in `collections` and `search`."""
    ingest("mem", ["a red car", "a blue boat"], tiny_clip_dir)
    fs = small_fs("150m")
    home = copy_home(ragcap_home, fs / "home")
    monkeypatch.setenv("RAGCAP_HOME", str(home))
    fill(fs, leave=8 * MiB)
    line = one_error_line(cli("search", "a red car", "-c", "mem"))
    assert "not enough free space" in line and "opening collection 'mem'" in line and "it needs" in line
    listed = cli("collections", "--json")  # the listing opens nothing
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["points"] == 2


def test_caption_output_on_a_full_disk(small_fs, tiny_clip_dir, tmp_path):
    from PIL import Image

    ingest("shapes", ["a red square", "a blue square"], tiny_clip_dir)
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), "red").save(image)
    fs = small_fs("1m")
    out = fs / "captions.jsonl"
    out.write_text("an earlier run\n")
    fill(fs, leave=0)
    line = one_error_line(cli("caption", image, "-c", "shapes", "--mode", "clipre", "--format", "jsonl", "-o", out))
    assert "is full" in line or "No space left" in line
    assert out.read_text() == "an earlier run\n"
    assert sorted(p.name for p in fs.iterdir()) == ["captions.jsonl", "filler"]  # no temporary left


def test_training_on_a_full_disk_is_refused_before_it_starts(small_fs, tiny_clip_dir):
    """Issue row: disk full in train-decoder gave a traceback and left a 61 MB .tmp behind."""
    ingest("train", [f"a {c} dog on grass" for c in ("red", "blue", "green", "white")], tiny_clip_dir)
    fs = small_fs("2m")
    out = fs / "decoder"
    line = one_error_line(cli("train-decoder", "-c", "train", "--out", out, "--layers", "1", "--width", "256", "--epochs", "1"))
    assert "not enough free space" in line and str(out) in line and "checkpoint" in line
    assert not out.exists()  # refused before writing: the --out it made is gone again


def test_export_on_a_full_disk_leaves_no_temporary(small_fs, tiny_clip_dir):
    ingest("mem", [f"caption {i}" for i in range(200)], tiny_clip_dir)
    fs = small_fs("1m")
    fill(fs, leave=8192)
    line = one_error_line(cli("export", "mem", fs / "mem.parquet"))
    assert "is full" in line
    assert [p.name for p in fs.iterdir()] == ["filler"]  # no temporary left


@pytest.mark.parametrize("what", ["the collection record", "the lock"])
def test_creating_a_collection_on_a_full_disk(small_fs, tiny_clip_dir, monkeypatch, tmp_path, what):
    fs = small_fs("110m")
    monkeypatch.setenv("RAGCAP_HOME", str(fs / "home"))
    (fs / "home" / "collections").mkdir(parents=True)
    fill(fs, leave=4 * MiB if what == "the collection record" else 0)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a cat\na dog\n")
    line = one_error_line(cli("ingest", "text", corpus, "-c", "new", "-m", tiny_clip_dir))
    assert "free space" in line or "is full" in line
    assert [p.name for p in (fs / "home" / "collections").iterdir() if not p.name.startswith(".new.lock")] == []


def test_a_writer_reporting_a_full_disk_in_its_own_words(tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError("... file write failed"), not ENOSPC: the
    free space left tells atomic_path what happened (and it still removes the temporary)."""
    from ragcap import util
    from ragcap.errors import DiskFullError

    monkeypatch.setattr(util, "free_bytes", lambda path: 0)
    with pytest.raises(DiskFullError, match="is full"):
        with util.atomic_path(tmp_path / "checkpoint.pt") as tmp:
            tmp.write_bytes(b"half a checkpoint")
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert list(tmp_path.iterdir()) == []
