"""The identity of an embedder, recorded in every collection and every trained decoder.

Kept apart from ragcap.embed so the store can check compatibility without importing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Text contexts in tokens, start and end included: CLIP's, and Long-CLIP's stretch of it (20 + 4 x 57).
CLIP_CONTEXT = 77
LONG_CONTEXT = 248


@dataclass(frozen=True)
class EmbedderInfo:
    spec: str  # canonical model spec: "ViT-B-32:openai", "hf-hub:org/name", "local:/abs/dir", "st:NAME"
    dim: int
    normalized: bool = True  # vectors are L2-normalised, so cosine == dot product

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EmbedderInfo":
        return cls(spec=str(data["spec"]), dim=int(data["dim"]), normalized=bool(data.get("normalized", True)))
