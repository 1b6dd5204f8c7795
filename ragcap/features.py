"""Paired image–caption data: every image a reference file lists, encoded once into Parquet.

    ragcap embed-images REFS --images DIR -o FEATURES.parquet -m SPEC

One row per image: image_id (normalised), file, vector (the embedder's unit image embedding)
and references (its human captions). The embedder is recorded in the schema metadata as
`ragcap export` records it, so training refuses features of another embedder. Readers select
the columns they need, so the optional column leaves older readers and files working: with
--patches, `patches` holds the vision transformer's last hidden states (SmallCap cross-attends to
them: 50 x 768 floats per image for ViT-B/32, 150 KB), their shape in the schema metadata.

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
from typing import Callable, Iterator

import numpy as np

from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import ImageError, RagcapError, SourceError
from ragcap.evaluate import References
from ragcap.export import EMBEDDER_METADATA_KEY, parquet_embedder
from ragcap.images import load_image
from ragcap.util import chunks, write_atomic

FEATURE_COLUMNS = ["image_id", "file", "vector", "references"]
PATCHES_METADATA_KEY = b"ragcap.patches"  # [tokens, width] of the patches column


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
    patches: np.ndarray | None = None  # (n, tokens, width) float32, when asked for and present

    def pairs(self) -> tuple[list[str], np.ndarray, list[str]]:
        """(captions, their image's vector, their image id): one training example per reference."""
        rows = [(c, i) for i, refs in enumerate(self.references) for c in refs]
        index = np.array([i for _, i in rows], dtype=np.int64)
        return [c for c, _ in rows], self.vectors[index], [self.image_ids[i] for _, i in rows]


def _schema(embedder: EmbedderInfo, patch_shape: tuple[int, int] | None = None):
    import pyarrow as pa

    fields = [("image_id", pa.string()), ("file", pa.string()), ("vector", pa.list_(pa.float32(), embedder.dim)),
              ("references", pa.list_(pa.string()))]
    metadata = {EMBEDDER_METADATA_KEY: json.dumps(embedder.to_dict())}
    if patch_shape is not None:
        fields.append(("patches", pa.list_(pa.float32(), patch_shape[0] * patch_shape[1])))
        metadata[PATCHES_METADATA_KEY] = json.dumps(list(patch_shape))
    return pa.schema(fields, metadata=metadata)


def _table(embedder: EmbedderInfo, ids: list[str], files: list[str], vectors: np.ndarray, references: list[list[str]],
           patches: np.ndarray | None = None):
    import pyarrow as pa

    def fixed(array: np.ndarray, size: int):
        return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1), pa.float32()), size)

    columns = [pa.array(ids, pa.string()), pa.array(files, pa.string()), fixed(vectors, embedder.dim), pa.array(references, pa.list_(pa.string()))]
    shape = None if patches is None else patches.shape[1:]
    if patches is not None:
        columns.append(fixed(patches, shape[0] * shape[1]))
    return pa.Table.from_arrays(columns, schema=_schema(embedder, shape))


def read_features(path: str | Path, expected: EmbedderInfo | None = None, patches: bool = False) -> Features:
    """A feature file (RagcapError if it is not one, or was made by another embedder than `expected`);
    with patches, its patch features too (RagcapError if it has none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise RagcapError(f"{path}: no such features file; make one with `ragcap embed-images`")
    try:
        embedder = parquet_embedder(path)
        table = pq.read_table(path, columns=FEATURE_COLUMNS) if embedder is not None else None
    except (pa.ArrowException, OSError, KeyError, ValueError, SourceError) as e:
        raise RagcapError(f"{path} is not a features file written by `ragcap embed-images` ({e})") from e
    if embedder is None or table is None:
        raise RagcapError(f"{path} records no embedder; make it with `ragcap embed-images`")
    if expected is not None and not embedder.matches(expected):
        raise RagcapError(f"{path} holds features of {embedder.spec} (dim {embedder.dim}), not of {expected.spec} (dim {expected.dim}); "
                          f"re-run `ragcap embed-images -m {expected.spec}` into another file")
    vectors = np.asarray(table.column("vector").combine_chunks().flatten(), dtype=np.float32).reshape(len(table), embedder.dim)
    return Features(table.column("image_id").to_pylist(), table.column("file").to_pylist(), vectors,
                    table.column("references").to_pylist(), embedder, _read_patches(path) if patches else None)


def patch_shape(path: str | Path) -> tuple[int, int] | None:
    """(tokens, width) of a features file's patch features, None when it has none."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(PATCHES_METADATA_KEY)
    return tuple(json.loads(raw)) if raw else None


def _read_patches(path: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    shape = patch_shape(path)
    if shape is None:
        raise RagcapError(f"{path} has no patch features; re-run `ragcap embed-images ... --patches` (a ViT embedder) into it")
    column = pq.read_table(path, columns=["patches"]).column("patches").combine_chunks().flatten()
    return np.array(column, dtype=np.float32).reshape(-1, *shape)  # a writable copy: torch trains from it


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def encode_files(embedder, files: list[Path], names: list[str] | None = None, patches: bool = False
                 ) -> tuple[np.ndarray | None, np.ndarray | None, dict[int, str]]:
    """Load and encode one batch of image files: the vectors (and patch features, if asked) of
    those that load, in order, and the error of each that does not (naming the file as `names`
    does), by its index in `files`."""
    images, broken = [], {}
    for i, path in enumerate(files):
        try:
            images.append(load_image(path, name=names and names[i]))
        except ImageError as err:
            broken[i] = str(err)
    if not images:
        return None, None, broken
    vectors, tokens = embedder.encode_image_tokens(images) if patches else (embedder.encode_images(images), None)
    return vectors, tokens, broken


def embed_images(
    refs: References,
    pairs: dict[str, Path],
    info: EmbedderInfo,
    encode: Callable[[Iterator[list[Path]]], Iterator[tuple[np.ndarray | None, np.ndarray | None, dict[int, str]]]],
    out: str | Path,
    batch_size: int = 64,
    on_progress: Callable[[int], None] | None = None,
    patches: bool = False,
) -> FeatureSummary:
    """Encode the image of every reference that has one (pairs: image id -> file, from
    ragcap.evaluate.match_images) into `out`, with patch features if asked; see the module
    docstring for resuming. encode: batches of files -> encode_files' answer for each, in order
    (in this process, or on a Ray cluster's actors)."""
    out = Path(out)
    if not out.parent.is_dir():
        raise RagcapError(f"cannot write {out}: the folder {out.parent} does not exist; create it first")
    if out.is_dir():
        raise RagcapError(f"cannot write {out}: it is a folder; give a file name such as {out / 'features.parquet'}")
    summary = FeatureSummary(out=str(out), embedder=info.spec, missing=sorted(set(refs) - set(pairs)))
    done = _done_so_far(out, info, patches)
    batches = list(chunks([key for key in pairs if key not in done], batch_size))
    parts = parts_dir(out)
    next_part = len(list(parts.glob("part-*.parquet")))
    for batch, (vectors, tokens, broken) in zip(batches, encode([pairs[key] for key in batch] for batch in batches)):
        summary.broken.update({str(pairs[batch[i]]): error for i, error in broken.items()})
        kept = [key for i, key in enumerate(batch) if i not in broken]
        if kept:
            table = _table(info, kept, [pairs[k].name for k in kept], vectors, [refs[k].captions for k in kept], tokens)
            parts.mkdir(exist_ok=True)
            _write_parquet(parts / f"part-{next_part:06d}.parquet", table)
            next_part += 1
            done.update(zip(kept, zip(vectors, tokens if patches else [None] * len(kept))))
            summary.encoded += len(kept)
        if on_progress is not None:
            on_progress(len(batch))

    keys = [key for key in pairs if key in done]
    summary.images, summary.reused = len(keys), len(keys) - summary.encoded
    if keys:
        vectors = np.stack([done[k][0] for k in keys])
        tokens = np.stack([done[k][1] for k in keys]) if patches else None
        _write_parquet(out, _table(info, keys, [pairs[k].name for k in keys], vectors, [refs[k].captions for k in keys], tokens))
    shutil.rmtree(parts, ignore_errors=True)
    return summary


def _write_parquet(path: Path, table) -> None:
    import pyarrow.parquet as pq

    write_atomic(path, lambda p: pq.write_table(table, p))


def _done_so_far(out: Path, info: EmbedderInfo, patches: bool) -> dict[str, tuple]:
    """image id -> (vector, patches or None) from an earlier run: the finished file, then any parts
    of an interrupted one (files without patch features count for nothing when they are wanted)."""
    done: dict[str, tuple] = {}
    parts = sorted(parts_dir(out).glob("part-*.parquet")) if parts_dir(out).is_dir() else []
    for path in ([out] if out.exists() else []) + parts:
        features = read_features(path)
        if not features.embedder.matches(info):
            raise RagcapError(f"{path} holds features of {features.embedder.spec}, not of {info.spec}; "
                              f"pass -m {features.embedder.spec} to extend it, or write to another file")
        if patches and patch_shape(path) is None:
            continue
        tokens = _read_patches(path) if patches else [None] * len(features.image_ids)
        done.update(zip(features.image_ids, zip(features.vectors, tokens)))
    return done
