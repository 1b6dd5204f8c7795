"""Reading a checkpoint another project published: tensors only, whatever the file holds; and
what every decoder importer checks (key names and shapes, the embedder it records)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import ModelError


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, read without unpickling code (torch.load weights_only=True)."""
    _require_checkpoint_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for truncated, foreign or code-carrying files
        raise ModelError(
            f"{path}: not a readable state dict ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "published checkpoints are plain state dicts, read with torch.load(weights_only=True): "
            "a checkpoint is untrusted input, so TorchScript archives and pickled objects (which could run code) are refused"
        ) from e
    for wrapper in ("state_dict", "model"):  # training scripts often nest the weights
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{path}: expected a state dict (tensor names to tensors), found {type(data).__name__}")
    return {k.removeprefix("module."): v for k, v in data.items()}  # DistributedDataParallel's prefix


# How a file torch.save or safetensors wrote begins: a zip archive, a pickle (protocol 2+), or
# safetensors' 8-byte header length (little-endian, far below 2^32, so bytes 4-7 are zero).
def _is_checkpoint_head(head: bytes) -> bool:
    return head.startswith((b"PK\x03\x04", b"\x80")) or (len(head) == 8 and head[4:] == b"\0\0\0\0")


def _require_checkpoint_file(path: Path) -> None:
    """A file that is no checkpoint at all (a text, an HTML error page saved as .pt) is named as
    such; torch.load's own error for one reads like a bug (KeyError: 104)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
    if not head:
        raise ModelError(f"{path} is empty (a download cut short?); give the published checkpoint file")
    if not _is_checkpoint_head(head):
        raise ModelError(f"{path} is not a checkpoint file (it starts with {head!r}, not as torch.save or safetensors "
                         "write one); give the published .pt/.pth/.ckpt or .safetensors file")


def require_new_decoder_dir(out: Path) -> None:
    """Refuse, before any checkpoint is read, an `out` that is a file or already a decoder."""
    from ragcap.decoders.base import CONFIG_FILE

    if out.exists() and not out.is_dir():
        raise ModelError(f"{out} is a file; give a directory to write the decoder into")
    if (out / CONFIG_FILE).exists():
        raise ModelError(f"{out} already holds a decoder; choose another directory")


# transformers 4.x before 2023 saved each GPT-2 attention's causal-mask buffers with the weights.
LEGACY_GPT2_BUFFERS = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")


def without_legacy_buffers(state: dict[str, torch.Tensor], lm_prefix: str) -> dict[str, torch.Tensor]:
    """The state dict without old transformers' GPT-2 mask buffers (not weights) under lm_prefix."""
    return {k: v for k, v in state.items() if not (k.startswith(lm_prefix) and LEGACY_GPT2_BUFFERS.fullmatch(k[len(lm_prefix):]))}


def key_problems(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], max_listed: int = 3) -> str | None:
    """What keeps `state` from having exactly the `expected` keys and shapes, or None."""
    problems = [f"missing key {k!r}" for k in expected if k not in state]
    problems += [f"unexpected key {k!r}" for k in state if k not in expected]
    problems += [f"key {k!r} has shape {tuple(state[k].shape)}, expected {expected[k]}"
                 for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if not problems:
        return None
    more = len(problems) - max_listed
    return "; ".join(sorted(problems)[:max_listed]) + (f"; and {more} more" if more > 0 else "")


def recorded_embedder(spec: str | None, dim: int, defaults: dict[int, str]) -> EmbedderInfo:
    """The embedder an imported decoder records: `spec`, else the published checkpoints' CLIP
    for that width; an open_clip name must make `dim`-d embeddings."""
    from ragcap.embed import parse_spec

    spec = spec or defaults.get(dim)
    if spec is None:
        raise ModelError(f"the checkpoint's mapping network takes {dim}-d embeddings; pass --model SPEC naming the CLIP it was trained on")
    parsed = parse_spec(spec)
    if parsed.kind == "pretrained":
        import open_clip

        arch_dim = open_clip.get_model_config(parsed.name)["embed_dim"]
        if arch_dim != dim:
            raise ModelError(f"{parsed.canonical} makes {arch_dim}-d embeddings but the checkpoint's mapping network takes {dim}-d ones")
    return EmbedderInfo(spec=parsed.canonical, dim=dim)
