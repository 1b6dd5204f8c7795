"""SmallCap-style prompting: retrieved captions -> text prompt -> a causal LM's beam search.

SmallCap (Ramos et al., arXiv 2209.15323) conditions a GPT-2 decoder on the captions retrieved
for an image by writing them into a fixed prompt. This module reproduces that prompt, the
retrieval-side length filter and the decoding settings of SmallCap's reference code
(github.com/RitaRamo/smallcap), but runs the LM alone (no image cross-attention) and batches
across images, which SmallCap's `evaluate_rag_model` does not ("RAG models can only be
evaluated with a batch of length 1").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ragcap.decoders.base import Caption
from ragcap.decoders.lm import LMInput, LMStepper, lm_batch, load_causal_lm
from ragcap.errors import ModelError, OptionError
from ragcap.generation import SearchOptions, search
from ragcap.precision import autocast, prepare, resolve_precision
from ragcap.util import default_device

# SmallCap src/template.txt is "Similar images show\n\n||\n\nThis image shows \n"; infer.py reads it
# with `.strip() + ' '` and src/utils.py::prep_strings replaces "||" with
# `'\n\n'.join(retrieved_caps[:k]) + '.'`. Captions are not stripped there, and the prompt keeps
# the trailing space (SmallCap was trained with it, so it is part of the prompt, not a typo).
PROMPT_HEAD = "Similar images show\n\n"
PROMPT_TAIL = ".\n\nThis image shows "
# SmallCap's prompt when there is nothing to retrieve (src/utils.py SIMPLE_PREFIX, used by
# evaluate_norag_model); we use it when every neighbour was filtered out.
NO_RETRIEVAL_PROMPT = "This image shows "

# SmallCap src/retrieve_caps.py::filter_captions keeps datastore captions with <= 25 GPT-2 tokens;
# infer.py/train.py use k=4 retrieved captions, num_beams=3 and max_new_tokens=25 (CAPTION_LENGTH),
# ranked by the summed log-probability (length_penalty 0).
DEFAULT_K = 4
MAX_CAPTION_TOKENS = 25
SMALLCAP_SEARCH = SearchOptions(beam=3, max_tokens=25, length_alpha=0.0)
# The same as SmallCap's own `generate` call (used by the benchmarks' per-image reference; the
# tests check that ragcap's batched search gives the same captions).
SMALLCAP_GENERATE = dict(num_beams=3, max_new_tokens=25, length_penalty=0.0, early_stopping=True, do_sample=False)

_SENTENCE_END = re.compile(r"[.\n]")


def build_prompt(captions: Sequence[str]) -> str:
    """SmallCap's prompt for these retrieved captions, byte for byte (see PROMPT_HEAD)."""
    if not captions:
        return NO_RETRIEVAL_PROMPT
    return PROMPT_HEAD + "\n\n".join(captions) + PROMPT_TAIL


def normalise_caption(caption: str) -> str:
    # SmallCap's datastore holds Karpathy-tokenised captions (' '.join(tokens)): no surrounding
    # whitespace and no final period. Raw corpora (COCO json) have both; without this the last
    # neighbour would read "...horse..\n\n" and a stray "\n" would break the template's layout.
    return caption.strip().rstrip(".").rstrip()


def select_captions(
    neighbour_captions: Sequence[str],
    tokenizer,
    k: int = DEFAULT_K,
    max_tokens: int = MAX_CAPTION_TOKENS,
) -> list[str]:
    """The first k neighbours (retrieval order) with at most max_tokens LM tokens.

    SmallCap applies the 25-token limit when building its datastore; we apply it at prompt time
    so any collection behaves the same. Token counts are of the normalised caption, as it
    appears in the prompt.
    """
    captions = [c for c in map(normalise_caption, neighbour_captions) if c]
    if not captions:
        return []
    lengths = [len(ids) for ids in tokenizer(captions, add_special_tokens=False)["input_ids"]]
    return [c for c, n in zip(captions, lengths) if n <= max_tokens][:k]


def first_sentence(text: str) -> str:
    # SmallCap generates with eos_token='.' and drops that final '.' (utils.py::postprocess_preds).
    return _SENTENCE_END.split(text, maxsplit=1)[0].strip()


def stop_ids(tokenizer) -> tuple[int, ...]:
    """'.' is SmallCap's end of caption. Newlines and the LM's own end of text also end it (the
    caption is cut there anyway), so beam search ranks what is returned, not text after the cut."""
    ids = {tokenizer.eos_token_id}
    for text in (".", "\n", "\n\n"):
        tokens = tokenizer.encode(text, add_special_tokens=False)
        if len(tokens) == 1:
            ids.add(tokens[0])
    return tuple(sorted(i for i in ids if i is not None))


def left_padded(token_ids: list[list[int]], embed, device: torch.device) -> LMInput:
    """Prompts of different lengths as one left-padded batch, so every prompt ends at the last column."""
    width = max(len(ids) for ids in token_ids)
    ids = torch.zeros((len(token_ids), width), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(token_ids):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return LMInput(embed(ids), mask)


class PromptCaptioner:
    """Captions images from their neighbours' captions with a causal LM (SmallCap prompt)."""

    def __init__(self, lm: str | Path = "gpt2", device: str | torch.device | None = None, batch_size: int = 32,
                 precision: str | None = None):
        self.tokenizer, self.model = load_causal_lm(lm)
        self.device = default_device(device)
        self.precision = resolve_precision(precision)  # ragcap.precision
        prepare(self.model.to(self.device), self.device, self.precision)
        self.batch_size = lm_batch(batch_size, self.device)
        self.stop_ids = stop_ids(self.tokenizer)

    def generate_kwargs(self) -> dict:
        """transformers' generate arguments for SmallCap's decoding with this LM's stop tokens."""
        return dict(SMALLCAP_GENERATE, eos_token_id=list(self.stop_ids), pad_token_id=self.tokenizer.eos_token_id)

    def prompts(self, neighbour_captions: Sequence[Sequence[str]], k: int = DEFAULT_K) -> list[str]:
        return [build_prompt(select_captions(caps, self.tokenizer, k=k)) for caps in neighbour_captions]

    def search_options(self, options: SearchOptions | None) -> SearchOptions:
        """SmallCap's settings, except where `options` says otherwise (beam, length cap, sampling...)."""
        return (options or SearchOptions()).with_defaults(
            SMALLCAP_SEARCH.beam, SMALLCAP_SEARCH.max_tokens, SMALLCAP_SEARCH.length_alpha, stop_ids=self.stop_ids
        )

    @torch.inference_mode()
    def caption(
        self, neighbour_captions: Sequence[Sequence[str]], k: int = DEFAULT_K, options: SearchOptions | None = None
    ) -> list[list[Caption]]:
        """options.num_return captions per image (best first), given its retrieved captions in retrieval order."""
        options = self.search_options(options)
        ids = self.tokenizer(self.prompts(neighbour_captions, k=k), add_special_tokens=False)["input_ids"]
        if any(len(row) + options.max_tokens > self._context() for row in ids):
            raise ModelError(f"a prompt of {max(map(len, ids))} tokens leaves no room for {options.max_tokens} new ones in the LM's context")
        # Batch prompts of similar length together: less padding, same results.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        captions: list[list[Caption]] = [[] for _ in ids]
        embed = self.model.get_input_embeddings()
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            with autocast(self.device, self.precision):
                found = search(LMStepper(self.model), left_padded([ids[i] for i in chunk], embed, self.device), options)
            for i, row in zip(chunk, found):
                captions[i] = [Caption(first_sentence(self.tokenizer.decode(h.tokens, skip_special_tokens=True)), h.score) for h in row]
        return captions

    def generate(self, neighbour_captions: Sequence[Sequence[str]], k: int = DEFAULT_K, options: SearchOptions | None = None) -> list[str]:
        return [row[0].text for row in self.caption(neighbour_captions, k, options)]

    def _context(self) -> int:
        return int(getattr(self.model.config, "n_positions", None) or getattr(self.model.config, "max_position_embeddings", 1024))


def save_random_lm(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    n_layer: int = 12,
    n_embd: int = 768,
    n_head: int = 12,
    seed: int = 0,
) -> Path:
    """A randomly initialised GPT-2 (default: GPT-2 small's shape) with the real GPT-2 tokenizer.

    For tests and benchmarks offline: same vocabulary, prompt lengths and compute as GPT-2, no
    download. tokenizer_dir holds vocab.json + merges.txt (or a saved tokenizer).
    """
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    out_dir = Path(out_dir)
    # Checked first: GPT-2's own checks raise a bare ValueError, after the tokenizer has loaded.
    if min(n_layer, n_embd, n_head) < 1 or n_embd % n_head:
        raise OptionError(f"--layers {n_layer}, --width {n_embd}, --heads {n_head}: each must be at least 1 "
                          "and the width a multiple of the heads (GPT-2 small: 12, 768, 12)")
    if not Path(tokenizer_dir).is_dir():
        raise ModelError(f"--tokenizer {tokenizer_dir}: no such directory; give the folder holding GPT-2's vocab.json and merges.txt")
    try:
        tokenizer = GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as err:
        raise ModelError(f"GPT-2 tokenizer not found in {tokenizer_dir} (needs vocab.json + merges.txt): {err}") from err
    if len(tokenizer) == 0 or tokenizer.vocab_size == 0:
        raise ModelError(f"GPT-2 tokenizer not found in {tokenizer_dir} (needs vocab.json + merges.txt)")
    tokenizer.model_max_length = 1024  # GPT-2's context; the bare files leave it unbounded
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
