"""Causal language models as ragcap drives them: loading, and the Stepper the kinds decode with.

Every decoder kind is a GPT-2-family LM fed a different conditioning: DeCap's decoder and
ClipCap a few prefix embeddings, the prompt mode a text prompt, SmallCap a prompt plus image
features it cross-attends to. LMStepper runs transformers' LMs (all but DeCap's, whose GPT-2
is ragcap.decoders.gpt with its own GPTStepper) for ragcap.generation: the conditioning once
(left-padded, so every row's last input token sits at the end), then one token per row with
the KV cache.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ragcap.errors import ModelError
from ragcap.util import looks_like_path

# Inputs per pass of a beam-searching LM (prompt, SmallCap) on a CPU. Its KV cache grows with
# inputs x beams x tokens, and past a few dozen inputs a CPU also gets slower per input: each step
# reorders the whole cache, which is memory-bound. GPT-2 small, 3 beams, 128 prompts at once ran
# at 0.58x the images/s of 32 at a time and peaked at 5.7 GB resident instead of 2.5. A GPU takes
# the captioner's whole batch.
CPU_LM_BATCH = 32


def lm_batch(batch_size: int, device: torch.device) -> int:
    """How many inputs a beam-searching LM decodes together out of a batch of batch_size."""
    return batch_size if device.type == "cuda" else min(batch_size, CPU_LM_BATCH)


MISSING_LM_HINT = (
    "pass --lm DIR with a saved causal LM (e.g. from save_pretrained); offline, "
    "`ragcap models save-random-lm DIR --tokenizer TOKENIZER_DIR` makes a random GPT-2 for trying things out"
)


@lru_cache(maxsize=1)
def cache_keyword() -> str:
    """The name of the KV-cache argument: `cache` since transformers 5.x, `past_key_values` before."""
    from transformers import GPT2Model

    return "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"


def new_cache(cross_attention: bool = False):
    """An empty KV cache; with cross_attention, one that also keeps the keys and values of the
    encoder states, computed at the first step and reused (GPT-2 otherwise wraps a plain cache
    anew at every call and recomputes them: ~4x a SmallCap7M step's other work, 50 patches)."""
    from transformers import DynamicCache, EncoderDecoderCache

    return EncoderDecoderCache(DynamicCache(), DynamicCache()) if cross_attention else DynamicCache()


def check_causal_lm(name: str | Path) -> str:
    """The name to load an LM from, checked without loading it: a directory must hold
    config.json; a hub name must be in the local cache when the hub is offline (ragcap.hub)."""
    from ragcap.hub import offline_reason, use_cache_only_if_offline

    name = str(name)
    if looks_like_path(name):
        local = Path(name).expanduser()
        if not (local / "config.json").is_file():
            raise ModelError(f"language model not found: {name} is not a directory with config.json; {MISSING_LM_HINT}")
        return str(local)
    if use_cache_only_if_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ModelError(f"language model {name!r} is not in the local Hugging Face cache and the hub is offline "
                             f"({offline_reason()}): {MISSING_LM_HINT}")
    return name


def load_causal_lm(name: str | Path):
    """(tokenizer, model) of a causal LM from a local directory or a hub name (ModelError if absent)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    name = check_causal_lm(name)
    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with ragcap's own
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name)
    except (OSError, ValueError) as err:
        # Offline with nothing cached, or a directory missing weights/tokenizer files.
        raise ModelError(f"language model {name!r} could not be loaded: {MISSING_LM_HINT}. Cause: {err}") from err
    from ragcap.decoders.tokenizers import check_not_empty

    return check_not_empty(tokenizer, name), model.eval()


@dataclass
class LMInput:
    """A batch of conditionings, left-padded to one length."""

    embeds: torch.Tensor  # (n, length, width) input embeddings
    mask: torch.Tensor | None = None  # (n, length) 1 for real positions; None: no padding
    encoder_states: torch.Tensor | None = None  # (n, m, width') features to cross-attend to (SmallCap)


@dataclass
class _State:
    cache: object
    mask: torch.Tensor  # grows by one column per step
    next_position: torch.Tensor  # (n,) position id of the next token
    encoder_states: torch.Tensor | None


class LMStepper:
    """ragcap.generation's Stepper over a transformers causal LM (GPT-2 family)."""

    def __init__(self, lm, logits_fn=None):
        self.lm = lm
        # Kinds that write over part of the vocabulary map the LM's logits here (DeCap's pruning
        # lives in its output layer, so most need nothing).
        self.logits_fn = logits_fn or (lambda logits: logits)

    def _forward(self, state: _State, **inputs) -> torch.Tensor:
        if state.encoder_states is not None:
            inputs["encoder_hidden_states"] = state.encoder_states
        out = self.lm(**inputs, attention_mask=state.mask, use_cache=True, logits_to_keep=1, **{cache_keyword(): state.cache})
        return self.logits_fn(out.logits[:, -1])

    def start(self, cond: LMInput) -> tuple[torch.Tensor, _State]:
        n, length = cond.embeds.shape[:2]
        device = cond.embeds.device
        mask = cond.mask if cond.mask is not None else torch.ones((n, length), dtype=torch.long, device=device)
        # Positions count real tokens only, so a left-padded row sees the positions it would see
        # alone (transformers' generate does the same; padded slots get an arbitrary 1).
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        state = _State(new_cache(cond.encoder_states is not None), mask, positions[:, -1] + 1, cond.encoder_states)
        logits = self._forward(state, inputs_embeds=cond.embeds, position_ids=positions)
        return logits, state

    def step(self, tokens: torch.Tensor, state: _State) -> torch.Tensor:
        state.mask = torch.cat([state.mask, state.mask.new_ones((state.mask.shape[0], 1))], dim=1)
        logits = self._forward(state, input_ids=tokens.unsqueeze(1), position_ids=state.next_position.unsqueeze(1))
        state.next_position = state.next_position + 1
        return logits

    def select(self, state: _State, rows: torch.Tensor) -> _State:
        state.cache.reorder_cache(rows)
        encoder_states = None if state.encoder_states is None else state.encoder_states[rows]
        return _State(state.cache, state.mask[rows], state.next_position[rows], encoder_states)


def save_lm_assets(lm, tokenizer, target: Path) -> None:
    """The LM's config and tokenizer files into `target`, each written next to its place and
    then moved in one file at a time: never half a file."""
    target.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        lm.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for written in Path(tmp).iterdir():
            os.replace(written, target / written.name)
