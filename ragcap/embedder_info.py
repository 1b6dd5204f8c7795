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
    # A local model's identity: sha256 of its config and weights. The path in `spec` is only
    # where it was; a moved or copied directory has the same digest, a changed one another.
    digest: str | None = None

    def matches(self, other: "EmbedderInfo") -> bool:
        """Whether vectors of `other` are vectors of this embedder: the same digest when both
        record one (local models, wherever they are now), else the same spec; and the same
        dimension and normalisation. Records made before digests compare by spec."""
        if (self.dim, self.normalized) != (other.dim, other.normalized):
            return False
        if self.digest and other.digest:
            return self.digest == other.digest
        return self.spec == other.spec

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.digest is None:
            del data["digest"]  # records of hub models stay as they were
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EmbedderInfo":
        return cls(spec=str(data["spec"]), dim=int(data["dim"]), normalized=bool(data.get("normalized", True)),
                   digest=data.get("digest"))
