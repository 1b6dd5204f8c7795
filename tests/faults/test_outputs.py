"""Output files: never truncated by a failed run, never complete-looking when cut short, resumable."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.faults.conftest import REPO, cli, ingest, inline, messages, one_error_line, start, wait_for


@pytest.fixture
def photos(tmp_path, tiny_clip_dir):
    """A collection to caption against (mode clipre needs no decoder) and six images, the fourth
    named stop.png: the stopper halts a caption run when it loads that one."""
    ingest("shapes", [f"a {c} square on white" for c in ("red", "green", "blue", "black")], tiny_clip_dir)
    paths = []
    for i, colour in enumerate(["red", "green", "blue", "black", "white", "yellow"]):
        path = tmp_path / ("stop.png" if i == 3 else f"img{i}.png")
        Image.new("RGB", (64, 64), colour).save(path)
        paths.append(path)
    return paths


def caption_args(photos, out, *extra):
    return ["caption", *photos, "-c", "shapes", "--mode", "clipre", "--format", "jsonl", "--batch-size", "1", "-o", out, *extra]


def stopped_run(photos, out, tmp_path):
    """A caption run halted while loading stop.png, after writing the three images before it."""
    marker = tmp_path / "reached"
    run = start("-m", "tests.faults.stopper", marker, "ragcap.images:load_image:stop.png", *caption_args(photos, out))
    wait_for(marker.exists, "the run reached stop.png", process=run)
    # Images load one batch ahead of captioning: the three before it are written after it is reached.
    partial = Path(f"{out}.partial")
    wait_for(lambda: partial.exists() and len(partial.read_text().splitlines()) == 3, "three results written", process=run)
    return run


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_caption_killed_then_resumed_equals_an_uninterrupted_run(photos, tmp_path):
    """Issue row: `caption -o` killed mid-run left a complete-looking partial file under the final name."""
    reference = tmp_path / "reference.jsonl"
    assert inline(*caption_args(photos, reference)).exit_code == 0

    out = tmp_path / "out.jsonl"
    run = stopped_run(photos, out, tmp_path)
    run.send_signal(signal.SIGKILL)
    run.wait()
    partial = tmp_path / "out.jsonl.partial"
    assert not out.exists()
    assert [r["file"] for r in records(partial)] == [str(p) for p in photos[:3]]

    line = one_error_line(cli(*caption_args(photos, out)))  # starting over would lose it: refused
    assert "--resume" in line and str(partial) in line
    resumed = cli(*caption_args(photos, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert records(out) == records(reference) and not partial.exists()


def test_ctrl_c_keeps_the_results_and_says_how_to_resume(photos, tmp_path):
    """Issue row: Ctrl-C promised a resume that did not exist."""
    out = tmp_path / "out.jsonl"
    run = stopped_run(photos, out, tmp_path)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "Traceback" not in err, err
    [line] = messages(err)
    assert line == f"ragcap: interrupted; the results so far are kept in {out}.partial: rerun with --resume to continue"
    assert cli(*caption_args(photos, out, "--resume")).returncode == 0
    assert [r["file"] for r in records(out)] == [str(p) for p in photos]


def test_resume_drops_what_a_kill_cut_short(photos, tmp_path):
    """A cut last line, and an input with only some of its modes, are redone; other formats too."""
    for fmt in ("jsonl", "csv", "text"):
        out = tmp_path / f"out.{fmt}"
        args = ["caption", *photos, "-c", "shapes", "--mode", "clipre", "--format", fmt, "-o", out]
        assert inline(*args).exit_code == 0
        complete = out.read_text()
        lines = complete.splitlines(keepends=True)
        cut = "".join(lines[: len(lines) // 2]) + lines[len(lines) // 2][:5]  # half the results and a cut line
        out.rename(tmp_path / f"out.{fmt}.partial")
        (tmp_path / f"out.{fmt}.partial").write_text(cut)
        assert inline(*args, "--resume").exit_code == 0
        assert out.read_text() == complete, fmt


def test_failed_run_leaves_an_existing_output_untouched(photos, tmp_path):
    """Issue row: a typo in -c truncated the existing output to 0 bytes."""
    out = tmp_path / "out.jsonl"
    out.write_text("results of an earlier run\n")
    line = one_error_line(cli(*caption_args(photos, out)[:-2], "-c", "shapez", "-o", out))
    assert "no collection 'shapez'" in line
    assert out.read_text() == "results of an earlier run\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out.jsonl"]


def test_two_runs_into_one_output_file(photos, tmp_path):
    out = tmp_path / "out.jsonl"
    run = stopped_run(photos, out, tmp_path)
    try:
        line = one_error_line(cli(*caption_args(photos, out)))
        assert "another ragcap process is writing" in line
    finally:
        run.kill()
        run.wait()


def test_resume_with_other_modes_is_refused(photos, tmp_path):
    out = tmp_path / "out.jsonl"
    assert inline(*caption_args(photos[:2], out)).exit_code == 0
    line = one_error_line(cli("caption", *photos, "-c", "shapes", "--mode", "pd", "--format", "jsonl", "-o", out, "--resume"))
    assert "mode 'clipre'" in line and "same --mode" in line
    assert len(records(out)) == 2


def test_export_failure_leaves_an_existing_file_untouched(tmp_path):
    out = tmp_path / "backup.parquet"
    out.write_bytes(b"an earlier backup")
    line = one_error_line(cli("export", "nothing", out))
    assert "no collection 'nothing'" in line
    assert out.read_bytes() == b"an earlier backup" and [p.name for p in tmp_path.iterdir()] == ["backup.parquet"]


def read_fifo(path: Path) -> tuple[threading.Thread, list[bytes]]:
    """A reader draining the FIFO at `path` in the background, as `cmd -o FIFO | ...` would."""
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(path.read_bytes()), daemon=True)
    reader.start()
    return reader, got


def test_output_into_a_fifo_or_device_is_written_in_place_not_renamed_over(photos, tmp_path):
    """Issue row: `caption -o /dev/null` (as root) renamed /dev/null.partial over /dev/null,
    leaving a regular file where the device was. A FIFO stands in for the device here."""
    fifo = tmp_path / "results"
    os.mkfifo(fifo)
    reader, got = read_fifo(fifo)
    assert inline(*caption_args(photos[:2], fifo)).exit_code == 0
    reader.join(60)
    assert [json.loads(line)["file"] for line in got[0].decode().splitlines()] == [str(p) for p in photos[:2]]
    assert stat.S_ISFIFO(fifo.stat().st_mode) and [p.name for p in tmp_path.iterdir() if p.name.startswith("results")] == ["results"]

    line = one_error_line(cli(*caption_args(photos[:2], fifo), "--resume"))
    assert "is a device or a pipe" in line and stat.S_ISFIFO(fifo.stat().st_mode)

    reader, got = read_fifo(fifo)
    assert inline("export", "shapes", fifo).exit_code == 0
    reader.join(60)
    assert pq.read_table(io.BytesIO(got[0])).num_rows == 4 and stat.S_ISFIFO(fifo.stat().st_mode)


def test_export_to_stdout_is_parquet_alone(photos):
    """`ragcap export C /dev/stdout | ...`: the summary goes to stderr, after the Parquet it would break it."""
    run = subprocess.run([sys.executable, "-m", "ragcap.cli", "export", "shapes", "/dev/stdout", "--json"],
                         capture_output=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert pq.read_table(io.BytesIO(run.stdout)).num_rows == 4
    assert "wrote 4 points of shapes to stdout" in run.stderr.decode()


def test_export_under_a_file_names_it(photos, tmp_path):
    (tmp_path / "a.txt").write_text("a file")
    line = one_error_line(cli("export", "shapes", tmp_path / "a.txt" / "x.parquet"))
    assert f"part of {tmp_path / 'a.txt'} is a file, not a folder" in line


def test_no_resume_without_an_output_file(photos):
    assert "--resume continues an output file" in one_error_line(cli("caption", *photos, "-c", "shapes", "--mode", "clipre", "--resume"))


def test_caption_ctrl_c_on_stdout_output_is_one_line(photos, tmp_path):
    marker = tmp_path / "reached"
    run = start("-m", "tests.faults.stopper", marker, "ragcap.images:load_image:stop.png",
                "caption", *photos, "-c", "shapes", "--mode", "clipre", "--batch-size", "1")
    wait_for(marker.exists, "the run reached stop.png", process=run)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and messages(err) == ["ragcap: interrupted"]
