"""Reading corpus files safely: existence, gzip, UTF-8 per line, whole-file JSON, bad lines.

Every reader goes through these so that errors look the same everywhere:
"path:line: what is wrong; what to do".
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import sys
from pathlib import Path
from typing import IO, Any, Iterator
from urllib.parse import urlparse
from urllib.request import getproxies

import numpy as np

from pipelines.base import BadRecord, ReadOptions
from ragcap.errors import SourceError

SKIP_HINT = "use --skip-bad to skip such lines"


STDIN = "-"  # line formats (text, jsonl, csv, flickr, cc3m) also read a pipe: `... | ragcap ingest text -`


def require_file(path: str | Path) -> Path:
    if str(path) == STDIN:
        return Path(STDIN)
    path = Path(path)
    if path.is_dir():
        raise SourceError(f"{path}: is a directory, expected a file")
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    return path


def open_binary(path: str | Path) -> IO[bytes]:
    """Open a file (or its .gz) as bytes; decoding is per line so bad bytes get a line number."""
    path = require_file(path)
    if str(path) == STDIN:
        return sys.stdin.buffer
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def bad_line(location: str, reason: str, options: ReadOptions) -> BadRecord:
    """The BadRecord to yield for an unreadable line, or SourceError when skip_bad is off."""
    if not options.skip_bad:
        raise SourceError(f"{location}: {reason}; fix the file or {SKIP_HINT}")
    return BadRecord(location, reason)


def vector_or_bad(value: Any, what: str, location: str, options: ReadOptions) -> np.ndarray | BadRecord:
    """A pre-computed caption vector as float32, or bad_line's answer for one that cannot be
    stored: not a flat list of numbers, NaN or infinity, or all zeros (the store normalises
    vectors, and a zero one has no direction to normalise). `what` names it: "field 'vector'"."""
    try:
        vector = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        vector = None
    if vector is None or vector.ndim != 1 or vector.size == 0:
        return bad_line(location, f"{what} holds {type(value).__name__}, not a list of numbers", options)
    if not np.isfinite(vector).all():
        return bad_line(location, f"{what} holds NaN or infinity", options)
    if not vector.any():
        return bad_line(location, f"{what} is all zeros, a vector without a direction", options)
    return vector


class LineSource:
    """The decoded lines of a text file (endings kept, for csv's multi-line fields).

    Lines that are not UTF-8 raise SourceError, or with skip_bad are left out and queued in
    `bad`; callers yield `take_bad()` as they go. A queue rather than yielded markers because
    csv.reader must consume plain strings.
    """

    def __init__(self, path: str | Path, options: ReadOptions):
        self.path = Path(path)
        self.options = options
        self.line_no = 0  # the last line handed out (1-based)
        self.bad: list[BadRecord] = []
        self._file = open_binary(path)  # opened now so a missing file fails before iteration

    @property
    def location(self) -> str:
        return f"{self.path}:{self.line_no}"

    def take_bad(self) -> list[BadRecord]:
        bad, self.bad = self.bad, []
        return bad

    def __iter__(self) -> Iterator[str]:
        with self._file as raw:
            try:
                for data in _lines(raw):
                    self.line_no += 1
                    try:
                        # utf-8-sig on line 1 drops the BOM that Windows tools write.
                        line = data.decode("utf-8-sig" if self.line_no == 1 else "utf-8")
                    except UnicodeDecodeError as exc:
                        reason = f"not UTF-8 (byte {data[exc.start]:#04x} at column {exc.start + 1}); re-encode the file as UTF-8"
                        self.bad.append(bad_line(self.location, reason, self.options))
                        continue
                    yield line
            except (OSError, EOFError) as exc:  # truncated or corrupt .gz
                raise SourceError(f"{self.location}: cannot read past this line ({exc})") from exc


# A carriage return that ends a line by itself (classic Mac OS, some spreadsheet exports): not
# the \r of a \r\n, which the \n ends.
_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")


def _lines(raw: IO[bytes]) -> Iterator[bytes]:
    """The lines of a binary file ending in \n, \r\n or a lone \r (endings kept)."""
    for data in raw:
        if b"\r" in data:
            yield from (piece for piece in _LONE_CR.split(data) if piece)
        else:
            yield data


def load_json(path: str | Path) -> Any:
    """A whole-file JSON document (the format allows no streaming without an extra parser).

    Karpathy's per-sentence "tokens" lists are dropped while parsing: they are most of the
    memory of dataset_coco.json and no reader uses them.
    """
    path = require_file(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SourceError(f"{path}:{line}: not UTF-8 (byte {data[exc.start]:#04x}); re-encode the file as UTF-8") from exc
    try:
        return json.loads(text, object_hook=_drop_tokens)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}:{exc.lineno}: invalid JSON at column {exc.colno}: {exc.msg}") from exc
    except RecursionError:
        raise SourceError(f"{path}: JSON nested too deeply to parse") from None


def _drop_tokens(obj: dict) -> dict:
    if "tokens" in obj and "raw" in obj:
        del obj["tokens"]
    return obj


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all.

    Asked before any download because offline the hub client retries every file for
    minutes (and transformers then returns an empty tokenizer instead of failing).
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if getproxies().get("https"):
        return True  # only the proxy can tell; let the hub client try
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True
