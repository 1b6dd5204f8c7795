"""SmallCap's training data: each image's patch features, and the prompt of the captions the
memory returns for it, without the image's own captions.

A memory built from the training corpus holds every training image's own captions, and they are
its nearest neighbours: a model trained on prompts that contain the answer learns to copy, then
meets no such prompt at test time. SmallCap's retrieve_caps.py drops a neighbour of the same
image; so does this module, by the image id the memory records for the caption (ingest's
--id-field) and, for memories that record none, by the caption's text matching one of the
image's references. How many were dropped is reported.

    features FILE (embed-images --patches)   patches: what the model cross-attends to; its embedder is the encoder
    query features (the same FILE, or another embed-images file of the memory's embedder)
        -> store.search(memory) -> own captions dropped -> SmallCap's prompt (k = 4, <= 25 tokens)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ragcap.decoders.lm_prompt import normalise_caption
from ragcap.decoders.smallcap import SmallCapInput, prompt_ids
from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import RagcapError
from ragcap.features import Features, read_features
from ragcap.modes import PROMPT_SEARCH_FACTOR
from ragcap.store import Hit, Store
from ragcap.util import chunks

QUERY_BATCH = 256  # images per search call: bounded memory, one progress tick per batch


@dataclass
class SmallCapExamples:
    """train.Conditioning for SmallCap: row i is the image image_of_row[i]'s patches and prompt."""

    patches: torch.Tensor  # (images, tokens, width) float32
    image_of_row: torch.Tensor  # (captions,) long
    prompts: list[list[int]]  # per image, its prompt's token ids

    def __len__(self) -> int:
        return len(self.image_of_row)

    def __getitem__(self, rows: torch.Tensor) -> SmallCapInput:
        images = self.image_of_row[rows]
        return SmallCapInput(self.patches[images], [], [self.prompts[i] for i in images.tolist()])

    def digest(self) -> bytes:
        digest = hashlib.sha256(self.patches.numpy().tobytes())
        digest.update(self.image_of_row.numpy().tobytes())
        digest.update(json.dumps(self.prompts).encode())
        return digest.digest()


@dataclass
class SmallCapData:
    captions: list[str]  # training targets, one row per reference
    examples: SmallCapExamples
    groups: list[str]  # the image of each row, so the held-out split keeps an image together
    encoder: EmbedderInfo
    retrieval: EmbedderInfo
    neighbours: list[list[str]]  # per image, what the memory returned once its own captions were dropped
    excluded: int = 0  # own captions dropped from the retrievals
    images_with_own: int = 0  # images that had at least one
    summary: dict = field(default_factory=dict)


def own_caption(hit: Hit, image_key: str, references: set[str]) -> bool:
    """Whether a retrieved caption is the image's own: same image id, else same text."""
    from pipelines.filters import normalise_image_id

    ids = [hit.payload.get(key) for key in ("image_id", "file")]
    if any(v is not None and normalise_image_id(v) == image_key for v in ids):
        return True
    return normalise_caption(hit.payload.get("caption", "")).lower() in references


def retrieve_without_own(store: Store, collection: str, queries: np.ndarray, image_ids: Sequence[str], references: Sequence[Sequence[str]],
                         k: int, on_progress: Callable[[int], None] | None = None) -> tuple[list[list[str]], int, int]:
    """Per image, the captions the memory returns for its query, its own removed (retrieval order);
    and (own captions removed, images that had any). Enough are fetched that k remain after the
    image's own captions and SmallCap's length filter drop some."""
    from pipelines.filters import normalise_image_id

    size = store.count(collection)
    if size == 0:
        raise RagcapError(f"collection '{collection}' is empty: fill it with `ragcap ingest` (the captions SmallCap retrieves from)")
    neighbours: list[list[str]] = []
    excluded = images_with_own = 0
    for batch in chunks(range(len(image_ids)), QUERY_BATCH):
        own_most = max(len(references[i]) for i in batch)
        hits = store.search(collection, queries[batch], min(size, k * PROMPT_SEARCH_FACTOR + own_most))
        for i, found in zip(batch, hits):
            mine = {normalise_caption(c).lower() for c in references[i]}
            key = normalise_image_id(image_ids[i])
            kept = [h.payload["caption"] for h in found if not own_caption(h, key, mine)]
            excluded += len(found) - len(kept)
            images_with_own += len(kept) < len(found)
            neighbours.append(kept)
        if on_progress is not None:
            on_progress(len(batch))
    return neighbours, excluded, images_with_own


def query_vectors(features: Features, query_features: str | Path | None, retrieval: EmbedderInfo) -> np.ndarray:
    """Each training image's retrieval query, by the memory's embedder."""
    if query_features is None:
        if not retrieval.matches(features.embedder):
            raise RagcapError(
                f"the memory was embedded with {retrieval.spec} but the features with {features.embedder.spec}; pass "
                f"--query-features with the same images embedded by the memory's model (`ragcap embed-images REFS --images DIR -m {retrieval.spec} -o FILE`)"
            )
        return features.vectors
    queries = read_features(query_features, expected=retrieval)
    by_id = dict(zip(queries.image_ids, queries.vectors))
    missing = [i for i in features.image_ids if i not in by_id]
    if missing:
        raise RagcapError(f"{query_features} lacks {len(missing)} images of the features file (e.g. {', '.join(missing[:3])}); "
                          "embed the same references and images into both")
    return np.stack([by_id[i] for i in features.image_ids])


def smallcap_data(store: Store, collection: str, features_path: str | Path, tokenizer, k: int, max_caption_tokens: int,
                  query_features: str | Path | None = None, on_progress: Callable[[int], None] | None = None) -> SmallCapData:
    """Everything train_decoder needs for SmallCap, from a features file with patches and a memory."""
    retrieval = store.embedder(collection)
    features = read_features(features_path, patches=True)
    if not features.image_ids:
        raise RagcapError(f"{features_path} holds no images; make it with `ragcap embed-images ... --patches`")
    queries = query_vectors(features, query_features, retrieval)
    neighbours, excluded, with_own = retrieve_without_own(store, collection, queries, features.image_ids, features.references, k, on_progress)
    prompts = prompt_ids(tokenizer, neighbours, k, max_caption_tokens)
    rows = [(caption, i) for i, refs in enumerate(features.references) for caption in refs]
    if not rows:
        raise RagcapError(f"{features_path}: its images have no reference captions to train on")
    examples = SmallCapExamples(torch.from_numpy(features.patches), torch.tensor([i for _, i in rows], dtype=torch.long), prompts)
    return SmallCapData(
        captions=[c for c, _ in rows], examples=examples, groups=[f"image:{features.image_ids[i]}" for _, i in rows],
        encoder=features.embedder, retrieval=retrieval, neighbours=neighbours, excluded=excluded, images_with_own=with_own,
    )
