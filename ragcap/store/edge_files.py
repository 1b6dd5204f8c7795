"""The embedded store's files: the collection record, and what Qdrant Edge's files need and show.

Qdrant Edge memory-maps pre-sized, sparse files (32 MiB WAL segments, vector chunks and payload
pages; a fresh collection is 98 MiB of which 1 MiB is written). A write into a hole that the
filesystem cannot back is not an error the engine sees: the kernel kills the process with
SIGBUS. So the store asks the filesystem for room *before* every write, sized by the functions
here. On tmpfs/ramfs even reading a hole through the memory map takes memory, and opening a
collection reads its vector storage whole (measured: 64 MiB of a 300-point collection's 161
MiB of holes, its vector and quantized-code chunks), so there the vector storage's holes count.

Damaged files can make the engine abort the whole process (a flipped id-map entry had it
allocate 103 GB), which no `except` can catch; `probe` opens a collection in a child process
first whenever its files are not as the last clean close left them (see `files_stamp`).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ragcap.errors import CollectionBusy, DamagedCollection
from ragcap.util import ensure_free_space, on_memory_filesystem, write_atomic

RECORD = "ragcap.json"
FORMAT = 1

PRESIZED_BYTES = 32 << 20  # each new WAL segment, vector chunk and payload page (measured)
# Headers, journals, trackers and page rounding of the small files, opening included.
RESERVE_BYTES = 16 << 20
# Measured 4078 bytes a point for 512-d float16 vectors and ~40-byte payloads (12 batches of
# 4096 on tmpfs): the WAL keeps float32 vectors and the payload, the segment the stored vectors
# and the payload again. The estimate below gives 5476 for that case, a third to spare.
POINT_OVERHEAD_BYTES = 256


def read_record(directory: Path, name: str) -> dict:
    """The collection's record; a missing or unreadable one is a DamagedCollection saying how to recover."""
    path = directory / RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("embedder"), dict):
            raise ValueError("no embedder in it")
        int(record["embedder"]["dim"]), str(record["embedder"]["spec"])
    except FileNotFoundError:
        raise DamagedCollection(
            f"collection '{name}' ({directory}) has no record ({RECORD}), so ragcap does not know the model that "
            f"filled it; nothing was changed. Recover the record with `ragcap check {name} --restore-record "
            f"--model SPEC` (it verifies SPEC against the stored vectors), or delete the collection with "
            f"`ragcap drop {name}`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedCollection(
            f"collection '{name}': its record {path} is unreadable ({type(e).__name__}: {e}); nothing was changed. "
            f"Rewrite it with `ragcap check {name} --restore-record --model SPEC`, or `ragcap drop {name}`"
        ) from None
    return record


def write_record(directory: Path, record: dict) -> None:
    write_atomic(directory / RECORD, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8"))


def _files(directory: Path):
    for root, _, names in os.walk(directory):
        for file in names:
            path = os.path.join(root, file)
            yield path, os.stat(path)


def files_stamp(shard_dir: Path) -> str:
    """A digest of every file's name, size and modification time: changed by any write, by the
    engine or by anyone else (writes through a memory map update the time too)."""
    digest = hashlib.sha256()
    for path, st in sorted(_files(shard_dir)):
        digest.update(f"{os.path.relpath(path, shard_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def vector_holes(shard_dir: Path) -> int:
    """Bytes of the vector storage (vectors and quantized codes) the filesystem does not back
    yet: what opening the collection reads, and on tmpfs allocates."""
    return sum(
        max(0, st.st_size - st.st_blocks * 512)
        for path, st in _files(shard_dir)
        if f"{os.sep}vector_storage{os.sep}" in path
    )


def allocated(directory: Path) -> int:
    return sum(st.st_blocks * 512 for _, st in _files(directory)) if directory.exists() else 0


def point_bytes(dim: int, vector_dtype: str, payload_bytes: int) -> int:
    stored = 2 if vector_dtype == "float16" else 4
    return 2 * dim * 4 + dim * stored + 2 * payload_bytes + POINT_OVERHEAD_BYTES


def need_to_open(shard_dir: Path) -> int:
    return RESERVE_BYTES + (vector_holes(shard_dir) if on_memory_filesystem(shard_dir) else 0)


def need_to_write(shard_dir: Path, new_bytes: int) -> int:
    """Room for `new_bytes` of points (a write touches the pages it fills, not whole files); on
    tmpfs also for the vector storage's holes and a chunk the batch may start, so that the
    collection still opens there afterwards."""
    extra = vector_holes(shard_dir) + PRESIZED_BYTES if on_memory_filesystem(shard_dir) else 0
    return RESERVE_BYTES + new_bytes + extra


def need_to_optimize(shard_dir: Path) -> int:
    """Building the index writes the new segment before it deletes the old one: about a copy."""
    return need_to_write(shard_dir, allocated(shard_dir / "segments"))


def ensure_room(shard_dir: Path, need: int, what: str, note: str = "") -> None:
    """DiskFullError unless `need` bytes are free: `what` is e.g. "storing 30 points in collection 'x'"."""
    ensure_free_space(
        shard_dir, need, f"{what} (its files are memory-mapped: a write the filesystem could not back would kill ragcap{note})"
    )


def metadata_problems(shard_dir: Path) -> list[str]:
    """Unreadable metadata files (plain JSON/text the engine parses first), found without the engine."""
    problems = []
    config = shard_dir / "edge_config.json"
    segments = sorted((shard_dir / "segments").glob("*")) if (shard_dir / "segments").is_dir() else []
    checks = [(config, json.loads)]
    for segment in segments:
        checks += [(segment / "segment.json", json.loads), (segment / "version.info", _version)]
    for path, parse in checks:
        try:
            parse(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            problems.append(f"{path} is missing")
        except (OSError, ValueError) as e:
            problems.append(f"{path} is unreadable ({type(e).__name__}: {str(e)[:80]})")
    if not shard_dir.is_dir():
        problems.append(f"{shard_dir} is missing")
    return problems


def _version(text: str) -> None:
    parts = text.strip().split(".")
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a version: {text[:20]!r}")


def shard_vectors(shard_dir: Path) -> tuple[int, str]:
    """(dimension, storage) from the shard's own config: what a rebuilt record must agree with."""
    config = json.loads((shard_dir / "edge_config.json").read_text(encoding="utf-8"))
    params = config["vectors"][""]
    return int(params["size"]), "float16" if params.get("datatype") == "float16" else "float32"


def shard_storage(shard_dir: Path) -> tuple[bool, str]:
    """(vectors on disk, quantization kind) from the shard's own config."""
    config = json.loads((shard_dir / "edge_config.json").read_text(encoding="utf-8"))
    on_disk = bool(config["vectors"][""].get("on_disk"))
    quantization = config.get("quantization_config") or {}
    kind = next(iter(quantization), "none")
    if kind == "turbo":
        kind = f"turbo{quantization['turbo'].get('bits', 'bits4').removeprefix('bits')}"
    return on_disk, {"scalar": "int8"}.get(kind, kind)


_PROBE = (
    "import sys, qdrant_edge as qe\n"
    "shard = qe.EdgeShard.load(sys.argv[1])\n"
    "print(shard.count(qe.CountRequest(exact=True)))\n"
    "shard.close()\n"
)


def probe(shard_dir: Path, name: str) -> int:
    """Open the shard in a child process: the point count, or DamagedCollection if the engine
    fails or aborts on its files (an abort in this process could not be reported)."""
    env = {**os.environ, "RUST_BACKTRACE": "0"}
    done = subprocess.run([sys.executable, "-c", _PROBE, str(shard_dir)], capture_output=True, text=True, env=env)
    if done.returncode == 0:
        return int(done.stdout.strip() or 0)
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip() and not line.startswith((" ", "Traceback", "note:"))]
    reason = lines[-1] if lines else "no message"
    if "WouldBlock" in reason:
        raise CollectionBusy(f"collection '{name}' ({shard_dir}) is open in a process that is not ragcap's; close it first")
    if done.returncode < 0:
        reason = f"{signal.Signals(-done.returncode).name}: {lines[0] if lines else 'no message'}"
    raise DamagedCollection(
        f"collection '{name}' is damaged: the store engine fails opening it ({reason[:300]}); "
        f"`ragcap check {name}` tells more. Restore it from a `ragcap export` file, or drop it and re-ingest"
    )


def describe_engine_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def new_record(embedder: dict, vector_dtype: str) -> dict:
    from ragcap.store import new_writes_token

    return {"format": FORMAT, "embedder": embedder, "vector_dtype": vector_dtype, "points": 0, "writes": new_writes_token()}
