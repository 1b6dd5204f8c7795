"""Small helpers every stage shares: devices, atomic files, batching, telling paths from names."""

from __future__ import annotations

import itertools
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

if TYPE_CHECKING:  # torch is imported lazily: the store and the CLI's parsing do not need it
    import torch

T = TypeVar("T")


def default_device(device: "str | torch.device | None" = None) -> "torch.device":
    """The device to run models on: the one asked for, else CUDA when present, else the CPU."""
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of at most `size` items (the last may be shorter); streams its input."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed over `path` only if the block succeeds.

    So a crash, a full disk or Ctrl-C never leaves a half-written file under the real name, and
    an existing file is only replaced by a complete one. The temporary name is unique, so two
    processes writing the same file never trip over each other's temporary; the data is fsynced
    before the rename, so the rename cannot overtake the data after a power cut.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _match_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary sibling, then rename it over `path` (see atomic_path)."""
    with atomic_path(path) as tmp:
        write(tmp)


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
