"""Any Hugging Face `datasets` data set: a hub name, a directory of data files, or save_to_disk output."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from pipelines.base import BadRecord, CaptionRecord, ReadOptions
from pipelines.files import hub_reachable
from pipelines.tables import check_fields, row_records
from ragcap.errors import SourceError

BATCH_ROWS = 1000


def read_hf(paths: Sequence[str], options: ReadOptions) -> Iterator[CaptionRecord | BadRecord]:
    for name in paths:
        dataset, split = load_split(name, options)
        yield from read_dataset(dataset, name, split, options, "hf")


def read_dataset(dataset: Any, name: str, split: str | None, options: ReadOptions,
                 corpus: str) -> Iterator[CaptionRecord | BadRecord]:
    check_fields(dataset.column_names, options, name)
    # Only the named columns: decoding an image column nobody reads would dominate the time.
    dataset = dataset.select_columns(list(dict.fromkeys(c for c in (options.text_field, options.id_field) if c)))
    for start in range(0, len(dataset), BATCH_ROWS):
        batch = dataset[start:start + BATCH_ROWS]
        for i in range(len(batch[options.text_field])):
            row = {column: values[i] for column, values in batch.items()}
            yield from row_records(row, options, corpus, f"{name}[{split}]:row {start + i + 1}", split)


def load_split(name: str, options: ReadOptions) -> tuple[Any, str | None]:
    """The one split to read, and its name. Several splits without --split is an error, so
    that a test split never slips into a caption datastore by default."""
    import datasets  # lazily: importing datasets takes seconds

    loaded = _load(name)
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if options.split is None and len(splits) == 1:
            return loaded[splits[0]], splits[0]
        if options.split not in loaded:
            what = f"no split {options.split!r}" if options.split else "several splits"
            raise SourceError(f"{name}: {what}; pass --split with one of: {', '.join(splits)}")
        return loaded[options.split], options.split
    own = str(loaded.split) if loaded.split is not None else None
    if options.split and own and own != options.split:
        raise SourceError(f"{name}: holds only the split {own!r}, not {options.split!r}")
    return loaded, options.split or own


def _load(name: str) -> Any:
    import datasets

    path = Path(name)
    if path.is_dir():
        saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        try:
            return datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
        except Exception as exc:  # datasets raises many unrelated types for unreadable data
            raise SourceError(f"{name}: cannot load as a Hugging Face data set ({type(exc).__name__}: {exc})") from exc
    if path.exists():
        raise SourceError(f"{name}: the hf source reads a hub name or a directory; for a single file use `ragcap ingest jsonl`, `csv` or `parquet`")
    fix = "download it where the hub is reachable (datasets' save_to_disk) and pass that directory"
    if not hub_reachable():
        raise SourceError(f"{name}: not a local directory, and the Hugging Face hub is unreachable (offline?); {fix}")
    try:
        return datasets.load_dataset(name)
    except Exception as exc:
        raise SourceError(f"{name}: cannot load from the Hugging Face hub ({type(exc).__name__}: {exc}); {fix}") from exc
