"""SmallCap's published checkpoints (the Hugging Face repositories of RitaRamo/smallcap, e.g.
SmallCap7M: config.json + pytorch_model.bin) as ragcap decoders.

A checkpoint is the state dict of SmallCap's VisionEncoderDecoder-style model: the CLIP vision
tower under `encoder.` (Hugging Face's CLIPVisionTransformer: embeddings, pre_layrnorm,
encoder.layers, post_layernorm; frozen in training, so CLIP's own weights) and its GPT-2 under
`decoder.` with cross-attention in every block. Saved by transformers 4.x, the GPT-2 also holds
each attention's mask buffers (`bias`, `masked_bias`), which are not weights.

    SmallCap                                            ragcap (ragcap.decoders.smallcap)
    decoder.transformer.*  (wte, wpe, h.N.*, ln_f)      lm.transformer.*
    decoder.transformer.h.N.crossattention.q_attn       (w, c)          c = w / cross_attention_reduce_factor
    decoder.transformer.h.N.crossattention.c_attn       (e, 2c)         e = the encoder's width (768)
    decoder.transformer.h.N.crossattention.c_proj       (c, w)
    decoder.transformer.h.N.ln_cross_attn.*             same names
    decoder.lm_head.weight                              lm.lm_head.weight (SmallCap unties it; equal to wte when the LM was frozen)
    encoder.*                                           not imported: ragcap runs the open_clip model --model names

The widths are read from the tensors; the GPT-2 config from config.json's "decoder" beside the
weights, else from --lm, which also gives the tokenizer. config.json's "k" and
"retrieval_encoder" (RN50x64 for the published models) fill in what the model records about
retrieval. The file is read with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ragcap.decoders.smallcap import SmallCapConfig, SmallCapDecoder, cross_attention_lm, lm_config
from ragcap.decoders.tokenizers import load_gpt2_tokenizer
from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import ModelError
from ragcap.importers.state import read_state_dict, require_new_decoder_dir

DEFAULT_ENCODER = "ViT-B-32:openai"  # SmallCap's openai/clip-vit-base-patch32
DEFAULT_RETRIEVAL = "RN50x64"  # SmallCap's --retrieval_encoder
LEGACY_BUFFERS = re.compile(r"decoder\.transformer\.h\.\d+\.(attn|crossattention)\.(bias|masked_bias)")
CROSS_KEY = "decoder.transformer.h.0.crossattention."
MAX_LISTED = 3


def import_smallcap(checkpoint: str | Path, out: str | Path, source: str | None = None, lm: str = "gpt2", model: str | None = None,
                    retrieval: str | None = None) -> Path:
    """Convert a SmallCap checkpoint (file, or directory with config.json) into a ragcap decoder `out`.

    lm: tokenizer (and GPT-2 config when no config.json comes with the weights), hub name or directory.
    model: the encoder, an open_clip ViT spec (default ViT-B-32:openai).
    retrieval: the embedder of the memories it reads (default: config.json's retrieval_encoder, else RN50x64).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    where = source or str(checkpoint)
    require_new_decoder_dir(out)
    published = _published_config(checkpoint)
    state = {k: v for k, v in read_state_dict(checkpoint).items() if not LEGACY_BUFFERS.fullmatch(k) and not k.startswith("encoder.")}
    for key in ("q_attn.weight", "c_attn.weight"):
        if CROSS_KEY + key not in state or state[CROSS_KEY + key].ndim != 2:
            raise ModelError(f"{where}: no 2-d {CROSS_KEY + key!r}, so not a SmallCap checkpoint (its first keys: {', '.join(list(state)[:4])})")
    encoder_width, width = state[CROSS_KEY + "c_attn.weight"].shape[0], state[CROSS_KEY + "q_attn.weight"].shape[1]
    retrieval_spec = retrieval or _retrieval_spec(published.get("retrieval_encoder", DEFAULT_RETRIEVAL))
    retrieval_info = _describe(retrieval_spec)
    config = SmallCapConfig(encoder_width=encoder_width, cross_attention_width=width, retrieval_spec=retrieval_info.spec,
                            retrieval_dim=retrieval_info.dim, k=int(published.get("k", SmallCapConfig.k)))
    gpt2 = _gpt2_config(published, lm)
    head, wte = state.get("decoder.lm_head.weight"), state.get("decoder.transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        gpt2.tie_word_embeddings = False  # a fine-tuned output layer of its own
    tokenizer = load_gpt2_tokenizer(lm)
    with torch.device("meta"):
        decoder = SmallCapDecoder(config, _encoder(model, encoder_width), cross_attention_lm(gpt2, config), tokenizer)
    decoder.load_state_dict(_convert(where, state, decoder), strict=True, assign=True)
    decoder.lm.tie_weights()
    return decoder.eval().save(out)


def _published_config(checkpoint: Path) -> dict:
    path = checkpoint.parent / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path} is not readable JSON ({e}); remove it to take the LM config from --lm") from e
    return config if config.get("model_type") == "smallcap" else {}


def _gpt2_config(published: dict, lm: str):
    """GPT-2's config: the checkpoint's own "decoder" section, else the one --lm names."""
    from transformers import GPT2Config

    decoder = published.get("decoder")
    if not decoder:
        return lm_config(lm)
    known = GPT2Config().to_dict()
    return GPT2Config(**{k: v for k, v in decoder.items() if k in known and k not in ("model_type", "architectures", "transformers_version")})


def _retrieval_spec(name: str) -> str:
    """SmallCap names OpenAI's CLIPs as the `clip` package does (RN50x64, ViT-L/14)."""
    return name if ":" in name else f"{name.replace('/', '-')}:openai"


def _describe(spec: str) -> EmbedderInfo:
    from ragcap.embed import describe_embedder

    return describe_embedder(spec)


def _encoder(spec: str | None, width: int) -> EmbedderInfo:
    """The open_clip ViT whose patch features are `width` wide."""
    from ragcap.embed import model_config, parse_spec

    spec = spec or DEFAULT_ENCODER
    info = _describe(spec)
    vision = model_config(parse_spec(spec)).get("vision_cfg", {})
    if vision.get("width") != width or not vision.get("patch_size"):
        raise ModelError(f"the checkpoint cross-attends to {width}-wide patch features, but {info.spec}'s vision tower is "
                         f"{'a ResNet' if not vision.get('patch_size') else str(vision.get('width')) + ' wide'}; pass --model with the ViT it was trained with")
    return info


def _convert(path: str, state: dict[str, torch.Tensor], decoder: SmallCapDecoder) -> dict[str, torch.Tensor]:
    """The checkpoint renamed to the decoder's keys, or a ModelError naming every bad key. Conv1D
    weights are (in, out) in both."""
    ours = decoder.state_dict()
    expected = {f"decoder.{k.removeprefix('lm.')}": tuple(v.shape) for k, v in ours.items()}
    if decoder.lm.config.tie_word_embeddings and "decoder.lm_head.weight" not in state:
        expected.pop("decoder.lm_head.weight")
    problems = [f"missing key {k!r}" for k in expected if k not in state]
    problems += [f"unexpected key {k!r}" for k in state if k not in expected]
    problems += [f"key {k!r} has shape {tuple(state[k].shape)}, expected {expected[k]}"
                 for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if problems:
        listed = "; ".join(sorted(problems)[:MAX_LISTED]) + (f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else "")
        raise ModelError(f"{path} does not fit a SmallCap model with this GPT-2: {listed}. "
                         "Check that --lm (or the config.json beside the weights) is the LM it was trained with")
    converted = {f"lm.{k.removeprefix('decoder.')}": v.float() for k, v in state.items()}
    converted.setdefault("lm.lm_head.weight", converted["lm.transformer.wte.weight"])
    return converted
