"""`ragcap serve`: captioning over HTTP with a web page (the work is ragcap.serve's)."""

from __future__ import annotations

import math
from typing import Annotated, Optional

import typer

from ragcap.cli.common import (
    Beam, CausalLM, Collection, Decoders, Device, MaxTokens, Model, NumCaptions, Precision, PromptK, QdrantKey, QdrantUrl, Seed, Tau, Temperature, TopK,
    TopP, app,
    command, search_options, store,
)
from ragcap.errors import OptionError
from ragcap.serve.config import ServeConfig

DEFAULTS = ServeConfig()


@command(app)
def serve(
    collection: Collection = "captions",
    mode: Annotated[str, typer.Option("--mode", help="Default modes of a request, comma-separated: pd, nnd, clipre, vd, prompt, smallcap.")] = "pd",
    decoder: Decoders = None,
    lm: CausalLM = "gpt2",
    k: Annotated[Optional[int], typer.Option("--k", "-k", help="Default neighbours in the pd projection [default: 1024, or the whole collection if smaller].")] = None,
    tau: Tau = 0.01,
    beam: Beam = None,
    num_captions: NumCaptions = 1,
    max_tokens: MaxTokens = None,
    top_p: TopP = None,
    top_k: TopK = None,
    temperature: Temperature = None,
    seed: Seed = None,
    prompt_k: PromptK = 4,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network.")] = DEFAULTS.host,
    port: Annotated[int, typer.Option(help="Port (0: any free one, printed at start).")] = DEFAULTS.port,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="RAGCAP_API_KEY", help="Require this key (Authorization: Bearer KEY, or X-API-Key).")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option("--cors-origin", help="Allow browser pages from this origin to call the API (repeatable; none by default).")] = None,
    max_batch: Annotated[int, typer.Option(help="Items per model batch; 1 turns dynamic batching off.")] = DEFAULTS.max_batch,
    max_wait_ms: Annotated[float, typer.Option(help="How long a batch waits for more requests to join.")] = DEFAULTS.max_wait_ms,
    max_queue: Annotated[int, typer.Option(help="Items waiting or running; more are refused with 503.")] = DEFAULTS.max_queue,
    timeout: Annotated[float, typer.Option(help="Seconds before a request is answered 504.")] = DEFAULTS.timeout_s,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body, in MiB (413 above).")] = DEFAULTS.max_upload_bytes / 2**20,
    max_pixels: Annotated[int, typer.Option(help="Largest image in pixels (413 above; decompression bombs).")] = DEFAULTS.max_pixels,
    max_images: Annotated[int, typer.Option(help="Images per request.")] = DEFAULTS.max_images,
    max_captions: Annotated[int, typer.Option(help="Captions per input a request may ask for (num_captions, or n in chat).")] = DEFAULTS.max_captions,
    allow_image_host: Annotated[Optional[list[str]], typer.Option("--allow-image-host", help="Let chat requests name http(s) image URLs on this host (repeatable; none by default: images come inline as data: URLs).")] = None,
    model: Model = None,
    device: Device = None,
    precision: Precision = None,
    qdrant_url: QdrantUrl = None,
    qdrant_api_key: QdrantKey = None,
):
    """Serve captioning over HTTP: a JSON API under /v1 (with OpenAI's /v1/chat/completions) and a web page at /.

    Models and the collection are loaded once; concurrent requests are batched together.
    """
    from ragcap import api
    from ragcap.caption import CaptionSettings
    from ragcap.modes import parse_modes
    from ragcap.report import announce_runtime
    from ragcap.serve import serve as run

    if not (math.isfinite(max_upload_mb) and max_upload_mb > 0):
        raise OptionError(f"--max-upload-mb must be a positive number, got {max_upload_mb}")
    config = ServeConfig(
        host=host, port=port, api_key=api_key, cors_origins=tuple(cors_origin or ()), max_batch=max_batch,
        max_wait_ms=max_wait_ms, max_queue=max_queue, timeout_s=timeout, max_upload_bytes=int(max_upload_mb * 2**20),
        max_pixels=max_pixels, max_images=max_images, max_captions=max_captions, image_url_hosts=tuple(allow_image_host or ()),
        max_texts=min(DEFAULTS.max_texts, max_queue),  # a smaller queue admits fewer texts per request, not no server
    )
    search = search_options(beam, num_captions, max_tokens, top_p, top_k, temperature, seed)
    settings = CaptionSettings(modes=parse_modes(mode), k=k, tau=tau, search=search, prompt_k=prompt_k)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        typer.echo(f"ragcap: warning: listening on {host} without --api-key: anyone who reaches this address can use it", err=True)
    if port != 0:  # a busy port is refused now, not after the models have loaded (minutes with large ones)
        from ragcap.serve.server import bind

        bind(host, port).close()
    with store(qdrant_url, qdrant_api_key) as st:
        # The text tower too: /v1/caption/text and /v1/search take texts.
        captioner = api.load_captioner(st, collection, settings, decoder, lm, model, device, image_only=False, precision=precision)
        announce_runtime(captioner.runtime())
        run(captioner, config)
    typer.echo("ragcap: stopped", err=True)
