"""`ragcap finetune-longclip`: Long-CLIP's primary component matching on (image, long, short) triples."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ragcap.cli.common import Device, Json, KeepCheckpoint, app, command


@command(app, "finetune-longclip", interrupted="interrupted; rerun with --resume to continue from the last complete epoch")
def finetune_longclip(
    manifest: Annotated[Path, typer.Argument(help='JSONL, one {"file", "long", "short"?} per image; short defaults to long\'s first sentence.')],
    images: Annotated[Path, typer.Option("--images", help="Folder the manifest's files are relative to.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Long-context model to fine-tune (from `ragcap models stretch` or `models import longclip`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the fine-tuned model (and its checkpoints).")],
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (Long-CLIP: 6).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Triples per step (Long-CLIP: 128 per GPU).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak AdamW learning rate (Long-CLIP: 1e-6).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay (Long-CLIP: 0.01).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear warm-up steps before the cosine decay (at most 10% of the run).")] = None,
    pca_dim: Annotated[Optional[int], typer.Option(help="Principal components of the coarse image features (Long-CLIP: 32).")] = None,
    lock_image: Annotated[bool, typer.Option(help="Freeze the image tower (Long-CLIP trains both; cheaper).")] = False,
    val_fraction: Annotated[Optional[float], typer.Option(help="Held-out fraction for the per-epoch validation loss.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for the split and the batches.")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Skip and count bad manifest lines instead of stopping.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue from the last complete epoch in --out.")] = False,
    keep_checkpoint: KeepCheckpoint = False,
    device: Device = None,
    json_out: Json = False,
):
    """Fine-tune a stretched CLIP on long and short captions of the same images (Long-CLIP)."""
    from ragcap.locks import hold_directory
    from ragcap.longclip_train import FinetuneConfig, finetune_longclip as train, read_triples
    from ragcap.report import StepProgress, emit_json

    triples, bad = read_triples(manifest, images, skip_bad=skip_bad)
    given = dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                 pca_dim=pca_dim, val_fraction=val_fraction, seed=seed, device=device)
    config = FinetuneConfig(lock_image=lock_image, **{k: v for k, v in given.items() if v is not None})
    # A second run into --out is refused at once; a run that fails before writing leaves no --out.
    with hold_directory(out, f"--out {out}"), StepProgress("finetune-longclip") as report:
        result = train(triples, model, out, config, resume=resume, progress=report, keep_checkpoint=keep_checkpoint)
    if json_out:
        emit_json({"out": str(out), "model": model, "triples": len(triples), "skipped_bad": len(bad), **result})
    else:
        typer.echo(f"fine-tuned {model} on {len(triples)} triples; written to {out}")
    for record in bad:
        typer.echo(f"  skipped {record.location}: {record.reason}", err=True)
    if bad:
        raise typer.Exit(1)
