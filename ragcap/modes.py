"""The caption modes: what each one needs from the memory, and how it turns an image into a caption.

    pd      decode DeCap's projection of the query onto the memory's text embeddings
    nnd     decode the nearest caption's stored embedding
    clipre  return the nearest caption itself
    vd      decode the query embedding directly (no memory: shows CLIP's modality gap)
    prompt  SmallCap's prompt: complete "Similar images show ... This image shows" with a causal LM
    smallcap  SmallCap itself: that prompt, and a trained cross-attention to the image's patches

Modes that decode an embedding (pd, nnd, vd) give a prefix vector, and the Captioner decodes
the prefixes of all of them in one batched call of whichever decoder kind it loaded; the
others caption from the neighbours themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from ragcap.errors import RagcapError

if TYPE_CHECKING:
    from ragcap.caption import Batch, Captioner


@dataclass(frozen=True)
class Mode:
    name: str
    needs: str | None  # the resource it runs: "decoder" (an embedding decoder), "lm", "smallcap" (a SmallCap model), or None
    memory: bool  # whether it reads the collection at all
    # How many neighbours it retrieves (the captioner knows k, the memory search and prompt settings).
    neighbours: Callable[["Captioner"], int]
    vectors: bool = False
    prefix: Callable[["Batch"], np.ndarray] | None = None  # embedding modes: one vector per query
    captions: Callable[["Batch"], list] | None = None  # other modes: [[Caption, ...] per query]
    help: str = ""


def _pd_prefixes(batch: "Batch") -> np.ndarray:
    from ragcap.retrieve import project_hits

    if batch.projections is not None:  # the exact projection over every stored caption
        return batch.projections
    run = batch.captioner
    return np.stack([project_hits(h[: run.k], run.settings.tau) for h in batch.hits])


def _clipre(batch: "Batch") -> list:
    """The nearest caption; with several captions asked for, the n nearest."""
    from ragcap.decoders import Caption

    n = batch.captioner.settings.search.num_return
    return [[Caption(hit.payload["caption"], float(hit.score)) for hit in h[:n]] for h in batch.hits]


def _prompt(batch: "Batch") -> list:
    run = batch.captioner
    return run.prompter.caption([[hit.payload["caption"] for hit in h] for h in batch.hits], k=run.settings.prompt_k, options=run.settings.search)


def _smallcap(batch: "Batch") -> list:
    from ragcap.decoders.lm import lm_batch
    from ragcap.decoders.smallcap import SmallCapInput

    if not batch.images:
        raise RagcapError("mode smallcap captions images (it attends to the image itself), not --text queries")
    decoder = batch.captioner.smallcap
    neighbours = [[hit.payload["caption"] for hit in hits] for hits in batch.hits]
    rows = lm_batch(len(batch.images), decoder.device)
    found = []
    for start in range(0, len(batch.images), rows):
        patches = decoder.encode_patches(batch.images[start : start + rows])
        found += decoder.caption(SmallCapInput(patches, neighbours[start : start + rows]), batch.captioner.settings.search)
    return found


# Prompt mode retrieves 3x its k, so that skipping over-long captions (> 25 GPT-2 tokens) still leaves k.
PROMPT_SEARCH_FACTOR = 3

MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("pd", memory=True, needs="decoder", neighbours=lambda run: 0 if run.exact is not None else run.k, vectors=True, prefix=_pd_prefixes,
             help="decode DeCap's projection onto the memory (DeCap)"),
        Mode("nnd", memory=True, needs="decoder", neighbours=lambda run: 1, vectors=True, prefix=lambda b: np.stack([h[0].vector for h in b.hits]),
             help="decode the nearest caption's embedding (DeCap baseline)"),
        Mode("clipre", memory=True, needs=None, neighbours=lambda run: run.settings.search.num_return, captions=_clipre, help="the nearest caption (DeCap baseline)"),
        Mode("vd", memory=False, needs="decoder", neighbours=lambda run: 0, prefix=lambda b: b.queries,
             help="decode the query embedding itself: CLIP's modality gap (DeCap baseline)"),
        Mode("prompt", memory=True, needs="lm", neighbours=lambda run: run.settings.prompt_k * PROMPT_SEARCH_FACTOR, captions=_prompt,
             help="SmallCap's prompt completed by a causal LM"),
        Mode("smallcap", memory=True, needs="smallcap", neighbours=lambda run: run.smallcap.config.k * PROMPT_SEARCH_FACTOR, captions=_smallcap,
             help="SmallCap: retrieved captions in the prompt, cross-attention to the image (`train-smallcap`)"),
    )
}


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise RagcapError(f"unknown mode {', '.join(unknown) or text!r}; choose from {', '.join(MODES)} (comma-separated)")
    return modes


def modes_needing(resource: str, modes) -> list[str]:
    return [m for m in modes if MODES[m].needs == resource]
