"""DeCap's text-only caption decoder: a small GPT-2 that writes a caption from one embedding.

The decoder is trained on text alone (ragcap.train): each caption is reproduced from its own
L2-normalised text embedding, mapped by one linear layer to a single "prefix" token in front of
the caption. At captioning time the prefix is DeCap's projection of an image embedding onto
the caption memory, which lies in the same text-embedding space (ragcap.retrieve).

    input:   [prefix] <start_of_text>  a    dog  runs
    target:     -          a          dog  runs  <end_of_text>

Tokens are CLIP's BPE (open_clip's SimpleTokenizer, whose vocabulary file ships inside the
open_clip package, so everything works offline). A saved decoder directory holds its own copy
of that file and loads without open_clip's data files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer, default_bpe
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import ModelError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
FORMAT = "ragcap-decoder/1"
TIED = ("gpt.transformer.wte.weight", "gpt.lm_head.weight")


@dataclass(frozen=True)
class DecoderConfig:
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

    def __post_init__(self):
        if self.vocab is not None:  # JSON gives a list; keep the config hashable
            object.__setattr__(self, "vocab", tuple(self.vocab))

    def pruned_to(self, captions: Iterable[str]) -> "DecoderConfig":
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
        return self.max_tokens + 2


@lru_cache(maxsize=4)
def _bpe(path: str) -> SimpleTokenizer:
    # Building the BPE tables takes ~0.3 s; every decoder in a process shares one per file.
    return SimpleTokenizer(bpe_path=path)


class CaptionTokenizer:
    """CLIP's BPE without the special tokens: lowercases and normalises whitespace.

    With `vocab` (a pruned decoder's CLIP ids) the ids it speaks are positions in that list.
    """

    def __init__(self, bpe_path: str | Path | None = None, vocab: Sequence[int] | None = None):
        self.bpe_path = Path(bpe_path or default_bpe())
        self._bpe = _bpe(str(self.bpe_path))
        self._to_clip = None if vocab is None else list(vocab)
        self._to_local = None if vocab is None else {clip: i for i, clip in enumerate(vocab)}
        self.sot_id = self._local(self._bpe.sot_token_id)
        self.eot_id = self._local(self._bpe.eot_token_id)
        self.vocab_size = self._bpe.vocab_size if vocab is None else len(vocab)

    def _local(self, clip_id: int) -> int:
        if self._to_local is None:
            return clip_id
        if clip_id not in self._to_local:
            raise ModelError(f"'{self._bpe.decode([clip_id])}' is not in this decoder's vocabulary (it was pruned to its training captions)")
        return self._to_local[clip_id]

    def encode(self, text: str) -> list[int]:
        # A caption may literally contain "<end_of_text>", which the BPE maps to the special id.
        specials = (self._bpe.sot_token_id, self._bpe.eot_token_id)
        return [self._local(i) for i in self._bpe.encode(text) if i not in specials]

    def decode(self, ids: list[int]) -> str:
        kept = [i for i in ids if i not in (self.sot_id, self.eot_id)]
        text = self._bpe.decode(kept if self._to_clip is None else [self._to_clip[i] for i in kept])
        return " ".join(text.split())

    def clip_ids(self, text: str) -> set[int]:
        """The CLIP BPE ids of a text (for choosing a pruned vocabulary)."""
        return set(self._bpe.encode(text))

    def normalise(self, text: str) -> str:
        """The text as the decoder can reproduce it: decode(encode(text))."""
        return self.decode(self.encode(text))


class CaptionDecoder(nn.Module):
    def __init__(self, config: DecoderConfig, embedder: EmbedderInfo, bpe_path: str | Path | None = None):
        super().__init__()
        if embedder.dim != config.embed_dim:
            raise ModelError(f"decoder embed_dim {config.embed_dim} does not match embedder {embedder.spec} (dim {embedder.dim})")
        self.config = config
        self.embedder = embedder
        self.source: Path | None = None  # directory it was loaded from, for messages
        self.tokenizer = CaptionTokenizer(bpe_path, config.vocab)
        if self.tokenizer.vocab_size != config.vocab_size:
            raise ModelError(f"tokenizer {self.tokenizer.bpe_path} has {self.tokenizer.vocab_size} ids, the decoder expects {config.vocab_size}")
        self.project = nn.Linear(config.embed_dim, config.n_embd)  # DeCap: one linear layer
        self.gpt = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=config.vocab_size,
                n_positions=config.n_positions,
                n_embd=config.n_embd,
                n_layer=config.n_layer,
                n_head=config.n_head,
                resid_pdrop=config.dropout,
                embd_pdrop=config.dropout,
                attn_pdrop=config.dropout,
                bos_token_id=config.sot_id,
                eos_token_id=config.eot_id,
            )
        )

    @property
    def device(self) -> torch.device:
        return self.project.weight.device

    def prefix_embeds(self, prefixes: torch.Tensor) -> torch.Tensor:
        """(b, embed_dim) -> (b, 1, n_embd). Normalised here so callers cannot forget: DeCap
        trains and decodes on unit vectors."""
        x = F.normalize(prefixes.to(self.device, torch.float32), dim=-1)
        return self.project(x).unsqueeze(1)

    def forward(self, prefixes: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. inputs (b, t) = <start_of_text> + caption tokens, right-padded with any
        id; returns logits (b, t, vocab): row i predicts the token after inputs[:, i]. Causal
        attention means real tokens never see the right padding, so no attention mask is needed."""
        embeds = torch.cat([self.prefix_embeds(prefixes), self.gpt.transformer.wte(inputs.to(self.device))], dim=1)
        hidden = self.gpt.transformer(inputs_embeds=embeds).last_hidden_state
        return self.gpt.lm_head(hidden[:, 1:])  # the prefix position predicts nothing we train

    # ---- generation -------------------------------------------------------------------------

    def _start(self, prefixes: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
        """Run prefix + <start_of_text>; return log-probs of the first caption token and the KV cache."""
        b = prefixes.shape[0]
        sot = torch.full((b, 1), self.config.sot_id, dtype=torch.long, device=self.device)
        embeds = torch.cat([self.prefix_embeds(prefixes), self.gpt.transformer.wte(sot)], dim=1)
        out = self.gpt(inputs_embeds=embeds, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        return self._log_probs(out.logits[:, -1]), out.past_key_values

    def _step(self, tokens: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Feed one new token per row (the cache holds the rest); return next-token log-probs."""
        out = self.gpt(input_ids=tokens.unsqueeze(1), past_key_values=cache, use_cache=True)
        return self._log_probs(out.logits[:, -1])

    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)
        logp[:, self.config.sot_id] = -math.inf  # never a valid caption token
        return logp

    def _max_tokens(self, max_tokens: int | None) -> int:
        n = self.config.max_tokens if max_tokens is None else max_tokens
        if not 1 <= n <= self.config.max_tokens:
            raise ModelError(f"max_tokens must be between 1 and {self.config.max_tokens} (the decoder's trained length), got {n}")
        return n

    @torch.inference_mode()
    def search(self, prefixes: torch.Tensor, beam_size: int = 1, max_tokens: int | None = None) -> tuple[list[list[int]], torch.Tensor]:
        """Token ids (no specials) per prefix and their scores: the mean log-probability per
        generated token, <end_of_text> included when it was generated."""
        if prefixes.ndim != 2 or prefixes.shape[1] != self.config.embed_dim:
            raise ModelError(f"prefixes must have shape (n, {self.config.embed_dim}), got {tuple(prefixes.shape)}")
        if beam_size < 1:
            raise ModelError(f"beam_size must be >= 1, got {beam_size}")
        n = self._max_tokens(max_tokens)
        if prefixes.shape[0] == 0:
            return [], torch.empty(0)
        was_training = self.training
        self.eval()
        try:
            tokens, scores = self._greedy(prefixes, n) if beam_size == 1 else self._beam(prefixes, n, beam_size)
        finally:
            self.train(was_training)
        eot = self.config.eot_id
        ids = [row[: row.index(eot)] if eot in row else row for row in tokens.tolist()]
        return ids, scores

    def generate(self, prefixes: torch.Tensor, beam_size: int = 1, max_tokens: int | None = None) -> list[str]:
        """Captions for a batch of prefix embeddings (n, embed_dim): greedy when beam_size is 1,
        else beam search. Lowercase text without special tokens."""
        ids, _ = self.search(prefixes, beam_size, max_tokens)
        return [self.tokenizer.decode(row) for row in ids]

    def _greedy(self, prefixes: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, eot = prefixes.shape[0], self.config.eot_id
        tokens = torch.full((b, max_tokens), eot, dtype=torch.long, device=self.device)
        sums = torch.zeros(b, device=self.device)
        lengths = torch.zeros(b, device=self.device)
        rows = torch.arange(b, device=self.device)  # original rows still generating
        logp, cache = self._start(prefixes)
        for step in range(max_tokens):
            best_logp, best = logp.max(dim=-1)
            tokens[rows, step] = best
            sums[rows] += best_logp
            lengths[rows] += 1
            going = best != eot
            if step == max_tokens - 1 or not bool(going.any()):
                break
            if not bool(going.all()):  # finished rows leave the batch: no compute spent on them
                keep = going.nonzero().squeeze(1)
                rows, best = rows[keep], best[keep]
                cache.batch_select_indices(keep)
            logp = self._step(best, cache)
        return tokens, sums / lengths

    def _beam(self, prefixes: torch.Tensor, max_tokens: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam search over b images x k beams, all rows in one batch.

        Length handling (as ClipCap's beam search, and HF's length_penalty=1 for finished
        hypotheses): every candidate, finished or not, is ranked by its mean log-prob per token.
        A finished beam keeps its slot and score by extending with a free <end_of_text>, so it
        competes with longer candidates on equal terms; search stops when all k beams of every
        image have finished or max_tokens is reached. With k at least the number of possible
        sequences nothing is pruned and the result is the exact best (tested)."""
        b, eot, dev = prefixes.shape[0], self.config.eot_id, self.device
        logp, cache = self._start(prefixes)  # run the shared start once per image, then copy
        logp = logp.repeat_interleave(k, dim=0)
        cache.batch_repeat_interleave(k)
        vocab = logp.shape[-1]
        frozen = torch.full((vocab,), -math.inf, device=dev)  # a finished beam's only move: free EOT
        frozen[eot] = 0.0
        sums = torch.zeros(b, k, device=dev)
        sums[:, 1:] = -math.inf  # the k start beams are copies: only the first one may expand
        lengths = torch.zeros(b, k, device=dev)
        finished = torch.zeros(b, k, dtype=torch.bool, device=dev)
        tokens = torch.full((b * k, max_tokens), eot, dtype=torch.long, device=dev)
        offsets = (torch.arange(b, device=dev) * k).unsqueeze(1)
        for step in range(max_tokens):
            logp = torch.where(finished.view(-1, 1), frozen, logp).view(b, k, vocab)
            new_lengths = lengths + (~finished).float()
            cand = (sums.unsqueeze(-1) + logp) / new_lengths.unsqueeze(-1)
            # Within a beam all candidates share one length, so its top k contain every
            # candidate of that beam that can make the image's top k.
            beam_top, beam_tok = cand.topk(k, dim=-1)  # (b, k, k)
            _, pick = beam_top.view(b, k * k).topk(k, dim=-1)  # (b, k), best first
            src = torch.div(pick, k, rounding_mode="floor")
            tok = beam_tok.view(b, k * k).gather(1, pick)
            sums = sums.gather(1, src) + logp.view(b, k * vocab).gather(1, src * vocab + tok)
            lengths = new_lengths.gather(1, src)
            finished = finished.gather(1, src) | (tok == eot)
            rows = (offsets + src).view(-1)
            tokens = tokens[rows]
            tokens[:, step] = tok.view(-1)
            if step == max_tokens - 1 or bool(finished.all()):
                break
            cache.reorder_cache(rows)
            logp = self._step(tok.view(-1), cache)
        scores = sums / lengths
        best = scores.argmax(dim=1)
        return tokens.view(b, k, max_tokens)[torch.arange(b, device=dev), best], scores.gather(1, best.unsqueeze(1)).squeeze(1)

    @torch.inference_mode()
    def score(self, prefixes: torch.Tensor, ids: list[list[int]], ended: list[bool]) -> torch.Tensor:
        """Mean log-prob per token of given captions (the objective `search` maximises); a caption
        that `ended` is scored with its <end_of_text>."""
        seqs = [row + [self.config.eot_id] * end for row, end in zip(ids, ended)]
        width = max(len(s) for s in seqs)
        targets = torch.tensor([s + [-100] * (width - len(s)) for s in seqs], device=self.device)
        inputs = torch.cat([torch.full_like(targets[:, :1], self.config.sot_id), targets[:, :-1].clamp(min=0)], dim=1)
        was_training = self.training
        self.eval()
        try:
            logp = self._log_probs(self(prefixes, inputs).flatten(0, 1)).view(*targets.shape, -1)
        finally:
            self.train(was_training)
        mask = targets >= 0
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(mask, picked, 0.0).sum(1) / mask.sum(1)  # not picked * mask: -inf * 0 is NaN

    # ---- persistence ------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write config.json (decoder config + embedder), model.safetensors and the BPE vocab."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "decoder": asdict(self.config), "embedder": self.embedder.to_dict()}
        _write_atomic(out / CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
        # save_model (not save_file) because GPT-2 ties lm_head to the token embedding.
        _write_atomic(out / WEIGHTS_FILE, lambda p: save_model(self, str(p)))
        if self.tokenizer.bpe_path.resolve() != (out / BPE_FILE).resolve():
            _write_atomic(out / BPE_FILE, lambda p: shutil.copyfile(self.tokenizer.bpe_path, p))
        return out

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None) -> "CaptionDecoder":
        src = Path(directory)
        hint = "train one with `ragcap train-decoder`, or pass the directory it wrote"
        if not (src / CONFIG_FILE).is_file():
            raise ModelError(f"{src} is not a trained decoder (no {CONFIG_FILE}); {hint}")
        try:
            meta = json.loads((src / CONFIG_FILE).read_text())
            known = {f.name for f in fields(DecoderConfig)}
            config = DecoderConfig(**{k: v for k, v in meta["decoder"].items() if k in known})
            embedder = EmbedderInfo.from_dict(meta["embedder"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{src / CONFIG_FILE} is not a valid decoder config ({e!r}); {hint}") from e
        for name in (WEIGHTS_FILE, BPE_FILE):
            if not (src / name).is_file():
                raise ModelError(f"{src} is incomplete: {name} is missing; {hint}")
        # Built on the meta device (no random init), then the file's tensors are assigned in
        # place: memory-mapped, never copied, so loading takes no transient second copy.
        with torch.device("meta"):
            model = cls(config, embedder, bpe_path=src / BPE_FILE)
        try:
            state = load_file(src / WEIGHTS_FILE)
            # save_model stores GPT-2's tied output layer and token embedding once, under either name.
            tied = state.get(TIED[0], state.get(TIED[1]))
            if tied is not None:
                state.update(dict.fromkeys(TIED, tied))
            model.load_state_dict(state, strict=True, assign=True)
        except (SafetensorError, RuntimeError, OSError) as e:
            raise ModelError(f"{src / WEIGHTS_FILE} cannot be loaded ({e}); {hint}") from e
        model.gpt.tie_weights()
        model.source = src
        return model.to(default_device(device)).eval()


def check_compatible(decoder: CaptionDecoder, embedder: EmbedderInfo, collection: str) -> None:
    """A decoder only understands vectors from the embedder it was trained on."""
    if decoder.embedder != embedder:
        where = decoder.source or "(unsaved decoder)"
        raise ModelError(
            f"decoder {where} was trained for embedder {decoder.embedder.spec} (dim {decoder.embedder.dim}), "
            f"but collection {collection} uses {embedder.spec} (dim {embedder.dim}); "
            "train a decoder on this collection with `ragcap train-decoder`"
        )


def default_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _write_atomic(path: Path, write) -> None:
    """Write via a temporary sibling and rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
