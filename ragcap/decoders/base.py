"""What every decoder kind shares: the captioning call, and a saved directory that says its kind.

A decoder directory holds config.json ({"format", "kind", "config", "embedder"}),
model.safetensors and the kind's tokenizer files. `ragcap.decoders.load_decoder` reads the kind
and builds that class; a kind implements four things: `prepare` (conditioning -> LMInput),
`stepper`, `search_defaults` (its stop tokens, length cap and ranking) and `detokenize`, and
two more to be trained by ragcap.train: `training_targets` (captions -> token ids) and
`teacher_forced_logits`. Which parameters train is what `requires_grad` says after the kind's
training config builds the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_model
from torch import nn

from ragcap.decoders.lm import LMInput
from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import ModelError
from ragcap.generation import SearchOptions, Stepper, search
from ragcap.precision import autocast
from ragcap.util import write_atomic

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "ragcap-decoder/2"
IGNORE = -100  # target id that cross_entropy skips: padding after a caption


@dataclass(frozen=True)
class Caption:
    text: str
    score: float  # the search's score (ragcap.generation): higher is better


class Decoder(nn.Module):
    """A GPT-2-family captioner conditioned on something an image gives (see `conditioning`)."""

    kind: ClassVar[str]  # the name in config.json and in the DECODERS registry
    config_class: ClassVar[type]
    # "embedding": one CLIP vector per caption (modes pd, nnd, vd); other kinds say what they read.
    conditioning: ClassVar[str] = "embedding"
    train_hint: ClassVar[str] = "train one with `ragcap train-decoder`"
    # Files besides config and weights that loading reads (checked before any model loads).
    required_files: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any, embedder: EmbedderInfo):
        super().__init__()
        self.config = config
        self.embedder = embedder
        self.source: Path | None = None  # the directory it was loaded from, for messages
        self.precision = "fp32"  # captioning's forward passes (ragcap.precision); training is always fp32

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- what a kind implements --------------------------------------------------------------

    def prepare(self, cond: Any) -> LMInput:
        raise NotImplementedError

    def stepper(self) -> Stepper:
        raise NotImplementedError

    def search_defaults(self, options: SearchOptions) -> SearchOptions:
        """`options` completed with this kind's length cap, stop tokens and ranking."""
        raise NotImplementedError

    def detokenize(self, tokens: list[int]) -> str:
        raise NotImplementedError

    def save_assets(self, out: Path) -> None:
        """Write the files besides config and weights that loading needs (tokenizers)."""

    # ---- what a kind implements to be trained (ragcap.train) ---------------------------------

    def training_targets(self, captions: list[str]) -> torch.Tensor:
        """(n, width) token ids each caption is trained to write, its stop token included,
        right-padded with IGNORE."""
        raise NotImplementedError

    def teacher_forced_logits(self, prefixes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(b, t, vocab) logits predicting targets (b, t) from the conditioning and the targets
        before each position (IGNORE read as any id: causal attention never looks ahead)."""
        raise NotImplementedError

    # ---- shared -------------------------------------------------------------------------------

    @torch.inference_mode()
    def caption(self, cond: Any, options: SearchOptions | None = None) -> list[list[Caption]]:
        """options.num_return captions per input, best first."""
        was_training = self.training
        self.eval()
        try:
            with autocast(self.device, self.precision):
                found = search(self.stepper(), self.prepare(cond), self.search_defaults(options or SearchOptions()))
        finally:
            self.train(was_training)
        return [[Caption(self.detokenize(h.tokens), h.score) for h in row] for row in found]

    def generate(self, cond: Any, options: SearchOptions | None = None) -> list[str]:
        """The best caption per input."""
        return [row[0].text for row in self.caption(cond, options)]

    def check_embedder(self, embedder: EmbedderInfo, collection: str) -> None:
        """A decoder only understands vectors from the embedder it was trained on."""
        if not self.embedder.matches(embedder):
            where = self.source or "(unsaved decoder)"
            raise ModelError(
                f"decoder {where} was trained for embedder {self.embedder.spec} (dim {self.embedder.dim}), "
                f"but collection {collection} uses {embedder.spec} (dim {embedder.dim}); {self.train_hint} on this collection"
            )

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "kind": self.kind, "config": asdict(self.config), "embedder": self.embedder.to_dict()}
        # save_model (not save_file): GPT-2 ties its output layer to the token embedding.
        write_atomic(out / WEIGHTS_FILE, lambda p: save_model(self, str(p)))
        self.save_assets(out)
        # The config marks a complete decoder, so it comes last: a save cut short (disk full,
        # Ctrl-C) leaves a folder that is not taken for a decoder and that a rerun may fill.
        write_atomic(out / CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
        return out

    @classmethod
    def config_from_dict(cls, data: dict) -> Any:
        """The kind's config from config.json; unknown keys are refused, not silently dropped."""
        known = {f.name for f in fields(cls.config_class)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"unknown {cls.kind} config keys {unknown} (written by a newer ragcap?)")
        return cls.config_class(**data)

    @classmethod
    def load_from(cls, config: Any, embedder: EmbedderInfo, directory: Path) -> "Decoder":
        """A skeleton (on the meta device) whose assets come from `directory`; weights are assigned after."""
        return cls(config, embedder)


def resolved(options: SearchOptions, max_tokens: int, beam: int = 1, length_alpha: float = 1.0, **kind) -> SearchOptions:
    """options completed with the kind's defaults (see SearchOptions.with_defaults), the length
    cap checked against what the decoder was trained for."""
    options = options.with_defaults(beam, max_tokens, length_alpha, **kind)
    if not 1 <= options.max_tokens <= max_tokens:
        raise ModelError(f"max_tokens must be between 1 and {max_tokens} (the decoder's trained length), got {options.max_tokens}")
    return options
