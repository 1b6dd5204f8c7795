"""Damaged store files, one class at a time: every command fails in one clear line (never a
crash, a traceback or a wrong answer), the other collections stay usable, `check` names the
damage, `drop` removes it, and the recovery paths (`--repair` + re-ingest, `--restore-record`,
an export restored) bring the collection back."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.faults.conftest import cli, ingest, inline, one_error_line

CAPTIONS = [f"a {c} {t} beside the road" for c in ("red", "blue", "green", "white", "black") for t in ("car", "bus", "van", "bike")]

# Qdrant Edge's id map: entries of 1 type byte, a 16-byte UUID and a 4-byte internal id (the
# file format, read here only to aim the damage at a known point).
ENTRY = 21


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_clip_dir):
    """A home with collections 'mem' (20 captions) and 'other'; and the caption stored first."""
    home = tmp_path_factory.mktemp("pristine")
    ingest("mem", CAPTIONS, tiny_clip_dir, home)
    ingest("other", ["a cat", "a dog"], tiny_clip_dir, home)
    segment = next((home / "collections" / "mem" / "shard" / "segments").iterdir())
    first = str(uuid.UUID(bytes=(segment / "mutable_id_tracker.mappings").read_bytes()[1:17]))
    from ragcap.store import point_id

    caption = next(c for c in CAPTIONS if point_id("mem", c) == first)
    return home, caption


@pytest.fixture
def home(pristine, ragcap_home):
    shutil.rmtree(ragcap_home)
    subprocess.run(["cp", "-a", "--sparse=always", str(pristine[0]), str(ragcap_home)], check=True)
    return ragcap_home


def segment(home: Path) -> Path:
    return next((home / "collections" / "mem" / "shard" / "segments").iterdir())


def flip(path: Path, offset: int, length: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def scale_first_vector(home: Path) -> None:
    """Multiply the first stored vector by 100 (float16 storage, 32-d): a cosine of ~100."""
    path = segment(home) / "vector_storage" / "vectors" / "chunk_0.mmap"
    vector = np.fromfile(path, dtype=np.float16, count=32)
    with open(path, "r+b") as f:
        f.write((vector.astype(np.float32) * 100).astype(np.float16).tobytes())


def lose_points(home: Path, lost: int) -> None:
    path = home / "collections" / "mem" / "ragcap.json"
    record = json.loads(path.read_text())
    record["points"] += lost
    path.write_text(json.dumps(record))


DAMAGE = {
    # name: (damage, detected by the listing, what `check` says)
    "record unreadable": (lambda h: (h / "collections/mem/ragcap.json").write_text("{not json"), True, "record"),
    "record deleted": (lambda h: (h / "collections/mem/ragcap.json").unlink(), True, "no record"),
    "segment.json": (lambda h: (segment(h) / "segment.json").write_text("{not json"), True, "segment.json is unreadable"),
    "edge_config.json": (lambda h: (h / "collections/mem/shard/edge_config.json").write_text("[]x"), True, "edge_config.json is unreadable"),
    "version.info": (lambda h: (segment(h) / "version.info").write_text("garbage"), True, "version.info is unreadable"),
    "WAL index": (lambda h: (h / "collections/mem/shard/wal/first-index").write_text("garbage"), False, "fails opening it"),
    "vectors": (scale_first_vector, False, "norm"),
    "payloads": (lambda h: flip(segment(h) / "payload_storage" / "page_0.dat", 0, 64), False, "unreadable"),
    "deleted flags": (lambda h: flip(segment(h) / "vector_storage" / "deleted" / "flags_a.dat", 0, 64), False, "not 32 finite numbers"),
    "id map entry": (lambda h: flip(segment(h) / "mutable_id_tracker.mappings", 5 * ENTRY + 17, 4), False, "SIGABRT"),
    # Points gone from the store (as after a truncated id map the WAL no longer covers): its
    # record remembers how many were stored.
    "points lost": (lambda h: lose_points(h, 5), False, "were lost"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_collection(case, home, pristine):
    damage, listed_as_damaged, diagnosis = DAMAGE[case]
    damage(home)

    # Retrieval: one line pointing at the way out. The case where the engine aborts runs as a
    # process of its own, to show the exit status; the others need not.
    search = cli if case == "id map entry" else inline
    line = one_error_line(search("search", pristine[1], "-c", "mem", "-k", "3"))
    assert "ragcap check mem" in line or "restore-record" in line, line

    listed = inline("collections", "--json")
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["other"]["status"] == "ok" and rows["other"]["points"] == 2  # the rest is listed
    assert (rows["mem"]["status"] == "damaged") == listed_as_damaged
    assert listed.exit_code == (1 if listed_as_damaged else 0)
    # What is unknown is null, not a string where scripts expect a number.
    assert all(rows["mem"][k] is None or isinstance(rows["mem"][k], t) for k, t in (("points", int), ("dim", int), ("embedder", str)))

    checked = inline("check", "mem")
    assert checked.exit_code == 1 and "Traceback" not in checked.stderr
    assert diagnosis in checked.stdout, checked.stdout

    assert inline("drop", "mem", "--yes").exit_code == 0  # without opening it
    assert not (home / "collections" / "mem").exists()
    assert json.loads(inline("search", "a cat", "-c", "other", "-k", "1", "--json").stdout)["neighbours"][0]["caption"] == "a cat"


def test_impossible_similarity_is_refused_then_repaired_and_restored_by_reingest(home, pristine, tmp_path):
    """Issue row: flipped vector bytes gave exit 0 with a "cosine" of 15.6 and a wrong caption,
    and re-ingesting said "already stored" and repaired nothing."""
    scale_first_vector(home)
    line = one_error_line(inline("search", pristine[1], "-c", "mem", "-k", "3"))
    assert "outside [-1, 1]" in line and "ragcap check mem" in line

    repaired = inline("check", "mem", "--repair")
    assert repaired.exit_code == 0 and "deleted 1 damaged points" in repaired.stderr
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CAPTIONS) + "\n")
    again = json.loads(inline("ingest", "text", corpus, "-c", "mem", "--json").stdout)
    assert (again["stored"], again["already_stored"], again["points"]) == (1, 19, 20)
    found = json.loads(inline("search", pristine[1], "-c", "mem", "-k", "1", "--json").stdout)["neighbours"][0]
    assert found["caption"] == pristine[1] and found["score"] == pytest.approx(1.0, abs=2e-3)
    assert inline("check", "mem").exit_code == 0


def test_lost_record_is_never_overwritten_and_can_be_restored(home, pristine, tiny_clip_dir, tmp_path):
    """Issue row: with ragcap.json deleted, the next `ingest -m` into that name silently deleted its points."""
    (home / "collections" / "mem" / "ragcap.json").unlink()
    corpus = tmp_path / "more.txt"
    corpus.write_text("a new caption\n")
    line = one_error_line(inline("ingest", "text", corpus, "-c", "mem", "-m", tiny_clip_dir))
    assert "has no record" in line and "--restore-record" in line and "nothing was changed" in line

    from tests.helpers import make_tiny_clip

    stranger = make_tiny_clip(tmp_path / "stranger", seed=1)  # same architecture, other weights
    line = one_error_line(inline("check", "mem", "--restore-record", "--model", stranger))
    assert "does not reproduce the vectors" in line
    restored = inline("check", "mem", "--restore-record", "--model", tiny_clip_dir)
    assert restored.exit_code == 0 and "record restored" in restored.stderr and "ok (20 points)" in restored.stdout
    found = json.loads(inline("search", pristine[1], "-c", "mem", "-k", "1", "--json").stdout)["neighbours"][0]
    assert found["caption"] == pristine[1]


def test_an_export_restores_a_collection_damaged_beyond_repair(home, tmp_path):
    """The documented recovery: keep `ragcap export` backups; restore with `ingest parquet`."""
    backup = tmp_path / "mem.parquet"
    assert inline("export", "mem", backup).exit_code == 0
    before = json.loads(inline("search", "a red car", "-c", "mem", "-k", "5", "--json").stdout)["neighbours"]
    (segment(home) / "segment.json").write_text("{not json")
    assert "cannot be repaired in place" in inline("check", "mem").stderr
    assert inline("drop", "mem", "--yes").exit_code == 0
    assert inline("ingest", "parquet", backup, "-c", "mem", "--text-field", "caption", "--vector-field", "vector").exit_code == 0
    assert json.loads(inline("search", "a red car", "-c", "mem", "-k", "5", "--json").stdout)["neighbours"] == before
    assert inline("check", "mem").exit_code == 0
