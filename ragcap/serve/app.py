"""The ASGI application: the /v1 API (and its OpenAI-style chat), the web page, /metrics, and what wraps every request.

FastAPI on uvicorn: typed request parsing and validation, the OpenAPI schema generated from the
same types (/openapi.json), multipart uploads, CORS and lifespan hooks are the framework's; this
module adds the page, the body-size limit (as JSON) and the request metrics.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragcap import __version__
from ragcap.caption import Captioner
from ragcap.serve import errors
from ragcap.serve.chat import chat
from ragcap.serve.config import ServeConfig
from ragcap.serve.metrics import Metrics
from ragcap.serve.routes import api, monitoring, probes
from ragcap.serve.service import Service

# The page loads nothing from elsewhere and runs no inline script, so a strict policy costs
# nothing and stops a caption or file name from ever running as code.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}


def _static(name: str) -> str:
    return (resources.files("ragcap.serve") / "static" / name).read_text(encoding="utf-8")


def page_routes() -> APIRouter:
    """The web page, served from memory (no file is looked up from a request path)."""
    router = APIRouter(include_in_schema=False)
    index = _static("index.html")
    files = {name: (_static(name), media) for name, media in STATIC.items()}

    @router.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(index, headers=PAGE_HEADERS)

    def serve_file(text: str, media: str):
        async def get() -> Response:
            return Response(text, media_type=media, headers=PAGE_HEADERS)

        return get

    for name, (text, media) in files.items():
        router.add_api_route(f"/static/{name}", serve_file(text, media))
    return router


class RequestMetrics:
    """Counts every answer by route, method and status, and times it (pure ASGI: sees every status)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: frozenset[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"  # unknown paths stay one label
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


class BodyLimit:
    """Bodies over the limit are refused with 413: an announced one (Content-Length) before a
    byte is read, a streamed (chunked) one as soon as the bytes read pass the limit.

    Starlette has a limit of its own, but it answers in plain text; every error here is JSON.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, max_bytes: int):
        self.app, self.metrics, self.max_bytes = app, metrics, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            self.metrics.errors.labels("request_too_large").inc()
            message = f"the request body has {int(length):,} bytes; this server takes at most {self.max_bytes:,}"
            response = JSONResponse({"error": {"type": "request_too_large", "message": message}}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # raised inside the route, so the JSON error handlers answer it
                raise HTTPException(413, f"the request body is over this server's limit of {self.max_bytes:,} bytes")
            return message

        await self.app(scope, counted, send)


def create_app(captioner: Captioner, config: ServeConfig | None = None) -> FastAPI:
    """The server for one loaded Captioner (see ragcap.api.load_captioner); run it with any ASGI server."""
    config = config or ServeConfig()
    svc = Service(captioner, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()  # after uvicorn has let in-flight requests finish

    app = FastAPI(
        title="ragcap", version=__version__, lifespan=lifespan,
        description="Retrieval-augmented image captioning with a Qdrant caption memory.",
        # Swagger UI and ReDoc load their scripts from a CDN: not on an offline or private server.
        docs_url=None, redoc_url=None,
    )
    app.state.service = svc
    errors.install(app)
    routers = (api, chat, probes, monitoring, page_routes())
    for router in routers:
        app.include_router(router)
    paths = frozenset([app.openapi_url] + [route.path for router in routers for route in router.routes])
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])
    app.add_middleware(BodyLimit, metrics=svc.metrics, max_bytes=config.max_upload_bytes)
    app.add_middleware(RequestMetrics, metrics=svc.metrics, routes=paths)
    return app
