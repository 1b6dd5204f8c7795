"""ClipCap (Mokady et al., arXiv 2111.09734): a mapping network turns one CLIP embedding into
prefix_length embeddings that a GPT-2-family LM continues with a caption.

    input:   [p1 ... pP]  A    dog  runs
    target:      ... -    A    dog  runs  .

Two mapping networks, as in the paper's repository (rmokady/CLIP_prefix_caption, train.py):
  mlp          Linear(embed_dim, P*w/2) -> tanh -> Linear(P*w/2, P*w); P = 10 (512 -> 3840 -> 7680
               for GPT-2 small, w = 768). Its published checkpoints also fine-tune the LM.
  transformer  Linear(embed_dim, C*w) gives C "CLIP tokens", P learned constants are appended, and
               8 pre-norm transformer layers (8 heads, MLP 2w, ReLU) run over the C + P tokens;
               the last P outputs are the prefix. P = C = 40; the LM stays frozen.

CapDec (Nukrai et al., arXiv 2211.00575) is the same model trained on text embeddings with noise
(ragcap.train, --noise), not another class. Captions end at the first '.', ClipCap's stop token;
the '.' is not part of the returned text (every ragcap kind returns captions without their stop).

The LM is any transformers causal LM with GPT-2's interface; a saved ClipCap directory holds its
config and tokenizer under lm/ and its weights in model.safetensors with the mapping network's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ragcap.decoders.base import IGNORE, Decoder, resolved
from ragcap.decoders.lm import LMInput, LMStepper, save_lm_assets
from ragcap.decoders.tokenizers import load_gpt2_tokenizer
from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import ModelError
from ragcap.generation import SearchOptions

LM_DIR = "lm"  # inside a saved decoder: the LM's config.json and tokenizer files
MAPPINGS = ("mlp", "transformer")


@dataclass(frozen=True)
class ClipCapConfig:
    embed_dim: int  # width of the embedder's vectors (512 for ViT-B-32, 640 for RN50x4)
    mapping: str = "mlp"  # "mlp" or "transformer" (module docstring)
    # Prefix embeddings fed to the LM. ClipCap: 10 with the MLP (more would make its second layer,
    # P*w/2 x P*w, too big), 40 with the transformer.
    prefix_length: int = 10
    # Transformer mapping only: the CLIP embedding is first spread over this many tokens (ClipCap: 40).
    clip_length: int = 40
    mapping_layers: int = 8  # ClipCap's transformer mapping: 8 layers of 8 heads
    mapping_heads: int = 8
    # The mapping network sees unit vectors times this. ragcap's vectors are L2-normalised, as
    # CapDec and ClipCap's transformer model train on; the published MLP checkpoints were trained
    # on raw CLIP image embeddings, whose norm an import can set here.
    prefix_scale: float = 1.0
    # ClipCap's decoding cap (entry_length = 67 tokens): far above any COCO caption, so in
    # practice only '.' ends a caption. Training cuts longer captions to this.
    max_tokens: int = 67
    stop_token: str = "."  # ClipCap's generate functions stop at the first '.'

    def __post_init__(self):
        if self.mapping not in MAPPINGS:
            raise ModelError(f"unknown ClipCap mapping {self.mapping!r}; choose from {', '.join(MAPPINGS)}")
        if min(self.prefix_length, self.clip_length, self.mapping_layers, self.max_tokens) < 1:
            raise ModelError("ClipCap prefix_length, clip_length, mapping_layers and max_tokens must be >= 1")


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapping: CLIP tokens + learned constants -> prefix_length outputs."""

    def __init__(self, config: ClipCapConfig, width: int):
        super().__init__()
        if width % config.mapping_heads:
            raise ModelError(f"the LM's width {width} is not divisible by {config.mapping_heads} mapping heads")
        self.clip_length = config.clip_length
        self.linear = nn.Linear(config.embed_dim, config.clip_length * width)
        self.prefix_const = nn.Parameter(torch.randn(config.prefix_length, width))
        # ClipCap's layers are torch's pre-norm encoder layer: LayerNorm -> attention -> residual,
        # LayerNorm -> MLP (2w, ReLU) -> residual. Its queries, keys and values have no bias, so
        # torch's input-projection bias is held at zero.
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, config.mapping_heads, dim_feedforward=2 * width, dropout=0.0,
                                       activation="relu", batch_first=True, norm_first=True)
            for _ in range(config.mapping_layers)
        )
        for layer in self.layers:
            nn.init.zeros_(layer.self_attn.in_proj_bias)
            layer.self_attn.in_proj_bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.linear(x).view(x.shape[0], self.clip_length, -1)
        h = torch.cat([tokens, self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        for layer in self.layers:
            h = layer(h)
        return h[:, self.clip_length :]


def mapping_network(config: ClipCapConfig, width: int) -> nn.Module:
    if config.mapping == "transformer":
        return TransformerMapper(config, width)
    out = config.prefix_length * width
    return nn.Sequential(nn.Linear(config.embed_dim, out // 2), nn.Tanh(), nn.Linear(out // 2, out))


class ClipCapDecoder(Decoder):
    kind = "clipcap"
    config_class = ClipCapConfig
    train_hint = "train one with `ragcap train-clipcap`"
    required_files = (f"{LM_DIR}/config.json",)  # the LM's config; its tokenizer files sit beside it

    def __init__(self, config: ClipCapConfig, embedder: EmbedderInfo, lm: nn.Module, tokenizer):
        super().__init__(config, embedder)
        if embedder.dim != config.embed_dim:
            raise ModelError(f"ClipCap embed_dim {config.embed_dim} does not match embedder {embedder.spec} (dim {embedder.dim})")
        self.lm = lm
        self.tokenizer = tokenizer
        self.width = lm.get_input_embeddings().embedding_dim
        self.mapping = mapping_network(config, self.width)
        stop = tokenizer.encode(config.stop_token, add_special_tokens=False)
        if not stop:
            raise ModelError(f"the tokenizer has no token for the stop token {config.stop_token!r}")
        self.stop_id = stop[0]  # ClipCap: tokenizer.encode(stop_token)[0]
        self.lm_frozen = False

    @classmethod
    def load_from(cls, config: ClipCapConfig, embedder: EmbedderInfo, directory: Path) -> "ClipCapDecoder":
        return cls(config, embedder, lm_skeleton(directory / LM_DIR), load_gpt2_tokenizer(directory / LM_DIR))

    def freeze_lm(self, frozen: bool = True) -> "ClipCapDecoder":
        """Train only the mapping network (ClipCap's --only_prefix): the LM gets no gradients and
        stays in eval mode (no dropout), as ClipCaptionPrefix keeps it."""
        self.lm_frozen = frozen
        self.lm.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "ClipCapDecoder":
        super().train(mode)
        if self.lm_frozen:
            self.lm.eval()
        return self

    def prefix_embeds(self, prefixes: torch.Tensor) -> torch.Tensor:
        """(b, embed_dim) -> (b, prefix_length, width); inputs are normalised here, then scaled."""
        if prefixes.ndim != 2 or prefixes.shape[1] != self.config.embed_dim:
            raise ModelError(f"prefixes must have shape (n, {self.config.embed_dim}), got {tuple(prefixes.shape)}")
        x = F.normalize(prefixes.to(self.device, torch.float32), dim=-1) * self.config.prefix_scale
        return self.mapping(x).view(x.shape[0], self.config.prefix_length, self.width)

    # ---- generation -------------------------------------------------------------------------

    def prepare(self, prefixes: torch.Tensor) -> LMInput:
        return LMInput(self.prefix_embeds(prefixes))

    def stepper(self) -> LMStepper:
        return LMStepper(self.lm)

    def search_defaults(self, options: SearchOptions) -> SearchOptions:
        # ClipCap decodes greedily by default (generate2) and ranks beams by the mean log-prob
        # per token (generate_beam); it bans no token.
        return resolved(options, self.config.max_tokens, length_alpha=1.0, stop_ids=(self.stop_id,))

    def detokenize(self, tokens: list[int]) -> str:
        return " ".join(self.tokenizer.decode(tokens, skip_special_tokens=True).split())

    def target_text(self, caption: str) -> str:
        """The caption as this decoder is trained to write it (and returns it): whitespace
        normalised, without the final stop token."""
        return " ".join(caption.split()).removesuffix(self.config.stop_token).rstrip()

    # ---- training ---------------------------------------------------------------------------

    def training_targets(self, captions: list[str]) -> torch.Tensor:
        """Each caption's tokens then the stop token (ClipCap trains on COCO captions, which end
        with '.', and stops there); captions longer than max_tokens are cut without it."""
        texts = [self.target_text(c) + self.config.stop_token for c in captions]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        width = min(max(map(len, ids)), self.config.max_tokens)
        targets = torch.full((len(captions), width), IGNORE, dtype=torch.long)
        for i, row in enumerate(ids):
            row = row[:width]
            targets[i, : len(row)] = torch.tensor(row)
        return targets

    def teacher_forced_logits(self, prefixes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(self.device)
        tokens = self.lm.get_input_embeddings()(targets[:, :-1].clamp(min=0))
        embeds = torch.cat([self.prefix_embeds(prefixes), tokens], dim=1)
        # The last prefix position predicts the first caption token.
        return self.lm(inputs_embeds=embeds, logits_to_keep=targets.shape[1]).logits

    # ---- persistence ------------------------------------------------------------------------

    def save_assets(self, out: Path) -> None:
        save_lm_assets(self.lm, self.tokenizer, out / LM_DIR)


def lm_skeleton(source: str | Path) -> nn.Module:
    """A causal LM built from the config in `source` (a directory or hub name) without weights:
    on the meta device inside load_decoder, randomly initialised otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise ModelError(f"no language-model config in {source} ({err}); pass the LM's directory or hub name") from err
    return AutoModelForCausalLM.from_config(config)
