"""`ragcap export`: a collection as Parquet (captions, payloads, vectors, the embedder in the metadata).

The file is the portable form of a memory: embed on a GPU box, `ingest parquet FILE
--vector-field vector` on a server elsewhere, or keep it as a backup. It is written under a
temporary name and renamed when complete, so an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import RagcapError, SourceError
from ragcap.store import Store
from ragcap.util import atomic_path

# Schema metadata key under which an export records its embedder (read back by ingest and training).
EMBEDDER_METADATA_KEY = b"ragcap.embedder"


def parquet_embedder(path: str | Path) -> EmbedderInfo | None:
    """The embedder a Parquet file records, or None for a file ragcap did not write."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.files import require_file

    try:
        metadata = pq.read_schema(require_file(path)).metadata or {}
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{path}: not a readable Parquet file ({e})") from None
    raw = metadata.get(EMBEDDER_METADATA_KEY)
    return EmbedderInfo.from_dict(json.loads(raw)) if raw else None


def export_schema(info: EmbedderInfo):
    """The export format: id, caption, payload (JSON), vector; the embedder in the metadata."""
    import pyarrow as pa

    return pa.schema(
        [("id", pa.string()), ("caption", pa.string()), ("payload", pa.string()), ("vector", pa.list_(pa.float32(), info.dim))],
        metadata={EMBEDDER_METADATA_KEY: json.dumps(info.to_dict())},
    )


def export_table(ids: list[str], payloads: list[dict], vectors, info: EmbedderInfo):
    """One batch of points (vectors: float32 (n, dim)) as a table of the export format."""
    import pyarrow as pa

    columns = [
        pa.array(ids, pa.string()),
        pa.array([p["caption"] for p in payloads], pa.string()),
        pa.array([json.dumps(p, ensure_ascii=False) for p in payloads], pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), info.dim),
    ]
    return pa.Table.from_arrays(columns, schema=export_schema(info))


def export_collection(store: Store, name: str, out: str | Path, on_progress: Callable[[int], None] | None = None) -> int:
    """Write every point of `name` to the Parquet file `out`; returns the number of points."""
    import pyarrow.parquet as pq

    out = Path(out)
    info = store.embedder(name)  # a missing collection fails before any folder is made
    if out.is_dir():
        raise RagcapError(f"cannot write {out}: it is a folder; give a file name such as {out / (name + '.parquet')}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RagcapError(f"cannot write {out}: part of {out.parent} is a file, not a folder; give another path") from None
    rows = 0
    # Through a Python file, which keeps its own position where Arrow's would seek: so the
    # export also streams into a pipe (-o /dev/stdout).
    with atomic_path(out) as tmp, open(tmp, "wb") as file, pq.ParquetWriter(file, export_schema(info)) as writer:
        for ids, vectors, payloads in store.scroll(name, with_vectors=True):
            writer.write_table(export_table(ids, payloads, vectors, info))
            rows += len(ids)
            if on_progress is not None:
                on_progress(len(ids))
    return rows
