"""DeCap's text-only caption decoder: a small GPT-2 that writes a caption from one embedding.

The decoder is trained on text alone (ragcap.train): each caption is reproduced from its own
L2-normalised text embedding, mapped by one linear layer to a single "prefix" token in front of
the caption. At captioning time the prefix is DeCap's projection of an image embedding onto
the caption memory, which lies in the same text-embedding space (ragcap.retrieve).

    input:   [prefix] <start_of_text>  a    dog  runs
    target:     -          a          dog  runs  <end_of_text>

Tokens are CLIP's BPE (ragcap.decoders.tokenizers), optionally pruned to the ids the training
captions use.

DeCap's published decoders (imported by ragcap.importers.decap) differ in three ways their
config records: they were trained to predict <start_of_text> from the prefix, and DeCap decodes
from the prefix alone (`writes_sot`); their output layer has GPT-2's 50257 rows, of which only
CLIP's 49408 are tokens (the rest are cut from the logits); their position table has 1024 rows.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ragcap.decoders.base import IGNORE, Decoder, resolved
from ragcap.decoders.gpt import GPT, GPTConfig, GPTStepper
from ragcap.decoders.lm import LMInput
from ragcap.decoders.tokenizers import BPE_FILE, CaptionTokenizer
from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import ModelError
from ragcap.generation import SearchOptions
from ragcap.util import write_atomic


@dataclass(frozen=True)
class DeCapConfig:
    embed_dim: int  # width of the embedder's vectors, i.e. of the prefix input (512 for ViT-B-32)
    # DeCap's decoder: 4 layers, 4 heads, width 768, trained from scratch. Small on purpose: it
    # only has to verbalise one embedding, and it trains in hours on one GPU.
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 768
    # Longest caption in BPE tokens, without <start_of_text>/<end_of_text>. DeCap cuts the CLIP
    # token sequence (specials included) at 20; we allow 20 caption tokens, which keeps ~99% of
    # COCO captions whole. Longer captions are trained truncated (without an end token).
    max_tokens: int = 20
    dropout: float = 0.1  # GPT-2's default, which DeCap's stock GPT2Config keeps
    # CLIP's BPE: 49152 merges/bytes + 2 specials = 49408 ids, <start_of_text> 49406, <end_of_text> 49407.
    vocab_size: int = 49408
    sot_id: int = 49406
    eot_id: int = 49407
    # The CLIP BPE ids the decoder writes (sorted), or None for all of them; see pruned_to().
    vocab: tuple[int, ...] | None = None
    # Rows of the position table; None: what max_tokens needs. DeCap's published decoders keep
    # GPT-2's 1024 (unused beyond their 20 training tokens, but part of the weights).
    positions: int | None = None
    # False: ragcap feeds <start_of_text> after the prefix (how ragcap trains). True: decoding
    # starts from the prefix alone and the decoder writes <start_of_text> itself, as DeCap's
    # published decoders were trained to and DeCap's inference does; max_tokens then counts it.
    # Decoding only: ragcap trains (and scores) with <start_of_text> fed, as written below.
    writes_sot: bool = False

    def __post_init__(self):
        if self.vocab is not None:  # JSON gives a list; keep the config hashable
            object.__setattr__(self, "vocab", tuple(self.vocab))

    def pruned_to(self, captions: Iterable[str]) -> "DeCapConfig":
        """This config restricted to the CLIP ids the captions use (plus the two specials).

        A caption corpus uses a small part of CLIP's 49408 ids (COCO: about 12k), and the output
        layer over the vocabulary is most of the arithmetic of a decoder this small: 768 x 49408
        multiply-adds per token against ~7M for each transformer layer. Keeping only the ids the
        training captions use makes training and decoding several times faster and changes
        nothing else: the decoder could never learn to write the other ids anyway.
        """
        full = CaptionTokenizer()
        clip_ids = set().union(*(full.clip_ids(c) for c in captions))
        vocab = tuple(sorted(clip_ids | {full.sot_id, full.eot_id}))
        return replace(self, vocab=vocab, vocab_size=len(vocab), sot_id=vocab.index(full.sot_id), eot_id=vocab.index(full.eot_id))

    @property
    def n_positions(self) -> int:
        # prefix + <start_of_text> + max_tokens caption tokens; <end_of_text> is only ever a target.
        return self.positions or self.max_tokens + 2


class DeCapDecoder(Decoder):
    kind = "decap"
    config_class = DeCapConfig

    def __init__(self, config: DeCapConfig, embedder: EmbedderInfo, bpe_path: str | Path | None = None):
        super().__init__(config, embedder)
        if embedder.dim != config.embed_dim:
            raise ModelError(f"decoder embed_dim {config.embed_dim} does not match embedder {embedder.spec} (dim {embedder.dim})")
        self.tokenizer = CaptionTokenizer(bpe_path, config.vocab)
        # An output layer wider than the tokenizer (DeCap's published decoders: GPT-2's 50257
        # rows over CLIP's 49408 ids) has its extra rows cut from the logits: they are no token.
        wider = config.vocab is None and config.vocab_size > self.tokenizer.vocab_size
        if self.tokenizer.vocab_size != config.vocab_size and not wider:
            raise ModelError(f"tokenizer {self.tokenizer.bpe_path} has {self.tokenizer.vocab_size} ids, the decoder expects {config.vocab_size}")
        self.project = nn.Linear(config.embed_dim, config.n_embd)  # DeCap: one linear layer
        self.gpt = GPT(GPTConfig(config.vocab_size, config.n_positions, config.n_embd, config.n_layer, config.n_head, config.dropout))

    @classmethod
    def load_from(cls, config: DeCapConfig, embedder: EmbedderInfo, directory: Path) -> "DeCapDecoder":
        return cls(config, embedder, bpe_path=directory / BPE_FILE)

    def prefix_embeds(self, prefixes: torch.Tensor) -> torch.Tensor:
        """(b, embed_dim) -> (b, 1, n_embd). Normalised here so callers cannot forget: DeCap
        trains and decodes on unit vectors."""
        if prefixes.ndim != 2 or prefixes.shape[1] != self.config.embed_dim:
            raise ModelError(f"prefixes must have shape (n, {self.config.embed_dim}), got {tuple(prefixes.shape)}")
        x = F.normalize(prefixes.to(self.device, torch.float32), dim=-1)
        return self.project(x).unsqueeze(1)

    def forward(self, prefixes: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. inputs (b, t) = <start_of_text> + caption tokens, right-padded with any
        id; returns logits (b, t, vocab): row i predicts the token after inputs[:, i]. Causal
        attention means real tokens never see the right padding, so no attention mask is needed."""
        embeds = torch.cat([self.prefix_embeds(prefixes), self.gpt.transformer.wte(inputs.to(self.device))], dim=1)
        hidden = self.gpt(embeds)
        return self.tokens_only(self.gpt.lm_head(hidden[:, 1:]))  # the prefix position predicts nothing we train

    def tokens_only(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits of the ids the tokenizer has (all of them, unless the output layer is wider)."""
        return logits[..., : self.tokenizer.vocab_size]

    # ---- generation -------------------------------------------------------------------------

    def prepare(self, prefixes: torch.Tensor) -> LMInput:
        """prefix + <start_of_text>: the model's first step predicts the first caption token
        (with writes_sot, the prefix alone: its first step predicts <start_of_text>)."""
        if self.config.writes_sot:
            return LMInput(self.prefix_embeds(prefixes))
        sot = torch.full((prefixes.shape[0], 1), self.config.sot_id, dtype=torch.long, device=self.device)
        return LMInput(torch.cat([self.prefix_embeds(prefixes), self.gpt.transformer.wte(sot)], dim=1))

    def stepper(self) -> GPTStepper:
        wider = self.config.vocab_size > self.tokenizer.vocab_size
        return GPTStepper(self.gpt, self.tokens_only if wider else None)

    def search_defaults(self, options: SearchOptions) -> SearchOptions:
        # DeCap and ClipCap rank beams by the mean log-prob per token (length_alpha 1). A decoder
        # that writes <start_of_text> itself must be free to (detokenize drops it).
        banned = () if self.config.writes_sot else (self.config.sot_id,)
        return resolved(options, self.config.max_tokens, length_alpha=1.0, stop_ids=(self.config.eot_id,), banned_ids=banned)

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    @torch.inference_mode()
    def score(self, prefixes: torch.Tensor, ids: list[list[int]], ended: list[bool]) -> torch.Tensor:
        """Mean log-prob per token of given captions (what greedy and beam search rank by); a
        caption that `ended` is scored with its <end_of_text>."""
        seqs = [row + [self.config.eot_id] * end for row, end in zip(ids, ended)]
        width = max(len(s) for s in seqs)
        targets = torch.tensor([s + [IGNORE] * (width - len(s)) for s in seqs], device=self.device)
        was_training = self.training
        self.eval()
        try:
            logp = F.log_softmax(self.teacher_forced_logits(prefixes, targets).float(), dim=-1)
        finally:
            self.train(was_training)
        mask = targets != IGNORE
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(mask, picked, 0.0).sum(1) / mask.sum(1)  # not picked * mask: -inf * 0 is NaN

    # ---- training ---------------------------------------------------------------------------

    def training_targets(self, captions: list[str]) -> torch.Tensor:
        """(n, max_tokens + 1): caption tokens then <end_of_text>. A caption longer than
        max_tokens is cut and gets no end token: it must not learn to stop mid-sentence."""
        width = self.config.max_tokens
        targets = torch.full((len(captions), width + 1), IGNORE, dtype=torch.long)
        for i, caption in enumerate(captions):
            ids = self.tokenizer.encode(caption)
            ids = ids[:width] if len(ids) > width else ids + [self.config.eot_id]
            targets[i, : len(ids)] = torch.tensor(ids)
        return targets

    def teacher_forced_logits(self, prefixes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(self.device)
        sot = torch.full_like(targets[:, :1], self.config.sot_id)
        return self(prefixes, torch.cat([sot, targets[:, :-1].clamp(min=0)], dim=1))

    # ---- persistence ------------------------------------------------------------------------

    def save_assets(self, out: Path) -> None:
        if self.tokenizer.bpe_path.resolve() != (out / BPE_FILE).resolve():
            write_atomic(out / BPE_FILE, lambda p: shutil.copyfile(self.tokenizer.bpe_path, p))
