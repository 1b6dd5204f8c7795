"""Shared test helpers: a tiny random CLIP that builds in well under a second."""

import json
import shutil
import tempfile
from pathlib import Path

from ragcap.embed import save_random

# ViT-B-32's layout shrunk to 2 layers of width 64: the real tokenizer (vocab 49408, context 77)
# and a real preprocess, so every code path is the one a full model takes.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_tiny_clip(out_dir: Path, seed: int = 0, **overrides) -> Path:
    """Write a random tiny CLIP checkpoint directory (open_clip's on-disk form); returns it.

    overrides are merged into the config's top level, and text_cfg/vision_cfg keys into those
    dicts, e.g. make_tiny_clip(d, custom_text=True, text_cfg={"pool_type": "last"}).
    """
    config = json.loads(json.dumps(TINY_CLIP_CONFIG))
    for key, value in overrides.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        arch = Path(tmp) / "tiny-clip.json"
        arch.write_text(json.dumps(config))
        return save_random(arch, out_dir, seed=seed)


def hub_cache(root: Path, repo: str, files: list[Path]) -> Path:
    """huggingface_hub's cache layout after a download of `repo` holding `files` (what users have offline)."""
    revision = "0" * 40
    entry = root / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in files:
        shutil.copy(file, snapshot / file.name)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(revision)
    return root
