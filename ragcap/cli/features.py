"""`ragcap embed-images`: paired image–caption data for training, as a Parquet feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ragcap.cli.common import Device, Json, Model, app, command
from ragcap.errors import RagcapError


@command(app, "embed-images")
def embed_images(
    references: Annotated[Path, typer.Argument(help="Human references: COCO JSON, Karpathy JSON, COCO by-image JSON, Flickr token/CSV, or a JSONL manifest.")],
    images: Annotated[Path, typer.Option("--images", help="Folder of the images (matched to references by id or file name).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write (rerun to resume or to follow a changed reference file).")],
    model: Model = None,
    ref_format: Annotated[Optional[str], typer.Option("--ref-format", help="Reference format (default: detected).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Karpathy or manifest split to encode (Karpathy default: test).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch (also the resume granularity).")] = 64,
    device: Device = None,
    json_out: Json = False,
):
    """Encode every image the references list, once, with its references: training data for
    `train-clipcap --features`. Missing and unreadable images are listed and skipped."""
    from ragcap import api
    from ragcap import evaluate as ev
    from ragcap.report import emit_json, progress

    refs = ev.load_references(references, ref_format, split)
    matched = ev.match_images(refs, images)
    if not matched.pairs:
        raise RagcapError(f"none of the {len(refs)} images in {references} is in {images}; check --images and --split")
    with progress(len(matched.pairs), "embed-images", "images") as bar:
        summary = api.embed_images(refs, matched.pairs, out, model, device, batch_size, on_progress=bar.update)
    for path, error in summary.broken.items():
        typer.echo(f"ragcap: could not read {path}: {error}", err=True)
    if not summary.images:
        raise RagcapError(f"none of the {len(matched.pairs)} referenced images in {images} could be read; nothing written")
    if json_out:
        emit_json(summary.to_dict())
    else:
        typer.echo(f"{summary.images} images written to {out} ({summary.encoded} encoded now, {summary.reused} kept from an earlier run; {summary.embedder})")
    if summary.missing:
        typer.echo(f"ragcap: {len(summary.missing)} referenced images are not in {images} (e.g. {', '.join(summary.missing[:3])}); "
                   "encoded the rest", err=True)
    if summary.broken or summary.missing:
        raise typer.Exit(1)
