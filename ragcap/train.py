"""Text-only training of the caption decoder (DeCap): reproduce each caption from its own embedding.

The caller supplies captions and their vectors (from a collection or an exported Parquet file);
no images are involved. Each epoch ends with a held-out loss and an atomic checkpoint (model,
optimiser, schedule, RNG), so an interrupted run resumes from its last complete epoch and ends
with the same weights as an uninterrupted one. out_dir finally holds a loadable decoder
(DeCapDecoder.load) and train_log.jsonl, one line per epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

from ragcap.decoders.base import CONFIG_FILE
from ragcap.decoders.decap import DeCapConfig, DeCapDecoder
from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import ModelError
from ragcap.util import checkpoint_bytes, default_device, ensure_free_space, write_atomic

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"
IGNORE = -100  # target id that cross_entropy skips: padding


@dataclass(frozen=True)
class TrainConfig:
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
    # CapDec's noise injection: add N(0, noise_std^2) to the unit embedding and re-normalise, so
    # the decoder tolerates the gap between text and (projected) image embeddings. CapDec's best
    # variance 0.016 is noise_std ~0.126. DeCap's projection closes the gap instead: default off.
    noise_std: float = 0.0
    val_fraction: float = 0.01  # held out for the per-epoch validation loss; split fixed by seed
    seed: int = 0
    max_tokens: int = 20  # see DeCapConfig.max_tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 768
    dropout: float = 0.1
    # Output only the CLIP ids the training captions use (DeCapConfig.pruned_to): same
    # captions, several times less arithmetic. Off = all 49408 ids, exactly DeCap's decoder.
    prune_vocab: bool = True
    device: str | None = None  # None: CUDA when present, else CPU

    def decoder_config(self, embed_dim: int, captions: list[str]) -> DeCapConfig:
        config = DeCapConfig(embed_dim=embed_dim, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, max_tokens=self.max_tokens, dropout=self.dropout)
        return config.pruned_to(captions) if self.prune_vocab else config


Progress = Callable[[int, int, float], None]


def train_decoder(
    captions: list[str],
    vectors: np.ndarray,
    embedder: EmbedderInfo,
    out_dir: str | Path,
    config: TrainConfig = TrainConfig(),
    resume: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Train a decoder on (caption, vector) pairs; returns {"epochs": [log rows], "train_loss",
    "val_loss", "steps", "out_dir"}. progress(step, total_steps, loss) is called after every step."""
    out = Path(out_dir)
    vectors = _check_inputs(captions, vectors, embedder)
    device = default_device(config.device)
    torch.manual_seed(config.seed)  # weight init, dropout and noise all draw from torch's RNG
    model = DeCapDecoder(config.decoder_config(embedder.dim, captions), embedder).to(device)
    targets = _encode(model, captions, config.max_tokens)
    train_idx, val_idx = _split(len(captions), config.val_fraction, config.seed)
    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr
    )
    warmup = min(config.warmup_steps, total_steps // 10)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    fingerprint = _fingerprint(captions, vectors, embedder, config)
    log: list[dict] = []
    start_epoch = 0
    _prepare_out_dir(out, resume)
    if resume and (out / CHECKPOINT_FILE).is_file():
        start_epoch, log = _restore(out / CHECKPOINT_FILE, fingerprint, model, optimizer, scheduler)

    vectors_t = torch.from_numpy(vectors)
    ensure_free_space(out, checkpoint_bytes(model), "the training checkpoint and the decoder")  # before training, not after
    for epoch in range(start_epoch, config.epochs):
        model.train()
        # The order depends only on (seed, epoch), so a resumed run sees the same batches.
        order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))]
        total_loss, total_tokens = 0.0, 0
        for i in range(steps_per_epoch):
            batch = order[i * config.batch_size : (i + 1) * config.batch_size]
            prefixes = vectors_t[batch].to(device)
            if config.noise_std > 0:
                prefixes = F.normalize(F.normalize(prefixes, dim=-1) + config.noise_std * torch.randn_like(prefixes), dim=-1)
            loss, n_tokens = _loss(model, prefixes, targets[batch], config.label_smoothing)
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

    model.save(out)
    last = log[-1] if log else {"train_loss": None, "val_loss": None}
    return {"epochs": log, "train_loss": last["train_loss"], "val_loss": last["val_loss"], "steps": total_steps, "out_dir": str(out)}


def _check_inputs(captions: list[str], vectors: np.ndarray, embedder: EmbedderInfo) -> np.ndarray:
    if len(captions) == 0:
        raise ModelError("no captions to train on; fill the collection first with `ragcap ingest`")
    if vectors.ndim != 2 or vectors.shape != (len(captions), embedder.dim):
        raise ModelError(f"expected vectors of shape ({len(captions)}, {embedder.dim}) for {len(captions)} captions from {embedder.spec}, got {vectors.shape}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise ModelError("some caption vectors contain NaN or infinity; re-embed the collection")
    return vectors


def _encode(model: DeCapDecoder, captions: list[str], max_tokens: int) -> torch.Tensor:
    """(n, max_tokens + 1) targets: caption tokens then <end_of_text>, padded with IGNORE. A caption
    longer than max_tokens is cut and gets no end token: it must not learn to stop mid-sentence."""
    targets = torch.full((len(captions), max_tokens + 1), IGNORE, dtype=torch.long)
    for i, caption in enumerate(captions):
        ids = model.tokenizer.encode(caption)
        ids = ids[:max_tokens] if len(ids) > max_tokens else ids + [model.config.eot_id]
        targets[i, : len(ids)] = torch.tensor(ids)
    return targets


def _loss(model: DeCapDecoder, prefixes: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the caption tokens and <end_of_text> (not the prefix, not padding)."""
    width = int((targets != IGNORE).sum(1).max())
    targets = targets[:, :width].to(model.device)  # trim to the longest caption in the batch
    sot = torch.full_like(targets[:, :1], model.config.sot_id)
    inputs = torch.cat([sot, targets[:, :-1].clamp(min=0)], dim=1)  # padding read as id 0: never attended to
    logits = model(prefixes, inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, label_smoothing=label_smoothing)
    return loss, int((targets != IGNORE).sum())


@torch.inference_mode()
def _evaluate(model: DeCapDecoder, vectors: torch.Tensor, targets: torch.Tensor, idx: np.ndarray, config: TrainConfig) -> float | None:
    """Held-out loss, same criterion as training (label smoothing included) so the curves compare."""
    if len(idx) == 0:
        return None
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(idx), config.batch_size):
        batch = torch.from_numpy(idx[start : start + config.batch_size])
        loss, n = _loss(model, vectors[batch].to(model.device), targets[batch], config.label_smoothing)
        total += loss.item() * n
        tokens += n
    return total / tokens


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 <= val_fraction < 1:
        raise ModelError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 or n < 2 else max(1, int(n * val_fraction))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _fingerprint(captions: list[str], vectors: np.ndarray, embedder: EmbedderInfo, config: TrainConfig) -> dict:
    """What a checkpoint must match to be resumed: same data, embedder and settings."""
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    settings = {k: v for k, v in asdict(config).items() if k != "device"}
    return {"captions": digest, "count": len(captions), "shape": list(vectors.shape), "embedder": embedder.to_dict(), "config": settings}


def _prepare_out_dir(out: Path, resume: bool) -> None:
    if not resume and ((out / CHECKPOINT_FILE).exists() or (out / CONFIG_FILE).exists()):
        raise ModelError(f"{out} already holds a decoder or a training run; resume it with --resume, or choose another output directory")
    out.mkdir(parents=True, exist_ok=True)


def _checkpoint(path: Path, epoch: int, log: list[dict], fingerprint: dict, model, optimizer, scheduler) -> None:
    state = {
        "epoch": epoch,
        "log": log,
        "fingerprint": fingerprint,
        "model": model.state_dict(),
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
    if state["fingerprint"] != fingerprint:
        raise ModelError(f"{path} was made with other captions or settings; resume with the same ones, or choose another output directory")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"].cpu())
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    return state["epoch"], state["log"]
