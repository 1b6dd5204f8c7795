"""Every error answer is JSON, {"error": {"type", "message"}}, with a fitting status; never a traceback.

A message says what is wrong and what to do. Errors that could reveal the server's insides (the
store's address, a bug) are logged on the server and answered with a short message.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ragcap.errors import ImageError, RagcapError, StoreError
from ragcap.images import ImageTooLarge
from ragcap.serve.batching import QueueFull, ShuttingDown

log = logging.getLogger("ragcap.serve")

# (exception, status, type), the most specific first.
ERRORS: list[tuple[type[BaseException], int, str]] = [
    (ImageTooLarge, 413, "image_too_large"),
    (ImageError, 422, "invalid_image"),
    (StoreError, 503, "store_unavailable"),
    (RagcapError, 422, "invalid_request"),
    (QueueFull, 503, "overloaded"),
    (ShuttingDown, 503, "shutting_down"),
    (TimeoutError, 504, "timeout"),
]
HIDDEN = {"store_unavailable": "the caption store is unavailable; the server log says why"}
STATUS_TYPES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers


def classify(exc: BaseException | None) -> tuple[int, str]:
    for cls, status, type_ in ERRORS:
        if isinstance(exc, cls):
            return status, type_
    return 500, "internal_error"


def error_response(request: Request, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    request.app.state.service.metrics.errors.labels(type_).inc()
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc.status, exc.type, exc.message, exc.headers)

    async def known(request: Request, exc: Exception) -> JSONResponse:
        status, type_ = classify(exc)
        if type_ in HIDDEN:
            log.error("%s: %s", type_, exc)
        headers = {"Retry-After": "1"} if status == 503 else None
        return error_response(request, status, type_, HIDDEN.get(type_, str(exc) or type_), headers)

    async def store_failed(request: Request, exc: Exception) -> JSONResponse:
        from ragcap.store.client import server_error

        log.error("the Qdrant server failed: %s", server_error(exc))
        return error_response(request, 503, "store_unavailable", HIDDEN["store_unavailable"], {"Retry-After": "1"})

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors())
        return error_response(request, 422, "invalid_request", problems)

    async def http(request: Request, exc: HTTPException) -> JSONResponse:
        type_ = STATUS_TYPES.get(exc.status_code, "invalid_request" if exc.status_code < 500 else "internal_error")
        return error_response(request, exc.status_code, type_, str(exc.detail), getattr(exc, "headers", None))

    async def bug(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer is sent; the client sees none of it.
        return error_response(request, 500, "internal_error", "internal error; the server log has the details")

    app.add_exception_handler(ApiError, api_error)
    for cls in (RagcapError, QueueFull, ShuttingDown, TimeoutError):
        app.add_exception_handler(cls, known)
    for cls in (UnexpectedResponse, ResponseHandlingException):
        app.add_exception_handler(cls, store_failed)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(Exception, bug)
