"""The precision models run at (--precision): fp32, bf16 / fp16 autocast, or int8 on a CPU.

fp32 is the default, and every quality figure ragcap reports was measured with it. bf16 and
fp16 run the encoders' and decoders' forward passes under torch.autocast: matrix products and
attention in 16 bits, while LayerNorm, softmax and the other ops autocast keeps in float32 stay
there, and the weights stay float32. Autocast rather than casting the weights because one
mechanism then serves every model ragcap runs (open_clip's towers, GPT-2 decoders, a prompt LM,
SmallCap) with no dtype plumbing per model, and keeps the drift from fp32 at its smallest. What
runs outside the models stays float32 or float64 whatever the setting: the memory search,
DeCap's projection, and the search's log-probabilities (ragcap.generation).

On a GPU, 16-bit matrix work is several times faster (the image tower alone: 8,710 images/s
fp32 against 25,632 bf16 on an H100, as measured for the speed issue). On a CPU without bf16
instructions (AVX2) it is 6-7x slower than fp32 on ViT-B-32, so it is opt-in;
benchmarks/precision.py measures the drift and the speed.

int8 is the CPU's counterpart: every matrix product with a model's weights runs in int8 through
torch's dynamically quantized Linear, applied once at load (ragcap.int8).
"""

from __future__ import annotations

import contextlib

from ragcap.errors import OptionError

# --precision value -> the torch dtype autocast computes in (named, so importing this is free of torch).
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}
PRECISIONS = tuple(DTYPE_NAMES)


def resolve_precision(precision: str | None = None) -> str:
    """The precision asked for, else $RAGCAP_PRECISION or the config file's `precision`, else
    fp32; OptionError for a name that is none of PRECISIONS, saying where it came from."""
    from ragcap.config import setting

    where = "--precision"
    if precision is None:
        precision, where = setting("precision")
        if precision is None:
            return "fp32"
    name = precision.strip().lower()
    if name not in DTYPE_NAMES:
        raise OptionError(f"{where}: unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return name


def prepare(model, device, precision: str):
    """`model` made ready to run at `precision` on `device`, in place: int8 quantizes its
    linear layers (CPU only: OptionError elsewhere); autocast needs nothing at load."""
    if precision != "int8":
        return model
    if device.type != "cpu":
        raise OptionError(f"--precision int8 runs on the CPU only (torch's quantized Linear has no {device.type} kernels); "
                          "on a GPU use bf16 or fp16")
    from ragcap.int8 import quantize

    return quantize(model)


def autocast(device, precision: str):
    """The context a model's forward pass runs in at this precision on this torch device."""
    if precision in ("fp32", "int8"):
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device.type, dtype=getattr(torch, DTYPE_NAMES[precision]))


def dtype_name(precision: str) -> str:
    """The name reports use: float32, bfloat16, float16 or int8."""
    return DTYPE_NAMES[precision]
