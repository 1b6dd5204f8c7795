"""Retrieval from the caption memory, and DeCap's projection of an image into text space.

DeCap (arXiv 2303.03032, eq. 3) replaces the image embedding v by
    p = sum_i softmax(sim(v, t_i) / tau) * t_i,   re-normalised,
over the text embeddings t_i of the memory. A decoder trained only on text embeddings then
sees an input from the distribution it was trained on, which bridges CLIP's modality gap.
With tau = 0.01 the weights fall off so fast that the top-k neighbours carry almost all of
the mass, so ragcap computes it over the k nearest captions that Qdrant returns;
`FullMemory` computes the exact sum over every stored caption, for checking.
"""

from __future__ import annotations

import numpy as np

from ragcap.store import Hit, Store

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
