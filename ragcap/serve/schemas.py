"""The JSON the server speaks (pydantic models: they are also the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ragcap.caption import CaptionResult
from ragcap.serve.errors import classify


class ErrorInfo(BaseModel):
    type: str = Field(description="Machine-readable kind, e.g. invalid_image, image_too_large, overloaded, timeout.")
    message: str = Field(description="What is wrong and what to do.")


class ErrorBody(BaseModel):
    error: ErrorInfo


class Scored(BaseModel):
    caption: str
    score: float


class Neighbour(Scored):
    payload: dict | None = Field(None, description="The stored point's metadata (image id, corpus, ...), in search answers.")


class ModeCaption(BaseModel):
    mode: str
    caption: str
    score: float | None = Field(None, description="The decoder's score (modes that decode), or the cosine (clipre).")
    alternatives: list[Scored] | None = Field(None, description="Every caption with its score, when several are asked for.")


class Captioned(BaseModel):
    captions: list[ModeCaption] = Field(default_factory=list, description="One per mode, in the order asked for.")
    neighbours: list[Neighbour] | None = Field(None, description="The retrieved captions, best first, when asked for.")
    error: ErrorInfo | None = Field(None, description="Why this input got no captions (the others still do).")

    @classmethod
    def of(cls, results: list[CaptionResult], **source) -> "Captioned":
        first = results[0]
        if first.error is not None:
            return cls(error=ErrorInfo(type=classify(first.exception)[1], message=first.error), **source)
        return cls(
            captions=[
                ModeCaption(mode=r.mode, caption=r.caption, score=r.score,
                            alternatives=None if r.alternatives is None else [Scored(caption=c, score=s) for c, s in r.alternatives])
                for r in results
            ],
            neighbours=None if first.neighbours is None else [Neighbour(caption=c, score=s) for c, s in first.neighbours],
            **source,
        )


class CaptionedImage(Captioned):
    file: str = Field(description="The uploaded file's name.")


class CaptionedText(Captioned):
    text: str


class Timing(BaseModel):
    total_ms: float = Field(description="From the request's arrival to its answer.")
    queue_ms: float = Field(description="Waiting for a batch to start.")
    compute_ms: float = Field(description="The model batch this request ran in.")
    batch_items: int = Field(description="Items in that batch, this request's and others'.")


class CaptionResponse(BaseModel):
    collection: str
    modes: list[str]
    results: list[CaptionedImage]
    timing: Timing


class TextCaptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1, description="Texts to caption from, as `ragcap caption --text` does.")
    modes: list[str] | None = Field(None, description="Modes to run (default: the server's --mode).")
    k: int | None = Field(None, ge=1, description="Neighbours in the pd projection (default: the server's).")
    neighbours: int | None = Field(None, ge=0, description="Also return this many retrieved captions.")
    num_captions: int | None = Field(None, ge=1, description="Captions per text and mode: the n best beams, or n samples.")


class TextCaptionResponse(BaseModel):
    collection: str
    modes: list[str]
    results: list[CaptionedText]
    timing: Timing


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    k: int = Field(10, ge=1)


class SearchResponse(BaseModel):
    collection: str
    query: str = Field(description="The text, or the image's file name.")
    kind: Literal["text", "image"]
    neighbours: list[Neighbour]
    timing: Timing


class CollectionRow(BaseModel):
    model_config = ConfigDict(extra="allow")  # whatever else the store reports about a collection
    name: str
    points: int | None
    embedder: str | None
    dim: int | None
    vectors: str
    served: bool = Field(description="Whether this server captions with it.")


class CollectionsResponse(BaseModel):
    collections: list[CollectionRow]


class Limits(BaseModel):
    max_upload_bytes: int
    max_pixels: int
    max_images: int
    max_texts: int
    max_text_chars: int
    max_k: int
    max_neighbours: int
    timeout_s: float


class InfoResponse(BaseModel):
    version: str
    collection: str
    embedder: str
    device: str = Field(description="Where the models run, e.g. cpu or cuda:0.")
    precision: str = Field(description="The models' arithmetic: float32, or bfloat16, float16 or int8 under --precision.")
    modes: list[str] = Field(description="The modes a request gets by default.")
    available_modes: list[str] = Field(description="Every mode the loaded models can run.")
    k: int = Field(description="Default neighbours in the pd projection.")
    api_key_required: bool
    limits: Limits


class Status(BaseModel):
    status: str
    pending: int | None = Field(None, description="Items waiting or running.")
    max_queue: int | None = None

