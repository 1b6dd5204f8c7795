"""Plain text: one caption per line (blank lines skipped); no image ids."""

from __future__ import annotations

from typing import Iterator, Sequence

from pipelines.base import BadRecord, CaptionRecord, ReadOptions
from pipelines.files import LineSource


def read_text(paths: Sequence[str], options: ReadOptions) -> Iterator[CaptionRecord | BadRecord]:
    for path in paths:
        lines = LineSource(path, options)
        for line in lines:
            yield from lines.take_bad()
            if line.strip():
                yield CaptionRecord(caption=line.rstrip("\r\n"), corpus="text", location=lines.location)
        yield from lines.take_bad()
