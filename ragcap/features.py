"""Paired image–caption data: every image a reference file lists, encoded once into Parquet.

    ragcap embed-images REFS --images DIR -o FEATURES.parquet -m SPEC

One row per image: image_id (normalised), file, vector (the embedder's unit image embedding)
and references (its human captions). The embedder is recorded in the schema metadata as
`ragcap export` records it, so training refuses features of another embedder. Readers select
the columns they need, so a later optional column (SmallCap will want CLIP's patch features, the
vision tower's last hidden states, as `patches`) leaves older readers and files working.

The file mirrors REFS: a rerun keeps the vectors of images already in FEATURES.parquet and
encodes only the rest, with references taken from REFS as it is now. Work in progress is
written batch by batch to FEATURES.parquet.parts/ (each part atomically), so an interrupted run
resumes where it stopped; the parts are merged into FEATURES.parquet atomically at the end.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import ImageError, RagcapError
from ragcap.evaluate import References
from ragcap.export import EMBEDDER_METADATA_KEY, parquet_embedder
from ragcap.images import load_image
from ragcap.util import chunks, write_atomic

FEATURE_COLUMNS = ["image_id", "file", "vector", "references"]


@dataclass
class FeatureSummary:
    out: str
    embedder: str
    images: int = 0  # rows in the written file
    encoded: int = 0  # images encoded by this run
    reused: int = 0  # vectors kept from an earlier (possibly interrupted) run
    missing: list[str] = field(default_factory=list)  # referenced image ids with no file in the folder
    broken: dict[str, str] = field(default_factory=dict)  # image file -> why it could not be read

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Features:
    """A feature file read back: row i is image image_ids[i]."""

    image_ids: list[str]
    files: list[str]
    vectors: np.ndarray  # (n, dim) float32
    references: list[list[str]]
    embedder: EmbedderInfo

    def pairs(self) -> tuple[list[str], np.ndarray, list[str]]:
        """(captions, their image's vector, their image id): one training example per reference."""
        rows = [(c, i) for i, refs in enumerate(self.references) for c in refs]
        index = np.array([i for _, i in rows], dtype=np.int64)
        return [c for c, _ in rows], self.vectors[index], [self.image_ids[i] for _, i in rows]


def _schema(embedder: EmbedderInfo):
    import pyarrow as pa

    return pa.schema(
        [("image_id", pa.string()), ("file", pa.string()), ("vector", pa.list_(pa.float32(), embedder.dim)),
         ("references", pa.list_(pa.string()))],
        metadata={EMBEDDER_METADATA_KEY: json.dumps(embedder.to_dict())},
    )


def _table(embedder: EmbedderInfo, ids: list[str], files: list[str], vectors: np.ndarray, references: list[list[str]]):
    import pyarrow as pa

    vector_column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), embedder.dim)
    return pa.Table.from_arrays(
        [pa.array(ids, pa.string()), pa.array(files, pa.string()), vector_column, pa.array(references, pa.list_(pa.string()))],
        schema=_schema(embedder),
    )


def read_features(path: str | Path, expected: EmbedderInfo | None = None) -> Features:
    """A feature file (RagcapError if it is not one, or was made by another embedder than `expected`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise RagcapError(f"{path}: no such features file; make one with `ragcap embed-images`")
    try:
        embedder = parquet_embedder(path)
        table = pq.read_table(path, columns=FEATURE_COLUMNS) if embedder is not None else None
    except (pa.ArrowException, OSError, KeyError, ValueError) as e:
        raise RagcapError(f"{path} is not a features file written by `ragcap embed-images` ({e})") from e
    if embedder is None or table is None:
        raise RagcapError(f"{path} records no embedder; make it with `ragcap embed-images`")
    if expected is not None and not embedder.matches(expected):
        raise RagcapError(f"{path} holds features of {embedder.spec} (dim {embedder.dim}), not of {expected.spec} (dim {expected.dim}); "
                          f"re-run `ragcap embed-images -m {expected.spec}` into another file")
    vectors = np.asarray(table.column("vector").combine_chunks().flatten(), dtype=np.float32).reshape(len(table), embedder.dim)
    return Features(table.column("image_id").to_pylist(), table.column("file").to_pylist(), vectors,
                    table.column("references").to_pylist(), embedder)


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def embed_images(
    refs: References,
    pairs: dict[str, Path],
    embedder,
    out: str | Path,
    batch_size: int = 64,
    on_progress: Callable[[int], None] | None = None,
) -> FeatureSummary:
    """Encode the image of every reference that has one (pairs: image id -> file, from
    ragcap.evaluate.match_images) into `out`; see the module docstring for resuming."""
    out = Path(out)
    if not out.parent.is_dir():
        raise RagcapError(f"cannot write {out}: the folder {out.parent} does not exist; create it first")
    info = embedder.info
    summary = FeatureSummary(out=str(out), embedder=info.spec, missing=sorted(set(refs) - set(pairs)))
    done = _done_so_far(out, info)
    todo = [key for key in pairs if key not in done]
    parts = parts_dir(out)
    next_part = len(list(parts.glob("part-*.parquet")))
    for batch in chunks(todo, batch_size):
        images, kept = [], []
        for key in batch:
            try:
                images.append(load_image(pairs[key]))
                kept.append(key)
            except ImageError as err:
                summary.broken[str(pairs[key])] = str(err)
        if kept:
            vectors = embedder.encode_images(images)
            table = _table(info, kept, [pairs[k].name for k in kept], vectors, [refs[k].captions for k in kept])
            parts.mkdir(exist_ok=True)
            _write_parquet(parts / f"part-{next_part:06d}.parquet", table)
            next_part += 1
            done.update(zip(kept, vectors))
            summary.encoded += len(kept)
        if on_progress is not None:
            on_progress(len(batch))

    keys = [key for key in pairs if key in done]
    summary.images, summary.reused = len(keys), len(keys) - summary.encoded
    if keys:
        vectors = np.stack([done[k] for k in keys])
        _write_parquet(out, _table(info, keys, [pairs[k].name for k in keys], vectors, [refs[k].captions for k in keys]))
    shutil.rmtree(parts, ignore_errors=True)
    return summary


def _write_parquet(path: Path, table) -> None:
    import pyarrow.parquet as pq

    write_atomic(path, lambda p: pq.write_table(table, p))


def _done_so_far(out: Path, info: EmbedderInfo) -> dict[str, np.ndarray]:
    """image id -> vector from an earlier run: the finished file, then any parts of an interrupted one."""
    done: dict[str, np.ndarray] = {}
    parts = sorted(parts_dir(out).glob("part-*.parquet")) if parts_dir(out).is_dir() else []
    for path in ([out] if out.exists() else []) + parts:
        features = read_features(path)
        if not features.embedder.matches(info):
            raise RagcapError(f"{path} holds features of {features.embedder.spec}, not of {info.spec}; "
                              f"pass -m {features.embedder.spec} to extend it, or write to another file")
        done.update(zip(features.image_ids, features.vectors))
    return done
