"""The tokenizers decoders write with: CLIP's BPE (DeCap) and GPT-2's (ClipCap, SmallCap, prompts).

CLIP's BPE is open_clip's SimpleTokenizer, whose vocabulary file ships inside the open_clip
package, so it works offline; a saved decoder keeps its own copy of the file.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

from open_clip.tokenizer import SimpleTokenizer, default_bpe

from ragcap.errors import ModelError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


@lru_cache(maxsize=4)
def _bpe(path: str) -> SimpleTokenizer:
    # Building the BPE tables takes ~0.3 s; every decoder in a process shares one per file.
    return SimpleTokenizer(bpe_path=path)


class CaptionTokenizer:
    """CLIP's BPE without the special tokens: lowercases and normalises whitespace.

    With `vocab` (a pruned decoder's CLIP ids) the ids it speaks are positions in that list.
    """

    def __init__(self, bpe_path: str | Path | None = None, vocab: Sequence[int] | None = None):
        self.bpe_path = Path(bpe_path or default_bpe())
        self._bpe = _bpe(str(self.bpe_path))
        self._to_clip = None if vocab is None else list(vocab)
        self._to_local = None if vocab is None else {clip: i for i, clip in enumerate(vocab)}
        self.sot_id = self._local(self._bpe.sot_token_id)
        self.eot_id = self._local(self._bpe.eot_token_id)
        self.vocab_size = self._bpe.vocab_size if vocab is None else len(vocab)

    def _local(self, clip_id: int) -> int:
        if self._to_local is None:
            return clip_id
        if clip_id not in self._to_local:
            raise ModelError(f"'{self._bpe.decode([clip_id])}' is not in this decoder's vocabulary (it was pruned to its training captions)")
        return self._to_local[clip_id]

    def encode(self, text: str) -> list[int]:
        # A caption may literally contain "<end_of_text>", which the BPE maps to the special id.
        specials = (self._bpe.sot_token_id, self._bpe.eot_token_id)
        return [self._local(i) for i in self._bpe.encode(text) if i not in specials]

    def decode(self, ids: list[int]) -> str:
        kept = [i for i in ids if i not in (self.sot_id, self.eot_id)]
        text = self._bpe.decode(kept if self._to_clip is None else [self._to_clip[i] for i in kept])
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
        raise ModelError(f"cannot load a tokenizer from {source!r} ({err}); pass a directory with the LM's tokenizer files") from err
    if len(tokenizer) == 0:
        raise ModelError(f"the tokenizer in {source!r} is empty; it needs vocab.json and merges.txt (or tokenizer.json)")
    return tokenizer
