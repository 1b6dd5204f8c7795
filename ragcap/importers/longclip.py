"""Long-CLIP's published checkpoints (longclip-B.pt, longclip-L.pt) as open_clip model directories.

They are state dicts of OpenAI's CLIP class (the key names open_clip's CLIP also uses) with one
addition: two (248, width) positional tables. Long-CLIP's encode_text adds `positional_embedding`
at positions 0-19 (frozen during its fine-tuning) and `positional_embedding_res` at 20-247 (the
trained one), so the one table open_clip reads is their concatenation at row 20. The
architecture is recognised by comparing every tensor's name and shape with the OpenAI CLIP
architectures open_clip knows (Long-CLIP-B is ViT-B-16, Long-CLIP-L is ViT-L-14), with QuickGELU
as OpenAI trained them.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch

from ragcap.embed import arch_config, write_checkpoint
from ragcap.embedder_info import CLIP_CONTEXT
from ragcap.errors import ModelError
from ragcap.importers.state import read_state_dict
from ragcap.longclip import KEEP, require_new_model_dir

# Long-CLIP's preprocessing: OpenAI's mean/std, bicubic resize of the short side, centre crop.
PREPROCESS = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
              "interpolation": "bicubic", "resize_mode": "shortest"}
DROPPED = ("input_resolution", "context_length", "vocab_size")  # OpenAI's non-tensor extras


def import_longclip(path: Path, out: str | Path, source: str | None = None, arch: str | None = None) -> Path:
    """Convert a Long-CLIP checkpoint file to a model directory; arch forces the architecture
    (an open_clip name or a model-config JSON) instead of recognising it."""
    require_new_model_dir(out)
    state = to_open_clip(read_state_dict(path), path)
    name, config = match_architecture(state, path, arch)
    record = {"import": {"kind": "longclip", "source": source or str(path), "architecture": name, "keep": KEEP}}
    return write_checkpoint(out, state, config, PREPROCESS, record)


def to_open_clip(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Long-CLIP's two positional tables merged into open_clip's one; float32 throughout."""
    if "positional_embedding_res" not in state:
        table = state.get("positional_embedding")
        if table is not None and table.shape[0] == CLIP_CONTEXT:
            hint = "a 77-token CLIP checkpoint; give ragcap its open_clip form and `ragcap models stretch` it instead"
        else:
            hint = f"not Long-CLIP's layout (its first keys: {', '.join(list(state)[:4])})"
        raise ModelError(f"{path}: no 'positional_embedding_res', so not a Long-CLIP checkpoint: {hint}")
    table, trained = state.pop("positional_embedding", None), state.pop("positional_embedding_res")
    if table is None or table.shape != trained.shape or table.shape[0] <= KEEP:
        shape = None if table is None else tuple(table.shape)
        raise ModelError(f"{path}: positional_embedding {shape} and positional_embedding_res {tuple(trained.shape)} "
                         f"should be two tables of the same shape, longer than {KEEP} rows")
    state["positional_embedding"] = torch.cat([table[:KEEP], trained[KEEP:]])
    for key in DROPPED:
        state.pop(key, None)
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def match_architecture(state: dict[str, torch.Tensor], path: Path, arch: str | None = None) -> tuple[str, dict]:
    """The open_clip architecture (name, model_cfg) whose CLIP has exactly these tensor names and shapes."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    # OpenAI's architectures, without open_clip's "-quickgelu" twins (QuickGELU is set below anyway).
    openai = {name for name, tag in open_clip.list_pretrained() if tag == "openai" and not name.endswith("-quickgelu")}
    candidates = [arch] if arch else sorted(openai)
    closest: tuple[int, str, list[str]] | None = None
    for name in candidates:
        config = arch_config(name)
        config["text_cfg"] = {**config["text_cfg"], "context_length": shapes["positional_embedding"][0]}
        config["quick_gelu"] = True  # OpenAI's CLIP, and so Long-CLIP, was trained with QuickGELU
        differences = _differences(_shapes(config), shapes)
        if not differences:
            return str(name), config
        if closest is None or len(differences) < closest[0]:
            closest = (len(differences), str(name), differences)
    count, name, differences = closest
    raise ModelError(
        f"{path}: its tensors match no architecture Long-CLIP builds on ({', '.join(map(str, candidates))}); closest is "
        f"{name}, with {count} differences, e.g. {'; '.join(differences[:3])}. If it is another OpenAI-CLIP "
        "architecture, pass --arch (an open_clip name or a model-config JSON)"
    )


def _shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of open_clip's CLIP for a config, built on the meta device (no memory)."""
    if config.get("custom_text") or "hf_model_name" in config["text_cfg"] or "timm_model_name" in config["vision_cfg"]:
        return {}  # not the OpenAI layout: every tensor then differs
    with torch.device("meta"):
        model = open_clip.CLIP(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _differences(expected: dict[str, tuple], got: dict[str, tuple]) -> list[str]:
    missing = [f"no {k}" for k in expected if k not in got]
    extra = [f"unexpected {k}" for k in got if k not in expected]
    shapes = [f"{k} is {got[k]}, not {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    return shapes + missing + extra
