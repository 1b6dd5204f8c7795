"""Generic tables whose columns the user names: jsonl, csv (or .tsv) and parquet.

--text-field names the caption column (default for a `ragcap export` file: caption; a string, or a list of strings giving one record
each); --id-field optionally names the image id column. Parquet written by `ragcap export`
also carries each caption's vector and its stored payload, so re-ingesting it needs no model.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from pipelines.base import BadRecord, CaptionRecord, ReadOptions
from pipelines.files import LineSource, bad_line, require_file, vector_or_bad
from ragcap.errors import SourceError
from ragcap.export import EMBEDDER_METADATA_KEY

# Payload keys of `ragcap export` that map back onto CaptionRecord fields.
RECORD_FIELDS = ("image_id", "file", "split", "corpus")
BATCH_ROWS = 8192  # Parquet rows decoded at a time: 16 MB of 512-d float32 vectors
# Python's csv refuses fields over 128 KiB, which a long payload column can exceed; the limit
# still bounds memory when an unclosed quote would make one field of the rest of the file.
CSV_FIELD_LIMIT = 16 << 20


def check_fields(available: Sequence[str], options: ReadOptions, where: str) -> None:
    """Fail once, up front, when the options name columns the source does not have."""
    listed = ", ".join(available) or "(none)"
    if not options.text_field:
        raise SourceError(f"{where}: pass --text-field to name the caption column; available fields: {listed}")
    for flag, name in (("--text-field", options.text_field), ("--id-field", options.id_field), ("--vector-field", options.vector_field)):
        if name and name not in available:
            raise SourceError(f"{where}: no field {name!r} ({flag}); available fields: {listed}")


def row_records(row: Mapping[str, Any], options: ReadOptions, corpus: str, location: str,
                split: str | None = None) -> Iterator[CaptionRecord | BadRecord]:
    """The records of one row: one per caption in the text field (None/empty: none)."""
    value = row[options.text_field]
    if isinstance(value, str):
        captions = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        captions = value
    elif value is None:
        return
    else:
        yield bad_line(location, f"field {options.text_field!r} holds {type(value).__name__}, not text or a list of texts", options)
        return
    image_id = row.get(options.id_field) if options.id_field else None
    for caption in captions:
        if caption.strip():
            yield CaptionRecord(caption=caption, corpus=corpus, split=split, location=location,
                                image_id=None if image_id is None else str(image_id))


def read_jsonl(paths: Sequence[str], options: ReadOptions) -> Iterator[CaptionRecord | BadRecord]:
    for path in paths:
        lines = LineSource(path, options)
        checked = False
        for line in lines:
            yield from lines.take_bad()
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield bad_line(lines.location, f"invalid JSON at column {exc.colno}: {exc.msg}", options)
                continue
            except RecursionError:
                yield bad_line(lines.location, "JSON nested too deeply to parse", options)
                continue
            if not isinstance(row, dict):
                yield bad_line(lines.location, f"expected a JSON object, found {type(row).__name__}", options)
                continue
            if not checked:
                # A field missing from the first object means the options are wrong, not the line.
                check_fields(list(row), options, lines.location)
                checked = True
            missing = [f for f in (options.text_field, options.id_field) if f and f not in row]
            if missing:
                yield bad_line(lines.location, f"no field {missing[0]!r}; this object has: {', '.join(row)}", options)
                continue
            yield from row_records(row, options, "jsonl", lines.location)
        yield from lines.take_bad()


def read_csv(paths: Sequence[str], options: ReadOptions) -> Iterator[CaptionRecord | BadRecord]:
    """CSV with a header row (.tsv: tab-separated); quoted fields may hold commas and newlines."""
    for path in paths:
        delimiter = "\t" if ".tsv" in Path(path).suffixes else ","
        lines = LineSource(path, options)
        rows = csv_rows(lines, lines, options, delimiter)
        header = next(rows, None)
        if header is None:
            continue
        if isinstance(header, BadRecord):  # --skip-bad cannot skip it: it names the columns
            raise SourceError(f"{header.location}: cannot read the header row ({header.reason}); fix the file's first line")
        check_fields(header, options, f"{path}:1")
        for row in rows:
            if isinstance(row, BadRecord):
                yield row
            else:
                yield from row_records(dict(zip(header, row)), options, "csv", lines.location)


def csv_rows(text: Iterable[str], lines: LineSource, options: ReadOptions,
             delimiter: str = ",") -> Iterator[list[str] | BadRecord]:
    """Rows of a CSV, the header first; rows whose field count differs from it are bad.

    `text` is `lines` itself or its iterator already started (to sniff the format);
    `lines` supplies locations and the queue of undecodable lines.
    """
    # strict: a stray quote is an error instead of silently merging fields.
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))  # process-wide, only ever raised
    reader = csv.reader(text, delimiter=delimiter, strict=True)
    width = None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            yield from lines.take_bad()
            yield bad_line(lines.location, f"malformed CSV ({exc})", options)
            continue
        yield from lines.take_bad()
        if not row:
            continue  # blank line
        if width is None:
            width = len(row)
        elif len(row) != width:
            yield bad_line(lines.location, f"{len(row)} fields where the header has {width}; "
                                           "quote fields that contain the delimiter", options)
            continue
        yield row
    yield from lines.take_bad()


def read_parquet(paths: Sequence[str], options: ReadOptions) -> Iterator[CaptionRecord | BadRecord]:
    """Parquet read batch by batch (bounded memory); a `payload` JSON column restores metadata."""
    import pyarrow.parquet as pq  # lazily: pyarrow is slow to import and most runs need no parquet

    for path in paths:
        try:
            table = pq.ParquetFile(require_file(path), pre_buffer=False)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise SourceError(f"{path}: not a readable Parquet file ({exc})") from exc
        available = table.schema_arrow.names
        if not options.text_field and EMBEDDER_METADATA_KEY in (table.schema_arrow.metadata or {}):
            options = replace(options, text_field="caption")  # a `ragcap export` file: its caption column
        check_fields(available, options, path)
        columns = [options.text_field, options.id_field, options.vector_field]
        if "payload" in available:
            columns.append("payload")
        columns = list(dict.fromkeys(c for c in columns if c))
        row_no = 0
        for batch in table.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            vectors = _vector_rows(batch.column(options.vector_field)) if options.vector_field else None
            data = batch.select([c for c in columns if c != options.vector_field]).to_pydict()
            for i in range(batch.num_rows):
                row = {name: data[name][i] for name in data}
                if vectors is not None:
                    row[options.vector_field] = vectors[i]
                yield from _parquet_row(row, options, f"{path}:row {row_no + i + 1}")
            row_no += batch.num_rows


def _vector_rows(column) -> list | np.ndarray:
    """A vector column as float32 numpy rows without a Python float per value.

    to_pydict() makes 512 Python floats per caption: 165 µs a row and ~1 GB per 64k-row batch
    (measured on a 512-d export). A list column of numbers of equal lengths and no nulls (what
    `ragcap export` writes) becomes one 2-d view; anything else falls back to per-row lists, so
    that the bad rows are still reported one by one.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if column.null_count == 0 and len(column) and (pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type)
                                                   or pa.types.is_large_list(column.type)):
        lengths = pc.list_value_length(column).to_numpy()
        flat = column.flatten()  # respects the batch's offset into the column, unlike .values
        numeric = pa.types.is_floating(flat.type) or pa.types.is_integer(flat.type)
        if numeric and lengths[0] > 0 and (lengths == lengths[0]).all() and flat.null_count == 0:
            return flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), int(lengths[0]))
    return column.to_pylist()


def _parquet_row(row: dict[str, Any], options: ReadOptions, location: str) -> Iterator[CaptionRecord | BadRecord]:
    payload: dict[str, Any] = {}
    if row.get("payload") is not None:
        try:
            payload = json.loads(row["payload"])
        except (json.JSONDecodeError, TypeError) as exc:
            yield bad_line(location, f"payload is not a JSON object ({exc})", options)
            return
        except RecursionError:
            yield bad_line(location, "payload is JSON nested too deeply to parse", options)
            return
    vector = None
    if options.vector_field:
        if row.get(options.vector_field) is None:
            yield bad_line(location, f"no vector in field {options.vector_field!r}", options)
            return
        vector = vector_or_bad(row[options.vector_field], f"field {options.vector_field!r}", location, options)
        if isinstance(vector, BadRecord):
            yield vector
            return
    for record in row_records(row, options, payload.get("corpus", "parquet"), location):
        if isinstance(record, CaptionRecord):
            # --id-field, when given, wins over the exported image_id.
            if record.image_id is None and payload.get("image_id") is not None:
                record.image_id = str(payload["image_id"])
            record.file = payload.get("file")
            record.split = payload.get("split")
            record.extra = {k: v for k, v in payload.items() if k not in RECORD_FIELDS and k != "caption"}
            record.vector = vector
        yield record
