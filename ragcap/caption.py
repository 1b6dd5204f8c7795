"""Captioning: inputs -> embeddings -> one batched Qdrant query -> every requested mode.

Inputs stream through in batches (load + encode a batch, one batched search, one batched
decode), so memory stays bounded whatever the folder size, and each image is encoded once
however many modes run. Modes (DeCap's table, plus SmallCap):
    pd      decode DeCap's projection of the query onto the memory's text embeddings
    nnd     decode the nearest caption's stored embedding
    clipre  return the nearest caption itself
    vd      decode the query embedding directly (no memory: shows the modality gap)
    prompt  SmallCap: complete "Similar images show ... This image shows" with a causal LM
"""

from __future__ import annotations

import glob
import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ragcap.errors import ImageError, RagcapError
from ragcap.images import IMAGE_EXTENSIONS, load_image
from ragcap.retrieve import DEFAULT_TAU, FullMemory, project_hits
from ragcap.store import Hit, Store

MODES = ("pd", "nnd", "clipre", "vd", "prompt")
DECODER_MODES = ("pd", "nnd", "vd")
MEMORY_MODES = ("pd", "nnd", "clipre", "prompt")

# Top-k for the projection. With tau = 0.01 a neighbour 0.05 less similar than the best
# weighs e^-5 ~ 0.7% as much, yet when similarities bunch together (512-d random vectors,
# the worst case) 256 neighbours left cosine 0.998 to DeCap's exact whole-memory projection
# and 1024 leave 0.9998 (benchmarks/caption.py), for ~20% of pd's speed.
DEFAULT_K = 1024
PROMPT_SEARCH_FACTOR = 3  # retrieve 3x --prompt-k so skipping over-long captions still leaves k


@dataclass
class CaptionSettings:
    modes: tuple[str, ...] = ("pd",)
    k: int | None = None  # None: DEFAULT_K, or the whole collection when it is smaller
    tau: float = DEFAULT_TAU
    beam_size: int = 1  # 1 = greedy, as DeCap decodes
    max_tokens: int | None = None  # decoder length cap; None = the decoder's training length
    prompt_k: int = 4  # SmallCap puts 4 retrieved captions in the prompt
    prompt_beam: int = 3
    prompt_max_new_tokens: int = 25
    full_memory: bool = False  # exact pd over every stored caption instead of the top k
    batch_size: int = 32
    neighbours: int = 0  # report this many retrieved captions with scores (0 = none)


@dataclass
class CaptionResult:
    source: str  # image path, or the query text with --text
    mode: str | None = None
    caption: str | None = None
    error: str | None = None
    neighbours: list[tuple[str, float]] | None = None


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise RagcapError(f"unknown mode {', '.join(unknown) or text!r}; choose from {', '.join(MODES)} (comma-separated)")
    return modes


def iter_inputs(inputs: Sequence[str]) -> Iterator[str]:
    """Image files, directories (recursive, by extension), globs, @list files and '-' (stdin)."""
    for item in inputs:
        if item == "-":
            yield from (line.strip() for line in sys.stdin if line.strip())
        elif item.startswith("@"):
            with open(item[1:], encoding="utf-8") as lines:
                yield from (line.strip() for line in lines if line.strip())
        elif os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                        yield os.path.join(root, name)
        elif glob.has_magic(item):
            yield from sorted(glob.glob(item, recursive=True))
        else:
            yield item  # a missing file is reported per file, not fatal to the batch


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class Captioner:
    """Captions batches of queries against one collection with the requested modes."""

    def __init__(self, store: Store, collection: str, embedder, settings: CaptionSettings, decoder=None, prompter=None):
        self.store, self.collection, self.embedder, self.settings = store, collection, embedder, settings
        self.decoder, self.prompter = decoder, prompter
        modes = set(settings.modes)
        if modes & set(DECODER_MODES) and decoder is None:
            raise RagcapError("modes pd, nnd and vd need a trained decoder: pass --decoder DIR (see `ragcap train-decoder`)")
        if "prompt" in modes and prompter is None:
            raise RagcapError("mode prompt needs a language model: pass --lm NAME_OR_DIR")
        self.search_k = 0
        if modes & set(MEMORY_MODES) or settings.neighbours:
            store.check_embedder(collection, embedder.info)
            size = store.count(collection)
            if size == 0:
                raise RagcapError(f"collection '{collection}' is empty: fill it with `ragcap ingest`")
            if settings.k is not None and settings.k > size:
                raise RagcapError(f"--k {settings.k} is larger than collection '{collection}' ({size} captions); use --k {size} or less")
            self.k = min(DEFAULT_K, size) if settings.k is None else settings.k
            wanted = max(
                self.k if "pd" in modes and not settings.full_memory else 1,
                settings.prompt_k * PROMPT_SEARCH_FACTOR if "prompt" in modes else 1,
                settings.neighbours,
            )
            self.search_k = min(wanted, size)
        self.full_memory = FullMemory(store, collection) if settings.full_memory and "pd" in modes else None

    def caption_images(self, paths: Iterable[str]) -> Iterator[CaptionResult]:
        """Results in input order: a file that fails to load gets one error result in its place."""
        per_input = len(self.settings.modes)
        for chunk in _chunks(paths, self.settings.batch_size):
            images, errors = [], {}
            for i, path in enumerate(chunk):
                try:
                    images.append(load_image(path))
                except ImageError as err:
                    errors[i] = CaptionResult(source=path, error=str(err))
            loaded = [path for i, path in enumerate(chunk) if i not in errors]
            results = iter(self._caption(loaded, self.embedder.encode_images(images)) if images else [])
            for i in range(len(chunk)):
                if i in errors:
                    yield errors[i]
                else:
                    yield from itertools.islice(results, per_input)

    def caption_texts(self, texts: Sequence[str]) -> Iterator[CaptionResult]:
        for chunk in _chunks(texts, self.settings.batch_size):
            yield from self._caption(chunk, self.embedder.encode_text(chunk).vectors)

    def _caption(self, sources: list[str], queries: np.ndarray) -> list[CaptionResult]:
        settings = self.settings
        needs_vectors = "nnd" in settings.modes or ("pd" in settings.modes and self.full_memory is None)
        hits: list[list[Hit]] = (
            self.store.search(self.collection, queries, self.search_k, with_vectors=needs_vectors) if self.search_k else []
        )
        captions: dict[str, list[str]] = {}
        prefixes = {}
        if "pd" in settings.modes:
            if self.full_memory is not None:
                prefixes["pd"] = self.full_memory.project(queries, settings.tau)
            else:
                prefixes["pd"] = np.stack([project_hits(h[: self.k], settings.tau) for h in hits])
        if "nnd" in settings.modes:
            prefixes["nnd"] = np.stack([h[0].vector for h in hits])
        if "vd" in settings.modes:
            prefixes["vd"] = queries
        if prefixes:
            decoded = self.decoder.generate(
                torch.from_numpy(np.concatenate(list(prefixes.values())).astype(np.float32)),
                beam_size=settings.beam_size,
                max_tokens=settings.max_tokens,
            )
            for i, mode in enumerate(prefixes):
                captions[mode] = decoded[i * len(sources) : (i + 1) * len(sources)]
        if "clipre" in settings.modes:
            captions["clipre"] = [h[0].payload["caption"] for h in hits]
        if "prompt" in settings.modes:
            captions["prompt"] = self.prompter.caption(
                [[hit.payload["caption"] for hit in h] for h in hits],
                k=settings.prompt_k,
                beam_size=settings.prompt_beam,
                max_new_tokens=settings.prompt_max_new_tokens,
            )
        results = []
        for i, source in enumerate(sources):
            neighbours = None
            if settings.neighbours:
                neighbours = [(h.payload["caption"], float(h.score)) for h in hits[i][: settings.neighbours]]
            for mode in settings.modes:
                results.append(CaptionResult(source=source, mode=mode, caption=captions[mode][i], neighbours=neighbours))
        return results
