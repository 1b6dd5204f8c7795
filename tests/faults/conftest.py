"""What the fault tests share: real `ragcap` processes, one-line-error checks, small filesystems."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def cli(*args, env: dict | None = None, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`ragcap ARGS` as a separate process (what a user runs), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "ragcap.cli", *map(str, args)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})}, input=input, timeout=timeout,
    )


def inline(*args):
    """`ragcap ARGS` in this process (for what needs no process of its own: much faster)."""
    from typer.testing import CliRunner

    from ragcap.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def ingest(name: str, captions: list[str], model_dir: Path, home: Path | None = None) -> None:
    """Fill a collection of the embedded store under `home` (default $RAGCAP_HOME), in this process."""
    from pipelines import ReadOptions
    from ragcap import api

    corpus = model_dir.parent / f"{name}-{uuid.uuid4().hex[:8]}.txt"
    corpus.write_text("".join(c + "\n" for c in captions))
    with api.open_store(path=home) as store:
        api.ingest_corpus(store, "text", [str(corpus)], name, model=str(model_dir), read_options=ReadOptions())
    corpus.unlink()


def start(*command, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """A background process in this repository, e.g. start("-m", "ragcap.cli", "ingest", ...)."""
    return subprocess.Popen(
        [sys.executable, *map(str, command)], cwd=REPO, env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )


def python(code: str, *args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, **(env or {})}, timeout=timeout,
    )


def messages(stderr: str) -> list[str]:
    """ragcap's own lines on stderr (progress bars redraw with \\r and are left out, and so is
    the line saying where the models run, printed by every caption run at its start)."""
    lines = [line.split("\r")[-1].strip() for line in stderr.splitlines()]
    return [line for line in lines if line.startswith("ragcap:") and not line.startswith("ragcap: running on ")]


def one_error_line(result, code: int = 1) -> str:
    """The single 'ragcap: error: ...' line of a failed command (a process or an inline run),
    after checking that it failed with `code` (not a signal), printed no traceback and said
    nothing else on stderr."""
    returncode = getattr(result, "returncode", getattr(result, "exit_code", None))
    assert returncode == code, f"exit {returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = messages(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("ragcap: error: "), result.stderr
    return lines[0]


def wait_for(condition, what: str, timeout: float = 120, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (exit {process.returncode}) before {what}: {process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


def blocked_reading_stdin(process: subprocess.Popen) -> bool:
    return "pipe" in Path(f"/proc/{process.pid}/wchan").read_text()


@pytest.fixture
def small_fs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size; skips unless this runs as root on Linux (as CI does)."""
    mounted = []

    def mount(size: str) -> Path:
        if sys.platform != "linux" or os.geteuid() != 0:
            pytest.skip("a full filesystem needs a small tmpfs, which only root can mount (CI runs as root)")
        point = tmp_path / f"fs-{uuid.uuid4().hex[:8]}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(directory: Path, leave: int) -> Path:
    """A file that leaves `leave` bytes free on the filesystem of `directory`."""
    stats = os.statvfs(directory)
    free = stats.f_bavail * stats.f_frsize
    filler = directory / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        remaining = max(0, free - leave)
        while remaining:
            remaining -= f.write(chunk[: min(len(chunk), remaining)])
    return filler


def copy_home(source: Path, target: Path) -> Path:
    """A copy of a RAGCAP_HOME, sparse files kept sparse (as the store made them)."""
    subprocess.run(["cp", "-a", "--sparse=always", str(source), str(target)], check=True)
    return target
