"""open_clip's CLIP tokenizer (SimpleTokenizer) run by Hugging Face `tokenizers` in Rust: the same ids.

SimpleTokenizer is pure Python and bounds `ragcap ingest` on a GPU long before the text tower
(see BENCHMARKS.md, "Tokenising captions"). This builds a BPE with `tokenizers` from the
SimpleTokenizer's own vocabulary and merge ranks, so every id comes from open_clip's BPE file
as open_clip derives it:

    cleaning   Python, as open_clip's: ftfy + html unescape + whitespace collapse + lower.
               ftfy is most of SimpleTokenizer's time and a no-op on plain ASCII (below), so
               that common case skips it; any other text goes through open_clip's own clean
               function. Lower-casing stays in Python: Rust lower-cases a character at a time,
               Python's str.lower() knows context (final sigma).
    words      ASCII captions (nearly all): SimpleTokenizer's regex in Rust, where it splits
               every printable-ASCII string the same. Other captions: SimpleTokenizer's own
               regex in Python, because Rust's (Oniguruma) disagrees on ~17,000 code points
               (newer Unicode letters, case-folded combining marks), and the GPT-2
               byte-to-unicode map (ByteLevel) in Rust. Printable ASCII maps to itself.
    model      BPE with SimpleTokenizer's merges in rank order and `</w>` on each word's last
               symbol ("dog" at a word's end is "dog</w>").
    specials   <start_of_text> and <end_of_text> around each caption, cut exactly as open_clip
               cuts: the first context_length tokens, the last one made EOT.

A caption whose cleaned text spells a special token goes through SimpleTokenizer itself (its
regex matches the token only at some positions), so ids equal open_clip's on every input.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
from typing import Sequence

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer, get_clean_fn
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

# SimpleTokenizer's pattern less its special-token alternatives (those captions fall back),
# for ASCII text only; on ASCII its IGNORECASE flag changes nothing after lower-casing.
_ASCII_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# Text ftfy and html.unescape leave alone: printable ASCII without '&' (no entity), plus tab and
# line breaks, which the whitespace collapse removes either way. ftfy changes nothing here: its
# mojibake, width, ligature, quote and C1 fixes need non-ASCII, its control-character and
# terminal-escape removal needs other control characters, and NFC is the identity on ASCII.
_NOT_PLAIN = re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")

# Building costs 0.07 CPU s (0.2 s wall on a loaded 2-core EPYC; BENCHMARKS.md), what
# SimpleTokenizer spends on ~500 captions: smaller calls (a query, a short ingest) keep using
# it, so a cold start that embeds a query pays nothing.
LAZY_BUILD_MIN = 1000

_lock = threading.Lock()
_pool_lock = threading.Lock()
_built: list[tuple[dict, dict, tuple[Tokenizer, Tokenizer]]] = []  # what this process has built


def supports(tokenizer) -> bool:
    """A tokenizer this module reproduces: open_clip's SimpleTokenizer with its default cleaning,
    no extra special tokens and no reduction (the OpenAI and LAION CLIPs' tokenizer)."""
    return (
        type(tokenizer) is SimpleTokenizer
        and tokenizer.clean_fn is get_clean_fn("lower")
        and tokenizer.reduction_fn is None
        and len(tokenizer.all_special_ids) == 2
    )


def build(simple: SimpleTokenizer) -> tuple[Tokenizer, Tokenizer]:
    """Rust tokenizers for this SimpleTokenizer's vocabulary, built once per process: one for
    ASCII text, one for text split into words in Python. They share one BPE model."""
    with _lock:
        for encoder, ranks, built in _built:
            if encoder == simple.encoder and ranks == simple.bpe_ranks:  # ~10 ms: 49k entries each
                return built
        merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
        bpe = models.BPE(vocab=simple.encoder, merges=merges, end_of_word_suffix="</w>")
        ascii_text, words = Tokenizer(bpe), Tokenizer(bpe)
        ascii_text.pre_tokenizer = pre_tokenizers.Split(Regex(_ASCII_WORDS), behavior="removed", invert=True)
        words.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        specials = [("<start_of_text>", simple.sot_token_id), ("<end_of_text>", simple.eot_token_id)]
        for rust in (ascii_text, words):
            rust.post_processor = processors.TemplateProcessing(
                single="<start_of_text> $A <end_of_text>", special_tokens=specials
            )
        built = ascii_text, words  # the one pair every later call returns
        _built[:] = [(simple.encoder, simple.bpe_ranks, built)]
        return built


def clean(simple: SimpleTokenizer, text: str) -> str:
    """SimpleTokenizer's cleaning of one caption, skipping ftfy where it is a no-op."""
    if _NOT_PLAIN.search(text) is None:
        return " ".join(text.split()).lower()
    return simple.clean_fn(text)


class ClipTokenizer:
    """Callable like open_clip's SimpleTokenizer (same tensor), plus each caption's full length.

    parallel: encode a batch on the Rust thread pool (else on the calling thread). open_clip
    turns TOKENIZERS_PARALLELISM off when imported (its fork-safety default), so the pool is
    switched on only for the call.
    build_min: calls with fewer captions use SimpleTokenizer until the Rust one is built.
    """

    def __init__(self, simple: SimpleTokenizer, parallel: bool = True, build_min: int = LAZY_BUILD_MIN):
        if not supports(simple):
            raise ValueError("ClipTokenizer reproduces only open_clip's default SimpleTokenizer")
        self.simple, self.parallel, self.build_min = simple, parallel, build_min
        self.context_length = simple.context_length
        self.sot, self.eot = simple.sot_token_id, simple.eot_token_id
        self._rust: tuple[Tokenizer, Tokenizer] | None = None

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        texts = [texts] if isinstance(texts, str) else texts
        return self.tokenize(texts, context_length or self.context_length)[0]

    def tokenize(self, texts: Sequence[str], context_length: int) -> tuple[torch.LongTensor, np.ndarray]:
        """open_clip's tokens (n, context_length) and each caption's length in tokens, start and
        end included, counted in full even past the context."""
        ids = self.encode(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return torch.from_numpy(self._pad(ids, lengths, context_length)), lengths

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Each caption's ids, <start_of_text> and <end_of_text> included, uncut."""
        if self._rust is None and len(texts) < self.build_min:
            return [self._simple_ids(t) for t in texts]
        if self._rust is None:
            self._rust = build(self.simple)
        ids: list[list[int] | None] = [None] * len(texts)
        ascii_at, ascii_text, words_at, words = [], [], [], []
        for i, text in enumerate(texts):
            cleaned = clean(self.simple, text)
            if "<start_of_text>" in cleaned or "<end_of_text>" in cleaned:
                ids[i] = self._simple_ids(text)
            elif cleaned.isascii() and cleaned.isprintable():
                ascii_at.append(i)
                ascii_text.append(cleaned)
            else:
                words_at.append(i)
                words.append(self.simple.pat.findall(cleaned))
        for at, rust, batch in ((ascii_at, self._rust[0], ascii_text), (words_at, self._rust[1], words)):
            for i, encoding in zip(at, self._encode_batch(rust, batch)):
                ids[i] = encoding.ids
        return ids

    def _simple_ids(self, text: str) -> list[int]:
        return [self.sot, *self.simple.encode(text), self.eot]

    def _encode_batch(self, rust: Tokenizer, batch: list) -> list:
        if not batch:
            return []
        # `tokenizers` reads TOKENIZERS_PARALLELISM at each call; one call at a time sets it, so
        # concurrent callers (the server's threads) cannot restore each other's setting.
        with _pool_lock:
            saved = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "true" if self.parallel else "false"
            try:
                return rust.encode_batch(batch, is_pretokenized=isinstance(batch[0], list))
            finally:
                if saved is None:
                    del os.environ["TOKENIZERS_PARALLELISM"]
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = saved

    def _pad(self, ids: list[list[int]], lengths: np.ndarray, context_length: int) -> np.ndarray:
        """Rows of context_length: a caption's first tokens, zero padded; a cut one ends in EOT."""
        out = np.zeros((len(ids), context_length), dtype=np.int64)
        if not ids:
            return out
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        starts = np.cumsum(lengths) - lengths
        kept = np.minimum(lengths, context_length)
        rows = np.repeat(np.arange(len(ids)), kept)
        cols = np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)
        out[rows, cols] = flat[np.repeat(starts, kept) + cols]
        out[lengths > context_length, -1] = self.eot
        return out
