"""The tokenizers decoders write with: CLIP's BPE (DeCap) and GPT-2's (ClipCap, SmallCap, prompts).

CLIP's BPE is open_clip's SimpleTokenizer, whose vocabulary file ships inside the open_clip
package, so it works offline; a saved decoder keeps its own copy of the file. Captioning only
turns ids back into text, which needs the vocabulary alone: that is read here from the file,
and SimpleTokenizer (whose import runs open_clip's, seconds of a cold start) only encodes.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from ragcap.errors import ModelError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # the merges CLIP's vocabulary uses: the file's lines 1 to 48894
SPECIALS = ("<start_of_text>", "<end_of_text>")


def default_bpe() -> str:
    """open_clip's BPE file, found without importing open_clip (find_spec runs no package code)."""
    return str(Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / BPE_FILE)


@lru_cache(maxsize=4)
def _bpe(path: str):
    # Building the BPE tables takes ~0.3 s; every decoder in a process shares one per file.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(bpe_path=path)


def _byte_symbols() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters: printable Latin-1
    bytes stand for themselves, the others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


@lru_cache(maxsize=4)
def _vocabulary(path: str) -> tuple[str, ...]:
    """CLIP BPE id -> token text, numbered as SimpleTokenizer numbers them: the 256 byte symbols
    (in _byte_symbols' order), the same each ending a word ('</w>'), the merges in rank order,
    the two specials."""
    try:
        merges = gzip.open(path).read().decode("utf-8").split("\n")[1:MERGES + 1]
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read CLIP's BPE vocabulary {path} ({e}); copy {BPE_FILE} from the open_clip package there") from e
    symbols = list(_byte_symbols().values())
    return (*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges), *SPECIALS)


@lru_cache(maxsize=1)
def _byte_of() -> dict[str, int]:
    return {symbol: byte for byte, symbol in _byte_symbols().items()}


class CaptionTokenizer:
    """CLIP's BPE without the special tokens: lowercases and normalises whitespace.

    With `vocab` (a pruned decoder's CLIP ids) the ids it speaks are positions in that list.
    """

    def __init__(self, bpe_path: str | Path | None = None, vocab: Sequence[int] | None = None):
        self.bpe_path = Path(bpe_path or default_bpe())
        self._tokens = _vocabulary(str(self.bpe_path))
        self._to_clip = None if vocab is None else list(vocab)
        self._to_local = None if vocab is None else {clip: i for i, clip in enumerate(vocab)}
        self._clip_sot, self._clip_eot = len(self._tokens) - 2, len(self._tokens) - 1
        self.sot_id = self._local(self._clip_sot)
        self.eot_id = self._local(self._clip_eot)
        self.vocab_size = len(self._tokens) if vocab is None else len(vocab)

    @property
    def _bpe(self):
        return _bpe(str(self.bpe_path))

    def _local(self, clip_id: int) -> int:
        if self._to_local is None:
            return clip_id
        if clip_id not in self._to_local:
            raise ModelError(f"'{self._text([clip_id])}' is not in this decoder's vocabulary (it was pruned to its training captions)")
        return self._to_local[clip_id]

    def encode(self, text: str) -> list[int]:
        # A caption may literally contain "<end_of_text>", which the BPE maps to the special id.
        return [self._local(i) for i in self._bpe.encode(text) if i not in (self._clip_sot, self._clip_eot)]

    def _text(self, clip_ids: list[int]) -> str:
        # As SimpleTokenizer.decode: the tokens' symbols back to bytes, then UTF-8; '</w>' ends a word.
        symbols = "".join(self._tokens[i] for i in clip_ids)
        return bytes(_byte_of()[c] for c in symbols).decode("utf-8", errors="replace").replace("</w>", " ")

    def decode(self, ids: list[int]) -> str:
        kept = [i for i in ids if i not in (self.sot_id, self.eot_id)]
        text = self._text(kept if self._to_clip is None else [self._to_clip[i] for i in kept])
        return " ".join(text.split())

    def clip_ids(self, text: str) -> set[int]:
        """The CLIP BPE ids of a text (for choosing a pruned vocabulary)."""
        return set(self._bpe.encode(text))

    def normalise(self, text: str) -> str:
        """The text as the decoder can reproduce it: decode(encode(text))."""
        return self.decode(self.encode(text))


def load_gpt2_tokenizer(source: str | Path):
    """A GPT-2-family tokenizer from a directory or a hub name (cache first), or a ModelError.

    transformers returns an empty tokenizer instead of failing when files are missing, which
    would later look like a model that writes nothing; that is refused here.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a tokenizer from {str(source)!r} ({err}); pass a directory with the LM's tokenizer files") from err
    return check_not_empty(tokenizer, source)


def check_not_empty(tokenizer, source: str | Path):
    """`tokenizer`, unless it was built without its vocabulary files (ModelError)."""
    if len(tokenizer) == 0 or tokenizer.vocab_size == 0:  # without vocab files only special tokens remain
        raise ModelError(f"the tokenizer in {str(source)!r} is empty; it needs vocab.json and merges.txt (or tokenizer.json)")
    return tokenizer
