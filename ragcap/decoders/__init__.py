"""Decoder kinds, found by the name a saved directory records (open_clip's factory, for captioners).

    DECODERS = {"decap": "ragcap.decoders.decap:DeCapDecoder", ...}   kind name -> its class
    decoder_class("decap")          imports the class's module, returns the class
    load_decoder(DIR)               reads DIR/config.json's "kind", builds that class

A kind's module is imported when a decoder of that kind is first needed: ClipCap and SmallCap
import transformers, which a start that loads DeCap's decoder would otherwise pay seconds for.
Adding a kind means a module here with a Decoder subclass and a line in DECODERS; the modes,
the CLI and the service reach it through load_decoder.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ragcap.decoders.base import CONFIG_FILE, WEIGHTS_FILE, Caption, Decoder
from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import ModelError, brief
from ragcap.precision import prepare, resolve_precision
from ragcap.util import default_device

DECODERS: dict[str, str] = {
    "decap": "ragcap.decoders.decap:DeCapDecoder",
    "clipcap": "ragcap.decoders.clipcap:ClipCapDecoder",
    "smallcap": "ragcap.decoders.smallcap:SmallCapDecoder",
}

# The kinds' classes, importable from here as before; each imports its module on first use.
_LAZY = {
    "DeCapConfig": "ragcap.decoders.decap", "DeCapDecoder": "ragcap.decoders.decap",
    "ClipCapConfig": "ragcap.decoders.clipcap", "ClipCapDecoder": "ragcap.decoders.clipcap",
    "SmallCapConfig": "ragcap.decoders.smallcap", "SmallCapDecoder": "ragcap.decoders.smallcap",
}

__all__ = ["DECODERS", "Caption", "ClipCapConfig", "ClipCapDecoder", "DeCapConfig", "DeCapDecoder", "Decoder", "SmallCapConfig", "SmallCapDecoder",
           "decoder_class", "load_decoder"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def decoder_class(kind: str) -> type[Decoder]:
    """The Decoder subclass of a kind name (KeyError for an unknown one)."""
    module, name = DECODERS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def _read_config(src: Path, hint: str) -> tuple[type[Decoder], object, EmbedderInfo]:
    if not (src / CONFIG_FILE).is_file():
        raise ModelError(f"{src} is not a trained decoder (no {CONFIG_FILE}); {hint}")
    try:
        meta = json.loads((src / CONFIG_FILE).read_text())
        if "kind" not in meta and "decoder" in meta:  # ragcap-decoder/1: DeCap only, before kinds existed
            meta = {"kind": "decap", "config": meta["decoder"], "embedder": meta["embedder"]}
        kind = meta["kind"]
        if kind not in DECODERS:
            raise ModelError(f"{src / CONFIG_FILE}: unknown decoder kind {kind!r}; known kinds: {', '.join(DECODERS)}")
        cls = decoder_class(kind)
        return cls, cls.config_from_dict(meta["config"]), EmbedderInfo.from_dict(meta["embedder"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"{src / CONFIG_FILE} is not a valid decoder config ({e!r}); {hint}") from e


HINT = "train one (`ragcap train-decoder`, `ragcap train-clipcap`, `ragcap train-smallcap`) or pass the directory a training or import wrote"


def check_decoder(directory: str | Path) -> tuple[type[Decoder], object, EmbedderInfo]:
    """A saved decoder's class, config and embedder, reading only its config (ModelError if the
    directory is not a complete decoder): cheap, so callers check before loading models."""
    src = Path(directory)
    found = _read_config(src, HINT)
    for name in (WEIGHTS_FILE, *found[0].required_files):
        if not (src / name).is_file():
            raise ModelError(f"{src} is incomplete: {name} is missing; {HINT}")
    return found


def load_decoder(directory: str | Path, device: str | torch.device | None = None, precision: str | None = None) -> Decoder:
    """The decoder saved in `directory`, whatever its kind, on `device` (default: CUDA if present),
    captioning at `precision` (ragcap.precision; default $RAGCAP_PRECISION, else fp32)."""
    src = Path(directory)
    cls, config, embedder = check_decoder(src)
    # Built on the meta device (no random init), then the file's tensors are assigned in place:
    # memory-mapped, never copied, so loading takes no transient second copy.
    with torch.device("meta"):
        model = cls.load_from(config, embedder, src)
    try:
        state = load_file(src / WEIGHTS_FILE)
        _untie(model, state)
        model.load_state_dict(state, strict=True, assign=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ModelError(f"{src / WEIGHTS_FILE} cannot be loaded ({brief(e)}); {HINT}") from e
    _retie(model)
    model.source = src
    model.precision = resolve_precision(precision)
    return prepare(model.to(default_device(device)), model.device, model.precision).eval()


def _tied_pairs(model: Decoder) -> list[tuple[str, str]]:
    """(output layer, token embedding) names of every tied LM inside the decoder (tied as built:
    transformers' LMs and ragcap.decoders.gpt tie at construction, on the meta device too)."""
    pairs = []
    for name, module in model.named_modules():
        if hasattr(module, "tie_weights") and hasattr(module, "lm_head") and module.lm_head.weight is module.get_input_embeddings().weight:
            prefix = f"{name}." if name else ""
            embed_name = next(n for n, p in module.named_parameters() if p is module.get_input_embeddings().weight)
            pairs.append((f"{prefix}lm_head.weight", f"{prefix}{embed_name}"))
    return pairs


def _untie(model: Decoder, state: dict) -> None:
    # save_model stores a tied output layer and token embedding once, under either name.
    for head, embed in _tied_pairs(model):
        tensor = state.get(head, state.get(embed))
        if tensor is not None:
            state[head] = state[embed] = tensor


def _retie(model: Decoder) -> None:
    for module in model.modules():
        if hasattr(module, "tie_weights") and hasattr(module, "lm_head"):
            module.tie_weights()
