"""The loaded resources and what requests may ask of them: every route is a thin layer over this.

One Service per process holds the store, the embedder and the decoders (a Captioner), loaded
once, and a Batcher that runs them on one model thread. Requests arrive as data (uploaded
bytes, texts): nothing a request says is ever opened as a path.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Hashable, Sequence

from ragcap import api
from ragcap.caption import CaptionResult, CaptionSettings, Captioner
from ragcap.errors import OptionError
from ragcap.modes import MODES, parse_modes
from ragcap.serve.batching import Batcher, JobTiming
from ragcap.serve.config import ServeConfig
from ragcap.serve.metrics import Metrics
from ragcap.store import CollectionInfo
from ragcap.util import chunks

PROBE_TIMEOUT_S = 2.0  # readiness probes time out in seconds (Kubernetes' default is 1 s per try)


class Service:
    def __init__(self, captioner: Captioner, config: ServeConfig):
        self.config = config
        # A full batch is one pass of the captioner; uploads over the pixel limit are refused.
        self.captioner = captioner.with_settings(replace(captioner.settings, batch_size=config.max_batch, max_pixels=config.max_pixels))
        loaded = {"decoder": captioner.decoder is not None, "lm": captioner.prompter is not None, "smallcap": captioner.smallcap is not None, None: True}
        self.available_modes = [name for name, mode in MODES.items() if loaded[mode.needs]]
        self.runtime = captioner.runtime()  # device and precision, for /v1/info
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ragcap-model")
        self.metrics = Metrics(lambda: self.batcher.pending)
        self.batcher = Batcher(self._run, self.executor, config.max_batch, config.max_wait_s, config.max_queue, self._observe)
        self.ready = False

    @property
    def collection(self) -> str:
        return self.captioner.collection

    async def start(self) -> None:
        self.batcher.start()
        self.ready = True

    async def stop(self) -> None:
        """Finish what is queued, then release the model thread (the caller closes the store)."""
        self.ready = False
        await self.batcher.close()
        self.executor.shutdown(wait=True)

    # -- what requests ask for

    def settings(self, modes: str | Sequence[str] | None, k: int | None, neighbours: int | None,
                 num_captions: int | None = None, **decoding) -> CaptionSettings:
        """The captioner's settings with a request's choices, checked against the limits.
        decoding: SearchOptions fields a request sets (max_tokens, temperature, top_p, seed, sample)."""
        base = self.captioner.settings
        if modes is not None and not isinstance(modes, str):
            modes = ",".join(modes)
        chosen = parse_modes(modes) if modes else base.modes
        missing = [m for m in chosen if m not in self.available_modes]
        if missing:
            raise OptionError(f"mode {', '.join(missing)} is not available on this server (its model is not loaded); "
                              f"available: {', '.join(self.available_modes)}")
        if k is not None and not 1 <= k <= self.config.max_k:
            raise OptionError(f"k must be in 1..{self.config.max_k}, got {k}")
        neighbours = base.neighbours if neighbours is None else neighbours
        if not 0 <= neighbours <= self.config.max_neighbours:
            raise OptionError(f"neighbours must be in 0..{self.config.max_neighbours}, got {neighbours}")
        if num_captions is not None and not 1 <= num_captions <= self.config.max_captions:
            raise OptionError(f"the number of captions must be in 1..{self.config.max_captions}, got {num_captions}")
        search = base.search
        if num_captions is not None or decoding:
            chosen_decoding = {"num_return": search.num_return if num_captions is None else num_captions, **decoding}
            if decoding.get("sample"):
                chosen_decoding["beam"] = None  # a server beam default does not forbid a request's sampling
            search = replace(search, **chosen_decoding)
        return replace(base, modes=chosen, k=base.k if k is None else k, neighbours=neighbours, search=search)

    async def caption_images(self, uploads: list[tuple[bytes, str]], settings: CaptionSettings) -> tuple[list[list[CaptionResult]], JobTiming]:
        """Per upload (data, file name): its result for each mode, or one error result."""
        return await self._submit(("images", settings), uploads, alone=_seeded(settings))

    async def caption_texts(self, texts: list[str], settings: CaptionSettings) -> tuple[list[list[CaptionResult]], JobTiming]:
        return await self._submit(("texts", settings), texts, alone=_seeded(settings))

    async def search(self, query: str | tuple[bytes, str], k: int) -> tuple[api.SearchResult, JobTiming]:
        """The k nearest captions to a text, or to an uploaded image given as (data, file name)."""
        if not 1 <= k <= self.config.max_k:
            raise OptionError(f"k must be in 1..{self.config.max_k}, got {k}")
        (result,), timing = await self._submit(("search", k), [query])
        return result, timing

    async def collections(self) -> list[CollectionInfo]:
        listing = asyncio.get_running_loop().run_in_executor(self.executor, self.captioner.store.collections)
        return await self._within_timeout(listing)

    async def collection_problem(self) -> str | None:
        """Why the served collection cannot answer now (dropped by another process, its server
        unreachable), or None. Asked off the model thread so a busy server still answers the probe."""
        try:
            work = asyncio.get_running_loop().run_in_executor(None, self.captioner.store.exists, self.collection)
            if await asyncio.wait_for(work, PROBE_TIMEOUT_S):
                return None
            return f"collection '{self.collection}' no longer exists; ingest it again, or restart with another --collection"
        except asyncio.TimeoutError:
            return f"the store did not say within {PROBE_TIMEOUT_S:g} s whether collection '{self.collection}' exists"
        except Exception as err:  # noqa: BLE001 - an unreachable server says only "not ready"
            return f"the store cannot be asked about collection '{self.collection}' ({type(err).__name__}: {err})"

    async def _submit(self, key: Hashable, items: list, alone: bool = False) -> tuple[list, JobTiming]:
        return await self._within_timeout(self.batcher.submit(key, items, alone))

    async def _within_timeout(self, work):
        """The answer, or TimeoutError saying what to do: 504 rather than a request left hanging."""
        try:
            return await asyncio.wait_for(work, self.config.timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"not answered within the server's timeout of {self.config.timeout_s:g} s (the server "
                               "is busy, or its collection is held by another process); retry later") from None

    # -- on the model thread

    def _run(self, key: tuple, items: list) -> list:
        kind, arg = key
        if kind == "search":
            queries = [q if isinstance(q, str) else q[0] for q in items]
            names = [q if isinstance(q, str) else q[1] for q in items]
            return api.search(self.captioner.store, self.collection, queries, arg, self.captioner.embedder,
                              self.config.max_pixels, names=names)
        captioner = self.captioner.with_settings(arg)
        if kind == "images":
            return list(captioner.caption_each([data for data, _ in items], [name for _, name in items]))
        return list(chunks(captioner.caption_texts(items), len(arg.modes)))

    def _observe(self, key: tuple, items: int, seconds: float) -> None:
        self.metrics.batch_items.labels(key[0]).observe(items)
        self.metrics.batch_seconds.labels(key[0]).observe(seconds)


def _seeded(settings: CaptionSettings) -> bool:
    """A seeded sampling request runs in a batch of its own: its draws come from one generator per
    batch, so other requests in the batch would change them and the same seed would not repeat."""
    return settings.search.sample and settings.search.seed is not None
