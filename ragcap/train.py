"""Decoder training, one loop for every decoder kind: reproduce each caption from one embedding.

The caller supplies captions and one vector per caption: the caption's own text embedding
(text-only: DeCap, CapDec) or its image's embedding (paired: ClipCap). What differs between
kinds is small and lives with the kind: its training config builds the model and says which
parameters train (`requires_grad`), and the model gives its targets and teacher-forced logits
(ragcap.decoders.base). Everything else is shared:

    TrainConfig          DeCap's decoder, trained from scratch (`ragcap train-decoder`)
    ClipCapTrainConfig   ClipCap's mapping network over a pretrained LM (`ragcap train-clipcap`)
    SmallCapTrainConfig  SmallCap's cross-attention in a frozen GPT-2 (`ragcap train-smallcap`),
                         whose per-caption conditioning is a Conditioning (patches and a prompt)

Each epoch ends with a held-out loss and an atomic checkpoint (trainable weights, optimiser,
schedule, RNG), so an interrupted run resumes from its last complete epoch and ends with the
same weights as an uninterrupted one. out_dir finally holds a decoder that loads on its own
(ragcap.decoders.load_decoder) and train_log.jsonl, one line per epoch; the checkpoint (3x the
decoder: weights plus AdamW's two moments) is removed once the run completes, unless kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

from ragcap.decoders.base import CONFIG_FILE, IGNORE, Decoder
from ragcap.decoders.clipcap import MAPPINGS, ClipCapConfig, ClipCapDecoder
from ragcap.decoders.decap import DeCapConfig, DeCapDecoder
from ragcap.decoders.smallcap import TRAINED, SmallCapConfig, SmallCapDecoder
from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import ModelError, OptionError
from ragcap.util import checkpoint_bytes, default_device, ensure_free_space, write_atomic

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"


# The flags of settings whose flag is not their name (--noise is a variance: see the CLI).
FLAGS = {"n_layer": "--layers", "n_head": "--heads", "n_embd": "--width", "noise_std": "--noise"}


def _flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def _shown(name: str, value) -> str:
    """A setting's value as its flag takes it: --noise is a variance, kept as its standard deviation."""
    if name != "noise_std" or not isinstance(value, (int, float)):
        return str(value)
    return f"{value ** 2:g}" if value >= 0 else f"{value} (a standard deviation)"  # nan, below 0: only from the API


def _at_least(settings, **least: int) -> None:
    for name, low in least.items():
        value = getattr(settings, name)
        if value < low:
            raise OptionError(f"{_flag(name)} must be at least {low}, not {value}")


def _within(settings, **bounds: tuple[float, float | None, bool]) -> None:
    """Each named setting finite, above its low bound (or equal to it, where allowed) and below its high one."""
    for name, (low, high, low_allowed) in bounds.items():
        value = getattr(settings, name)
        if not (math.isfinite(value) and (value >= low if low_allowed else value > low) and (high is None or value < high)):
            above = f"{'at least' if low_allowed else 'above'} {low}" + (f" and below {high}" if high is not None else "")
            raise OptionError(f"{_flag(name)} must be {above}, not {_shown(name, value)}")


@dataclass(frozen=True)
class TrainSettings:
    """What the loop itself needs, for every kind. The defaults are DeCap's; a kind's config
    overrides those its paper chose differently."""

    epochs: int = 10  # DeCap: 10 epochs over COCO's ~560k training captions
    batch_size: int = 64  # DeCap
    # DeCap used AdamW at 1e-5, enough for ~90k steps on COCO. A from-scratch GPT of this size
    # trains well at 1e-4..6e-4 (nanoGPT: 6e-4 for GPT-2 small); 3e-4 also converges on small
    # collections of a few thousand captions, where 1e-5 would barely move the weights.
    lr: float = 3e-4
    weight_decay: float = 0.01  # AdamW's usual; not applied to biases and LayerNorm gains
    # Linear warm-up then linear decay to 0 (DeCap's schedule, warm-up 1000 steps). Short runs
    # warm up for at most 10% of their steps, so a tiny collection still gets a useful lr.
    warmup_steps: int = 1000
    label_smoothing: float = 0.1  # DeCap
    # CapDec's noise injection on text embeddings: add N(0, noise_std^2) to the unit embedding
    # and re-normalise, so the decoder tolerates the gap between text and image embeddings.
    # CapDec's best variance 0.016 is noise_std ~0.126. DeCap's projection closes the gap
    # instead, and paired image features need none: default off.
    noise_std: float = 0.0
    # Held out for the per-epoch validation loss; split fixed by seed, by image for paired data.
    val_fraction: float = 0.01
    seed: int = 0
    device: str | None = None  # None: CUDA when present, else CPU

    def __post_init__(self):
        """Out-of-range settings fail here, before any data loads, not as a division by zero or
        an optimiser's error minutes later (or, for epochs 0, as an untrained decoder written)."""
        _at_least(self, epochs=1, batch_size=1, warmup_steps=0, seed=0)  # numpy and torch refuse negative seeds
        _within(self, lr=(0, None, False), weight_decay=(0, None, True), label_smoothing=(0, 1, True), noise_std=(0, None, True),
                val_fraction=(0, 1, True))

    def build(self, embedder: EmbedderInfo, captions: list[str]) -> Decoder:
        """The kind's untrained model, with requires_grad set on what trains."""
        raise NotImplementedError


@dataclass(frozen=True)
class TrainConfig(TrainSettings):
    """DeCap's decoder: a small GPT trained from scratch on CLIP BPE tokens."""

    max_tokens: int = 20  # see DeCapConfig.max_tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 768
    dropout: float = 0.1
    # Output only the CLIP ids the training captions use (DeCapConfig.pruned_to): same
    # captions, several times less arithmetic. Off = all 49408 ids, exactly DeCap's decoder.
    prune_vocab: bool = True

    def __post_init__(self):
        super().__post_init__()
        _at_least(self, n_layer=1, n_head=1, n_embd=1, max_tokens=1)
        _within(self, dropout=(0, 1, True))
        if self.n_embd % self.n_head:
            raise OptionError(f"--width {self.n_embd} is not divisible by --heads {self.n_head}: each head takes an equal share")

    def decoder_config(self, embed_dim: int, captions: list[str]) -> DeCapConfig:
        config = DeCapConfig(embed_dim=embed_dim, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, max_tokens=self.max_tokens, dropout=self.dropout)
        return config.pruned_to(captions) if self.prune_vocab else config

    def build(self, embedder: EmbedderInfo, captions: list[str]) -> DeCapDecoder:
        return DeCapDecoder(self.decoder_config(embedder.dim, captions), embedder)


# `train-decoder --preset`: named sizes of TrainConfig; explicit flags override them.
PRESETS: dict[str, dict] = {
    # DeCap's decoder and loop, as published (the TrainConfig defaults).
    "decap": {},
    # What fits a laptop CPU: 14x fewer multiply-adds per token than "decap" (BENCHMARKS.md,
    # *Caption quality*: 2 epochs over 100k COCO captions in 23 min on 2 cores, CIDEr 94 on
    # text queries). Width matters more than depth for a decoder that verbalises one vector;
    # a small model takes a larger batch and learning rate.
    "small": {"n_layer": 2, "n_head": 4, "n_embd": 256, "epochs": 2, "batch_size": 128, "lr": 1e-3},
}


def preset(name: str) -> TrainConfig:
    """TrainConfig for a --preset name (ModelError naming the choices)."""
    if name not in PRESETS:
        raise ModelError(f"unknown --preset {name!r}; choose from {', '.join(PRESETS)}")
    return TrainConfig(**PRESETS[name])


@dataclass(frozen=True)
class ClipCapTrainConfig(TrainSettings):
    """ClipCap's mapping network over a pretrained causal LM (frozen unless train_lm).

    Loop defaults are ClipCap's train.py: batch 40, AdamW (transformers', no weight decay) at
    2e-5 with 5,000 warm-up steps, plain cross-entropy, 10 epochs.
    """

    batch_size: int = 40
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 5000
    label_smoothing: float = 0.0
    mapping: str = "mlp"  # "mlp" or "transformer" (ragcap.decoders.clipcap)
    prefix_length: int | None = None  # None: ClipCap's 10 for the MLP, 40 for the transformer
    clip_length: int = 40  # transformer only
    mapping_layers: int = 8  # transformer only
    lm: str = "gpt2"  # hub name or directory of a GPT-2-family causal LM
    # ClipCap fine-tunes GPT-2 with its MLP checkpoints and freezes it with the transformer;
    # frozen trains ~10x fewer weights and keeps the LM's fluency, so it is the default.
    train_lm: bool = False
    max_tokens: int = 67  # ClipCapConfig.max_tokens

    def __post_init__(self):
        super().__post_init__()
        if self.mapping not in MAPPINGS:  # before minutes of loading data and the LM
            raise ModelError(f"unknown ClipCap mapping {self.mapping!r}; choose from {', '.join(MAPPINGS)}")
        # Named by flag, and before the LM loads; a --prefix-length of 0 used to mean the default.
        _at_least(self, clip_length=1, mapping_layers=1, max_tokens=1, **({} if self.prefix_length is None else {"prefix_length": 1}))

    def decoder_config(self, embed_dim: int) -> ClipCapConfig:
        prefix_length = self.prefix_length if self.prefix_length is not None else (10 if self.mapping == "mlp" else 40)
        return ClipCapConfig(embed_dim=embed_dim, mapping=self.mapping, prefix_length=prefix_length, clip_length=self.clip_length,
                             mapping_layers=self.mapping_layers, max_tokens=self.max_tokens)

    def build(self, embedder: EmbedderInfo, captions: list[str]) -> ClipCapDecoder:
        from ragcap.decoders.lm import load_causal_lm

        config = self.decoder_config(embedder.dim)
        tokenizer, lm = load_causal_lm(self.lm)
        context = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", None)
        if context is not None and config.prefix_length + config.max_tokens > context:
            raise ModelError(f"a prefix of {config.prefix_length} and {config.max_tokens} caption tokens exceed the LM's context of {context}")
        return ClipCapDecoder(config, embedder, lm, tokenizer).freeze_lm(not self.train_lm)


@dataclass(frozen=True)
class SmallCapTrainConfig(TrainSettings):
    """SmallCap's cross-attention layers in a frozen GPT-2 (ragcap.decoders.smallcap).

    Loop defaults are SmallCap's train.py (Hugging Face's Seq2SeqTrainer defaults around them):
    batch 64, AdamW at 1e-4 without weight decay or warm-up, linear decay, plain cross-entropy,
    10 epochs. train_smallcap fills in the encoder width and the retrieval embedder.
    """

    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    lm: str = "gpt2"  # hub name or directory of a GPT-2 causal LM
    # None: the LM's width / 4, SmallCap7M (SmallCap's 3.5M and 1.8M models: / 8, / 16).
    cross_attention_width: int | None = None
    k: int = 4  # retrieved captions per prompt
    max_tokens: int = 25  # SmallCapConfig.max_tokens
    encoder_width: int = 0
    retrieval_spec: str = ""
    retrieval_dim: int = 0

    def __post_init__(self):
        super().__post_init__()
        # Named by flag, before the retrieval; a --cross-attention-width of 0 used to mean the default.
        given = {} if self.cross_attention_width is None else {"cross_attention_width": 1}
        _at_least(self, k=1, max_tokens=1, **given)

    def build(self, embedder: EmbedderInfo, captions: list[str]) -> SmallCapDecoder:
        from ragcap.decoders.lm import load_causal_lm
        from ragcap.decoders.smallcap import cross_attention_lm

        tokenizer, pretrained = load_causal_lm(self.lm)
        width = self.cross_attention_width if self.cross_attention_width is not None else pretrained.config.n_embd // 4
        config = SmallCapConfig(encoder_width=self.encoder_width, cross_attention_width=width, retrieval_spec=self.retrieval_spec,
                                retrieval_dim=self.retrieval_dim, k=self.k, max_tokens=self.max_tokens)
        # The LM's weights, and SmallCap's new cross-attention layers (GPT-2's initialisation) around them.
        lm = cross_attention_lm(self.lm, config)
        missing, unexpected = lm.load_state_dict(pretrained.state_dict(), strict=False)
        if unexpected or any(not any(part in name for part in TRAINED) for name in missing):
            raise ModelError(f"the weights of {self.lm} do not fit its GPT-2 config (unexpected {unexpected[:3]}, missing {missing[:3]})")
        lm.tie_weights()
        return SmallCapDecoder(config, embedder, lm, tokenizer)


class Conditioning(Protocol):
    """What a kind reads per caption when it is more than one vector (SmallCap: patches and a prompt)."""

    def __len__(self) -> int: ...

    def __getitem__(self, rows: torch.Tensor) -> Any: ...  # the rows' conditioning, as teacher_forced_logits reads it

    def digest(self) -> bytes: ...  # identifies the data, for resuming


Progress = Callable[[int, int, float], None]


def train_decoder(
    captions: list[str],
    vectors: np.ndarray | Conditioning,
    embedder: EmbedderInfo,
    out_dir: str | Path,
    config: TrainSettings = TrainConfig(),
    resume: bool = False,
    progress: Progress | None = None,
    groups: Sequence[str] | None = None,
    noisy: np.ndarray | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    keep_checkpoint: bool = False,
    on_estimate: Callable[[dict], None] | None = None,
    estimate: bool = True,
) -> dict:
    """Train the kind `config` builds on (caption, vector) pairs.

    vectors: one row per caption, or a Conditioning; groups: the image each caption belongs to
    (paired data), so the held-out split keeps an image's captions together; noisy: which rows get config.noise_std (text rows; default all).
    Returns {"epochs": [log rows], "train_loss", "val_loss", "steps", "out_dir"};
    progress(step, total_steps, loss) is called after every step, on_epoch(log row) after
    every epoch. keep_checkpoint: leave checkpoint.pt behind (it is only needed to resume).
    estimate: before the first epoch, time ESTIMATE_STEPS steps (the weights and RNG untouched)
    for "expected_epoch_s" in the result and on_estimate({"expected_epoch_s", "steps_per_epoch",
    "epochs"}), epochs being those left to run.
    """
    out = Path(out_dir)
    vectors = _check_inputs(captions, vectors, embedder) if isinstance(vectors, np.ndarray) else vectors
    if len(vectors) != len(captions):
        raise ModelError(f"{len(captions)} captions but conditioning for {len(vectors)}")
    noisy = np.ones(len(captions), dtype=bool) if noisy is None else np.asarray(noisy, dtype=bool)
    device = default_device(config.device)
    torch.manual_seed(config.seed)  # weight init, dropout and noise all draw from torch's RNG
    model = config.build(embedder, captions).to(device)
    targets = model.training_targets(captions)
    train_idx, val_idx = _split(len(captions), config.val_fraction, config.seed, groups)
    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
         {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}],
        lr=config.lr,
    )
    warmup = min(config.warmup_steps, total_steps // 10)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    fingerprint = _fingerprint(model.kind, captions, vectors, embedder, config, groups, noisy)
    log: list[dict] = []
    start_epoch = 0
    _prepare_out_dir(out, resume)
    if resume and (out / CHECKPOINT_FILE).is_file():
        start_epoch, log = _restore(out / CHECKPOINT_FILE, fingerprint, model, optimizer, scheduler)

    vectors_t = torch.from_numpy(vectors) if isinstance(vectors, np.ndarray) else vectors
    noisy_t = torch.from_numpy(noisy)
    ensure_free_space(out, checkpoint_bytes(model), "the training checkpoint and the decoder")  # before training, not after

    def batch_loss(batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        prefixes = _with_noise(_rows(vectors_t, batch, device), noisy_t[batch].to(device), config.noise_std)
        return _loss(model, prefixes, targets[batch], config.label_smoothing)

    expected_epoch_s = None
    if estimate and start_epoch < config.epochs and steps_per_epoch > 0:
        order = _epoch_order(train_idx, config, start_epoch)
        first = [order[i * config.batch_size : (i + 1) * config.batch_size] for i in range(min(steps_per_epoch, ESTIMATE_STEPS))]
        expected_epoch_s = _time_steps(model, batch_loss, first) * steps_per_epoch
        if on_estimate is not None:
            on_estimate({"expected_epoch_s": expected_epoch_s, "steps_per_epoch": steps_per_epoch, "epochs": config.epochs - start_epoch})
    for epoch in range(start_epoch, config.epochs):
        model.train()
        order = _epoch_order(train_idx, config, epoch)
        total_loss, total_tokens = 0.0, 0
        for i in range(steps_per_epoch):
            batch = order[i * config.batch_size : (i + 1) * config.batch_size]
            loss, n_tokens = batch_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            value = loss.item()
            total_loss += value * n_tokens
            total_tokens += n_tokens
            if progress is not None:
                progress(epoch * steps_per_epoch + i + 1, total_steps, value)
        row = {"epoch": epoch + 1, "train_loss": total_loss / total_tokens, "val_loss": _evaluate(model, vectors_t, targets, val_idx, config)}
        log.append(row)
        ensure_free_space(out, checkpoint_bytes(model), f"the epoch {epoch + 1} checkpoint and the decoder")
        _checkpoint(out / CHECKPOINT_FILE, epoch + 1, log, fingerprint, model, optimizer, scheduler)
        write_atomic(out / LOG_FILE, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in log)))
        if on_epoch is not None:
            on_epoch(row)

    model.save(out)
    if not keep_checkpoint:
        (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    last = log[-1] if log else {"train_loss": None, "val_loss": None}
    return {"epochs": log, "train_loss": last["train_loss"], "val_loss": last["val_loss"], "steps": total_steps, "out_dir": str(out),
            "expected_epoch_s": expected_epoch_s}


def _epoch_order(train_idx: np.ndarray, config: TrainSettings, epoch: int) -> torch.Tensor:
    """The epoch's batch order: it depends only on (seed, epoch), so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    return torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=generator)]


# Steps timed before training for the expected time per epoch: the first pays for allocation and
# warm-up (on a GPU, CUDA's and cuBLAS's set-up: often slower than the rest of an epoch's steps)
# and is left out; the second is the estimate. Two, not more: they are work a short run feels
# (the quick start's decoder trains in 4 steps). AdamW's update is not run (it would change the
# weights); it is a few percent of a step (the forward and backward passes dominate).
ESTIMATE_STEPS = 2


def _time_steps(model: Decoder, batch_loss: Callable[[torch.Tensor], tuple[torch.Tensor, int]], batches: list[torch.Tensor]) -> float:
    """Seconds per training step, measured on the given batches without changing the run: no
    optimiser step, gradients cleared after, and torch's RNG (dropout, noise) restored, so the
    trained weights are bit-identical to a run that did not estimate."""
    cuda = model.device.type == "cuda"
    with torch.random.fork_rng(devices=[model.device] if cuda else []):
        model.train()
        times = []
        for i in range(ESTIMATE_STEPS):  # a one-batch epoch times its batch again
            start = time.perf_counter()
            loss, _ = batch_loss(batches[i % len(batches)])
            loss.backward()
            if cuda:
                torch.cuda.synchronize(model.device)
            times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return sum(times[1:]) / len(times[1:])


def with_overrides(config: TrainSettings, **given) -> TrainSettings:
    """config with the given settings that are not None (the CLI's unset flags are None)."""
    return replace(config, **{k: v for k, v in given.items() if v is not None})


def _check_inputs(captions: list[str], vectors: np.ndarray, embedder: EmbedderInfo) -> np.ndarray:
    if len(captions) == 0:
        raise ModelError("no captions to train on; fill the collection first with `ragcap ingest`")
    if vectors.ndim != 2 or vectors.shape != (len(captions), embedder.dim):
        raise ModelError(f"expected vectors of shape ({len(captions)}, {embedder.dim}) for {len(captions)} captions from {embedder.spec}, got {vectors.shape}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise ModelError("some caption vectors contain NaN or infinity; re-embed the collection")
    return vectors


def _rows(vectors: torch.Tensor | Conditioning, rows: torch.Tensor, device: torch.device):
    """The rows' conditioning: vectors on the device, or what a Conditioning gives (the kind moves it)."""
    return vectors[rows].to(device) if isinstance(vectors, torch.Tensor) else vectors[rows]


def _with_noise(prefixes: torch.Tensor, noisy: torch.Tensor, std: float) -> torch.Tensor:
    """CapDec's noise injection (normalise, add N(0, std^2), normalise) on the noisy rows."""
    if std <= 0:  # also every Conditioning: noise is for vectors
        return prefixes
    noised = F.normalize(F.normalize(prefixes, dim=-1) + std * torch.randn_like(prefixes), dim=-1)
    return torch.where(noisy.unsqueeze(1), noised, prefixes)


def _loss(model: Decoder, prefixes: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the caption tokens and the stop token (not the prefix, not padding)."""
    width = int((targets != IGNORE).sum(1).max())
    targets = targets[:, :width].to(model.device)  # trim to the longest caption in the batch
    logits = model.teacher_forced_logits(prefixes, targets)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, label_smoothing=label_smoothing)
    return loss, int((targets != IGNORE).sum())


@torch.inference_mode()
def _evaluate(model: Decoder, vectors: torch.Tensor, targets: torch.Tensor, idx: np.ndarray, config: TrainSettings) -> float | None:
    """Held-out loss, same criterion as training (label smoothing included) so the curves compare."""
    if len(idx) == 0:
        return None
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(idx), config.batch_size):
        batch = torch.from_numpy(idx[start : start + config.batch_size])
        loss, n = _loss(model, _rows(vectors, batch, model.device), targets[batch], config.label_smoothing)
        total += loss.item() * n
        tokens += n
    return total / tokens


def _split(n: int, val_fraction: float, seed: int, groups: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows); with groups, whole groups (an image's captions) are held out."""
    if not 0 <= val_fraction < 1:
        raise ModelError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if groups is None:
        unit_of_row = np.arange(n)
    else:
        _, unit_of_row = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    units = int(unit_of_row.max()) + 1 if n else 0
    n_val = 0 if val_fraction == 0 or units < 2 else max(1, int(units * val_fraction))
    held_out = np.zeros(units, dtype=bool)
    held_out[np.random.default_rng(seed).permutation(units)[:n_val]] = True
    return np.flatnonzero(~held_out[unit_of_row]), np.flatnonzero(held_out[unit_of_row])


def _fingerprint(kind: str, captions: list[str], vectors: np.ndarray | Conditioning, embedder: EmbedderInfo, config: TrainSettings,
                 groups: Sequence[str] | None, noisy: np.ndarray) -> dict:
    """What a checkpoint must match to be resumed: same kind, data, embedder and settings."""
    digest = hashlib.sha256("\n".join(captions).encode())
    data = vectors.tobytes() if isinstance(vectors, np.ndarray) else vectors.digest()
    for part in (data, noisy.tobytes(), "\n".join(groups or []).encode()):
        digest.update(part)
    settings = {k: v for k, v in asdict(config).items() if k != "device"}
    return {"kind": kind, "data": digest.hexdigest(), "count": len(captions), "shape": list(getattr(vectors, "shape", [len(vectors)])),
            "embedder": embedder.to_dict(), "config": settings}


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuse an --out this run cannot write (called early by the CLI, before the data loads)."""
    if not resume and ((out / CHECKPOINT_FILE).exists() or (out / CONFIG_FILE).exists()):
        raise ModelError(f"{out} already holds a decoder or a training run; resume it with --resume, or choose another output directory")
    if resume and (out / CONFIG_FILE).exists() and not (out / CHECKPOINT_FILE).exists():
        raise ModelError(f"{out} holds a completed decoder and no checkpoint to resume (it is removed at the end unless "
                         "--keep-checkpoint); choose another output directory to train again")


def _prepare_out_dir(out: Path, resume: bool) -> None:
    check_out_dir(out, resume)
    out.mkdir(parents=True, exist_ok=True)


def _differences(theirs: dict, ours: dict) -> str:
    """What a checkpoint's fingerprint has that this run's does not: the settings by flag, else the data."""
    before, now = theirs.get("config", {}), ours.get("config", {})
    changed = [f"{_flag(k)} {_shown(k, before.get(k))}, now {_shown(k, v)}" for k, v in now.items() if before.get(k) != v]
    return "; ".join(changed) if changed else "the same settings, other data"


def _checkpoint(path: Path, epoch: int, log: list[dict], fingerprint: dict, model, optimizer, scheduler) -> None:
    state = {
        "epoch": epoch,
        "log": log,
        "fingerprint": fingerprint,
        # Only what trains: a frozen LM (ClipCap's GPT-2 is ~500 MB) is the same on every resume.
        "model": {name: p.detach() for name, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    write_atomic(path, lambda p: torch.save(state, p))


def _restore(path: Path, fingerprint: dict, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    try:
        state = torch.load(path, map_location=model.device, weights_only=True)
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise ModelError(f"{path} is not a readable training checkpoint ({e}); delete it to start over") from e
    theirs, embedder = state["fingerprint"], fingerprint.get("embedder")
    if embedder is not None and theirs.get("embedder") != embedder:
        raise ModelError(f"{path} was trained on vectors of {(theirs.get('embedder') or {}).get('spec')}, not {embedder['spec']}; "
                         "resume with the same data, or choose another output directory")
    if theirs != fingerprint:
        raise ModelError(f"{path} was made with other captions or settings ({_differences(theirs, fingerprint)}); "
                         "resume with the same ones, or choose another output directory")
    model.load_state_dict(state["model"], strict=False)  # the frozen rest is rebuilt identically
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"].cpu())
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    return state["epoch"], state["log"]
