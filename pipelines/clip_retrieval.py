"""Pre-computed caption embeddings in clip-retrieval's layout (LAION publishes its own this way).

    DIR/text_emb/text_emb_0.npy      float16/float32 (n, dim), one row per caption
    DIR/metadata/metadata_0.parquet  n rows with a `caption` column (and url, key, ...)

Any folder of .npy + Parquet pairs works the same way: pairs are matched by the number in
their names, or a flat folder of NAME.npy next to NAME.parquet. Nothing is re-embedded: the
vectors stream from memory-mapped .npy files and the captions from Parquet row batches, so a
folder of any size is read in bounded RAM.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipelines.base import BadRecord, CaptionRecord, ReadOptions
from pipelines.files import bad_line, vector_or_bad
from ragcap.errors import SourceError

DEFAULT_TEXT_FIELD = "caption"  # clip-retrieval's metadata column
_NUMBER = re.compile(r"(\d+)$")
BATCH_ROWS = 65_536  # Parquet rows decoded at a time: ~10 MB of captions


def embedding_pairs(folder: str | Path) -> list[tuple[Path, Path]]:
    """(npy, parquet) pairs of a clip-retrieval output folder or a flat folder, in file order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"{folder}: not a directory; give the folder clip-retrieval wrote (with text_emb/ and metadata/)")
    npy_dir = folder / "text_emb" if (folder / "text_emb").is_dir() else folder
    meta_dir = folder / "metadata" if (folder / "metadata").is_dir() else folder
    parquets = {_key(p): p for p in meta_dir.glob("*.parquet")}
    pairs, unmatched = [], []
    for npy in sorted(npy_dir.glob("*.npy"), key=_order):
        meta = parquets.pop(_key(npy), None)
        if meta is None:
            unmatched.append(npy.name)
        else:
            pairs.append((npy, meta))
    if unmatched or parquets:
        lonely = unmatched + [p.name for p in parquets.values()]
        raise SourceError(f"{folder}: no partner for {', '.join(sorted(lonely)[:5])}; each .npy needs a .parquet with the same number or name")
    if not pairs:
        raise SourceError(f"{folder}: no .npy embedding files (looked in {npy_dir})")
    return pairs


def _key(path: Path) -> str:
    """What pairs text_emb_7.npy with metadata_7.parquet (or x.npy with x.parquet)."""
    match = _NUMBER.search(path.stem)
    return str(int(match.group(1))) if match else path.stem


def _order(path: Path) -> tuple[int, str]:
    match = _NUMBER.search(path.stem)
    return (int(match.group(1)) if match else -1, path.stem)


def _open_vectors(path: Path) -> np.ndarray:
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:  # truncated, not .npy, or an object array (a pickle)
        raise SourceError(f"{path}: not a readable .npy array of embeddings ({exc})") from exc
    if vectors.ndim != 2 or vectors.dtype.kind != "f":
        raise SourceError(f"{path}: expected a 2-d float array (captions x dimensions), found {vectors.dtype} {vectors.shape}")
    return vectors


def read_clip_retrieval(paths: Sequence[str], options: ReadOptions) -> Iterator[CaptionRecord | BadRecord]:
    import pyarrow.parquet as pq

    field = options.text_field or DEFAULT_TEXT_FIELD
    for folder in paths:
        for npy, meta in embedding_pairs(folder):
            vectors = _open_vectors(npy)
            try:
                table = pq.ParquetFile(meta)
            except (OSError, ValueError) as exc:
                raise SourceError(f"{meta}: not a readable Parquet file ({exc})") from exc
            if table.metadata.num_rows != len(vectors):
                raise SourceError(f"{meta} has {table.metadata.num_rows} rows but {npy} has {len(vectors)} embeddings; they must pair row by row")
            columns = [c for c in (field, options.id_field) if c]
            missing = [c for c in columns if c not in table.schema_arrow.names]
            if missing:
                raise SourceError(f"{meta}: no column {missing[0]!r}; columns: {', '.join(table.schema_arrow.names)} (choose with --text-field)")
            row = 0
            for batch in table.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                data = batch.to_pydict()
                # One check per batch; only a row that fails it goes through vector_or_bad for its message.
                block = np.asarray(vectors[row : row + batch.num_rows], dtype=np.float32)
                usable = np.isfinite(block).all(axis=1) & block.any(axis=1)
                for i, caption in enumerate(data[field]):
                    location = f"{meta}:row {row + i + 1}"
                    if not isinstance(caption, str):
                        if caption is not None:
                            yield bad_line(location, f"{field!r} holds {type(caption).__name__}, not text", options)
                        continue
                    vector = block[i] if usable[i] else vector_or_bad(block[i], f"{npy.name} row {row + i + 1}", location, options)
                    if isinstance(vector, BadRecord):
                        yield vector
                        continue
                    image_id = data[options.id_field][i] if options.id_field else None
                    yield CaptionRecord(caption=caption, corpus="clip-retrieval", location=location, vector=vector,
                                        image_id=None if image_id is None else str(image_id))
                row += batch.num_rows
