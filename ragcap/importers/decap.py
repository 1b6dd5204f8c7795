"""DeCap's published decoders (coco_prefix-009.pt from dhg-wei/DeCap) as ragcap decap decoders.

A checkpoint is DeCap.state_dict() from DeCap's train.py: a GPT2LMHeadModel under `decoder.`,
built from the repository's decoder_config.pkl (4 layers, 4 heads, width 768, GPT-2's 50257-row
vocabulary and 1024 positions), and one linear layer from the CLIP embedding to the prefix
token under `clip_project.model.0.`. It writes CLIP BPE tokens: <start_of_text> (49406) from the
prefix, then the caption, then <end_of_text> (49407); rows 49408 and up of its output layer are
no CLIP token and never written (ragcap.decoders.decap cuts them).

    DeCap                                   ragcap (ragcap.decoders.decap)
    clip_project.model.0.{weight,bias}      project.{weight,bias}
    decoder.*                               gpt.*

Every size is read from the tensors except the number of attention heads, which no shape
records (decoder_config.pkl says 4; it is a pickle, i.e. code, so it is never read): --heads.
The file is untrusted input, read with torch.load(weights_only=True) (ragcap.importers.state).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ragcap.decoders.decap import DeCapConfig, DeCapDecoder
from ragcap.errors import ModelError
from ragcap.importers.state import key_problems, read_state_dict, recorded_embedder, require_new_decoder_dir, without_legacy_buffers

DEFAULT_EMBEDDERS = {512: "ViT-B-32:openai"}  # DeCap trained on OpenAI's ViT-B/32 text embeddings
HEADS = 4  # decoder_config.pkl's n_head for the published decoders
# DeCap's inference writes at most 30 tokens (its entry_length), <start_of_text> and
# <end_of_text> included; its training captions were 20 tokens long.
MAX_TOKENS = 30
PREFIX_KEY = "clip_project.model.0.weight"
EMBED_KEY = "decoder.transformer.wte.weight"
POSITIONS_KEY = "decoder.transformer.wpe.weight"
RENAMES = (("clip_project.model.0.", "project."), ("decoder.", "gpt."))


def import_decap(checkpoint: str | Path, out: str | Path, source: str | None = None, heads: int = HEADS, model: str | None = None) -> Path:
    """Convert a DeCap checkpoint file into a ragcap decoder directory `out`; returns it.

    source: what the user named, for messages. heads: attention heads (not in the tensors).
    model: the embedder spec to record (default: ViT-B-32:openai for 512-d prefixes).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    where = source or str(checkpoint)
    require_new_decoder_dir(out)
    state = without_legacy_buffers(read_state_dict(checkpoint), "decoder.")
    config = config_from_checkpoint(where, state, heads)
    with torch.device("meta"):  # shapes only: the checkpoint supplies every weight
        decoder = DeCapDecoder(config, recorded_embedder(model, config.embed_dim, DEFAULT_EMBEDDERS))
    layout = {_theirs(k): k for k in decoder.state_dict()}  # DeCap's name -> ragcap's
    expected = checkpoint_shapes(decoder)
    if "decoder.lm_head.weight" not in state:
        expected.pop("decoder.lm_head.weight")  # tied to the token embedding: one copy suffices
    problems = key_problems(state, expected)
    if problems:
        raise ModelError(f"{where} does not fit a DeCap decoder of {config.n_layer} layers: {problems}. "
                         "Is it a checkpoint saved by DeCap's train.py?")
    converted = {layout[k]: v.float() for k, v in state.items()}
    converted.setdefault("gpt.lm_head.weight", converted["gpt.transformer.wte.weight"])
    decoder.load_state_dict(converted, strict=True, assign=True)
    decoder.gpt.tie_weights()
    return decoder.eval().save(out)


def config_from_checkpoint(path: str, state: dict[str, torch.Tensor], heads: int = HEADS) -> DeCapConfig:
    """The DeCapConfig the tensors' shapes imply, decoding as DeCap's inference does."""
    if any(k.startswith("gpt.") for k in state) or "clip_project.model.2.weight" in state:
        raise ModelError(f"{path} looks like a ClipCap checkpoint (a GPT-2 under 'gpt.' or a two-layer mapping); "
                         "import it with `ragcap models import clipcap`")
    for key in (PREFIX_KEY, EMBED_KEY, POSITIONS_KEY):
        if key not in state:
            raise ModelError(f"{path}: missing key {key!r}; is it a checkpoint saved by DeCap's train.py?")
        if state[key].ndim != 2:
            raise ModelError(f"{path}: key {key!r} has shape {tuple(state[key].shape)}, expected 2 dimensions")
    width, embed_dim = state[PREFIX_KEY].shape
    vocab_size, positions = state[EMBED_KEY].shape[0], state[POSITIONS_KEY].shape[0]
    layers = len({m.group(1) for k in state if (m := re.match(r"decoder\.transformer\.h\.(\d+)\.", k))})
    clip_vocab = DeCapConfig.vocab_size
    if vocab_size < clip_vocab:
        raise ModelError(f"{path}: key {EMBED_KEY!r} has {vocab_size} rows, fewer than CLIP's {clip_vocab} BPE ids; "
                         "DeCap's decoders write CLIP tokens (a ragcap decoder directory needs no import)")
    if heads < 1 or width % heads:
        raise ModelError(f"--heads {heads} does not divide the decoder's width {width}")
    return DeCapConfig(embed_dim=embed_dim, n_layer=layers, n_head=heads, n_embd=width, max_tokens=min(MAX_TOKENS, positions - 1),
                       vocab_size=vocab_size, positions=positions, writes_sot=True)


def checkpoint_shapes(decoder: DeCapDecoder) -> dict[str, tuple[int, ...]]:
    """Every key a DeCap checkpoint of this decoder's shape holds, with its shape."""
    return {_theirs(k): tuple(v.shape) for k, v in decoder.state_dict().items()}


def _theirs(ours: str) -> str:
    theirs_prefix, our_prefix = next((t, o) for t, o in RENAMES if ours.startswith(o))
    return theirs_prefix + ours.removeprefix(our_prefix)
