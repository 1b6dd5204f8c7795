"""Long-CLIP's knowledge-preserved stretching: a 77-token CLIP text tower made to read 248 tokens.

Long-CLIP (Zhang et al., arXiv 2403.15378) found that CLIP's positional embeddings are well
trained only for about the first 20 positions (training captions are short). Its stretch keeps
those 20 rows as they are and interpolates the other 57 at ratio 4, so 20 + 4 x 57 = 248 rows:

    new[20 + 4i + j] = (4 - j)/4 * old[20 + i] + j/4 * old[21 + i]      i = 0..55, j = 0..3
    new[244 + j]     = old[76] + j/4 * (old[76] - old[75])               (the last row has no
                                                                          successor: extrapolate)

(`load_from_clip` in Long-CLIP's model/longclip.py). Any whole ratio r gives a context of
20 + r x 57 (134, 191, 248, ...). A caption of at most 20 tokens then embeds exactly as before.
The stretched model is written as an ordinary model directory, the stretch recorded in its config.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ragcap.embed import (
    CONFIG_NAME,
    load_embedder,
    model_config,
    parse_spec,
    preprocess_config,
    text_tower,
    write_checkpoint,
)
from ragcap.embedder_info import LONG_CONTEXT
from ragcap.errors import ModelError

KEEP = 20  # Long-CLIP's kept positions (its mask1 / mask2 split the table here)


def stretch_ratio(length: int, context: int, keep: int = KEEP) -> int:
    """The ratio r with context = keep + r * (length - keep), or a ModelError saying which contexts exist."""
    span = length - keep
    if span < 2:
        raise ModelError(f"a {length}-position text table has nothing past the {keep} kept positions to stretch")
    choices = ", ".join(str(keep + r * span) for r in range(2, 6))
    if context <= length:
        raise ModelError(f"--context {context}: the model already reads {length} tokens; a stretch must be longer: {choices}, ...")
    if (context - keep) % span:
        raise ModelError(
            f"--context {context} is not a stretch of {length}: Long-CLIP keeps the first {keep} positions and "
            f"repeats each of the other {span} a whole number of times, so the context is {keep} + r x {span}: {choices}, ..."
        )
    return (context - keep) // span


def stretch_positions(table: torch.Tensor, context: int, keep: int = KEEP) -> torch.Tensor:
    """The (context, width) positional table Long-CLIP's stretch makes from a (length, width) one."""
    ratio = stretch_ratio(table.shape[0], context, keep)
    tail = table[keep:]
    j = torch.arange(ratio, dtype=table.dtype).view(1, ratio, 1)  # weight j/ratio on the next row
    # Term by term as Long-CLIP writes it, (r - j) * a / r + j * b / r: in the same dtype, ratio 4
    # gives its table bit for bit (Long-CLIP computes in the checkpoint's float16, ragcap in float32).
    inner = (ratio - j) * tail[:-1, None] / ratio + j * tail[1:, None] / ratio
    last = tail[-1] + j[0] * (tail[-1] - tail[-2]) / ratio
    return torch.cat([table[:keep], inner.flatten(0, 1), last])


def stretch_model(spec: str, out: str | Path, context: int = LONG_CONTEXT, keep: int = KEEP, device: str | None = None) -> Path:
    """Write `spec` (any open_clip CLIP) with its text context stretched to `context` as a model directory."""
    parsed = parse_spec(spec)
    cfg = model_config(parsed)
    if cfg["text_cfg"].get("hf_model_name") or cfg["text_cfg"].get("hf_tokenizer_name"):
        raise ModelError(f"model {spec}: Long-CLIP's stretch applies to CLIP's own text transformer and tokenizer, not a Hugging Face one")
    stretch_ratio(cfg["text_cfg"].get("context_length", 77), context, keep)  # refuse a bad --context before loading
    require_new_model_dir(out)
    model = load_embedder(spec, device, precision="fp32").model  # the weights as stored, whatever $RAGCAP_PRECISION says
    found = text_tower(model)
    if found is None:
        raise ModelError(f"model {spec}: Long-CLIP's stretch needs a causal CLIP text tower pooled at the end token")
    tower = found[0]
    key = "positional_embedding" if tower is model else "text.positional_embedding"
    table = tower.positional_embedding.detach().cpu()
    ratio = stretch_ratio(table.shape[0], context, keep)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    state[key] = stretch_positions(table, context, keep)
    cfg["text_cfg"] = {**cfg["text_cfg"], "context_length": context}
    record = {"stretch": {"method": "Long-CLIP knowledge-preserved stretching", "source": parsed.canonical,
                          "from_context": table.shape[0], "context": context, "keep": keep, "ratio": ratio}}
    return write_checkpoint(out, state, cfg, preprocess_config(model), record)


def require_new_model_dir(out: str | Path) -> None:
    """Refuse to overwrite a model directory (its config is what marks it)."""
    out = Path(out)
    if (out / CONFIG_NAME).exists():
        raise ModelError(f"{out} already holds a model ({CONFIG_NAME}); choose another directory or delete it")
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out} is a file; give a directory to write the model into")
