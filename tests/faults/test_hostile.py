"""Hostile input: names, nesting, pickles; and every error is one line unless RAGCAP_DEBUG=1."""

from __future__ import annotations

import json
import pickle

import pytest

from tests.faults.conftest import cli, ingest, inline, one_error_line


@pytest.mark.parametrize("name", ["ab\n", "../escape", ".hidden", "a" * 129, "", "a b", "a/b", "caf\u00e9", "-x"])
def test_bad_collection_names_are_refused_with_the_rule(name, tmp_path, ragcap_home, tiny_clip_dir):
    """Issue row: "ab\\n" was accepted ($ matches before a final newline): a directory with a newline in its name."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("a cat\n")
    line = one_error_line(inline("ingest", "text", corpus, "-c", name, "-m", tiny_clip_dir))
    assert f"bad collection name {name!r}" in line and "1 to 128 characters" in line
    assert [p.name for p in (ragcap_home / "collections").iterdir()] == []


def test_a_128_character_name_is_fine(tiny_clip_dir):
    ingest("a" * 128, ["a cat"], tiny_clip_dir)
    assert json.loads(inline("collections", "--json").stdout)[0]["name"] == "a" * 128


def test_jsonl_nested_100k_deep_is_a_bad_line_not_a_crash(tmp_path, tiny_clip_dir):
    """Issue row: a JSONL line nested 100k deep gave a RecursionError traceback, even with --skip-bad."""
    corpus = tmp_path / "deep.jsonl"
    corpus.write_text('{"caption": "a cat"}\n' + "[" * 100_000 + "]" * 100_000 + '\n{"caption": "a dog"}\n')
    line = one_error_line(inline("ingest", "jsonl", corpus, "--text-field", "caption", "-c", "deep", "-m", tiny_clip_dir))
    assert f"{corpus}:2" in line and "nested too deeply" in line
    skipped = inline("ingest", "jsonl", corpus, "--text-field", "caption", "-c", "deep", "-m", tiny_clip_dir, "--skip-bad", "--json")
    assert skipped.exit_code == 0, skipped.stderr
    assert (json.loads(skipped.stdout)["skipped_bad"], json.loads(skipped.stdout)["points"]) == (1, 2)


def test_errors_are_one_line_and_ragcap_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing-list.txt"
    line = one_error_line(inline("caption", f"@{missing}", "-c", "none"))  # an OSError, not a RagcapError
    assert line == f"ragcap: error: No such file or directory: {missing}"
    debug = cli("caption", f"@{missing}", "-c", "none", env={"RAGCAP_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == line


def test_every_kind_of_error_is_described_in_one_line():
    import errno

    from ragcap.cli.common import describe_error

    PanicException = type("PanicException", (BaseException,), {})  # how pyo3 delivers a Rust panic
    described = {
        kind: describe_error(error)
        for kind, error in {
            "bug": ZeroDivisionError("division by zero"),
            "recursion": RecursionError("maximum recursion depth exceeded"),
            "memory": MemoryError(),
            "unpickling": pickle.UnpicklingError("Weights only load failed"),
            "no space": OSError(errno.ENOSPC, "No space left on device", "/data/out.jsonl"),
            "permission": PermissionError(errno.EACCES, "Permission denied", "/data/out.jsonl"),
            "engine": Exception("Service runtime error: WAL ack failed\nmore detail"),
            "panic": PanicException("index out of bounds"),
        }.items()
    }
    assert described["bug"].startswith("unexpected ZeroDivisionError: division by zero") and "RAGCAP_DEBUG=1" in described["bug"]
    assert "nested too deeply" in described["recursion"] and "out of memory" in described["memory"]
    assert "never runs code from a checkpoint" in described["unpickling"]
    assert "/data/out.jsonl is full" in described["no space"] or "No space left on device: /data/out.jsonl" in described["no space"]
    assert described["permission"] == "Permission denied: /data/out.jsonl"
    assert described["engine"] == "the store engine failed: Service runtime error: WAL ack failed"
    assert described["panic"] == "the store engine failed: index out of bounds"
    assert all("\n" not in line for line in described.values())


def test_a_malicious_checkpoint_is_refused_without_running_it(tmp_path, tiny_clip_dir):
    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    ingest("train", ["a red dog", "a blue dog", "a green dog", "a white dog"], tiny_clip_dir)
    out = tmp_path / "decoder"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(pickle.dumps(Exploit()))
    line = one_error_line(cli("train-decoder", "-c", "train", "--out", out, "--resume", "--layers", "1", "--width", "32"))
    assert "not a readable training checkpoint" in line
    assert not (tmp_path / "PWNED").exists()
