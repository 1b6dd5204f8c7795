"""Flickr8k / Flickr30k captions, told apart by content:

- token files (Flickr8k.token.txt, Flickr30k results_20130124.token): "<image>.jpg#<n>\\t<caption>"
- CSV with header "image,caption" (Kaggle's captions.txt; captions with commas are quoted),
  optionally with a "split" column.
Neither names the split otherwise: to keep the test images out, pass the split list
(e.g. Flickr_8k.testImages.txt) to --exclude-images instead.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Iterator, Sequence

from pipelines.base import BadRecord, CaptionRecord, ReadOptions
from pipelines.files import LineSource, bad_line
from pipelines.tables import csv_rows
from ragcap.errors import SourceError

CORPUS = "flickr"
TOKEN_LINE = re.compile(r"^([^\t#]+)#\d+\t(.*)$")


def read_flickr(paths: Sequence[str], options: ReadOptions) -> Iterator[CaptionRecord | BadRecord]:
    for path in paths:
        lines = LineSource(path, options)
        it = iter(lines)
        first = next(it, None)
        if first is None:
            continue
        if TOKEN_LINE.match(first.rstrip("\r\n")):
            _no_split(lines, options)
            yield from _token_file(itertools.chain([first], it), lines, options)
        elif {"image", "caption"} <= {f.strip().lower() for f in first.split(",")}:
            yield from _csv_file(itertools.chain([first], it), lines, options)
        else:
            raise SourceError(f"{path}:1: not a Flickr caption file; expected '<image>.jpg#0<TAB>caption' lines "
                              "or a CSV with header 'image,caption'")


def _no_split(lines: LineSource, options: ReadOptions) -> None:
    if options.split:
        raise SourceError(f"{lines.path}: names no splits, so --split cannot select one; pass the split's "
                          "image list (e.g. Flickr_8k.testImages.txt) to --exclude-images instead")


def image_record(image: str, caption: str, location: str, split: str | None = None) -> CaptionRecord:
    image = image.strip()
    return CaptionRecord(caption=caption, corpus=CORPUS, image_id=Path(image).stem, file=image,
                         split=split, location=location)


def _token_file(text: Iterator[str], lines: LineSource, options: ReadOptions) -> Iterator[CaptionRecord | BadRecord]:
    for line in text:
        yield from lines.take_bad()
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        match = TOKEN_LINE.match(line)
        if match is None:
            yield bad_line(lines.location, "expected '<image>#<n><TAB><caption>'", options)
        elif match.group(2).strip():
            yield image_record(match.group(1), match.group(2), lines.location)
    yield from lines.take_bad()


def _csv_file(text: Iterator[str], lines: LineSource, options: ReadOptions) -> Iterator[CaptionRecord | BadRecord]:
    rows = csv_rows(text, lines, options)
    header = next(rows)  # the line read_flickr recognised as the header: it exists
    while isinstance(header, BadRecord):  # undecodable lines before it, skipped with --skip-bad
        yield header
        header = next(rows)
    header = [f.strip().lower() for f in header]
    image, caption = header.index("image"), header.index("caption")
    split = header.index("split") if "split" in header else None
    if split is None:
        _no_split(lines, options)
    for row in rows:
        if isinstance(row, BadRecord):
            yield row
            continue
        if not row[caption].strip():
            continue
        record = image_record(row[image], row[caption], lines.location, row[split] if split is not None else None)
        if options.split is None or record.split == options.split:
            yield record
