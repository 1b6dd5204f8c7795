"""Advisory locks between ragcap processes: one user of a collection at a time, one writer per output.

flock(2) rather than a lock library: a flock belongs to an open file and dies with its process,
kill -9 included, so a crash never leaves a stale lock that someone must delete by hand; and a
second lock taken *shared* by every waiter (the queue) lets the holder see that someone is
waiting, which is what lets the embedded store hand a collection over between operations.
Lock files are never deleted: a waiter that had opened the old file would lock an inode that no
one else sees. The lock file says who holds it, so whoever waits can say for whom.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ragcap.errors import RagcapError

POLL_S = 0.02  # between attempts while waiting; a handed-over lock is taken within this
NOTICE_AFTER_S = 2.0  # a wait shorter than this (another process's single operation) goes unsaid


class LockBusy(RagcapError):
    """The lock is held by another process (and waiting for it was not asked or timed out)."""


def describe_process() -> str:
    """"pid 4242: ragcap ingest text captions.txt -c coco": what a waiter is told about the holder."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program in ("__main__.py", "-m", "-c"):
        program = "ragcap" if "ragcap" in sys.argv[0] else "python"
    words = " ".join([program, *_redacted(sys.argv[1:])])
    return f"pid {os.getpid()}: {words[:200]}"


# Options whose values are secrets: a waiter, `collections` and the server's listing show the
# holder's command line, and must not show its --api-key or --qdrant-api-key.
_SECRET_OPTION = re.compile(r"--[\w-]*(key|token|password|secret)[\w-]*", re.IGNORECASE)


def _redacted(args: list[str]) -> list[str]:
    out, hide_next = [], False
    for arg in args:
        name, eq, _ = arg.partition("=")
        if hide_next:
            out.append("***")
        elif _SECRET_OPTION.fullmatch(name) and eq:
            out.append(f"{name}=***")
        else:
            out.append(arg)
        hide_next = not hide_next and not eq and bool(_SECRET_OPTION.fullmatch(arg))
    return out


def _try_lock(fd: int, mode: int = fcntl.LOCK_EX) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class Lock:
    """An exclusive lock on `path`, taken with a wait (seconds; None waits as long as it takes)."""

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self.queue_path = self.path.with_name(self.path.name + ".queue")
        self.what = what  # for messages: "collection 'coco'"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        """Who holds the lock, as that process wrote it (a holder writes it just after locking)."""
        for _ in range(10):
            try:
                text = self.path.read_text(encoding="utf-8", errors="replace").strip()
            except OSError:
                break
            if text:
                return text
            time.sleep(POLL_S)
        return "another process"

    def acquire(self, wait: float | None = 0, on_wait: Callable[[str], None] | None = None, hint: str = "") -> None:
        """Take the lock; LockBusy if it is still held after `wait` seconds. on_wait(message) is
        called once when the wait has lasted NOTICE_AFTER_S, saying for whom it waits."""
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            # Said plainly: the bare "Read-only file system: .../.NAME.lock" named a file the user never made.
            raise RagcapError(
                f"cannot use {self.what}: {self.path.parent} is not writable ({e.strerror}), and ragcap keeps "
                f"its lock file {self.path.name} there, even to read; make the folder writable, or copy it "
                f"to one that is (for the embedded store, point RAGCAP_HOME at the copy)"
            ) from None
        queue = None
        start = time.monotonic()
        told = False
        try:
            while not _try_lock(fd):
                waited = time.monotonic() - start
                if wait is not None and waited >= wait:
                    raise LockBusy(f"{self.what} is in use by {self.holder()}{hint}")
                if queue is None:
                    # Held shared while waiting: the holder's wanted() sees it.
                    queue = os.open(self.queue_path, os.O_RDWR | os.O_CREAT, 0o666)
                    fcntl.flock(queue, fcntl.LOCK_SH)
                if not told and waited >= NOTICE_AFTER_S and on_wait is not None:
                    limit = "as long as it takes" if wait is None else f"up to {wait:g} s"
                    on_wait(f"{self.what} is in use by {self.holder()}; waiting {limit}")
                    told = True
                time.sleep(POLL_S)
        except BaseException:
            os.close(fd)
            raise
        finally:
            if queue is not None:
                os.close(queue)  # leaves the queue (closing drops the shared lock)
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, describe_process().encode(), 0)
        except OSError:
            pass  # a full disk: waiters are told "another process" instead of which

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing drops the flock

    def wanted(self) -> bool:
        """Whether another process is waiting for this lock (holds the queue file shared)."""
        try:
            fd = os.open(self.queue_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return False
        try:
            if _try_lock(fd):
                fcntl.flock(fd, fcntl.LOCK_UN)
                return False
            return True
        finally:
            os.close(fd)

    def in_use(self) -> bool:
        """Whether another process holds the lock now (a probe: takes and drops it if free)."""
        if self._fd is not None:
            return False
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return False
        try:
            return not _try_lock(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


LOCK_FILE = ".ragcap.lock"


@contextmanager
def hold_directory(directory: str | Path, what: str | None = None) -> Iterator[Lock]:
    """Hold DIRECTORY (created if missing) against other ragcap processes writing into it, e.g.
    two `train-decoder` runs with one --out: the second is refused at once, naming the first.
    A directory made here that the run leaves empty (it failed before writing: a wrong
    collection, a bad option) is removed again, so a mistake leaves nothing behind."""
    directory = Path(directory)
    what = what or f"output directory {directory}"
    if directory.exists() and not directory.is_dir():
        raise RagcapError(f"{what}: {directory} is a file; give a folder to write into (a new or a resumable one)")
    made = [d for d in (directory, *directory.parents) if not d.exists()]  # --out a/b/c may make a and b too
    directory.mkdir(parents=True, exist_ok=True)
    lock = Lock(directory / LOCK_FILE, what)
    lock.acquire(0, hint="; wait for it to finish, or write to another directory")
    try:
        yield lock
    finally:
        lock.release()
        if made and all(p.name == LOCK_FILE for p in directory.iterdir()):
            shutil.rmtree(directory, ignore_errors=True)
            for parent in made[1:]:  # innermost first; rmdir leaves one that something else was put in
                with contextlib.suppress(OSError):
                    parent.rmdir()
