"""GPT-2 as DeCap's decoder uses it, in one file: the model and its KV-cached Stepper.

DeCap's decoder is a small GPT-2 trained from scratch (ragcap.decoders.decap). transformers'
GPT2LMHeadModel computes the same, but importing it pulls in torch._dynamo, torch.distributed
and scipy: ~5 s of CPU before the first caption, twice what importing torch costs. The other
kinds (ClipCap, SmallCap, prompts) load pretrained LMs of any GPT-2-family architecture, and
keep transformers.

The parameters have GPT2LMHeadModel's names and layouts (its Conv1D stores W as (in, out)), so
decoders saved from GPT2LMHeadModel and DeCap's published checkpoints load unchanged, and the
arithmetic is the same operations in the same order (tests/test_gpt.py holds the two equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ragcap.decoders.lm import LMInput
from ragcap.errors import ModelError

# Per layer, the keys and values of every position so far: (n, heads, positions, head width) each.
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    n_positions: int  # rows of the learned position table: the longest input
    n_embd: int
    n_layer: int
    n_head: int
    dropout: float = 0.1  # GPT-2's embedding, attention and residual dropout (training only)
    layer_norm_eps: float = 1e-5  # GPT-2's
    init_std: float = 0.02  # GPT-2's initializer_range, for training from scratch


class Conv1D(nn.Module):
    """x @ W + b with W stored (in, out): GPT-2's layout for its linear layers, kept so that its
    checkpoints load as they are. ragcap.int8 rewrites it as an nn.Linear."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        n, t, width = x.shape
        q, k, v = (part.view(n, t, self.n_head, -1).transpose(1, 2) for part in self.c_attn(x).split(width, dim=2))
        past = cache[layer] if cache and layer < len(cache) else None
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            cache[layer] = (k, v)
        elif cache is not None:  # the first call: each layer adds its entry in turn
            cache.append((k, v))
        # Causal within the new positions; every new position sees all cached ones. Past the first
        # call only one position is new (one token per step), which may see everything.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None and t > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(n, t, width)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, 4 * config.n_embd)
        self.c_proj = Conv1D(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


def _embedding(rows: int, width: int) -> nn.Embedding:
    # Without nn.Embedding's own N(0, 1) init: GPT._init_weights sets GPT-2's, and a skeleton on
    # the meta device needs none (normal_ there imports torch._dynamo: a second of a cold start).
    return nn.Embedding(rows, width, _weight=torch.empty(rows, width))


class GPT(nn.Module):
    """GPT-2 with its output layer tied to the token embedding, fed embeddings (so a prefix
    vector can stand in front of the tokens); returns the final hidden states."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=_embedding(config.vocab_size, config.n_embd),
            wpe=_embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if not self.lm_head.weight.is_meta:  # a skeleton to load weights into needs no initialisation
            self.apply(self._init_weights)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.transformer.wte.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2's: N(0, 0.02) everywhere, and the two projections back into the residual stream
        # scaled by 1/sqrt(2 * layers), so the stream's variance does not grow with depth.
        std = self.config.init_std
        if isinstance(module, (Conv1D, nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, (Attention, MLP)):
            nn.init.normal_(module.c_proj.weight, std=std / math.sqrt(2 * self.config.n_layer))

    def forward(self, embeds: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(n, t, n_embd) input embeddings -> (n, t, n_embd) hidden states. With `cache` (a list,
        empty at first) the inputs continue the cached positions, whose keys and values it holds
        and is extended with."""
        start = cache[0][0].shape[2] if cache else 0
        end = start + embeds.shape[1]
        if end > self.config.n_positions:
            raise ModelError(f"an input of {end} positions is longer than the decoder's {self.config.n_positions}-position table")
        positions = torch.arange(start, end, device=embeds.device)
        x = self.transformer.drop(embeds + self.transformer.wpe(positions))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        return self.transformer.ln_f(x)


class GPTStepper:
    """ragcap.generation's Stepper over GPT: the conditioning (the same length in every row, as
    DeCap's prefix is) once, then one token per row with the KV cache."""

    def __init__(self, gpt: GPT, logits_fn=None):
        self.gpt = gpt
        self.logits_fn = logits_fn or (lambda logits: logits)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits_fn(self.gpt.lm_head(hidden[:, -1]))  # only the last position's

    def start(self, cond: LMInput) -> tuple[torch.Tensor, KVCache]:
        if cond.mask is not None or cond.encoder_states is not None:
            raise ModelError("GPTStepper takes unpadded conditionings without encoder states")
        cache: KVCache = []
        return self._logits(self.gpt(cond.embeds, cache)), cache

    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self._logits(self.gpt(self.gpt.transformer.wte(tokens.unsqueeze(1)), cache))

    def select(self, cache: KVCache, rows: torch.Tensor) -> KVCache:
        return [(k[rows], v[rows]) for k, v in cache]
