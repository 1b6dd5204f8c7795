"""Small helpers every stage shares: devices, atomic files, free space, batching, telling paths from names."""

from __future__ import annotations

import errno
import itertools
import os
import re
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

if TYPE_CHECKING:  # torch is imported lazily: the store and the CLI's parsing do not need it
    import torch

T = TypeVar("T")


def default_device(device: "str | torch.device | None" = None) -> "torch.device":
    """The device to run models on: the one asked for, else $RAGCAP_DEVICE or the config file's
    `device`, else CUDA when present, else the CPU."""
    import torch

    from ragcap.config import setting

    where = "--device"
    if device is None:
        device, where = setting("device")
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from ragcap.errors import OptionError

    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise OptionError(f"{where}: {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    # Said here, not later as a model that "cannot load" or a driver error.
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"{where}: {device} asked for, but torch sees no CUDA GPU here; use cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise OptionError(f"{where}: {device} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return chosen


def many(items, what: str, call: str):
    """`items`, or TypeError when it is one input where a list of them belongs: a str (or bytes)
    would be iterated quietly, every character an input of its own (a caption of 'e', 'x', ...)."""
    if isinstance(items, (str, bytes, bytearray, os.PathLike)) or type(items).__module__.startswith("PIL."):
        shown = repr(items) if len(repr(items)) <= 60 else f"{repr(items)[:40]}..."
        raise TypeError(f"{call} takes a list of {what}, not one {type(items).__name__}: put it in a list, [{shown}]")
    return items


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of at most `size` items (the last may be shorter); streams its input."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


@contextmanager
def atomic_path(path: str | Path, need_bytes: int = 0) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed over `path` only if the block succeeds.

    So a crash, a full disk or Ctrl-C never leaves a half-written file under the real name, and
    an existing file is only replaced by a complete one. The temporary name is unique, so two
    processes writing the same file never trip over each other's temporary; the data is fsynced
    before the rename, so the rename cannot overtake the data after a power cut. need_bytes:
    refuse up front (DiskFullError) unless that much is free; a write that fills the disk anyway
    also ends in DiskFullError, with the temporary removed. A device or a pipe (/dev/null, a
    FIFO) is yielded itself: a rename would replace the device, and a stream cannot be half-written.
    """
    path = Path(path)
    if not_a_file(path):
        yield path
        return
    if need_bytes:
        ensure_free_space(path.parent, need_bytes, str(path))
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise disk_full_error(e, path) or e
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _match_umask(tmp)
        os.replace(tmp, path)
    except Exception as e:
        # Writers report a full disk in their own words (torch: "file write failed"); the
        # free space left says what happened.
        raise disk_full_error(e, path) or e
    finally:
        tmp.unlink(missing_ok=True)


def not_a_file(path: str | Path) -> bool:
    """Whether `path` exists as something other than a regular file or a folder: /dev/null,
    /dev/stdout, a FIFO. Output goes into it as it is, never through a renamed temporary."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) or _names_an_open_descriptor(path)


def _names_an_open_descriptor(path: str | Path) -> bool:
    """Whether `path` is, or links to, /proc/PID/fd/N (/dev/stdout, /dev/fd/3): a file the shell
    opened for this process (`> out.parquet`). Such a path is a regular file to stat, but a
    temporary renamed over it would replace the /dev/stdout link itself, not write the file."""
    hop = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on links followed
        if re.fullmatch(r"/proc/[^/]+/fd", os.path.realpath(os.path.dirname(hop))):
            return True
        if not os.path.islink(hop):
            return False
        hop = os.path.join(os.path.dirname(hop), os.readlink(hop))
    return False


def write_atomic(path: str | Path, write: Callable[[Path], None], need_bytes: int = 0) -> None:
    """write(tmp) into a temporary sibling, then rename it over `path` (see atomic_path)."""
    with atomic_path(path, need_bytes) as tmp:
        write(tmp)


# A write that failed with less than this free on its filesystem failed for want of space.
FULL_BELOW_BYTES = 1 << 20


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged write may still use on the filesystem holding `path` (or its
    nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def ensure_free_space(path: str | Path, need_bytes: int, what: str) -> None:
    """DiskFullError naming the directory and both amounts unless `need_bytes` are free there."""
    from ragcap.errors import DiskFullError

    free = free_bytes(path)
    if free < need_bytes:
        raise DiskFullError(
            f"not enough free space in {path} for {what}: it needs {format_bytes(need_bytes)}, "
            f"{format_bytes(free)} are free; nothing was written: free some space and rerun"
        )


def disk_full_error(exc: BaseException, path: str | Path):
    """A DiskFullError for `exc` if it was a write failing on a full filesystem, else None."""
    from ragcap.errors import DiskFullError, RagcapError

    if isinstance(exc, RagcapError):
        return None
    no_space = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    try:
        free = free_bytes(Path(path).parent)
    except OSError:
        return None
    if not no_space and free >= FULL_BELOW_BYTES:
        return None
    error = DiskFullError(
        f"the disk holding {path} is full ({format_bytes(free)} free) and the write was stopped; "
        f"nothing was half-written: free some space and rerun"
    )
    error.__cause__ = exc
    return error


def checkpoint_bytes(model) -> int:
    """Room to write a training checkpoint of `model` beside the one it replaces, and then the
    decoder's weights: weights and AdamW's two moments are 3x the parameters, the weights 1x."""
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters())


def format_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def on_memory_filesystem(path: str | Path) -> bool:
    """Whether `path` lies on tmpfs/ramfs, where even *reading* a hole of a memory-mapped file
    takes memory from the filesystem's size (disk filesystems map a shared zero page instead)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    target = os.path.realpath(path)
    best, kind = "", ""
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind in ("tmpfs", "ramfs")


def _match_umask(path: Path) -> None:
    # mkstemp creates files 0600; a file the user asked for gets the mode open() would give it.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def looks_like_path(name: str) -> bool:
    """Whether a model name is meant as a local path rather than a hub id.

    "org/name" is a hub id; an existing path, an explicit relative or absolute form, a home
    directory or more than one separator is a path.
    """
    return (
        Path(name).expanduser().exists()
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )
