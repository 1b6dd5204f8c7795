"""Commands that write captions: train-decoder, train-clipcap, train-smallcap, caption, eval."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from ragcap.cli.common import (
    DEFAULT_WAIT_S, Actors, Beam, CausalLM, KeepCheckpoint, Collection, CpusPerActor, Decoders, Device, Engine, GpusPerActor, Json, MaxPixels, MaxTokens, Model, NumCaptions,
    Precision, PromptK, QdrantKey, QdrantUrl, RayAddress, Seed, Tau, Temperature, TopK, TopP, Wait, app, command, one_of, ray_options, search_options,
    store,
)
from ragcap.errors import OptionError, RagcapError



def _on_cpu(device: str | None) -> bool:
    from ragcap.util import default_device

    return default_device(device).type == "cpu"


@command(app, "train-decoder", interrupted="interrupted; rerun with --resume to continue from the last complete epoch")
def train_decoder(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the trained decoder (and its checkpoints).")],
    collection: Annotated[Optional[str], typer.Option("--collection", "-c", help="Train on this collection's captions and vectors.")] = None,
    parquet: Annotated[Optional[Path], typer.Option(help="Or train on a `ragcap export` Parquet file.")] = None,
    preset: Annotated[str, typer.Option(metavar=one_of("decap", "small"), help="Sizes and loop: decap (the paper's decoder: 4 layers, width 768, 10 epochs) or small (2 layers, width 256, 2 epochs: fits a CPU). The flags below override it.")] = "decap",
    layers: Annotated[Optional[int], typer.Option(help="Decoder layers [default: decap 4, small 2].")] = None,
    heads: Annotated[Optional[int], typer.Option(help="Attention heads [default: 4].")] = None,
    width: Annotated[Optional[int], typer.Option(help="Hidden size [default: decap 768, small 256].")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Captions are cut to this many CLIP tokens (at most the embedder's context less 2: 75, or 246 for Long-CLIP) [default: 20, DeCap's].")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs [default: decap 10, small 2].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Captions per step [default: decap 64, small 128].")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak AdamW learning rate [default: decap 3e-4, small 1e-3].")] = None,
    noise: Annotated[Optional[float], typer.Option(help="Variance of Gaussian noise on the embeddings (CapDec: 0.016); 0 = off.")] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help="Label smoothing of the cross-entropy (DeCap: 0.1).")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout in the decoder (GPT-2: 0.1).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear warm-up steps (at most 10% of the run) [default: 1000].")] = None,
    prune_vocab: Annotated[bool, typer.Option("--prune-vocab/--full-vocab", help="Output only the CLIP tokens the captions use (same captions, several times faster).")] = True,
    val_fraction: Annotated[Optional[float], typer.Option(help="Held-out fraction for the per-epoch validation loss [default: 0.01].")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for the split, initialisation and batches [default: 0].")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last complete epoch in --out.")] = False,
    keep_checkpoint: KeepCheckpoint = False,
    device: Device = None,
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
    wait: Wait = DEFAULT_WAIT_S,
    json_out: Json = False,
):
    """Train DeCap's decoder on text only: reproduce each caption from its own stored embedding."""
    from ragcap.embed import check_decoder_length
    from ragcap.report import emit_json
    from ragcap.train import preset as preset_config
    from ragcap.train import check_out_dir, with_overrides

    from ragcap import api
    from ragcap.locks import hold_directory

    # An unknown preset or a setting out of range fails before the collection is read.
    config = with_overrides(preset_config(preset), n_layer=layers, n_head=heads, n_embd=width, max_tokens=max_tokens, epochs=epochs,
                            batch_size=batch_size, lr=lr, noise_std=_noise_std(noise), val_fraction=val_fraction, seed=seed,
                            label_smoothing=label_smoothing, dropout=dropout, warmup_steps=warmup_steps, prune_vocab=prune_vocab,
                            device=device)
    with hold_directory(out, f"--out {out}"):  # a second run into --out is refused before any work
        check_out_dir(out, resume)  # as is an --out holding another run, before the data loads
        with store(qdrant_url, qdrant_api_key, wait) as st:
            captions, vectors, info = api.training_data(st, collection, parquet)
        if max_tokens is not None:  # up to the encoder's context (248 for a Long-CLIP model), not beyond
            check_decoder_length(info.spec, max_tokens)
        hint = "; on a CPU, --preset small does 14x less work per token" if preset == "decap" and _on_cpu(device) else ""
        result = _train("train-decoder", captions, vectors, info, out, config, resume, keep_checkpoint, hint)
    if json_out:
        emit_json({"out": str(out), "captions": len(captions), "embedder": info.spec, **result})
    else:
        typer.echo(f"decoder for {info.spec} written to {out} ({len(captions)} captions)")


@command(app, "train-clipcap", interrupted="interrupted; rerun with --resume to continue from the last complete epoch")
def train_clipcap(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the trained ClipCap model (and its checkpoints).")],
    features: Annotated[Optional[Path], typer.Option(help="Paired training: an `embed-images` features file (every reference of every image).")] = None,
    collection: Annotated[Optional[str], typer.Option("--collection", "-c", help="Text-only training on this collection's captions and vectors.")] = None,
    parquet: Annotated[Optional[Path], typer.Option(help="Or text-only training on a `ragcap export` Parquet file.")] = None,
    mapping: Annotated[str, typer.Option(metavar=one_of("mlp", "transformer"), help="Mapping network: mlp (ClipCap with GPT-2 fine-tuned) or transformer (ClipCap with GPT-2 frozen).")] = "mlp",
    lm: Annotated[str, typer.Option(help="GPT-2-family causal LM: hub name or directory.")] = "gpt2",
    train_lm: Annotated[bool, typer.Option("--train-lm/--freeze-lm", help="Fine-tune the LM too (ClipCap's MLP checkpoints do) or keep it frozen.")] = False,
    noise: Annotated[Optional[float], typer.Option(help="Variance of Gaussian noise on text embeddings (CapDec: 0.016); 0 = off.")] = None,
    prefix_length: Annotated[Optional[int], typer.Option(help="Prefix embeddings [default: 10 for mlp, 40 for transformer].")] = None,
    clip_length: Annotated[Optional[int], typer.Option(help="Transformer mapping: CLIP tokens the embedding is spread over (ClipCap: 40).")] = None,
    mapping_layers: Annotated[Optional[int], typer.Option(help="Transformer mapping layers (ClipCap: 8).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Captions are cut to this many LM tokens, the stop '.' included (ClipCap: 67).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (ClipCap: 10).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Captions per step (ClipCap: 40).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak AdamW learning rate (ClipCap: 2e-5).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear warm-up steps (at most 10% of the run; ClipCap: 5000).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Held-out fraction (of images, for paired data) for the per-epoch validation loss.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for the split, initialisation, noise and batches.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last complete epoch in --out.")] = False,
    keep_checkpoint: KeepCheckpoint = False,
    device: Device = None,
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
    wait: Wait = DEFAULT_WAIT_S,
    json_out: Json = False,
):
    """Train ClipCap: paired on image features (--features), text-only on caption embeddings
    (-c/--parquet; with --noise this is CapDec), or both."""
    from ragcap.report import emit_json
    from ragcap.train import ClipCapTrainConfig, check_out_dir, with_overrides

    from ragcap import api
    from ragcap.locks import hold_directory

    if collection is not None and parquet is not None:
        raise RagcapError("pass at most one of --collection NAME or --parquet FILE")
    config = with_overrides(ClipCapTrainConfig(), mapping=mapping, lm=lm, train_lm=train_lm, noise_std=_noise_std(noise),
                            prefix_length=prefix_length, clip_length=clip_length, mapping_layers=mapping_layers,
                            max_tokens=max_tokens, epochs=epochs, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                            val_fraction=val_fraction, seed=seed, device=device)
    with hold_directory(out, f"--out {out}"):  # a second run into --out is refused before any work
        check_out_dir(out, resume)  # as is an --out holding another run, before the data loads
        if collection is not None:
            with store(qdrant_url, qdrant_api_key, wait) as st:
                data = api.training_examples(st, collection, parquet, features)
        else:
            data = api.training_examples(None, None, parquet, features)
        result = _train("train-clipcap", data.captions, data.vectors, data.embedder, out, config, resume, keep_checkpoint, groups=data.groups, noisy=data.noisy)
    if json_out:
        emit_json({"out": str(out), "captions": len(data.captions), "paired": data.paired, "embedder": data.embedder.spec, **result})
    else:
        typer.echo(f"ClipCap for {data.embedder.spec} written to {out} ({data.paired} paired, {len(data.captions) - data.paired} text-only captions)")


@command(app, "train-smallcap", interrupted="interrupted; rerun with --resume to continue from the last complete epoch")
def train_smallcap(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the trained SmallCap model (and its checkpoints).")],
    features: Annotated[Path, typer.Option(help="`embed-images --patches` features file: the images, their references and patch features.")],
    collection: Annotated[str, typer.Option("--collection", "-c", help="The memory to retrieve the prompts' captions from.")],
    query_features: Annotated[Optional[Path], typer.Option(help="The same images embedded by the memory's model, when --features is of another (the encoder).")] = None,
    lm: Annotated[str, typer.Option(help="GPT-2 causal LM (frozen): hub name or directory.")] = "gpt2",
    cross_attention_width: Annotated[Optional[int], typer.Option(help="Width of the cross-attention [default: the LM's width / 4, SmallCap7M; / 8 and / 16 are SmallCap3.5M and 1.8M].")] = None,
    k: Annotated[Optional[int], typer.Option("--k", "-k", help="Retrieved captions per prompt (SmallCap: 4).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Captions are cut to this many LM tokens before the stop '.' (SmallCap: 25).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (SmallCap: 10).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Captions per step (SmallCap: 64).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak AdamW learning rate (SmallCap: 1e-4).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear warm-up steps (at most 10% of the run; SmallCap: 0).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Held-out fraction of images for the per-epoch validation loss.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for the split, initialisation and batches.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last complete epoch in --out.")] = False,
    keep_checkpoint: KeepCheckpoint = False,
    device: Device = None,
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
    wait: Wait = DEFAULT_WAIT_S,
    json_out: Json = False,
):
    """Train SmallCap's cross-attention (a frozen GPT-2 reading the image's patch features) with
    prompts retrieved from -c, each image's own captions left out of its prompt."""
    from ragcap.decoders.lm_prompt import MAX_CAPTION_TOKENS
    from ragcap.decoders.tokenizers import load_gpt2_tokenizer
    from ragcap.report import emit_json, progress
    from ragcap.smallcap_train import smallcap_data
    from ragcap.train import SmallCapTrainConfig, check_out_dir, with_overrides

    from ragcap.locks import hold_directory

    config = with_overrides(SmallCapTrainConfig(), lm=lm, cross_attention_width=cross_attention_width, k=k, max_tokens=max_tokens,
                            epochs=epochs, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, val_fraction=val_fraction, seed=seed,
                            device=device)
    with hold_directory(out, f"--out {out}"):  # a second run into --out is refused before any work
        check_out_dir(out, resume)  # as is an --out holding another run, before the data loads
        tokenizer = load_gpt2_tokenizer(config.lm)
        with store(qdrant_url, qdrant_api_key, wait) as st, progress(None, "retrieve", "images") as bar:
            data = smallcap_data(st, collection, features, tokenizer, config.k, MAX_CAPTION_TOKENS, query_features, bar.update)
        typer.echo(f"ragcap: left {data.excluded} of the training images' own captions out of their prompts "
                   f"({data.images_with_own} of {len(data.neighbours)} images met some of their own among their neighbours)", err=True)
        config = with_overrides(config, encoder_width=int(data.examples.patches.shape[2]), retrieval_spec=data.retrieval.spec,
                                retrieval_dim=data.retrieval.dim)
        result = _train("train-smallcap", data.captions, data.examples, data.encoder, out, config, resume, keep_checkpoint, groups=data.groups)
    summary = {"out": str(out), "captions": len(data.captions), "images": len(data.neighbours), "encoder": data.encoder.spec,
               "retrieval": data.retrieval.spec, "own_captions_excluded": data.excluded, "images_with_own_captions": data.images_with_own}
    if json_out:
        emit_json({**summary, **result})
    else:
        typer.echo(f"SmallCap for encoder {data.encoder.spec} and memories of {data.retrieval.spec} written to {out} ({len(data.captions)} captions)")


def _noise_std(variance: float | None) -> float | None:
    """--noise is a variance, as CapDec states it (0.016); the loop adds noise of this std."""
    if variance is None:
        return None
    if not (math.isfinite(variance) and variance >= 0):  # nan passes `< 0`
        raise RagcapError(f"--noise is a variance and must be >= 0, got {variance}")
    return math.sqrt(variance)


def _train(name: str, captions, vectors, info, out: Path, config, resume: bool, keep_checkpoint: bool, hint: str = "", **data) -> dict:
    """ragcap.train.train_decoder with a progress bar (steps, rate, ETA, loss), the expected time
    per epoch before training, the pace once measured, and each epoch's training and held-out loss."""
    from ragcap.report import StepProgress
    from ragcap.train import train_decoder

    with StepProgress(name, epochs=config.epochs, hint=hint) as report:
        return train_decoder(captions, vectors, info, out, config, resume=resume, progress=report, on_epoch=report.epoch,
                             on_estimate=report.expected, keep_checkpoint=keep_checkpoint, **data)


@command(app)
def caption(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="Images, directories, globs, @list files, or - for paths on stdin.")] = None,
    collection: Collection = "captions",
    mode: Annotated[str, typer.Option("--mode", help="Comma-separated: pd, nnd, clipre, vd, prompt, smallcap.")] = "pd",
    decoder: Decoders = None,
    lm: CausalLM = "gpt2",
    text: Annotated[Optional[list[str]], typer.Option("--text", help="Caption from this text instead of images (repeatable).")] = None,
    k: Annotated[Optional[int], typer.Option("--k", "-k", help="Neighbours in the pd projection when Qdrant searches the memory (--memory qdrant) [default: 1024, or the whole collection if smaller].")] = None,
    tau: Tau = 0.01,
    beam: Beam = None,
    num_captions: NumCaptions = 1,
    max_tokens: MaxTokens = None,
    top_p: TopP = None,
    top_k: TopK = None,
    temperature: Temperature = None,
    seed: Seed = None,
    prompt_k: PromptK = 4,
    memory: Annotated[str, typer.Option("--memory", metavar=one_of("auto", "exact", "qdrant"), help="How to search the memory: exact (every stored caption, from a copy of the vectors kept beside the collection), qdrant (Qdrant's top k: memories larger than RAM), or auto (exact when the copy fits in a quarter of the RAM, or half the GPU's).")] = "auto",
    neighbours: Annotated[int, typer.Option(help="Also report this many retrieved captions with scores.")] = 0,
    fmt: Annotated[str, typer.Option("--format", metavar=one_of("text", "jsonl", "csv"), help="How to write the results.")] = "text",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write results here instead of stdout (via FILE.partial, renamed when complete).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted -o FILE: skip the inputs it already holds.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per batch (with --engine ray: per actor call).")] = 128,  # CaptionSettings.batch_size
    max_pixels: MaxPixels = None,
    model: Model = None,
    device: Device = None,
    precision: Precision = None,
    engine: Engine = None,
    ray_address: RayAddress = None,
    actors: Actors = None,
    gpus_per_actor: GpusPerActor = None,
    cpus_per_actor: CpusPerActor = None,
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
    wait: Wait = DEFAULT_WAIT_S,
    json_out: Annotated[bool, typer.Option("--json", help="Same as --format jsonl.")] = False,
):
    """Caption images (or texts) with one or more modes.

    With --engine ray the images are captioned by a Ray cluster's actors, each with the models
    loaded once; results are written in input order, as without it."""
    from ragcap import api
    from ragcap.caption import CaptionSettings, check_texts, iter_inputs
    from ragcap.modes import parse_modes
    from ragcap.precision import resolve_precision
    from ragcap.report import CAPTION_FORMATS, CaptionWriter, announce_runtime, caption_output, progress, write_all

    fmt = "jsonl" if json_out else fmt
    if fmt not in CAPTION_FORMATS:
        raise RagcapError(f"unknown --format {fmt!r}; choose from {', '.join(CAPTION_FORMATS)}")
    if not inputs and not text:
        raise RagcapError("nothing to caption: give image paths, a directory, - for stdin, or --text")
    if inputs and text:  # each output line names a file or a text: one run writes one kind
        raise OptionError("--text captions texts, not images: caption the images and the texts in separate runs")
    check_texts(text or [], "--text")
    search = search_options(beam, num_captions, max_tokens, top_p, top_k, temperature, seed)
    settings = CaptionSettings(modes=parse_modes(mode), k=k, tau=tau, search=search, prompt_k=prompt_k,
                               memory=memory, batch_size=batch_size, neighbours=neighbours, max_pixels=max_pixels)
    engine_options = ray_options(engine, ray_address, actors, gpus_per_actor, cpus_per_actor)
    precision = resolve_precision(precision)
    if engine_options is not None and text:
        raise OptionError("--engine ray captions images; caption --text in this process (leave --engine out)")
    if max_pixels is not None:
        from ragcap.images import allow_pixels

        allow_pixels(max_pixels)
    paths = list(iter_inputs(inputs or []))
    if inputs and not paths:  # a folder or glob with none says so itself; stdin and @lists may be empty
        raise RagcapError(f"nothing to caption: {' '.join(inputs)} listed no images")
    key = "text" if text else "file"
    with store(qdrant_url, qdrant_api_key, wait) as st, caption_output(output, fmt, settings.modes, key, resume) as out:
        text, paths = [t for t in text or [] if t not in out.done], [p for p in paths if p not in out.done]
        runtime = None  # on Ray, the actors say where they run once they have loaded (below)
        if engine_options is None:
            captioner = api.load_captioner(st, collection, settings, decoder, lm, model, device, image_only=key == "file",
                                           precision=precision)
            runtime = captioner.runtime()
            announce_runtime(runtime)
        writer = CaptionWriter(out.stream, fmt, key=key, header=out.header, runtime=runtime)
        failed = out.failed + (write_all(captioner.caption_texts(text), writer) if text else 0)
        if paths:
            with progress(len(paths), "caption", "images") as bar:
                if engine_options is None:
                    results = captioner.caption_images(paths)
                else:
                    from ragcap.distributed.caption import caption_on_ray

                    def on_runtime(runtime: dict[str, str], actors: int) -> None:
                        with bar.external_write_mode():  # a line above the bar, not inside it
                            announce_runtime(runtime, actors)
                        writer.runtime = runtime

                    results = caption_on_ray(st, collection, settings, paths, engine_options, decoder, lm, model, device,
                                             precision, on_runtime)
                failed += write_all(_counting(results, bar), writer)
    if failed:
        typer.echo(f"ragcap: {failed} input(s) failed; see the error lines", err=True)
        raise typer.Exit(1)


def _counting(results, bar):
    """Advance the bar once per input (a failed input has one result, a captioned one one per mode)."""
    last = None
    for result in results:
        if result.source != last:
            bar.update(1)
            last = result.source
        yield result


# ---------------------------------------------------------------------------- evaluate


@command(app, "eval")
def evaluate(
    references: Annotated[Path, typer.Argument(help="Human references: COCO JSON, Karpathy JSON, COCO by-image JSON, Flickr token/CSV, or a JSONL manifest.")],
    images: Annotated[Path, typer.Option("--images", help="Folder of the images to caption (matched to references by id or file name).")],
    collection: Collection = "captions",
    mode: Annotated[str, typer.Option("--mode", help="Comma-separated modes to score: pd, nnd, clipre, vd, prompt, smallcap.")] = "pd",
    decoder: Decoders = None,
    lm: CausalLM = "gpt2",
    ref_format: Annotated[Optional[str], typer.Option("--ref-format", help="Reference format (default: detected).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split to score: Karpathy JSON's (default: test) or a JSONL manifest's \"split\" field (default: every line).")] = None,
    k: Annotated[Optional[int], typer.Option("--k", "-k", help="Neighbours in the pd projection when Qdrant searches the memory (--memory qdrant) [default: 1024, or the whole collection if smaller].")] = None,
    tau: Tau = 0.01,
    beam: Beam = None,
    max_tokens: MaxTokens = None,
    top_p: TopP = None,
    top_k: TopK = None,
    temperature: Temperature = None,
    seed: Seed = None,
    spice: Annotated[bool, typer.Option(help="Also score SPICE when its jars are installed (slow).")] = True,
    allow_leakage: Annotated[bool, typer.Option(help="Score even if the memory holds the evaluated images' own captions.")] = False,
    allow_missing: Annotated[bool, typer.Option(help="Score the referenced images that --images holds and exit 0 when others are missing (a subset is intended).")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 128,  # CaptionSettings.batch_size
    max_pixels: MaxPixels = None,
    model: Model = None,
    device: Device = None,
    precision: Precision = None,
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
    wait: Wait = DEFAULT_WAIT_S,
    json_out: Annotated[bool, typer.Option("--json", help="Print scores and per-image captions as JSON.")] = False,
):
    """Caption a set of images with one or more modes and score them with the COCO metrics."""
    from ragcap import api
    from ragcap import evaluate as ev
    from ragcap.caption import CaptionSettings
    from ragcap.modes import parse_modes
    from ragcap.precision import resolve_precision
    from ragcap.report import emit_json, progress

    ev.require_java()  # fail before minutes of captioning, not after
    precision = resolve_precision(precision)
    refs = ev.load_references(references, ref_format, split)
    matched = ev.match_images(refs, images)
    absent = sorted(set(refs) - set(matched.pairs), key=_image_order)
    unreferenced = [p.name for p in matched.missing]  # said, not scored
    if not matched.pairs:
        raise RagcapError(f"none of the {len(refs)} images in {references} is in {images}; check --images and --split")
    search = search_options(beam, 1, max_tokens, top_p, top_k, temperature, seed)
    settings = CaptionSettings(modes=parse_modes(mode), k=k, tau=tau, search=search, batch_size=batch_size, max_pixels=max_pixels)
    if max_pixels is not None:
        from ragcap.images import allow_pixels

        allow_pixels(max_pixels)
    with store(qdrant_url, qdrant_api_key, wait) as st:
        if not allow_leakage:
            leaked = api.find_leakage(st, collection, matched.pairs, (c for key in matched.pairs for c in refs[key].captions))
            if leaked:
                raise RagcapError(
                    f"collection '{collection}' holds {leaked} captions of the {len(matched.pairs)} images under evaluation "
                    "(by image id, or their reference captions word for word), which inflates every score; rebuild it with "
                    "`ragcap ingest ... --exclude-images FILE` (a file of the evaluated image ids; a corpus without ids must "
                    "leave their references out) or pass --allow-leakage"
                )
        captioner = api.load_captioner(st, collection, settings, decoder, lm, model, device, precision=precision)
        key_of = {str(path): key for key, path in matched.pairs.items()}
        captions: dict[str, dict[str, str]] = {m: {} for m in settings.modes}
        failed: dict[str, str] = {}
        with progress(len(key_of), "caption", "images") as bar:
            for result in _counting(captioner.caption_images(list(key_of)), bar):
                if result.error is not None:
                    failed[result.source] = result.error
                else:
                    captions[result.mode][key_of[result.source]] = result.caption
    if not any(captions.values()):
        raise RagcapError(f"no image could be captioned ({len(failed)} failed)")
    scores = {m: ev.score(captions[m], refs, spice=spice) for m in settings.modes}
    if json_out:
        emit_json({
            "references": str(references), "collection": collection, "images_scored": len(next(iter(captions.values()))),
            "images_missing": absent, "images_failed": failed, "images_unreferenced": unreferenced,
            "scores": {m: s.to_dict() for m, s in scores.items()},
            "captions": {key: {m: captions[m].get(key) for m in settings.modes} for key in sorted(matched.pairs)},
        })
    else:
        typer.echo(ev.format_table(scores))
    for path, error in failed.items():
        typer.echo(f"ragcap: could not caption {path}: {error}", err=True)
    if absent:
        hint = "" if allow_missing else "; pass --allow-missing if a subset is intended"
        typer.echo(f"ragcap: {len(absent)} referenced images are not in {images} (e.g. {', '.join(absent[:3])}); scored the rest{hint}", err=True)
    if unreferenced:
        some = f"1 image in {images} has" if len(unreferenced) == 1 else f"{len(unreferenced)} images in {images} have"
        typer.echo(f"ragcap: {some} no references in {references} "
                   f"(e.g. {', '.join(unreferenced[:3])}); they were not scored", err=True)
    if failed or (absent and not allow_missing):
        raise typer.Exit(1)


def _image_order(key: str) -> tuple:
    """COCO ids in numeric order (100 before 1000), names in text order after them."""
    return (0, int(key), "") if key.isdigit() else (1, 0, key)
