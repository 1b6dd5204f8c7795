"""--precision int8 on a CPU: a model's linear layers replaced, once at load, by torch's
dynamically quantized Linear (int8 weights, activations quantized per batch, fbgemm kernels).

Dynamic quantization only knows nn.Linear, and two kinds of layer hold their weights otherwise:
GPT-2's Conv1D (x @ W + b with W stored (in, out): every layer of a GPT-2 decoder or prompt
LM, transformers' class and ragcap.decoders.gpt's) and nn.MultiheadAttention (its input projection is a bare parameter, its output
projection a Linear subclass quantization skips on purpose: open_clip's towers). Each is first
rewritten as the nn.Linear layers that compute the same, so int8 covers every matrix product with
a model's weights (attention over keys of another width aside). On a 2-core AVX2 CPU that made
ViT-B-32's towers 2.1x and a DeCap decoder's greedy decoding 2.5x faster than fp32
(benchmarks/precision.py and gpu.py, BENCHMARKS.md).

torchao, the successor of torch.ao's eager quantization, was 12x slower than fp32 on the same
CPU without torch.compile, hence torch.ao, whose deprecation notices are silenced here.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ragcap.errors import OptionError


def quantize(model: nn.Module) -> nn.Module:
    """`model` with every linear layer int8, in place."""
    try:
        from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as e:
        raise OptionError(f"--precision int8 needs torch's eager dynamic quantization, which torch {torch.__version__} "
                          f"no longer has ({e}); use fp32") from None
    conv1d_as_linear(model)
    attention_as_linear(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices, one per layer (see above)
        # A scale per output row of each weight, not one per matrix: on trained weights (all-MiniLM-L6-v2)
        # that kept int8's vectors at cosine 0.978 to fp32's instead of 0.948, at the same speed.
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    for layer in model.modules():
        if isinstance(layer, QuantizedLinear):
            layer.int8_original_dtype = torch.float32  # where open_clip's towers read their compute dtype
    return model


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear over these (out, in) weights, made without a random init to overwrite."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().contiguous(), requires_grad=False)
    return layer


def _replace(model: nn.Module, kind: type, build) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                replacement = build(child)
                if replacement is not None:
                    setattr(parent, name, replacement)


def conv1d_as_linear(model: nn.Module) -> None:
    """Each GPT-2 Conv1D replaced in place by the nn.Linear computing the same (its weight is W
    transposed). Only the modules already imported are looked for: no model has a class of one
    that is not (and importing transformers would cost seconds)."""
    for module in ("transformers.pytorch_utils", "ragcap.decoders.gpt"):
        conv1d = getattr(sys.modules.get(module), "Conv1D", None)
        if conv1d is not None:
            _replace(model, conv1d, lambda layer: _linear(layer.weight.t(), layer.bias))


def attention_as_linear(model: nn.Module) -> None:
    """Each nn.MultiheadAttention whose query, key and value share one width replaced in place
    by ProjectedAttention; the others (bias_k, add_zero_attn, kdim != embed_dim) stay."""
    _replace(model, nn.MultiheadAttention, ProjectedAttention.of)


class ProjectedAttention(nn.Module):
    """nn.MultiheadAttention's inference forward with its four projections as nn.Linear layers.

    The call is MultiheadAttention's, for what models ragcap runs pass it (open_clip's blocks:
    need_weights=False, a float or boolean attn_mask); attention weights are not returned.
    """

    # nn.TransformerEncoderLayer's fused fast path reads MultiheadAttention's own parameters
    # (ClipCap's mapping network); this makes it decline, in its own words "self_attn was passed
    # bias=False", and call forward below.
    in_proj_bias = None

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, out: nn.Linear, num_heads: int, batch_first: bool):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q, k, v, out
        self.num_heads, self.batch_first = num_heads, batch_first

    @classmethod
    def of(cls, mha: nn.MultiheadAttention) -> "ProjectedAttention | None":
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            return None
        weights = mha.in_proj_weight.chunk(3)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        q, k, v = (_linear(w, b) for w, b in zip(weights, biases))
        return cls(q, k, v, _linear(mha.out_proj.weight, mha.out_proj.bias), mha.num_heads, mha.batch_first)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None:
            raise NotImplementedError("ProjectedAttention (--precision int8) does not take key_padding_mask")
        if not self.batch_first:  # (length, batch, width) -> (batch, length, width)
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        batch, length, width = query.shape
        heads = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:  # (batch, n, width) -> (batch, heads, n, head width)
            return x.view(batch, -1, heads, width // heads).transpose(1, 2)

        q, k, v = split(self.q_proj(query)), split(self.k_proj(key)), split(self.v_proj(value))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = ~attn_mask  # MultiheadAttention: True = may not attend; SDPA: True = may
            if attn_mask.dim() == 3:  # (batch * heads, length, source length)
                attn_mask = attn_mask.view(batch, heads, *attn_mask.shape[1:])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, width))
        return (out if self.batch_first else out.transpose(0, 1)), None
