"""SmallCap-style prompting: retrieved captions -> text prompt -> causal LM beam search.

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
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from ragcap.errors import ModelError

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
# infer.py/train.py use k=4 retrieved captions, num_beams=3 and max_new_tokens=25 (CAPTION_LENGTH).
DEFAULT_K = 4
MAX_CAPTION_TOKENS = 25
DEFAULT_BEAM_SIZE = 3
DEFAULT_MAX_NEW_TOKENS = 25

_SENTENCE_END = re.compile(r"[.\n]")
_MISSING_LM_HINT = "pass --lm DIR with a saved model, e.g. from save_pretrained"


def build_prompt(captions: Sequence[str]) -> str:
    """SmallCap's prompt for these retrieved captions, byte for byte (see PROMPT_HEAD)."""
    if not captions:
        return NO_RETRIEVAL_PROMPT
    return PROMPT_HEAD + "\n\n".join(captions) + PROMPT_TAIL


def _normalise(caption: str) -> str:
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
    captions = [c for c in map(_normalise, neighbour_captions) if c]
    if not captions:
        return []
    lengths = [len(ids) for ids in tokenizer(captions, add_special_tokens=False)["input_ids"]]
    return [c for c, n in zip(captions, lengths) if n <= max_tokens][:k]


def first_sentence(text: str) -> str:
    # SmallCap generates with eos_token='.' and drops that final '.' (utils.py::postprocess_preds).
    return _SENTENCE_END.split(text, maxsplit=1)[0].strip()


def _looks_like_path(lm: str) -> bool:
    # "org/name" is a hub id; an existing directory or an explicit path form is local.
    return Path(lm).expanduser().exists() or lm.startswith((".", "/", "~"))


def _load_lm(lm: str):
    if _looks_like_path(lm):
        local = Path(lm).expanduser()
        if not (local / "config.json").is_file():
            raise ModelError(f"GPT-2 weights not found: {lm} is not a directory with config.json; {_MISSING_LM_HINT}")
        lm = str(local)
    try:
        tokenizer = AutoTokenizer.from_pretrained(lm)
        model = AutoModelForCausalLM.from_pretrained(lm)
    except (OSError, ValueError) as err:
        # Offline with nothing cached, or a directory missing weights/tokenizer files.
        raise ModelError(f"GPT-2 weights not found for --lm {lm!r}: {_MISSING_LM_HINT}. Cause: {err}") from err
    return tokenizer, model


class PromptCaptioner:
    """Captions images from their neighbours' captions with a causal LM (SmallCap prompt)."""

    def __init__(self, lm: str = "gpt2", device: str | torch.device | None = None, batch_size: int = 32):
        self.tokenizer, self.model = _load_lm(lm)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        # Left padding keeps every prompt's last token at the end of the row, where generation
        # continues; transformers derives position_ids from the attention mask, so padded rows
        # see the same positions as unpadded ones (tested: batched == one at a time).
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stop_ids = self._stop_ids()

    def _stop_ids(self) -> list[int]:
        # '.' is SmallCap's eos. Newlines and the LM's own eos also end the caption (we cut there
        # anyway), so beam search ranks what is returned instead of text after the cut.
        ids = {self.tokenizer.eos_token_id}
        for text in (".", "\n", "\n\n"):
            tokens = self.tokenizer.encode(text, add_special_tokens=False)
            if len(tokens) == 1:
                ids.add(tokens[0])
        return sorted(i for i in ids if i is not None)

    def generation_kwargs(self, beam_size: int, max_new_tokens: int) -> dict:
        """SmallCap infer.py settings: length_penalty 0 (raw log-prob sums), early stopping."""
        kwargs = dict(
            num_beams=beam_size,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            no_repeat_ngram_size=0,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if beam_size > 1:  # beam-only flags; transformers warns about them for greedy search
            kwargs.update(length_penalty=0.0, early_stopping=True)
        return kwargs

    def prompts(self, neighbour_captions: Sequence[Sequence[str]], k: int = DEFAULT_K) -> list[str]:
        return [build_prompt(select_captions(caps, self.tokenizer, k=k)) for caps in neighbour_captions]

    @torch.inference_mode()
    def caption(
        self,
        neighbour_captions: Sequence[Sequence[str]],
        k: int = DEFAULT_K,
        beam_size: int = DEFAULT_BEAM_SIZE,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> list[str]:
        """One caption per image, given each image's retrieved captions in retrieval order."""
        prompts = self.prompts(neighbour_captions, k=k)
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        # Batch prompts of similar length together: less padding, same results.
        order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
        kwargs = self.generation_kwargs(beam_size, max_new_tokens)
        captions = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt").to(self.device)
            out = self.model.generate(**batch, **kwargs)
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            for i, text in zip(chunk, self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                captions[i] = first_sentence(text)
        return captions


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
    out_dir = Path(out_dir)
    try:
        tokenizer = GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as err:
        raise ModelError(f"GPT-2 tokenizer not found in {tokenizer_dir} (needs vocab.json + merges.txt): {err}") from err
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
