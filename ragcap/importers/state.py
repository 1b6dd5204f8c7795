"""Reading a checkpoint another project published: tensors only, whatever the file holds."""

from __future__ import annotations

from pathlib import Path

import torch

from ragcap.errors import ModelError


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, read without unpickling code (torch.load weights_only=True)."""
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
