"""Long-CLIP's fine-tuning, primary component matching, on (image, long caption, short caption) triples.

A stretched model (ragcap.longclip) reads 248 tokens but was trained on short captions. Long-CLIP
fine-tunes it with two symmetric contrastive losses per batch (its CLIP.forward):
  - fine:   the image features against the long captions' features;
  - coarse: the image features reduced to their top 32 principal components over the batch
            (SVD of the centred batch, reconstructed, mean added back) against the short captions'.
The loss is their sum, each a cross-entropy with label smoothing 0.1 in both directions. Every
parameter trains except the kept positional rows (0-19), which Long-CLIP holds in a frozen copy.

Text runs on ragcap's length-cut path (ragcap.embed.encode_cut): the same maths as open_clip's
encode_text on 248 padded tokens, with far less work for short captions. Each epoch ends with a
held-out loss and an atomic checkpoint, so `--resume` continues from the last complete epoch (the
conventions of ragcap.train); the output directory finally holds an ordinary model directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from pipelines.base import BadRecord, ReadOptions
from pipelines.files import LineSource, bad_line
from ragcap.embed import (
    CONFIG_NAME,
    encode_cut,
    load_trainable,
    model_config,
    pool_positions,
    preprocess_config,
    text_tower,
    write_checkpoint,
)
from ragcap.embedder_info import CLIP_CONTEXT
from ragcap.errors import ModelError, OptionError, RagcapWarning, SourceError
from ragcap.images import load_image
from ragcap.longclip import KEEP
from ragcap.train import CHECKPOINT_FILE, LOG_FILE, _at_least, _checkpoint, _restore, _split, _within
from ragcap.util import write_atomic


@dataclass(frozen=True)
class FinetuneConfig:
    # Long-CLIP's recommended settings (train/train.md; its paper's learning rate is a typo):
    # 6 epochs over ShareGPT4V's 1M pairs at batch 2048 (128 per GPU in train.py), AdamW.
    epochs: int = 6
    batch_size: int = 128  # per step; the contrastive losses see the batch as their negatives
    lr: float = 1e-6  # small: the stretched model already knows images and text
    weight_decay: float = 1e-2
    # Cosine schedule after a linear warm-up of 200 steps (Long-CLIP); a short run warms up for
    # at most 10% of its steps, as train-decoder does.
    warmup_steps: int = 200
    logit_scale: float = 4.6052  # ln 100: Long-CLIP restarts from CLIP's temperature 1/100
    label_smoothing: float = 0.1  # Long-CLIP
    pca_dim: int = 32  # principal components of the coarse image features (Long-CLIP); a batch
    # of at most this many images reconstructs exactly, so the coarse loss needs larger batches.
    lock_image: bool = False  # Long-CLIP trains both towers; locking the image tower is cheaper
    val_fraction: float = 0.01  # held out for the per-epoch validation loss; split fixed by seed
    seed: int = 0
    device: str | None = None  # None: CUDA when present, else CPU

    def __post_init__(self):
        # A contrastive loss over one triple has no negatives: it is 0 whatever the model.
        if self.batch_size < 2:
            raise OptionError(f"--batch-size must be at least 2 (each triple's negatives are the batch's others), not {self.batch_size}")
        # The rest fail here, before the model loads, not as an optimiser's "a bug in ragcap" error
        # or, for a negative warm-up or --pca-dim, as a run that trains something else.
        _at_least(self, epochs=1, warmup_steps=0, pca_dim=1, seed=0)
        _within(self, lr=(0, None, False), weight_decay=(0, None, True), val_fraction=(0, 1, True))


@dataclass(frozen=True)
class Triple:
    image: Path
    long: str
    short: str


MANIFEST_FORMAT = '{"file": "IMAGE", "long": "detailed caption", "short": "one-sentence caption"?}'


def first_sentence(text: str) -> str:
    """Long-CLIP's short caption when none is given: ShareGPT4V's first sentence is a summary."""
    return text.split(". ")[0]


def read_triples(manifest: str | Path, images: str | Path, skip_bad: bool = False) -> tuple[list[Triple], list[BadRecord]]:
    """(image, long, short) triples of a JSONL manifest, image files relative to `images`.

    A line without a long caption, a missing image file or bad JSON is an error naming the
    line, or with skip_bad is skipped and returned among the BadRecords.
    """
    folder = Path(images)
    if not folder.is_dir():
        raise SourceError(f"{folder}: not a directory of images (--images)")
    options = ReadOptions(skip_bad=skip_bad)
    lines = LineSource(manifest, options)
    triples, bad = [], []
    for line in lines:
        bad += lines.take_bad()
        if not line.strip():
            continue
        problem, row = None, None
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problem = f"invalid JSON at column {e.colno}: {e.msg}"
        if problem is None:
            problem = _check_row(row, folder)
        if problem is not None:
            bad.append(bad_line(lines.location, f"{problem}; each line is {MANIFEST_FORMAT}", options))
            continue
        short = row.get("short") or first_sentence(row["long"])
        triples.append(Triple(folder / row["file"], row["long"].strip(), short.strip()))
    bad += lines.take_bad()
    if not triples:
        raise SourceError(f"{manifest}: no usable (image, long, short) triple ({len(bad)} bad lines); each line is {MANIFEST_FORMAT}")
    return triples, bad


def _check_row(row, folder: Path) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, found {type(row).__name__}"
    if not isinstance(row.get("long"), str) or not row["long"].strip():
        found = "fields " + ", ".join(row) if row else "no fields"
        return f"no long caption (a non-empty \"long\" string; found {found})"
    if row.get("short") is not None and not isinstance(row["short"], str):
        return "\"short\" must be a string"
    if not isinstance(row.get("file"), str) or not row["file"]:
        return "no image \"file\""
    if not (folder / row["file"]).is_file():
        return f"no image {row['file']!r} in {folder}"
    return None


# ---------------------------------------------------------------------------------------------
# the objective


def pca_reconstruct(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x projected on its top `dim` principal components and mapped back (the mean kept)."""
    mean = x.mean(dim=0, keepdim=True)
    centred = (x - mean).float()
    _, _, vt = torch.linalg.svd(centred, full_matrices=False)  # SVD, not eig: Long-CLIP's fix for infs
    components = vt[:dim].T
    return centred @ components @ components.T + mean


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """CLIP's symmetric InfoNCE between row-aligned features a and b."""
    logits = scale * a @ b.T
    targets = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, targets, label_smoothing=label_smoothing)) / 2


class PrimaryComponentMatching(torch.nn.Module):
    """An open_clip CLIP with Long-CLIP's two losses as its forward."""

    def __init__(self, clip: torch.nn.Module, config: FinetuneConfig):
        super().__init__()
        found = text_tower(clip)
        if found is None:
            raise ModelError("primary component matching needs a causal CLIP text tower pooled at the end token")
        self.clip, self.config = clip, config
        self.tower, self.pool, self.eos_id = found

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised text features, the batch cut to its longest caption."""
        pos = pool_positions(tokens, self.pool, self.eos_id)
        return encode_cut(self.tower, tokens[:, : int(pos.max()) + 1].to(self.device), pos.to(self.device))

    def forward(self, images: torch.Tensor, long_tokens: torch.Tensor, short_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fine loss, coarse loss) for a batch of row-aligned triples."""
        image = F.normalize(self.clip.encode_image(images.to(self.device)), dim=-1)
        long, short = self.encode_text(long_tokens), self.encode_text(short_tokens)
        coarse = pca_reconstruct(image, self.config.pca_dim)  # not re-normalised, as in Long-CLIP
        scale = self.clip.logit_scale.exp()
        smoothing = self.config.label_smoothing
        return contrastive_loss(image, long, scale, smoothing), contrastive_loss(coarse, short, scale, smoothing)


# ---------------------------------------------------------------------------------------------
# training


Progress = Callable[[int, int, float], None]


def finetune_longclip(
    triples: list[Triple],
    model: str,
    out_dir: str | Path,
    config: FinetuneConfig = FinetuneConfig(),
    resume: bool = False,
    progress: Progress | None = None,
    keep_checkpoint: bool = False,
) -> dict:
    """Fine-tune a long-context model on triples; returns {"epochs": [log rows], "train_loss",
    "val_loss", "steps", "out_dir"}. progress(step, total_steps, loss) is told after every step.
    The checkpoint (weights and AdamW's state, ~3x the model) goes once the model is written,
    unless keep_checkpoint."""
    out = Path(out_dir)
    progress = progress or (lambda step, total, loss: None)
    torch.manual_seed(config.seed)
    embedder = load_trainable(model, config.device)
    context, clip = embedder.context_length, embedder.model
    if context <= CLIP_CONTEXT:
        raise ModelError(f"model {model} reads {context} tokens: stretch it first (`ragcap models stretch {model} DIR --context 248`)")
    made = _made_by_ragcap(embedder)
    keep = next((made[step]["keep"] for step in ("stretch", "import") if step in made), KEEP)
    clip.logit_scale.data.fill_(config.logit_scale)
    if config.lock_image:
        clip.lock_image_tower()
    objective = PrimaryComponentMatching(clip, config)
    kept = objective.tower.positional_embedding.detach()[:keep].clone()

    train_idx, val_idx = _split(len(triples), config.val_fraction, config.seed)
    if len(train_idx) < 2:
        raise ModelError(f"{len(train_idx)} of {len(triples)} triples left to train on after holding out --val-fraction "
                         f"{config.val_fraction}; a contrastive step needs at least 2: lower --val-fraction or add triples")
    if config.val_fraction > 0 and len(val_idx) < 2:  # else val_loss is null every epoch, unexplained
        warnings.warn(f"--val-fraction {config.val_fraction} holds out {len(val_idx)} of {len(triples)} triples and a held-out "
                      f"loss needs 2, so none is reported; raise it to {math.ceil(2 / len(triples) * 1000) / 1000:g} for one",
                      RagcapWarning, stacklevel=2)
    steps_per_epoch = _steps(len(train_idx), config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    params = [p for p in objective.parameters() if p.requires_grad]
    # One group, as Long-CLIP's AdamW over all parameters (betas 0.9/0.999, eps 1e-8: torch's defaults).
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, total_steps // 10), total_steps)

    fingerprint = _fingerprint(triples, embedder.info.spec, config)
    log: list[dict] = []
    start_epoch = 0
    _prepare_out_dir(out, resume)
    if resume and (out / CHECKPOINT_FILE).is_file():
        start_epoch, log = _restore(out / CHECKPOINT_FILE, fingerprint, objective, optimizer, scheduler)

    def batch_of(idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen = [triples[i] for i in idx]
        images = torch.stack([embedder.preprocess(load_image(t.image)) for t in chosen])
        tokenize = functools.partial(embedder.tokenizer, context_length=context)
        return images, tokenize([t.long for t in chosen]), tokenize([t.short for t in chosen])

    for epoch in range(start_epoch, config.epochs):
        # The order depends only on (seed, epoch), so a resumed run sees the same batches.
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = train_idx[torch.randperm(len(train_idx), generator=generator).numpy()]
        batches = (order[i * config.batch_size : (i + 1) * config.batch_size if i + 1 < steps_per_epoch else None]
                   for i in range(steps_per_epoch))
        on_step = lambda i, loss, first=epoch * steps_per_epoch: progress(first + i + 1, total_steps, loss)  # noqa: E731
        long_loss, short_loss = _train_epoch(objective, optimizer, scheduler, map(batch_of, batches), kept, on_step)
        row = {"epoch": epoch + 1, "train_loss": long_loss + short_loss, "train_loss_long": long_loss,
               "train_loss_short": short_loss, "val_loss": _evaluate(objective, val_idx, batch_of, config.batch_size)}
        log.append(row)
        _checkpoint(out / CHECKPOINT_FILE, epoch + 1, log, fingerprint, objective, optimizer, scheduler)
        write_atomic(out / LOG_FILE, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in log)))

    _save_model(out, embedder, {**made, "finetune": {
        "method": "Long-CLIP primary component matching", "base": embedder.info.spec, "triples": len(triples), "keep": keep,
        "epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr, "lock_image": config.lock_image}})
    if not keep_checkpoint:
        (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    last = log[-1] if log else {"train_loss": None, "val_loss": None}
    return {"epochs": log, "train_loss": last["train_loss"], "val_loss": last["val_loss"], "steps": total_steps, "out_dir": str(out)}


def _steps(n: int, batch_size: int) -> int:
    """Steps per epoch over n triples. A last batch of one triple joins the one before: alone it
    has no negatives, and the SVD of its one centred (zero) row has a NaN gradient that would
    turn every weight into NaN."""
    return max(1, n // batch_size if n % batch_size == 1 else math.ceil(n / batch_size))


def _train_epoch(objective: PrimaryComponentMatching, optimizer, scheduler, batches, kept: torch.Tensor, on_step) -> tuple[float, float]:
    """One pass over the batches; the mean fine and coarse losses per triple."""
    objective.train()
    table = objective.tower.positional_embedding
    sums, count = np.zeros(2), 0
    for i, batch in enumerate(batches):
        losses = objective(*batch)
        loss = losses[0] + losses[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            table[: len(kept)] = kept  # undo weight decay: Long-CLIP keeps these rows in a frozen copy
        n = len(batch[0])
        sums, count = sums + [losses[0].item() * n, losses[1].item() * n], count + n
        on_step(i, loss.item())
    return float(sums[0] / count), float(sums[1] / count)


@torch.no_grad()
def _evaluate(objective: PrimaryComponentMatching, idx: np.ndarray, batch_of, batch_size: int) -> float | None:
    """Held-out loss (fine + coarse), the training criterion in eval mode; None for fewer than two
    held-out triples, whose contrastive loss would be 0 for want of negatives. Batches are
    evened out, so none is left with one triple."""
    if len(idx) < 2:
        return None
    objective.eval()
    total = 0.0
    for batch in np.array_split(idx, math.ceil(len(idx) / batch_size)):
        total += sum(loss.item() for loss in objective(*batch_of(batch))) * len(batch)
    return total / len(idx)


def _save_model(out: Path, embedder, record: dict) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in embedder.model.state_dict().items()}
    write_checkpoint(out, state, model_config(embedder.spec), preprocess_config(embedder.model), record)


def _made_by_ragcap(embedder) -> dict:
    """How ragcap made a local model (its config's "ragcap" record, e.g. the stretch's kept rows)."""
    if embedder.spec.kind != "local":
        return {}
    return json.loads((Path(embedder.spec.name) / CONFIG_NAME).read_text(encoding="utf-8")).get("ragcap", {})


def _fingerprint(triples: list[Triple], spec: str, config: FinetuneConfig) -> dict:
    """What a checkpoint must match to be resumed: same triples, base model and settings."""
    digest = hashlib.sha256("\n".join(f"{t.image}\t{t.long}\t{t.short}" for t in triples).encode()).hexdigest()
    settings = {k: v for k, v in asdict(config).items() if k != "device"}
    return {"triples": digest, "count": len(triples), "model": spec, "config": settings}


def _prepare_out_dir(out: Path, resume: bool) -> None:
    if not resume and ((out / CHECKPOINT_FILE).exists() or (out / CONFIG_NAME).exists()):
        raise ModelError(f"{out} already holds a model or a training run; resume it with --resume, or choose another output directory")
    if resume and not (out / CHECKPOINT_FILE).exists() and (out / CONFIG_NAME).exists():
        raise ModelError(f"{out} holds a completed model and no checkpoint: nothing to resume; choose another output directory")
    out.mkdir(parents=True, exist_ok=True)
