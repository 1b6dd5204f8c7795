"""Captioning: inputs -> embeddings -> one search of the memory per batch -> every requested mode (ragcap.modes).

Inputs stream through in batches (load + encode a batch, one batched search, one batched
decode), so memory stays bounded whatever the folder size, and each image is encoded once
however many modes run. The search multiplies the batch by every stored vector where the
memory fits (ragcap.retrieve.ExactMemory: exact, and one pass serves every mode), or asks
Qdrant for each query's top k. An image is a path, encoded bytes or a PIL image
(ragcap.images), so the CLI's files and the server's uploads take the same path through here.
"""

from __future__ import annotations

import glob
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ragcap.errors import OptionError, RagcapError
from ragcap.generation import SearchOptions
from ragcap.images import IMAGE_EXTENSIONS, ImageInput, image_name, load_batches
from ragcap.modes import MODES, modes_needing, parse_modes
from ragcap.precision import dtype_name
from ragcap.retrieve import DEFAULT_TAU, ExactMemory
from ragcap.store import Hit, Store
from ragcap.store.cache import cache_bytes
from ragcap.util import chunks, many

__all__ = ["Batch", "CaptionResult", "CaptionSettings", "Captioner", "DEFAULT_K", "ImageInput", "iter_inputs", "parse_modes"]

# Top-k for the projection when Qdrant searches the memory. With tau = 0.01 a neighbour 0.05
# less similar than the best weighs e^-5 ~ 0.7% as much, yet when similarities bunch together
# (512-d random vectors, the worst case) 256 neighbours left cosine 0.998 to DeCap's exact
# whole-memory projection and 1024 leave 0.9998 (benchmarks/caption.py).
DEFAULT_K = 1024
MEMORY_SEARCHES = ("auto", "exact", "qdrant")
# Images per forward pass of the image tower on a CPU. Larger passes are no faster there
# (ViT-B-32: the same ms per image at 32 as at 128) but hold more activations: 128 images in
# passes of 32 / 64 / 128 raised the peak by 0 / 77 / 192 MB once the allocator was warm. A GPU
# encodes each batch in one pass.
CPU_ENCODE_ROWS = 32


@dataclass(frozen=True)  # hashable: the server batches together requests with equal settings
class CaptionSettings:
    modes: tuple[str, ...] = ("pd",)
    k: int | None = None  # None: DEFAULT_K, or the whole collection when it is smaller
    tau: float = DEFAULT_TAU
    # Decoding for every mode that writes a caption; what it leaves unset each decoder kind
    # decides (DeCap: greedy over its trained length; prompt: SmallCap's beam 3 and 25 tokens).
    search: SearchOptions = field(default_factory=SearchOptions)
    prompt_k: int = 4  # SmallCap puts 4 retrieved captions in the prompt
    # How queries meet the memory: "exact" multiplies them by every stored vector (exact pd and
    # neighbours, from a copy of the vectors kept beside the collection), "qdrant" asks Qdrant
    # for the top k (memories larger than memory), "auto" is exact when the copy takes at most
    # exact_max_bytes.
    memory: str = "auto"
    # None: a quarter of the RAM, or half of the GPU's memory (10M 512-d float16 vectors are 10 GB).
    exact_max_bytes: int | None = None
    # Images per batch; 128 for the decoder's sake: a CPU runs DeCap's decoder 1.9x faster per
    # image with 128 rows per matrix product than with 32 (each step reads the weights once either
    # way), while CLIP's image tower is as fast at 32 (CPU_ENCODE_ROWS). Beam-searching LMs take
    # a CPU batch in smaller pieces (ragcap.decoders.lm.CPU_LM_BATCH). benchmarks/caption.py.
    batch_size: int = 128
    neighbours: int = 0  # report this many retrieved captions with scores (0 = none)
    max_pixels: int | None = None  # refuse larger images (None: only Pillow's decompression-bomb limit)
    # Threads that decode and preprocess the next batch of images while the model encodes this
    # one (0: all in the calling thread). None: one per CPU core, at most 8.
    load_workers: int | None = None
    # Decode JPEGs at a reduced scale (PIL's draft mode) while both sides stay at least the
    # model's input size: the decoder skips the detail preprocessing would throw away
    # (benchmarks/caption.py states the pixel and embedding differences).
    draft: bool = True

    def __post_init__(self):
        """Checked here, where the CLI, the API and the service all pass: a batch of 0 captions
        nothing, a k of 0 retrieves nothing, and a tau of 0 or less weighs neighbours as NaN or
        upside down, each without an error of its own. Modes are checked and made a tuple here
        too: "pd,clipre" or a list is taken as the CLI takes --mode, where a str iterated as modes
        would be a KeyError of its first letter, and an empty tuple would caption nothing."""
        modes = self.modes if isinstance(self.modes, str) else ",".join(self.modes)
        object.__setattr__(self, "modes", parse_modes(modes))  # frozen: hashable for the server's batching
        at_least = {"--batch-size": (self.batch_size, 1), "--k": (self.k, 1), "--prompt-k": (self.prompt_k, 1),
                    "--neighbours": (self.neighbours, 0), "--max-pixels": (self.max_pixels, 1)}
        for flag, (value, least) in at_least.items():
            if value is not None and value < least:
                raise OptionError(f"{flag} must be at least {least}, not {value}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise OptionError(f"--tau must be a number above 0, not {self.tau} (DeCap's is {DEFAULT_TAU})")


@dataclass
class CaptionResult:
    source: str  # image path (or name), or the query text with --text
    mode: str | None = None
    caption: str | None = None
    error: str | None = None
    exception: RagcapError | None = field(default=None, repr=False, compare=False)  # what `error` says, to act on by type
    neighbours: list[tuple[str, float]] | None = None
    score: float | None = None  # the decoder's score of the caption (modes that decode)
    alternatives: list[tuple[str, float]] | None = None  # every caption with its score, with --num-captions > 1


@dataclass
class Batch:
    """One batch in flight, as the modes see it."""

    captioner: "Captioner"
    queries: np.ndarray  # (b, dim) unit embeddings
    hits: list[list[Hit]]  # neighbours per query (empty lists when no mode retrieves)
    images: list = field(default_factory=list)  # the decoded images (PIL), for modes that read them; empty for texts
    projections: np.ndarray | None = None  # (b, dim) DeCap's exact projections, when the memory is searched exactly


def _named(images: Iterable[ImageInput], names: Iterable[str] | None) -> Iterable[tuple[ImageInput, str]]:
    """(image, name) pairs. Names of another count than the images are an error: zip alone
    would drop the images past the last name without a word, or misname them all."""
    if names is None:
        return ((im, image_name(im, i)) for i, im in enumerate(images))
    if hasattr(images, "__len__") and hasattr(names, "__len__") and len(images) != len(names):
        raise OptionError(f"{len(names)} names for {len(images)} images: pass one name per image, in the same order")
    return zip(images, names, strict=True)  # streams of unknown length: a ValueError where one runs out


def check_texts(texts: Sequence[str], what: str) -> None:
    """OptionError for a blank text: it embeds to a vector like any other and comes back with a
    caption (or neighbours) that means nothing, with nothing to say the input was empty."""
    blank = [i + 1 for i, text in enumerate(texts) if isinstance(text, str) and not text.strip()]  # others: images
    if blank:
        which = "" if len(texts) == 1 else " " + ", ".join(map(str, blank[:5])) + (", ..." if len(blank) > 5 else "") + f" of {len(texts)}"
        raise OptionError(f"{what}{which} is empty (or only spaces): give words to search or caption from")


def iter_inputs(inputs: Sequence[str]) -> Iterator[str]:
    """Image files, directories (recursive, by extension), globs, @list files and '-' (stdin).
    A file that exists is itself, whatever its name: photo[1].jpg is no pattern, @home.jpg no list."""
    for item in inputs:
        if item == "-":
            yield from (line.strip() for line in sys.stdin if line.strip())
        elif os.path.isfile(item):
            yield item
        elif item.startswith("@"):
            with open(item[1:], encoding="utf-8") as lines:
                yield from (line.strip() for line in lines if line.strip())
        elif os.path.isdir(item):
            found = [os.path.join(root, name) for root, dirs, files in _sorted_walk(item) for name in sorted(files)
                     if Path(name).suffix.lower() in IMAGE_EXTENSIONS]
            if not found:  # an empty input is a mistake (a wrong folder), not an empty result
                raise RagcapError(f"{item}: no images in this folder or below (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
            yield from found
        elif glob.has_magic(item):
            matched = sorted(glob.glob(item, recursive=True))
            if not matched:
                raise RagcapError(f"{item}: no file matches this pattern")
            yield from matched
        else:
            yield item  # a missing file is reported per file, not fatal to the batch


def _sorted_walk(top: str):
    for root, dirs, files in os.walk(top):
        dirs.sort()  # in place: os.walk then descends in sorted order
        yield root, dirs, files


def require_resources(modes, decoder, lm, smallcap, given: dict | None = None) -> None:
    """Every mode's resource is given (an embedding decoder, a SmallCap model, a language model),
    else an error naming the flag. given: each --decoder DIR -> its kind, named when it is the
    wrong one for the modes (a --decoder was passed, just not of the kind they need)."""
    wrong = "".join(f"; {d} is a {k} decoder, for --mode {'smallcap' if k == 'smallcap' else 'pd, nnd or vd'}"
                    for d, k in (given or {}).items())
    if modes_needing("decoder", modes) and decoder is None:
        names = ", ".join(modes_needing("decoder", modes))
        raise RagcapError(f"mode {names} needs a trained decoder: pass --decoder DIR (make one with `ragcap train-decoder`){wrong}")
    if modes_needing("smallcap", modes) and smallcap is None:
        raise RagcapError("mode smallcap needs a SmallCap model: pass --decoder DIR "
                          f"(see `ragcap train-smallcap`, `ragcap models import smallcap`){wrong}")
    if modes_needing("lm", modes) and lm is None:
        raise RagcapError("mode prompt needs a language model: pass --lm NAME_OR_DIR")


class Captioner:
    """Captions batches of queries against one collection with the requested modes."""

    def __init__(self, store: Store, collection: str, embedder, settings: CaptionSettings, decoder=None, prompter=None,
                 exact: ExactMemory | None = None, smallcap=None):
        """decoder: an embedding decoder (pd, nnd, vd); smallcap: a SmallCap model; exact: the
        memory's vectors already loaded for exact search (with_settings shares them)."""
        self.store, self.collection, self.embedder, self.settings = store, collection, embedder, settings
        self.decoder, self.prompter, self.smallcap = decoder, prompter, smallcap
        modes = [MODES[m] for m in settings.modes]
        require_resources(settings.modes, decoder, prompter, smallcap)
        if settings.memory not in MEMORY_SEARCHES:
            raise RagcapError(f"unknown memory search {settings.memory!r}; choose from {', '.join(MEMORY_SEARCHES)}")
        self.exact: ExactMemory | None = None
        self.k = 0
        self.search_k = 0
        if any(m.memory for m in modes) or settings.neighbours:
            store.check_embedder(collection, embedder.info)
            version = store.version(collection)
            if version.points == 0:
                raise RagcapError(f"collection '{collection}' is empty: fill it with `ragcap ingest`")
            if self._searches_exactly(cache_bytes(store, collection, version), embedder.device):
                self.exact = exact or ExactMemory(store, collection, embedder.device)
                size = self.exact.size
            else:
                size = store.count(collection)
            if settings.k is not None and settings.k > size:
                raise RagcapError(f"--k {settings.k} is larger than collection '{collection}' ({size} captions); use --k {size} or less")
            self.k = min(DEFAULT_K, size) if settings.k is None else settings.k
            self.search_k = min(max([m.neighbours(self) for m in modes] + [settings.neighbours]), size)
        self.with_vectors = any(m.vectors and m.neighbours(self) for m in modes)

    def _searches_exactly(self, nbytes: int, device: torch.device) -> bool:
        if self.settings.memory != "auto":
            return self.settings.memory == "exact"
        budget = self.settings.exact_max_bytes
        if budget is None:
            if device.type == "cuda":
                budget = torch.cuda.get_device_properties(device).total_memory // 2
            else:
                budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
        return nbytes <= budget

    def runtime(self) -> dict[str, str]:
        """Where the loaded models run: {"device": "cpu", "precision": "float32"}; several
        models on different devices or precisions are listed comma-separated. The precision is
        what their forward passes compute in (bfloat16 under --precision bf16: ragcap.precision)."""
        owners = [(self.embedder, self.embedder.loaded), (self.decoder, self.decoder), (self.smallcap, self.smallcap),
                  (self.prompter, getattr(self.prompter, "model", None))]
        loaded = [(owner.precision, next(model.parameters()).device) for owner, model in owners if model is not None]
        return {"device": ",".join(sorted({str(device) for _, device in loaded})),
                "precision": ",".join(sorted({dtype_name(precision) for precision, _ in loaded}))}

    def with_settings(self, settings: CaptionSettings) -> "Captioner":
        """A captioner for other settings (modes, k, neighbours, decoding) over the same loaded
        models and memory: how a server answers each request's options without loading anything."""
        if settings == self.settings:
            return self
        return Captioner(self.store, self.collection, self.embedder, settings, self.decoder, self.prompter, self.exact, self.smallcap)

    def caption_images(self, images: Iterable[ImageInput], names: Iterable[str] | None = None) -> Iterator[CaptionResult]:
        """Results in input order, one per input and mode: an image that fails to load gets one
        error result in its place. images: paths, encoded bytes or PIL images (ragcap.images);
        names: what results call them (default: the path, else "image N")."""
        for results in self.caption_each(images, names):
            yield from results

    def caption_each(self, images: Iterable[ImageInput], names: Iterable[str] | None = None) -> Iterator[list[CaptionResult]]:
        """caption_images grouped by input: per input, its result for each mode or one error result."""
        settings, embedder = self.settings, self.embedder
        per_input = len(settings.modes)
        named = _named(many(images, "images", "caption_images"), names)
        workers = min(os.cpu_count() or 1, 8) if settings.load_workers is None else settings.load_workers
        keep_images = bool(modes_needing("smallcap", settings.modes))
        prepare = (lambda im: (embedder.prepare_image(im), im)) if keep_images else embedder.prepare_image
        draft = embedder.draft_size if settings.draft and not keep_images else None  # drafts suit the retrieval model's input only
        batches = load_batches(chunks(named, settings.batch_size), settings.max_pixels, prepare, draft, workers)
        encode_rows = settings.batch_size if embedder.device.type == "cuda" else CPU_ENCODE_ROWS
        for chunk, prepared, errors in batches:
            loaded = [name for i, (_, name) in enumerate(chunk) if i not in errors]
            images = []
            if keep_images:  # smallcap encodes the image again with its own encoder
                prepared, images = [p for p, _ in prepared], [im for _, im in prepared]
            results = iter(self._caption(loaded, embedder.encode_prepared(prepared, encode_rows), images) if prepared else [])
            for i, (_, name) in enumerate(chunk):
                if i in errors:
                    yield [CaptionResult(source=name, error=str(errors[i]), exception=errors[i])]
                else:
                    yield [next(results) for _ in range(per_input)]

    def caption_texts(self, texts: Sequence[str]) -> Iterator[CaptionResult]:
        """Results per text and mode, as caption_images gives them per image."""
        texts = list(many(texts, "texts", "caption_texts"))
        check_texts(texts, "text")
        for chunk in chunks(texts, self.settings.batch_size):
            yield from self._caption(chunk, self.embedder.encode_text(chunk).vectors)

    def _search(self, queries: np.ndarray) -> tuple[list[list[Hit]], np.ndarray | None]:
        """Each query's neighbours (as many as the modes need) and, searching exactly, its projection."""
        if self.exact is not None:
            self.exact.refresh()
            tau = self.settings.tau if "pd" in self.settings.modes else None
            scores, rows, projections = self.exact.search(queries, self.search_k, tau)
            return self.exact.hits(scores, rows, self.with_vectors), projections
        if self.search_k:
            return self.store.search(self.collection, queries, self.search_k, self.with_vectors), None
        return [[] for _ in queries], None

    def _caption(self, sources: list[str], queries: np.ndarray, images: Sequence = ()) -> list[CaptionResult]:
        settings = self.settings
        hits, projections = self._search(queries)
        batch = Batch(self, queries, hits, images=list(images), projections=projections)
        captions = self._decode_prefixes(batch)
        for name in settings.modes:
            if MODES[name].captions is not None:
                captions[name] = MODES[name].captions(batch)
        results = []
        for i, source in enumerate(sources):
            neighbours = None
            if settings.neighbours:
                neighbours = [(h.payload["caption"], float(h.score)) for h in hits[i][: settings.neighbours]]
            for name in settings.modes:
                found = captions[name][i]
                results.append(CaptionResult(
                    source=source, mode=name, caption=found[0].text, neighbours=neighbours, score=found[0].score,
                    alternatives=[(c.text, c.score) for c in found] if settings.search.num_return > 1 else None,
                ))
        return results

    def _decode_prefixes(self, batch: Batch) -> dict[str, list]:
        """Every embedding mode's prefixes decoded in one batched call of the decoder."""
        names = [m for m in self.settings.modes if MODES[m].prefix is not None]
        if not names:
            return {}
        prefixes = np.concatenate([MODES[m].prefix(batch) for m in names]).astype(np.float32)
        decoded = self.decoder.caption(torch.from_numpy(prefixes), self.settings.search)
        n = len(batch.queries)
        return {m: decoded[i * n : (i + 1) * n] for i, m in enumerate(names)}
