"""OpenAI's chat-completions protocol over the same Service: applications that speak it caption with ragcap.

    POST /v1/chat/completions   the last user message's image_url part -> the caption as the
                                assistant's message; `model` names a mode (GET /v1/models), `n`
                                asks for n captions (one choice each), `stream` answers as
                                server-sent events
    GET  /v1/models             the modes this server can run

The image comes inline as a data: URL (or bare base64), as OpenAI's clients send local images.
An http(s) URL is fetched only from a host in ServeConfig.image_url_hosts (none by default).
Text parts are read by no mode, so they are ignored. Errors are the service's own JSON
({"error": {"type", "message"}}), the shape OpenAI's clients read the message from.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
from typing import Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ragcap.modes import MODES
from ragcap.serve.errors import ApiError
from ragcap.serve.routes import ERRORS, Svc, require_api_key
from ragcap.serve.service import Service

chat = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERRORS, tags=["openai"])
STARTED = int(time.time())  # the `created` of every model: when this server process loaded them


class ImageURL(BaseModel):
    url: str = Field(description="data:image/...;base64,... (or bare base64); http(s) only for allowed hosts.")
    detail: str | None = Field(None, description="Accepted and ignored: CLIP sees every image at its own resolution.")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: nothing a caption reads
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    # OpenAI's clients send fields a captioner has no use for (user, frequency_penalty, ...);
    # they are accepted and ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(extra="allow")
    model: str = Field(description="A mode of GET /v1/models: pd, nnd, clipre, vd or prompt.")
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = Field(1, ge=1, description="Captions to return, one choice each: the n best beams, or n samples.")
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="The newer name of max_tokens.")
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False, description="> 0 samples at this temperature; 0 or absent: the server's decoding.")
    top_p: float | None = Field(None, gt=0, le=1, description="< 1 samples from the nucleus.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Sampling only: the same seed gives the same captions.")
    stream: bool = False


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop"] = "stop"
    logprobs: None = None
    score: float | None = Field(None, description="ragcap's score of the caption (decoder log-prob, or clipre's cosine).")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = STARTED
    owned_by: str = "ragcap"
    description: str = Field(description="What the mode does.")
    decoder: str | None = Field(None, description="What it runs: a decoder kind (decap, clipcap), lm (a causal LM), or nothing.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@chat.get("/models", response_model=ModelList)
async def models(svc: Svc) -> ModelList:
    """The modes this server can run, as OpenAI-style models (a chat request's `model`)."""
    return ModelList(data=[ModelCard(id=name, description=MODES[name].help, decoder=_runs(svc, name)) for name in svc.available_modes])


@chat.post("/chat/completions", response_model=ChatCompletion, responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(svc: Svc, body: ChatRequest):
    """Caption the image of the last user message with the mode `model` names."""
    if body.model not in svc.available_modes:
        raise ApiError(404, "model_not_found", f"model {body.model!r} is not served here; "
                       f"available: {', '.join(svc.available_modes)} (GET /v1/models)")
    image = await _image(svc, body.messages)
    decoding = {}
    if body.max_tokens or body.max_completion_tokens:
        decoding["max_tokens"] = body.max_completion_tokens or body.max_tokens
    if body.temperature or (body.top_p is not None and body.top_p < 1):
        decoding.update(sample=True, temperature=body.temperature or 1.0, top_p=body.top_p or 1.0, seed=body.seed)
    settings = svc.settings([body.model], None, None, body.n, **decoding)
    (results,), _ = await svc.caption_images([(image, "image_url")], settings)
    result = results[0]
    if result.error is not None:
        raise result.exception
    found = result.alternatives or [(result.caption, result.score)]
    answer = ChatCompletion(id=f"chatcmpl-{secrets.token_hex(12)}", created=int(time.time()), model=body.model,
                            choices=[Choice(index=i, message=AssistantMessage(content=text), score=score) for i, (text, score) in enumerate(found)])
    if body.stream:
        return StreamingResponse(_events(answer), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return answer


def _runs(svc: Service, mode: str) -> str | None:
    needs = MODES[mode].needs
    return svc.captioner.decoder.kind if needs == "decoder" else needs


def _events(answer: ChatCompletion):
    """The completion as OpenAI streams it: per choice its whole caption as one delta, then its
    finish_reason, then [DONE]. A caption is decoded whole in a batch, so nothing comes sooner."""
    base = {"id": answer.id, "object": "chat.completion.chunk", "created": answer.created, "model": answer.model}
    for choice in answer.choices:
        for delta, finish in (({"role": "assistant", "content": choice.message.content}, None), ({}, "stop")):
            chunk = {**base, "choices": [{"index": choice.index, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


async def _image(svc: Service, messages: list[ChatMessage]) -> bytes:
    """The bytes of the one image in the last user message."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        raise ApiError(422, "invalid_request", "messages: no user message; send one whose content has an image_url part")
    index = users[-1]
    content = messages[index].content
    parts = [(j, p) for j, p in enumerate(content) if p.type == "image_url"] if isinstance(content, list) else []
    if len(parts) != 1:
        raise ApiError(422, "invalid_request", f"messages[{index}]: the last user message has {len(parts)} image_url parts; "
                       "send exactly one image per request (a data: URL, e.g. data:image/jpeg;base64,...)")
    j, part = parts[0]
    field = f"messages[{index}].content[{j}].image_url"
    if part.image_url is None:
        raise ApiError(422, "invalid_request", f"{field}: missing; give {{\"url\": \"data:image/jpeg;base64,...\"}}")
    url = part.image_url.url.strip()
    if url.startswith(("http://", "https://")):
        return await _fetch(svc, url, field)
    payload = url
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(422, "invalid_image", f"{field}: a data: URL must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_image", f"{field}: neither an http(s) URL nor valid base64 image data "
                       "(send data:image/jpeg;base64,... with the file's bytes)") from None


async def _fetch(svc: Service, url: str, field: str) -> bytes:
    """An image from an allowed host, at most the upload limit, within image_url_timeout_s in all,
    without following redirects (a redirect could lead to a host that is not allowed)."""
    host = urlsplit(url).hostname or ""
    if host not in svc.config.image_url_hosts:
        allowed = ", ".join(svc.config.image_url_hosts) or "none"
        raise ApiError(422, "image_url_not_allowed", f"{field}: this server does not fetch images from {host or url!r} "
                       f"(hosts allowed: {allowed}); send the image inline as a data: URL")
    seconds = svc.config.image_url_timeout_s
    try:
        # httpx's timeout bounds each read, so a host sending a byte at a time would hold the
        # request (and a shutdown) indefinitely; the whole download gets the limit instead.
        return await asyncio.wait_for(_download(url, field, svc.config.max_upload_bytes, seconds), seconds)
    except asyncio.TimeoutError:
        raise ApiError(422, "image_url_unreachable", f"{field}: {url} did not send the image within {seconds:g} s; "
                       "send it inline as a data: URL") from None


async def _download(url: str, field: str, limit: int, seconds: float) -> bytes:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=seconds, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise ApiError(422, "image_url_unreachable", f"{field}: {url} answered HTTP {response.status_code}")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise ApiError(413, "image_too_large", f"{field}: {url} is over this server's limit of {limit:,} bytes")
                return bytes(data)
    except httpx.HTTPError as err:
        raise ApiError(422, "image_url_unreachable", f"{field}: {url} could not be fetched ({type(err).__name__}: {err})") from None
