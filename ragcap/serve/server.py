"""Running the app: bind the socket, serve with uvicorn, stop gracefully on SIGTERM or Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
from typing import Iterator

from ragcap.caption import Captioner
from ragcap.errors import RagcapError
from ragcap.serve.config import ServeConfig


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a RagcapError that says why not (bound here, not by uvicorn, so that
    a busy port is one clear line and port 0 can tell its caller the port it got)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as err:
        raise RagcapError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port or --host") from None


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def _signals_end_quietly() -> Iterator[None]:
    # uvicorn catches SIGINT/SIGTERM, lets in-flight requests finish, then re-raises the signal
    # to the handler that was there before it. A no-op handler there makes a graceful stop end
    # `serve` normally (the store is closed, exit status 0) instead of by the signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _draining_server(config, service):
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, telling the batcher when shutdown begins: batches then start at once instead
        of waiting for company that can no longer arrive, and the requests in them finish."""

        async def shutdown(self, sockets=None):
            service.batcher.drain()
            await super().shutdown(sockets)

    return DrainingServer(config)


def serve(captioner: Captioner, config: ServeConfig, log_level: str = "info") -> None:
    """Serve until SIGTERM or Ctrl-C; requests in flight then finish (up to the request timeout)."""
    import uvicorn

    from ragcap.serve.app import create_app

    app = create_app(captioner, config)
    sock = bind(config.host, config.port)
    server = _draining_server(uvicorn.Config(
        app, log_level=log_level, server_header=False,
        timeout_graceful_shutdown=config.timeout_s + 5,  # a request is answered (or timed out) by then
    ), app.state.service)
    print(f"ragcap: serving collection '{captioner.collection}' on {url(sock)}/ (API under /v1, schema at /openapi.json)",
          file=sys.stderr, flush=True)
    with _signals_end_quietly():
        server.run(sockets=[sock])
