"""`ragcap embed-images`: paired image–caption data for training, as a Parquet feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ragcap.cli.common import Actors, CpusPerActor, Device, Engine, GpusPerActor, Json, RayAddress, app, command, ray_options
from ragcap.errors import RagcapError


@command(app, "embed-images")
def embed_images(
    references: Annotated[Path, typer.Argument(help="Human references: COCO JSON, Karpathy JSON, COCO by-image JSON, Flickr token/CSV, or a JSONL manifest.")],
    images: Annotated[Path, typer.Option("--images", help="Folder of the images (matched to references by id or file name).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write (rerun to resume or to follow a changed reference file).")],
    # No collection here: the help of the shared -m option ("the collection's") would be wrong.
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Embedder [default: the one --out records when it exists, else $RAGCAP_MODEL, the config file's model, else ViT-B-32:openai].")] = None,
    ref_format: Annotated[Optional[str], typer.Option("--ref-format", help="Reference format (default: detected).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Karpathy or manifest split to encode (Karpathy default: test).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch (also the resume granularity).")] = 64,
    patches: Annotated[bool, typer.Option(help="Also store the vision transformer's patch features (for `train-smallcap`; ViT models only).")] = False,
    device: Device = None,
    engine: Engine = None,
    ray_address: RayAddress = None,
    actors: Actors = None,
    gpus_per_actor: GpusPerActor = None,
    cpus_per_actor: CpusPerActor = None,
    json_out: Json = False,
):
    """Encode every image the references list, once, with its references: training data for
    `train-clipcap --features` (and with --patches, `train-smallcap --features`). Missing and
    unreadable images are listed and skipped. With --engine ray the images are encoded by a Ray
    cluster's actors (every node must see --images)."""
    from ragcap import api
    from ragcap import evaluate as ev
    from ragcap.report import emit_json, progress

    engine_options = ray_options(engine, ray_address, actors, gpus_per_actor, cpus_per_actor)
    refs = ev.load_references(references, ref_format, split)
    matched = ev.match_images(refs, images)
    if not matched.pairs:
        raise RagcapError(f"none of the {len(refs)} images in {references} is in {images}; check --images and --split")
    with progress(len(matched.pairs), "embed-images", "images") as bar:
        summary = api.embed_images(refs, matched.pairs, out, model, device, batch_size, bar.update, engine_options, patches)
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
