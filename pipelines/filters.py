"""The mapper stage between reading and embedding: normalise, exclude images, shard, cap length.

ragcap.ingest applies these to every CaptionRecord; they are pure functions (plus one
tokenizer) so that the same caption gets the same decision on every machine.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Sequence

from pipelines.base import CaptionRecord, ReadOptions
from pipelines.files import LineSource, hub_reachable, load_json, require_file
from ragcap.errors import ModelError, RagcapError, SourceError

IMAGE_SUFFIX = re.compile(r"\.(jpe?g|png|gif|bmp|webp|tiff?)$", re.IGNORECASE)
COCO_PREFIX = re.compile(r"^COCO_(train|val|test)20\d\d_")


def normalise_caption(text: str) -> str:
    """Collapse all whitespace (newlines, tabs, runs) to single spaces; case and punctuation
    stay, since they are part of the caption a decoder should learn."""
    return " ".join(text.split())


def normalise_image_id(value: Any) -> str:
    """One spelling per image, so ids from any file compare equal:
    391895, "000000391895", "000000391895.jpg", "val2014/COCO_val2014_000000391895.jpg" -> "391895";
    "1000268201_693b08cb0e.jpg" and Flickr's token key "1000268201_693b08cb0e.jpg#2" ->
    "1000268201_693b08cb0e"."""
    text = str(value).strip().replace("\\", "/").rsplit("/", 1)[-1].split("#", 1)[0]
    text = COCO_PREFIX.sub("", IMAGE_SUFFIX.sub("", text))
    return str(int(text)) if text.isdigit() else text


def load_image_ids(path: str | Path) -> set[str]:
    """Image ids to exclude (--exclude-images): a JSON list of ids, or one id per line."""
    path = require_file(path)
    with path.open("rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"["):
        ids = load_json(path)
        if not isinstance(ids, list) or not all(isinstance(i, (int, str)) for i in ids):
            raise SourceError(f"{path}: expected a JSON list of image ids (numbers or strings)")
    else:
        ids = [line for line in LineSource(path, ReadOptions()) if line.strip()]
    if not ids:  # a wrong or empty split file would let the evaluated images' captions in unseen
        raise SourceError(f"{path}: lists no image ids; --exclude-images needs the ids (or file names) of the images to keep out")
    return {normalise_image_id(i) for i in ids}


def is_excluded(record: CaptionRecord, image_ids: set[str]) -> bool:
    return any(v is not None and normalise_image_id(v) in image_ids for v in (record.image_id, record.file))


def parse_shard(text: str) -> tuple[int, int]:
    """'--shard I/N' with 1 <= I <= N -> (I, N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise RagcapError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. 1/4 ... 4/4")
    return int(match.group(1)), int(match.group(2))


def shard_of(key: str, n: int) -> int:
    """The 1-based shard (as in --shard I/N) that owns key. hashlib, not hash(): Python salts
    str hashes per process, and every machine must agree."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n + 1


class GPT2TokenCounter:
    """GPT-2 token counts, for SmallCap's datastore rule (keep captions of <= 25 tokens).

    tokenizer: a directory with vocab.json + merges.txt (or tokenizer.json), or a hub name.
    """

    def __init__(self, tokenizer: str = "gpt2"):
        from transformers import GPT2TokenizerFast  # lazily: transformers is slow to import

        try:
            if Path(tokenizer).is_dir():
                self.tokenizer = GPT2TokenizerFast.from_pretrained(tokenizer)
            else:
                # The local cache first: offline, the hub client would retry for minutes.
                self.tokenizer = GPT2TokenizerFast.from_pretrained(tokenizer, local_files_only=True)
                if self.tokenizer.vocab_size == 0 and hub_reachable():
                    self.tokenizer = GPT2TokenizerFast.from_pretrained(tokenizer)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the GPT-2 tokenizer {tokenizer!r} ({exc}); "
                             "pass --tokenizer DIR with vocab.json and merges.txt") from exc
        # transformers returns an empty tokenizer rather than failing when files are missing.
        if self.tokenizer.vocab_size == 0:
            raise ModelError(f"cannot load the GPT-2 tokenizer {tokenizer!r} (not cached, hub unreachable "
                             "or files missing); pass --tokenizer DIR with vocab.json and merges.txt")

    def count(self, captions: Sequence[str]) -> list[int]:
        # No special tokens: GPT-2 adds none, and SmallCap counts the bare caption.
        return [len(ids) for ids in self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]]

