"""Conceptual Captions (CC3M) TSV: "caption<TAB>url" per line, no quoting, optional header.

The image id is a hash of the URL rather than the row number: it stays the same when the
TSV is split, shuffled or de-duplicated, and CC3M's repeated URLs share one id.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

from pipelines.base import BadRecord, CaptionRecord, ReadOptions
from pipelines.files import LineSource, bad_line

CORPUS = "cc3m"


def url_id(url: str) -> str:
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]


def read_cc3m(paths: Sequence[str], options: ReadOptions) -> Iterator[CaptionRecord | BadRecord]:
    for path in paths:
        lines = LineSource(path, options)
        for line in lines:
            yield from lines.take_bad()
            line = line.rstrip("\r\n")
            if not line.strip() or (lines.line_no == 1 and line.lower() == "caption\turl"):
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not fields[1].strip():
                yield bad_line(lines.location, f"expected 'caption<TAB>url', found {len(fields)} tab-separated fields", options)
                continue
            caption, url = fields[0], fields[1].strip()
            if caption.strip():
                yield CaptionRecord(caption=caption, corpus=CORPUS, image_id=url_id(url),
                                    location=lines.location, extra={"url": url})
        yield from lines.take_bad()
