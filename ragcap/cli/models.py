"""`ragcap models ...`: list model specs, write random models for offline use, import published checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ragcap.cli.common import Json, command, models_app


@command(models_app, "list")
def list_models(
    contains: Annotated[Optional[str], typer.Argument(help="Only specs containing this text (case-insensitive).")] = None,
    json_out: Json = False,
):
    """Every open_clip ARCH:TAG spec (weights download on first use)."""
    from ragcap.embed import list_pretrained_specs
    from ragcap.report import emit_json

    specs = [s for s in list_pretrained_specs() if contains is None or contains.lower() in s.lower()]
    if json_out:
        emit_json(specs)
    else:
        typer.echo("\n".join(specs))


@command(models_app, "save-random")
def save_random(
    arch: Annotated[str, typer.Argument(help="open_clip architecture (e.g. ViT-B-32) or a model-config JSON file.")],
    out: Annotated[Path, typer.Argument(help="Directory to write (a local checkpoint, usable as --model DIR).")],
    seed: Annotated[int, typer.Option(help="Initialisation seed.")] = 0,
):
    """Write a randomly initialised open_clip model in the on-disk form of a real checkpoint."""
    from ragcap.embed import save_random as write

    typer.echo(str(write(arch, out, seed=seed)))


@command(models_app, "save-random-lm")
def save_random_lm(
    out: Annotated[Path, typer.Argument(help="Directory to write (usable as --lm DIR).")],
    tokenizer: Annotated[Path, typer.Option(help="Directory with GPT-2's vocab.json and merges.txt.")],
    layers: Annotated[int, typer.Option(help="Transformer layers (GPT-2 small: 12).")] = 12,
    width: Annotated[int, typer.Option(help="Hidden size (GPT-2 small: 768).")] = 768,
    heads: Annotated[int, typer.Option(help="Attention heads (GPT-2 small: 12).")] = 12,
    seed: Annotated[int, typer.Option(help="Initialisation seed.")] = 0,
):
    """Write a randomly initialised GPT-2 with a real tokenizer (for offline tests and benchmarks)."""
    from ragcap.decoders.lm_prompt import save_random_lm as write

    typer.echo(str(write(out, tokenizer, n_layer=layers, n_embd=width, n_head=heads, seed=seed)))


@command(models_app, "import")
def import_model(
    kind: Annotated[str, typer.Argument(help="What the checkpoint is: clipcap.")],
    source: Annotated[Path, typer.Argument(help="The published checkpoint file (e.g. ClipCap's coco_weights.pt).")],
    out: Annotated[Path, typer.Argument(help="Directory to write (usable as --decoder DIR).")],
    mapping: Annotated[str, typer.Option(help="clipcap: the checkpoint's mapping network, mlp or transformer.")] = "mlp",
    lm: Annotated[str, typer.Option(help="clipcap: the LM's config and tokenizer (hub name or directory); weights come from the checkpoint.")] = "gpt2",
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="clipcap: embedder to record [default: ViT-B-32:openai for 512-d, RN50x4:openai for 640-d].")] = None,
    prefix_scale: Annotated[float, typer.Option(help="clipcap: scale of the unit embeddings fed to the mapping (the MLP checkpoints saw raw CLIP embeddings).")] = 1.0,
):
    """Convert another project's published checkpoint into a ragcap model directory."""
    from ragcap.importers import run_import

    typer.echo(str(run_import(kind, source, out, mapping=mapping, lm=lm, model=model, prefix_scale=prefix_scale)))
