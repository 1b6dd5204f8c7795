"""`ragcap models ...`: list model specs, write random models for offline use, stretch and import models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ragcap.cli.common import Device, Json, command, models_app, one_of


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
    elif not specs:  # a blank line alone read as a listing that failed
        typer.echo(f"no open_clip spec contains {contains!r}; `ragcap models list` shows all of them")
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


@command(models_app, "stretch")
def stretch(
    spec: Annotated[str, typer.Argument(help="open_clip CLIP to stretch: ARCH:TAG, hf-hub:ORG/NAME or a model directory.")],
    out: Annotated[Path, typer.Argument(help="Directory to write (a local model, usable as --model DIR).")],
    context: Annotated[int, typer.Option(help="New text context: 20 + r x 57 for a 77-token model (Long-CLIP: 248).")] = 248,
    device: Device = None,
    json_out: Json = False,
):
    """Stretch a CLIP text tower's context as Long-CLIP does (first 20 positions kept, the rest interpolated)."""
    from ragcap.longclip import stretch_model
    from ragcap.report import emit_json

    written = stretch_model(spec, out, context=context, device=device)
    if json_out:
        emit_json({"model": spec, "out": str(written), "context": context})
    else:
        typer.echo(str(written))


@command(models_app, "import")
def import_checkpoint(
    kind: Annotated[str, typer.Argument(help="Checkpoint kind: longclip, clipcap, decap or smallcap.")],
    source: Annotated[str, typer.Argument(help="Checkpoint file, a directory holding one (smallcap: with its config.json), or hf-hub:ORG/NAME (read from the local hub cache).")],
    out: Annotated[Path, typer.Argument(help="Directory to write (longclip: usable as --model DIR; clipcap, decap, smallcap: as --decoder DIR).")],
    arch: Annotated[Optional[str], typer.Option(help="longclip: force the open_clip architecture (name or model-config JSON) instead of recognising it.")] = None,
    mapping: Annotated[Optional[str], typer.Option(metavar=one_of("mlp", "transformer"), help="clipcap: the checkpoint's mapping network, mlp or transformer [default: mlp].")] = None,
    lm: Annotated[Optional[str], typer.Option(help="clipcap, smallcap: the LM's tokenizer and config (smallcap: config.json's when present), hub name or directory; weights come from the checkpoint [default: gpt2].")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="clipcap, decap: embedder to record [default: ViT-B-32:openai for 512-d mappings, RN50x4:openai for 640-d]; smallcap: the encoder, a ViT [default: ViT-B-32:openai].")] = None,
    retrieval: Annotated[Optional[str], typer.Option(help="smallcap: the embedder of the memories it reads [default: config.json's retrieval_encoder, else RN50x64:openai].")] = None,
    prefix_scale: Annotated[Optional[float], typer.Option(help="clipcap: scale of the unit embeddings fed to the mapping (the MLP checkpoints saw raw CLIP embeddings) [default: 1].")] = None,
    heads: Annotated[Optional[int], typer.Option(help="decap: attention heads, which no tensor shape records [default: 4, as DeCap's decoder_config.pkl].")] = None,
    json_out: Json = False,
):
    """Convert another project's published checkpoint (Long-CLIP-B/L, ClipCap, DeCap, SmallCap) to a ragcap model directory."""
    from ragcap.importers import import_model
    from ragcap.report import emit_json

    given = dict(arch=arch, mapping=mapping, lm=lm, model=model, prefix_scale=prefix_scale, heads=heads, retrieval=retrieval)
    written = import_model(kind, source, out, **{k: v for k, v in given.items() if v is not None})
    if json_out:
        emit_json({"kind": kind, "source": source, "out": str(written)})
    else:
        typer.echo(str(written))
