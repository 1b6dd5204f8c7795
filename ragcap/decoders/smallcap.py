"""SmallCap (Ramos et al., arXiv 2209.15323): a frozen GPT-2 that cross-attends to a frozen CLIP
vision tower's patch features and reads the captions retrieved for the image in its prompt.

    prompt:  Similar images show\\n\\n<cap 1>\\n\\n...<cap 4>.\\n\\nThis image shows   (ragcap.decoders.lm_prompt)
    input:   <prompt>  a    dog  runs
    target:       ...  a    dog  runs  .         cross-attending to the image's patches in every block

Only the cross-attention layers train. Their width is reduced (SmallCap's
cross_attention_reduce_factor): queries, keys and values have `cross_attention_width`
features split over the LM's heads, so SmallCap7M (GPT-2 small, 768 / 4 = 192 wide, 12 heads of
16) trains 7M parameters, SmallCap3.5M 768 / 8 and SmallCap1.8M 768 / 16. Keys and values come
straight from the encoder's width (SmallCap's `encoder_hidden_size`), so no projection is needed.

transformers' GPT-2 has the cross-attention blocks (add_cross_attention) and their KV cache;
ReducedCrossAttention only gives its projections the reduced width. The encoder is an open_clip
ViT named by the decoder's embedder (ragcap.embed, `encode_image_tokens`); the memory the
prompts come from may be of another CLIP (SmallCap encodes with ViT-B/32 and retrieves with
RN50x64), which the config records as the retrieval embedder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ragcap.decoders.base import IGNORE, Decoder, resolved
from ragcap.decoders.clipcap import LM_DIR
from ragcap.decoders.lm import LMInput, LMStepper, save_lm_assets
from ragcap.decoders.lm_prompt import MAX_CAPTION_TOKENS, build_prompt, left_padded, select_captions
from ragcap.decoders.tokenizers import load_gpt2_tokenizer
from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import ModelError
from ragcap.generation import SearchOptions

TRAINED = ("crossattention", "ln_cross_attn")  # parameter names that train; the rest stays frozen


@dataclass(frozen=True)
class SmallCapConfig:
    encoder_width: int  # features per patch of the encoder (ViT-B/32: 768)
    cross_attention_width: int  # SmallCap7M: the LM's width / 4 (192 for GPT-2 small)
    retrieval_spec: str  # the embedder of the memory it was trained to read (SmallCap: RN50x64)
    retrieval_dim: int
    k: int = 4  # retrieved captions in the prompt (SmallCap's k)
    max_caption_tokens: int = MAX_CAPTION_TOKENS  # retrieved captions longer than this are skipped
    # SmallCap's CAPTION_LENGTH: at most 25 new tokens, and training cuts captions to 25 tokens
    # before the stop token.
    max_tokens: int = 25
    stop_token: str = "."  # SmallCap sets GPT-2's eos_token to '.'

    def __post_init__(self):
        if min(self.encoder_width, self.cross_attention_width, self.k, self.max_caption_tokens, self.max_tokens) < 1:
            raise ModelError("SmallCap widths, k, max_caption_tokens and max_tokens must be >= 1")

    @property
    def retrieval(self) -> EmbedderInfo:
        return EmbedderInfo(self.retrieval_spec, self.retrieval_dim)


@dataclass
class SmallCapInput:
    """What SmallCap captions from: each image's patch features and its retrieved captions."""

    patches: torch.Tensor  # (n, tokens, encoder_width)
    neighbours: Sequence[Sequence[str]]  # per image, retrieved captions in retrieval order
    prompt_ids: Sequence[Sequence[int]] | None = None  # the prompts' tokens when already built (training)


def _transformer_blocks(lm: nn.Module) -> nn.ModuleList:
    blocks = getattr(getattr(lm, "transformer", None), "h", None)
    if blocks is None or not all(hasattr(b, "crossattention") for b in blocks):
        raise ModelError(f"SmallCap needs a GPT-2 language model (with cross-attention blocks), got {type(lm).__name__}")
    return blocks


def reduced_cross_attention(config, width: int, encoder_width: int, layer_idx: int) -> nn.Module:
    """GPT-2's cross-attention with its projections `width` wide instead of the LM's width: its
    forward and KV cache as they are, with heads of width / n_head features."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
    from transformers.pytorch_utils import Conv1D

    attention = GPT2Attention(config, is_cross_attention=True, layer_idx=layer_idx)
    if width % attention.num_heads:
        raise ModelError(f"cross-attention width {width} is not divisible by the LM's {attention.num_heads} heads")
    attention.split_size = width
    attention.head_dim = width // attention.num_heads
    attention.scaling = attention.head_dim**-0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        attention.scaling /= float(layer_idx + 1)
    attention.q_attn = Conv1D(width, attention.embed_dim)
    attention.c_attn = Conv1D(2 * width, encoder_width)
    attention.c_proj = Conv1D(attention.embed_dim, width)
    return attention


def lm_config(source: str | Path):
    """The language model config in `source` (a directory or hub name)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise ModelError(f"no language-model config in {source} ({err}); pass the LM's directory or hub name") from err
    return config


def cross_attention_lm(lm: str | Path | object, config: SmallCapConfig) -> nn.Module:
    """The GPT-2 of a config (or of the config in a directory / hub name), randomly initialised
    (or on the meta device), with reduced cross-attention in every block."""
    from transformers import AutoModelForCausalLM

    lm_cfg = lm_config(lm) if isinstance(lm, (str, Path)) else lm
    if lm_cfg.model_type != "gpt2":
        raise ModelError(f"SmallCap's cross-attention is built on GPT-2; {lm} is a {lm_cfg.model_type} model")
    lm_cfg.add_cross_attention = True
    model = AutoModelForCausalLM.from_config(lm_cfg)
    for i, block in enumerate(_transformer_blocks(model)):
        block.crossattention = reduced_cross_attention(lm_cfg, config.cross_attention_width, config.encoder_width, i)
    return model


def prompt_ids(tokenizer, neighbours: Sequence[Sequence[str]], k: int, max_caption_tokens: int = MAX_CAPTION_TOKENS) -> list[list[int]]:
    """Each image's prompt tokens: SmallCap's template around its first k retrieved captions of
    at most max_caption_tokens tokens."""
    prompts = [build_prompt(select_captions(caps, tokenizer, k, max_caption_tokens)) for caps in neighbours]
    return tokenizer(prompts, add_special_tokens=False)["input_ids"]


class SmallCapDecoder(Decoder):
    kind = "smallcap"
    config_class = SmallCapConfig
    conditioning = "patches"
    train_hint = "train one with `ragcap train-smallcap`"
    required_files = (f"{LM_DIR}/config.json",)  # the LM's config; its tokenizer files sit beside it

    def __init__(self, config: SmallCapConfig, embedder: EmbedderInfo, lm: nn.Module, tokenizer):
        """embedder: the encoder whose patch features the model reads (its retrieval embedder is in config)."""
        super().__init__(config, embedder)
        self.lm = lm
        self.tokenizer = tokenizer
        _transformer_blocks(lm)
        stop = tokenizer.encode(config.stop_token, add_special_tokens=False)
        if not stop:
            raise ModelError(f"the tokenizer has no token for the stop token {config.stop_token!r}")
        self.stop_id = stop[0]
        for name, param in self.lm.named_parameters():
            param.requires_grad_(any(part in name for part in TRAINED))

    @classmethod
    def load_from(cls, config: SmallCapConfig, embedder: EmbedderInfo, directory: Path) -> "SmallCapDecoder":
        return cls(config, embedder, cross_attention_lm(directory / LM_DIR, config), load_gpt2_tokenizer(directory / LM_DIR))

    def check_embedder(self, embedder: EmbedderInfo, collection: str) -> None:
        """The memory must be of the embedder it retrieved with in training (its prompts' source)."""
        if not self.config.retrieval.matches(embedder):
            where = self.source or "(unsaved decoder)"
            raise ModelError(
                f"SmallCap model {where} retrieves from memories of {self.config.retrieval_spec} (dim {self.config.retrieval_dim}), "
                f"but collection {collection} uses {embedder.spec} (dim {embedder.dim}); caption with a memory of "
                f"{self.config.retrieval_spec} (`ragcap ingest ... -m {self.config.retrieval_spec}`), or {self.train_hint} on this one"
            )

    # ---- conditioning -----------------------------------------------------------------------

    def encode_patches(self, images) -> torch.Tensor:
        """The encoder's patch features of PIL images (n, tokens, encoder_width)."""
        from ragcap.embed import load_embedder

        encoder = load_embedder(self.embedder.spec, str(self.device), image_only=True, precision=self.precision)
        if not self.embedder.matches(encoder.info):
            raise ModelError(f"encoder {self.embedder.spec} now makes {encoder.info.dim}-d embeddings, not {self.embedder.dim}-d; "
                             "it is not the model this SmallCap was trained on")
        return torch.from_numpy(encoder.encode_image_tokens(images)[1])

    def prompt_ids(self, neighbours: Sequence[Sequence[str]]) -> list[list[int]]:
        return prompt_ids(self.tokenizer, neighbours, self.config.k, self.config.max_caption_tokens)

    def _patches(self, cond: SmallCapInput) -> torch.Tensor:
        patches = torch.as_tensor(cond.patches)
        if patches.ndim != 3 or patches.shape[2] != self.config.encoder_width:
            raise ModelError(f"patch features must have shape (n, tokens, {self.config.encoder_width}), got {tuple(patches.shape)}")
        return patches.to(self.device, torch.float32)

    # ---- generation -------------------------------------------------------------------------

    def prepare(self, cond: SmallCapInput) -> LMInput:
        ids = cond.prompt_ids if cond.prompt_ids is not None else self.prompt_ids(cond.neighbours)
        inputs = left_padded(ids, self.lm.get_input_embeddings(), self.device)
        inputs.encoder_states = self._patches(cond)
        return inputs

    def stepper(self) -> LMStepper:
        return LMStepper(self.lm)

    def search_defaults(self, options: SearchOptions) -> SearchOptions:
        # SmallCap's generate: 3 beams, summed log-probs (length_penalty 0), stops at '.' only.
        return resolved(options, self.config.max_tokens, beam=3, length_alpha=0.0, stop_ids=(self.stop_id,))

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def target_text(self, caption: str) -> str:
        """The caption as this model is trained to write it: whitespace normalised, without its final '.'."""
        return " ".join(caption.split()).removesuffix(self.config.stop_token).rstrip()

    # ---- training ---------------------------------------------------------------------------

    def training_targets(self, captions: list[str]) -> torch.Tensor:
        """Each caption's first max_tokens tokens, then '.' (SmallCap: text_ids[:25] + [eos])."""
        ids = [row[: self.config.max_tokens] + [self.stop_id]
               for row in self.tokenizer([self.target_text(c) for c in captions], add_special_tokens=False)["input_ids"]]
        targets = torch.full((len(ids), max(map(len, ids))), IGNORE, dtype=torch.long)
        for i, row in enumerate(ids):
            targets[i, : len(row)] = torch.tensor(row)
        return targets

    def teacher_forced_logits(self, cond: SmallCapInput, targets: torch.Tensor) -> torch.Tensor:
        """The prompt (left-padded) then the caption; the prompt's last token predicts the first
        caption token, so the loss falls on the caption and its '.' only."""
        targets = targets.to(self.device)
        inputs = self.prepare(cond)
        tokens = self.lm.get_input_embeddings()(targets[:, :-1].clamp(min=0))
        embeds = torch.cat([inputs.embeds, tokens], dim=1)
        mask = torch.cat([inputs.mask, torch.ones(tokens.shape[:2], dtype=inputs.mask.dtype, device=self.device)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, encoder_hidden_states=inputs.encoder_states,
                      logits_to_keep=targets.shape[1], use_cache=False)
        return out.logits

    # ---- persistence ------------------------------------------------------------------------

    def save_assets(self, out: Path) -> None:
        save_lm_assets(self.lm, self.tokenizer, out / LM_DIR)

