"""What `ragcap serve` is allowed to do: address, batching, limits. Every default says why."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ragcap.errors import OptionError


@dataclass(frozen=True)
class ServeConfig:
    # Loopback only: nothing outside this machine reaches the server unless asked (--host 0.0.0.0).
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port (tests, benchmarks); the bound one is printed
    api_key: str | None = None  # when set, every /v1 route but health/ready and /metrics need it
    cors_origins: tuple[str, ...] = ()  # no CORS headers at all unless origins are named

    # Dynamic batching. A 32-image pd batch takes ~4 s on a 2-core CPU, so a request that arrives
    # behind one waits little; the CLI's 128 decode a little faster per image but hold the model
    # thread 4x as long. Waiting 10 ms for company costs ~0.3% of such a batch;
    # under load the next batch gathers while one runs, so the wait is rarely taken at all.
    max_batch: int = 32
    max_wait_ms: float = 10.0
    # Images (or texts, or queries) waiting or running. 256 is 8 full batches, about 35 s of pd
    # work on a 2-core CPU, so a queued request still finishes within the timeout; the queue
    # holds encoded uploads, so it takes at most max_queue x max_upload_bytes of memory.
    max_queue: int = 256
    timeout_s: float = 60.0  # a request not answered by then gets 504 (its work is dropped if not started)

    # Limits on what a request may send.
    max_upload_bytes: int = 20 * 2**20  # a whole request body: a 12 MP JPEG is ~5 MB, a 24 MP PNG ~15 MB
    # 25 MP holds a 24 MP camera photo; a model never needs more (CLIP looks at 224x224), and a
    # batch of 32 such images decodes to ~2.4 GB, so this also bounds the decoding memory.
    max_pixels: int = 25_000_000
    max_images: int = 32  # per request: one full batch
    max_texts: int = 256  # per text request; texts are ~100x cheaper than images to embed
    max_text_chars: int = 2000  # CLIP reads 77 tokens (~300 characters); more is truncated anyway
    max_k: int = 4096  # pd neighbours a request may ask for (default 1024; cost grows with k)
    max_neighbours: int = 100  # retrieved captions a response may list
    # Captions per input a request may ask for (num_captions, or n in chat): n captions are a
    # beam of n, and a batch's decoding cost grows about linearly with it.
    max_captions: int = 16
    # Hosts whose http(s) image URLs a chat request may name. None by default: a server that
    # fetches whatever a request names can be made to reach hosts only it can reach (SSRF);
    # clients send images inline as data: URLs instead.
    image_url_hosts: tuple[str, ...] = ()
    image_url_timeout_s: float = 10.0  # fetching one allowed image URL

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000

    def __post_init__(self):
        # Host names compare without case (a URL's host is read lower-cased).
        object.__setattr__(self, "image_url_hosts", tuple(h.strip().lower() for h in self.image_url_hosts))
        positive = {
            "max_batch": self.max_batch, "max_queue": self.max_queue, "timeout_s": self.timeout_s,
            "max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels, "max_images": self.max_images,
            "max_texts": self.max_texts, "max_text_chars": self.max_text_chars, "max_k": self.max_k,
            "max_captions": self.max_captions, "image_url_timeout_s": self.image_url_timeout_s,
        }
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):  # NaN compares false with everything
                raise OptionError(f"{_named(name)} must be a positive number, got {value}")
        if not (math.isfinite(self.max_wait_ms) and self.max_wait_ms >= 0):
            raise OptionError(f"{_named('max_wait_ms')} must be >= 0, got {self.max_wait_ms}")
        for field in ("max_images", "max_texts"):  # a request larger than the queue would be told to retry forever
            if self.max_queue < (most := getattr(self, field)):
                raise OptionError(f"{_named('max_queue')} {self.max_queue} is below {_named(field)} {most}, what one request "
                                  f"may send; raise it to at least {most}, or lower {_named(field)}")
        if self.max_neighbours < 0:
            raise OptionError(f"{_named('max_neighbours')} must be >= 0, got {self.max_neighbours}")
        if not 0 <= self.port <= 65535:
            raise OptionError(f"{_named('port')} must be in 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise OptionError("the API key is empty: pass a non-empty --api-key (or RAGCAP_API_KEY), or none")
        if self.api_key is not None and self.api_key != self.api_key.strip():
            # HTTP strips a header value's surrounding whitespace: no client could send this key.
            raise OptionError("the API key starts or ends with whitespace (a CRLF .env file?), which no HTTP client can send; "
                              "remove it from --api-key (or RAGCAP_API_KEY)")


# The `ragcap serve` option that sets a field, for messages; the others are set from Python only.
CLI_OPTIONS = {"timeout_s": "--timeout", "max_upload_bytes": "--max-upload-mb", "port": "--port", "max_batch": "--max-batch",
               "max_wait_ms": "--max-wait-ms", "max_queue": "--max-queue", "max_pixels": "--max-pixels",
               "max_images": "--max-images", "max_captions": "--max-captions"}


def _named(field: str) -> str:
    return CLI_OPTIONS.get(field, f"ServeConfig.{field}")
