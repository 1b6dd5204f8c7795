"""Retrieval from the caption memory, and DeCap's projection of an image into text space.

DeCap (arXiv 2303.03032, eq. 3) replaces the image embedding v by
    p = sum_i softmax(sim(v, t_i) / tau) * t_i,   re-normalised,
over the text embeddings t_i of the memory. A decoder trained only on text embeddings then
sees an input from the distribution it was trained on, which bridges CLIP's modality gap.
ragcap computes it exactly over every stored caption (`ExactMemory`, from a copy of the
collection's vectors kept beside it: ragcap.store.cache), in one pass of matrix products that
also finds each query's nearest captions. For a memory too large for that, it computes it over
the k nearest captions that Qdrant returns (`project_hits`): with tau = 0.01 the weights fall
off so fast that they carry almost all of the mass. `FullMemory` is the formula written out in
float64, for checking.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ragcap.store import Hit, Store
from ragcap.store.cache import load_vectors

DEFAULT_TAU = 0.01  # DeCap's temperature


def softmax_weights(scores: np.ndarray, tau: float) -> np.ndarray:
    """softmax(scores / tau) along the last axis, computed stably in float64."""
    logits = np.asarray(scores, dtype=np.float64) / tau
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=-1, keepdims=True)


def project(scores: np.ndarray, vectors: np.ndarray, tau: float = DEFAULT_TAU) -> np.ndarray:
    """DeCap's projection for one query: scores (k,), vectors (k, d) -> unit vector (d,)."""
    mixed = softmax_weights(scores, tau) @ np.asarray(vectors, dtype=np.float64)
    return (mixed / np.linalg.norm(mixed)).astype(np.float32)


def project_hits(hits: list[Hit], tau: float = DEFAULT_TAU) -> np.ndarray:
    """The projection over the neighbours a store returned (searched with_vectors=True)."""
    scores = np.array([h.score for h in hits])
    return project(scores, np.stack([h.vector for h in hits]), tau)


class FullMemory:
    """Every vector of a collection in RAM, for the exact (whole-memory) DeCap projection."""

    def __init__(self, store: Store, collection: str):
        chunks = [vectors for _, vectors, _ in store.scroll(collection, with_vectors=True)]
        self.vectors = np.concatenate(chunks).astype(np.float32)

    def project(self, queries: np.ndarray, tau: float = DEFAULT_TAU) -> np.ndarray:
        """Exact projections for queries (b, d) -> (b, d)."""
        return np.stack([project(self.vectors @ q, self.vectors, tau) for q in np.asarray(queries, np.float32)])


class ExactMemory:
    """Every vector of a collection, searched exactly by batched matrix products: DeCap's
    projection over the whole memory and each query's nearest captions, in one pass.

    The vectors stay as stored (float16 by default: half the memory) and are read in blocks,
    each widened to float32 for the products (CPUs without native float16 arithmetic convert
    anyway); the softmax runs online over the blocks (a running maximum rescales what came
    before, as in flash attention), so no (queries x memory) matrix is ever held. On a GPU the
    whole matrix is copied there once.
    """

    # Similarities per block (queries x rows): 32 queries x 16,384 rows. Blocks shrink as batches
    # grow, so that a block's float32 copy (16,384 x 512 is 32 MB) and its similarities stay this
    # size: 128 queries against 16,384 rows took 97 MB at the peak, against 4,096 rows 16 MB. Much
    # smaller blocks lost up to half the speed to per-call overheads on a busy 2-core CPU.
    BLOCK_SIMILARITIES = 32 * 16384
    MIN_BLOCK_ROWS = 1024

    def __init__(self, store: Store, collection: str, device: str | torch.device | None = None):
        self.store, self.collection = store, collection
        self.device = torch.device(device or "cpu")
        self._load()

    def _load(self) -> None:
        self.cache = load_vectors(self.store, self.collection)
        vectors = torch.from_numpy(self.cache.vectors)
        self.vectors = vectors if self.device.type == "cpu" else vectors.to(self.device)

    @property
    def size(self) -> int:
        return len(self.cache.ids)

    def refresh(self) -> None:
        """Take up the collection's current vectors if it changed since they were read (one
        read of its version: call it before each batch)."""
        if self.store.version(self.collection) != self.cache.version:
            self._load()

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int = 0, tau: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """For queries (b, d): the top-k similarities (b, k) and rows (b, k), best first, and
        with `tau` DeCap's projections (b, d) over the whole memory (else None)."""
        q = torch.as_tensor(np.asarray(queries, np.float32), device=self.device)
        b, dim = q.shape
        k = min(k, self.size)
        top_scores = q.new_empty((b, 0))
        top_rows = torch.empty((b, 0), dtype=torch.long, device=self.device)
        peak = q.new_full((b,), float("-inf"))
        total, mixed = q.new_zeros(b), q.new_zeros((b, dim))
        rows_per_block = min(max(self.BLOCK_SIMILARITIES // max(b, 1), self.MIN_BLOCK_ROWS), max(self.size, 1))
        widen = self.vectors.dtype != torch.float32
        buffer = torch.empty((rows_per_block, dim), device=self.device) if widen else None
        for start in range(0, self.size, rows_per_block):
            block = self.vectors[start : start + rows_per_block]
            if buffer is not None:  # widened into one reused buffer: no allocation per block
                block = buffer[: len(block)].copy_(block)
            sims = q @ block.T
            if k:
                rows = torch.arange(start, start + len(block), device=self.device).expand(b, -1)
                top_scores, picked = torch.cat([top_scores, sims], 1).topk(min(k, top_scores.shape[1] + len(block)), dim=1)
                top_rows = torch.cat([top_rows, rows], 1).gather(1, picked)
            if tau is not None:
                # Shifted by the best similarity before dividing by tau: the differences that
                # matter are small and exact in float32, where sims / tau (~50) would round them.
                new_peak = torch.maximum(peak, sims.amax(1))
                rescale = torch.exp((peak - new_peak) / tau)
                # Clamped at -80: such a weight is < 2e-35 of the best one's (nothing, even summed
                # over 10M rows), and torch's exp runs ~20x slower where its result would be
                # subnormal (arguments below -87), which far captions' weights are.
                weights = torch.exp(((sims - new_peak[:, None]) / tau).clamp_(min=-80))
                total = total * rescale + weights.sum(1)
                mixed = mixed * rescale[:, None] + weights @ block
                peak = new_peak
        projections = F.normalize(mixed, dim=1).cpu().numpy() if tau is not None else None
        return top_scores.cpu().numpy(), top_rows.cpu().numpy(), projections

    def hits(self, scores: np.ndarray, rows: np.ndarray, with_vectors: bool = False) -> list[list[Hit]]:
        """Neighbours found by `search` as the store's hits: payloads fetched by id."""
        ids = [str(i) for i in self.cache.ids[rows.reshape(-1)]]
        payloads = iter(self.store.payloads(self.collection, ids) if ids else [])
        found = iter(ids)
        return [
            [
                Hit(next(found), float(score), next(payloads),
                    np.asarray(self.cache.vectors[row], np.float32) if with_vectors else None)
                for score, row in zip(query_scores, query_rows)
            ]
            for query_scores, query_rows in zip(scores, rows)
        ]
