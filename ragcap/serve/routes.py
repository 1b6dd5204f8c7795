"""The versioned JSON API, /v1: caption, search, collections, info; health/ready; /metrics.

Each route checks what the request may ask for, hands the work to the Service, and shapes the
answer; the OpenAI-style chat endpoint (ragcap.serve.chat) is another set of functions over the
same Service calls. Uploads are read as bytes: no path from a request is ever opened.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Security, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from ragcap import __version__
from ragcap.serve.batching import JobTiming
from ragcap.serve.errors import ApiError, classify, error_response
from ragcap.serve.schemas import (
    CaptionedImage, CaptionedText, CaptionResponse, CollectionRow, CollectionsResponse, ErrorBody, InfoResponse, Limits,
    Neighbour, SearchRequest, SearchResponse, Status, TextCaptionRequest, TextCaptionResponse, Timing,
)
from ragcap.serve.service import Service

_bearer = HTTPBearer(auto_error=False, description="The server's --api-key as `Authorization: Bearer KEY`.")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Or the key in an `X-API-Key` header.")


def service(request: Request) -> Service:
    return request.app.state.service


Svc = Annotated[Service, Depends(service)]


def require_api_key(
    svc: Svc,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header: Annotated[str | None, Security(_header)],
) -> None:
    expected = svc.config.api_key
    if expected is None:
        return
    given = bearer.credentials if bearer is not None else header
    # compare_digest: the time taken says nothing about how much of a wrong key was right.
    if given is None or not secrets.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "this server needs its API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`",
                       {"WWW-Authenticate": "Bearer"})


ERRORS = {status: {"model": ErrorBody} for status in (401, 413, 422, 503, 504)}
api = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERRORS)
probes = APIRouter(prefix="/v1", tags=["probes"])  # open: orchestrators probe without a key
monitoring = APIRouter(dependencies=[Depends(require_api_key)], tags=["probes"])


def timing(started: float, job: JobTiming) -> Timing:
    return Timing(total_ms=round((time.perf_counter() - started) * 1000, 1), queue_ms=round(job.queue_s * 1000, 1),
                  compute_ms=round(job.compute_s * 1000, 1), batch_items=job.batch_items)


@api.post("/caption", response_model=CaptionResponse, tags=["caption"])
async def caption(
    svc: Svc,
    images: Annotated[list[UploadFile], File(description="One or more images (any format Pillow reads).")],
    modes: Annotated[str | None, Form(description="Comma-separated modes, e.g. pd,clipre (default: the server's).")] = None,
    k: Annotated[int | None, Form(ge=1, description="Neighbours in the pd projection (default: the server's).")] = None,
    neighbours: Annotated[int | None, Form(ge=0, description="Also return this many retrieved captions.")] = None,
    num_captions: Annotated[int | None, Form(ge=1, description="Captions per image and mode: the n best beams, or n samples (default: the server's).")] = None,
) -> CaptionResponse:
    """Caption uploaded images with one or more modes.

    One image that cannot be used is answered with its error (413 over the pixel limit, 422
    not an image); in a request of several, each such image gets an `error` and the others
    their captions.
    """
    started = time.perf_counter()
    if len(images) > svc.config.max_images:
        raise ApiError(413, "too_many_images", f"{len(images)} images in one request; send at most {svc.config.max_images}")
    settings = svc.settings(modes, k, neighbours, num_captions)
    uploads = [(await f.read(), (f.filename or f"image {i}")[:255]) for i, f in enumerate(images)]
    results, job = await svc.caption_images(uploads, settings)
    failed = [r[0].exception for r in results if r[0].error is not None]
    if len(uploads) == 1 and failed:
        raise failed[0]
    for exc in failed:
        svc.metrics.errors.labels(classify(exc)[1]).inc()
    return CaptionResponse(collection=svc.collection, modes=list(settings.modes), timing=timing(started, job),
                           results=[CaptionedImage.of(r, file=name) for r, (_, name) in zip(results, uploads)])


@api.post("/caption/text", response_model=TextCaptionResponse, tags=["caption"])
async def caption_text(svc: Svc, body: TextCaptionRequest) -> TextCaptionResponse:
    """Caption from texts instead of images (the same modes, from a text embedding)."""
    started = time.perf_counter()
    if len(body.texts) > svc.config.max_texts:
        raise ApiError(413, "too_many_texts", f"{len(body.texts)} texts in one request; send at most {svc.config.max_texts}")
    long = [i for i, t in enumerate(body.texts) if len(t) > svc.config.max_text_chars]
    if long:
        raise ApiError(422, "invalid_request", f"text {long[0]} has {len(body.texts[long[0]])} characters; "
                       f"at most {svc.config.max_text_chars} are read (CLIP reads 77 tokens)")
    blank = [i for i, t in enumerate(body.texts) if not t.strip()]
    if blank:  # refused here: in the model thread it would fail the other requests batched with it
        raise ApiError(422, "invalid_request", f"text {blank[0]} is empty (or only spaces): send words to caption from")
    settings = svc.settings(body.modes, body.k, body.neighbours, body.num_captions)
    results, job = await svc.caption_texts(body.texts, settings)
    return TextCaptionResponse(collection=svc.collection, modes=list(settings.modes), timing=timing(started, job),
                               results=[CaptionedText.of(r, text=t) for r, t in zip(results, body.texts)])


def _search_response(svc: Service, started: float, found, job: JobTiming, kind: str) -> SearchResponse:
    if found.exception is not None:
        raise found.exception
    neighbours = [Neighbour(caption=h.payload.get("caption", ""), score=float(h.score), payload=h.payload) for h in found.neighbours]
    return SearchResponse(collection=svc.collection, query=found.source, kind=kind, neighbours=neighbours, timing=timing(started, job))


@api.post("/search", response_model=SearchResponse, tags=["search"])
async def search_text(svc: Svc, body: SearchRequest) -> SearchResponse:
    """The captions nearest to a text."""
    started = time.perf_counter()
    if len(body.text) > svc.config.max_text_chars:
        raise ApiError(422, "invalid_request", f"the text has {len(body.text)} characters; at most {svc.config.max_text_chars} are read")
    if not body.text.strip():
        raise ApiError(422, "invalid_request", "the text is only spaces: send words to search for")
    found, job = await svc.search(body.text, body.k)
    return _search_response(svc, started, found, job, "text")


@api.post("/search/image", response_model=SearchResponse, tags=["search"])
async def search_image(
    svc: Svc,
    image: Annotated[UploadFile, File(description="The query image.")],
    k: Annotated[int, Form(ge=1, description="Number of neighbours.")] = 10,
) -> SearchResponse:
    """The captions nearest to an uploaded image."""
    started = time.perf_counter()
    found, job = await svc.search((await image.read(), (image.filename or "image")[:255]), k)
    return _search_response(svc, started, found, job, "image")


@api.get("/collections", response_model=CollectionsResponse, tags=["memory"])
async def collections(svc: Svc) -> CollectionsResponse:
    """Every collection in the store, with its size and embedder; `served` marks this server's."""
    rows = []
    for info in await svc.collections():
        extra = {k: v for k, v in vars(info).items() if k not in ("name", "points", "embedder", "vector_dtype")}
        rows.append(CollectionRow(name=info.name, points=info.points, vectors=info.vector_dtype,
                                  embedder=info.embedder.spec if info.embedder else None,
                                  dim=info.embedder.dim if info.embedder else None, served=info.name == svc.collection, **extra))
    return CollectionsResponse(collections=rows)


@api.get("/info", response_model=InfoResponse, tags=["memory"])
async def info(svc: Svc) -> InfoResponse:
    """What this server captions with, its defaults and its limits (the web page reads it)."""
    c = svc.config
    return InfoResponse(
        version=__version__, collection=svc.collection, embedder=svc.captioner.embedder.info.spec, **svc.runtime,
        modes=list(svc.captioner.settings.modes), available_modes=svc.available_modes, k=svc.captioner.k,
        api_key_required=c.api_key is not None,
        limits=Limits(max_upload_bytes=c.max_upload_bytes, max_pixels=c.max_pixels, max_images=c.max_images,
                      max_texts=c.max_texts, max_text_chars=c.max_text_chars, max_k=c.max_k,
                      max_neighbours=c.max_neighbours, timeout_s=c.timeout_s),
    )


@probes.get("/health", response_model=Status)
async def health() -> Status:
    """Liveness: the process answers."""
    return Status(status="ok")


@probes.get("/ready", response_model=Status, responses={503: {"model": ErrorBody}})
async def ready(request: Request, svc: Svc):
    """Readiness: models loaded, the collection there, not shutting down, and room in the queue."""
    if not svc.ready:
        return error_response(request, 503, "not_ready", "starting or shutting down")
    if (missing := await svc.collection_problem()) is not None:
        return error_response(request, 503, "collection_unavailable", missing)
    if svc.batcher.pending >= svc.config.max_queue:
        return error_response(request, 503, "overloaded", f"the queue is full ({svc.batcher.pending} items)", {"Retry-After": "1"})
    return JSONResponse(Status(status="ready", pending=svc.batcher.pending, max_queue=svc.config.max_queue).model_dump())


@monitoring.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(svc: Svc) -> Response:
    """Prometheus metrics: requests, errors, latency, batch sizes, queue."""
    body, media = svc.metrics.render()
    return Response(body, media_type=media)
