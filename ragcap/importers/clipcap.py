"""ClipCap's published checkpoints (coco_weights.pt, conceptual_weights.pt: MLP mapping with
GPT-2 fine-tuned; transformer_weights.pt: transformer mapping, GPT-2 frozen) as ragcap decoders.

A checkpoint is ClipCaptionModel.state_dict() from rmokady/CLIP_prefix_caption: the mapping
network under `clip_project.` and the whole GPT-2 under `gpt.` (also when it was frozen). Sizes
are read from the tensors (embedding width, prefix and CLIP lengths, layers); the LM's config and
tokenizer come from --lm and must fit the `gpt.` tensors. The file is untrusted input: it is read
with torch.load(weights_only=True) (ragcap.importers.state), which loads tensors and refuses code.

    ClipCap                                         ragcap (ragcap.decoders.clipcap)
    clip_project.model.{0,2}.*                      mapping.{0,2}.*                      (mlp)
    clip_project.linear.*, .prefix_const            mapping.linear.*, .prefix_const      (transformer)
    clip_project.transformer.layers.N.
        norm1.*, norm2.*                            mapping.layers.N.norm1.*, norm2.*
        attn.to_queries.weight (w, w)           \\   mapping.layers.N.self_attn.in_proj_weight (3w, w)
        attn.to_keys_values.weight (2w, w)      /   (its bias: zero, ClipCap has none)
        attn.project.*                              mapping.layers.N.self_attn.out_proj.*
        mlp.fc1.*, mlp.fc2.*                        mapping.layers.N.linear1.*, linear2.*
    gpt.*                                           lm.*
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ragcap.decoders.clipcap import MAPPINGS, ClipCapConfig, ClipCapDecoder, lm_skeleton
from ragcap.decoders.tokenizers import load_gpt2_tokenizer
from ragcap.errors import ModelError
from ragcap.importers.state import key_problems, read_state_dict, recorded_embedder, require_new_decoder_dir, without_legacy_buffers

# The CLIPs the published checkpoints were trained on, told apart by their embedding width:
# ViT-B/32 (512) for the MLP models, RN50x4 (640) for the transformer model.
DEFAULT_EMBEDDERS = {512: "ViT-B-32:openai", 640: "RN50x4:openai"}
# ClipCap's transformer layer, parameter by parameter, as torch's encoder layer names it.
LAYER_KEYS = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attn.project.weight": "self_attn.out_proj.weight", "attn.project.bias": "self_attn.out_proj.bias",
    "mlp.fc1.weight": "linear1.weight", "mlp.fc1.bias": "linear1.bias", "mlp.fc2.weight": "linear2.weight", "mlp.fc2.bias": "linear2.bias",
}


def import_clipcap(checkpoint: str | Path, out: str | Path, source: str | None = None, mapping: str = "mlp", lm: str = "gpt2",
                   model: str | None = None, prefix_scale: float = 1.0) -> Path:
    """Convert a ClipCap checkpoint file into a ragcap decoder directory `out`; returns it.

    source: what the user named (a file or hf-hub:ORG/NAME), for messages.
    lm: the LM's config and tokenizer (hub name or directory; weights come from the checkpoint).
    model: the embedder spec to record (default: the published checkpoints' CLIP, by width).
    prefix_scale: ClipCapConfig.prefix_scale (the MLP checkpoints saw raw CLIP embeddings).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    where = source or str(checkpoint)  # how messages name it
    if mapping not in MAPPINGS:
        raise ModelError(f"unknown ClipCap mapping {mapping!r}; choose from {', '.join(MAPPINGS)}")
    require_new_decoder_dir(out)
    # Without the legacy GPT-2 buffers, which are not weights.
    state = without_legacy_buffers(read_state_dict(checkpoint), "gpt.")
    tokenizer = load_gpt2_tokenizer(lm)
    with torch.device("meta"):  # shapes only: the checkpoint supplies every weight
        skeleton = lm_skeleton(lm)
    width = skeleton.get_input_embeddings().embedding_dim
    config = config_from_checkpoint(where, state, mapping, width, prefix_scale)
    with torch.device("meta"):
        decoder = ClipCapDecoder(config, recorded_embedder(model, config.embed_dim, DEFAULT_EMBEDDERS), skeleton, tokenizer)
    decoder.load_state_dict(_convert(where, state, decoder), strict=True, assign=True)
    decoder.lm.tie_weights()
    return decoder.eval().save(out)


def _shape(path: str, state: dict, key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise ModelError(f"{path}: missing key {key!r}; is it a ClipCap checkpoint of that mapping?")
    if state[key].ndim != ndim:
        raise ModelError(f"{path}: key {key!r} has shape {tuple(state[key].shape)}, expected {ndim} dimensions")
    return tuple(state[key].shape)


def config_from_checkpoint(path: str, state: dict, mapping: str, width: int, prefix_scale: float = 1.0) -> ClipCapConfig:
    """The ClipCapConfig the tensors' shapes imply."""
    other = "transformer" if mapping == "mlp" else "mlp"
    marker = {"mlp": "clip_project.model.0.weight", "transformer": "clip_project.linear.weight"}
    if marker[mapping] not in state and marker[other] in state:
        raise ModelError(f"{path} holds a {other} mapping network; pass --mapping {other}")
    if mapping == "mlp":
        embed_dim = _shape(path, state, "clip_project.model.0.weight", 2)[1]
        out_features = _shape(path, state, "clip_project.model.2.weight", 2)[0]
        prefix_length, clip_length, layers = out_features // width, ClipCapConfig.clip_length, ClipCapConfig.mapping_layers
        if out_features % width:
            raise ModelError(f"{path}: key 'clip_project.model.2.weight' has {out_features} outputs, not a multiple of the LM's "
                             f"width {width}; pass the --lm this checkpoint was trained with")
    else:
        clip_out, embed_dim = _shape(path, state, "clip_project.linear.weight", 2)
        prefix_length = _shape(path, state, "clip_project.prefix_const", 2)[0]
        clip_length = clip_out // width
        layers = len({m.group(1) for k in state if (m := re.match(r"clip_project\.transformer\.layers\.(\d+)\.", k))})
        if clip_out % width or not layers:
            raise ModelError(f"{path}: key 'clip_project.linear.weight' has {clip_out} outputs for the LM's width {width}, "
                             "or the checkpoint has no clip_project.transformer.layers; is it a ClipCap transformer checkpoint?")
    return ClipCapConfig(embed_dim=embed_dim, mapping=mapping, prefix_length=prefix_length, clip_length=clip_length,
                         mapping_layers=layers, prefix_scale=prefix_scale)


def _layout(decoder: ClipCapDecoder) -> dict[str, str]:
    """ClipCap checkpoint key -> ragcap key, for every tensor the checkpoint must hold."""
    keys = {f"gpt.{k}": f"lm.{k}" for k in decoder.lm.state_dict()}
    if decoder.config.mapping == "mlp":
        keys.update({f"clip_project.model.{k}": f"mapping.{k}" for k in decoder.mapping.state_dict()})
        return keys
    keys.update({"clip_project.linear.weight": "mapping.linear.weight", "clip_project.linear.bias": "mapping.linear.bias",
                 "clip_project.prefix_const": "mapping.prefix_const"})
    for i in range(decoder.config.mapping_layers):
        theirs, ours = f"clip_project.transformer.layers.{i}.", f"mapping.layers.{i}."
        keys.update({theirs + a: ours + b for a, b in LAYER_KEYS.items()})
        keys[theirs + "attn.to_queries.weight"] = ours + "self_attn.in_proj_weight"  # its first w rows
        keys[theirs + "attn.to_keys_values.weight"] = ours + "self_attn.in_proj_weight"  # the other 2w
    return keys


def checkpoint_shapes(decoder: ClipCapDecoder) -> dict[str, tuple[int, ...]]:
    """Every key a ClipCap checkpoint of this decoder's shape holds, with its shape."""
    ours, w = decoder.state_dict(), decoder.width
    shapes = {key: tuple(ours[mine].shape) for key, mine in _layout(decoder).items()}
    for key in shapes:
        if key.endswith("attn.to_queries.weight"):
            shapes[key] = (w, w)
        elif key.endswith("attn.to_keys_values.weight"):
            shapes[key] = (2 * w, w)
    return shapes


def _convert(path: str, state: dict[str, torch.Tensor], decoder: ClipCapDecoder) -> dict[str, torch.Tensor]:
    """The checkpoint renamed to the decoder's keys, or a ModelError naming every bad key."""
    layout, expected = _layout(decoder), checkpoint_shapes(decoder)
    if decoder.lm.config.tie_word_embeddings and "gpt.lm_head.weight" not in state:
        expected.pop("gpt.lm_head.weight", None)  # tied to the token embedding: one copy suffices
    listed = key_problems(state, expected)
    if listed:
        raise ModelError(f"{path} does not fit a ClipCap {decoder.config.mapping} model with this LM: {listed}. "
                         "Check --mapping, and that --lm is the LM the checkpoint was trained with (GPT-2 small for the published ones)")
    converted = {layout[k]: v.float() for k, v in state.items() if "attn.to_" not in k}
    for i in range(decoder.config.mapping_layers if decoder.config.mapping == "transformer" else 0):
        theirs, mine = f"clip_project.transformer.layers.{i}.attn.", f"mapping.layers.{i}.self_attn."
        converted[mine + "in_proj_weight"] = torch.cat([state[theirs + "to_queries.weight"], state[theirs + "to_keys_values.weight"]]).float()
        converted[mine + "in_proj_bias"] = torch.zeros(3 * decoder.width)
    if "lm.lm_head.weight" in decoder.state_dict() and "lm.lm_head.weight" not in converted:  # GPT-2's tied output layer
        converted["lm.lm_head.weight"] = converted["lm.transformer.wte.weight"]
    return converted
