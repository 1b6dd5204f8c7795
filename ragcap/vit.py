"""CLIP's image tower, a vision transformer, and its inference preprocessing, without open_clip.

Captioning only embeds images, and importing open_clip costs a new process about 4 s on a 2-core CPU
(torchvision, timm and transformers come with it) before a caption can start. This file is the
part of open_clip a captioner runs: `open_clip.transformer.VisionTransformer` with its
ResidualAttentionBlocks, written out for the configurations the common CLIP towers use (ViT-B-32,
ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14 and their OpenAI, LAION and DataComp weights), and
open_clip's inference transform on PIL images. Same maths in the same order, so the same numbers:

- parameters have open_clip's names, so the `visual.` tensors of an open_clip checkpoint load
  with load_state_dict(strict=True) unchanged;
- attention is nn.MultiheadAttention(batch_first=True), as open_clip's blocks use it: the same
  kernels, and ragcap.int8 rewrites it into Linears the same way;
- preprocessing makes PIL's own resize and crop calls that torchvision makes, so the pixels are
  bit-identical.

`supports` says which model configs this covers; ragcap.embed loads the others through open_clip.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

# open_clip's PreprocessCfg defaults (OpenAI's normalisation): what a config that names no
# preprocessing gets.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_DEFAULTS = {"size": 224, "mode": "RGB", "mean": OPENAI_MEAN, "std": OPENAI_STD,
                       "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}

# vision_cfg keys this tower implements, then those it does not: each of these may only hold the
# value that turns its feature off, as open_clip's own defaults do. Any other key (a newer
# open_clip option) means "not supported".
_VISION_SIZES = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "ls_init_value",
                 "patch_dropout"}  # open_clip drops patches in training only: an eval forward skips it
_VISION_OFF = {
    "timm_model_name": (None, ""), "attentional_pool": (False,), "no_ln_pre": (False,),
    "pos_embed_type": ("learnable",), "final_ln_after_pool": (False,), "pool_type": ("tok",),
    "output_tokens": (False,), "act_kwargs": (None,), "norm_kwargs": (None, {}), "block_type": (None, "default"),
    "qk_norm": (False,), "scaled_cosine_attn": (False,), "scale_heads": (False,), "scale_attn_inner": (False,),
    "scale_attn": (False,), "scale_fc": (False,),
}
# Read by features that are off above (the attentional pooler, timm towers): harmless.
_VISION_UNUSED = {"attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained", "timm_pool", "timm_proj",
                  "timm_proj_bias", "timm_drop", "timm_drop_path"}
# Top-level model_cfg keys that leave the image tower as it is (the text tower's kind, the
# contrastive logits). multimodal_cfg (CoCa, whose encode_image differs) and unknown keys are refused.
_MODEL_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text", "init_logit_scale",
               "init_logit_bias", "nonscalar_logit_scale"}


def supports(model_cfg: dict, preprocess_cfg: dict) -> bool:
    """Whether this file computes exactly what open_clip does for this model: a plain CLIP ViT
    (no timm or ResNet tower, class-token pooling, learnable positions, default blocks, norms and
    activations) with a preprocessing it matches bit for bit."""
    vision = model_cfg.get("vision_cfg")
    if not isinstance(vision, dict) or not model_cfg.keys() <= _MODEL_KEYS or "embed_dim" not in model_cfg:
        return False
    for key, value in vision.items():
        if key in _VISION_OFF:
            if value not in _VISION_OFF[key]:
                return False
        elif key not in _VISION_SIZES | _VISION_UNUSED:
            return False
    if isinstance(vision.get("layers", 12), (list, tuple)):  # a ResNet's stages
        return False
    return _supports_preprocess(preprocess_cfg)


def _supports_preprocess(cfg: dict) -> bool:
    # 'longest' pads to the target size (torchvision's fill rules per image mode): not done here.
    three_numbers = all(isinstance(cfg.get(k), (list, tuple)) and len(cfg[k]) == 3 for k in ("mean", "std"))
    return (cfg.get("mode") == "RGB" and cfg.get("resize_mode") in ("shortest", "squash")
            and cfg.get("interpolation") in ("bicubic", "bilinear", "random") and three_numbers)


def _pair(size) -> tuple[int, int]:
    """open_clip's to_2tuple: an int means a square."""
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


@dataclass(frozen=True)
class ViTConfig:
    """One CLIP image tower's shape (ViT-B-32: 224 px in 32 px patches, width 768, 12 layers of
    12 heads, into CLIP's 512-wide space)."""

    image_size: tuple[int, int]  # (height, width) of the input
    patch_size: tuple[int, int]  # each patch is one token: conv1's kernel and stride
    width: int  # the tokens' width throughout the transformer
    layers: int
    heads: int  # configs give the head width (64 unless said): the count is width // head_width
    mlp_width: int  # int(width * mlp_ratio), truncated as open_clip does (ViT-bigG: 4.9231 -> 8192)
    output_dim: int  # embed_dim: the joint image-text space the class token is projected into
    layer_scale: bool  # ls_init_value set: each residual branch is scaled per channel (ls_1, ls_2)
    # OpenAI's weights, and tags trained like them, use x * sigmoid(1.702 x), not GELU: the
    # config's quick_gelu, which ragcap.embed forces for such tags as open_clip's factory does.
    quick_gelu: bool

    @classmethod
    def from_model_cfg(cls, model_cfg: dict) -> "ViTConfig":
        """From open_clip's model_cfg, with CLIPVisionCfg's defaults where it is silent: a config
        means here what it means to open_clip."""
        vision = model_cfg["vision_cfg"]
        width = vision.get("width", 768)
        return cls(
            image_size=_pair(vision.get("image_size", 224)),
            patch_size=_pair(vision.get("patch_size", 16)),
            width=width,
            layers=vision.get("layers", 12),
            heads=width // vision.get("head_width", 64),
            mlp_width=int(width * vision.get("mlp_ratio", 4.0)),
            output_dim=model_cfg["embed_dim"],
            layer_scale=vision.get("ls_init_value") is not None,
            quick_gelu=bool(model_cfg.get("quick_gelu", False)),
        )


# ---------------------------------------------------------------------------------------------
# the tower. Weights always come from a checkpoint, so nothing is initialised here: the tower is
# built on the meta device and the checkpoint's tensors are assigned to it (see load).


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm with its output cast back to its input's dtype, as open_clip's: CUDA's
    autocast computes the norm in float32 and returns float32, and the cast keeps the residual
    stream in the autocast dtype there (on a CPU the norm already returns its input's dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ResidualAttentionBlock(nn.Module):
    """Pre-norm self-attention then MLP, each a residual branch (optionally layer-scaled)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        width = config.width
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, config.heads, batch_first=True)
        self.ls_1 = LayerScale(width) if config.layer_scale else nn.Identity()
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, config.mlp_width)),
            ("gelu", QuickGELU() if config.quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(config.mlp_width, width)),
        ]))
        self.ls_2 = LayerScale(width) if config.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Query, key and value are one tensor, as open_clip passes them: MultiheadAttention picks
        # its fused inference kernel only for self-attention on one tensor, and the same kernel
        # gives the same bits.
        normed = self.ln_1(x)
        x = x + self.ls_1(self.attn(normed, normed, normed, need_weights=False)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """The blocks, under open_clip's name: encode_image_tokens hooks this module's output, the
    last hidden states before ln_post (what SmallCap cross-attends to)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.width = config.width
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """Patches -> tokens (plus a class token) -> transformer -> the class token, projected."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.image_size = config.image_size  # read by the embedder for JPEG draft decoding
        grid = (config.image_size[0] // config.patch_size[0]) * (config.image_size[1] // config.patch_size[1])
        # A patch's pixels projected to a token is a convolution with the patch as kernel and stride.
        self.conv1 = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(config.width))
        self.positional_embedding = nn.Parameter(torch.empty(grid + 1, config.width))
        self.ln_pre = LayerNorm(config.width)
        self.transformer = Transformer(config)
        self.ln_post = LayerNorm(config.width)
        self.proj = nn.Parameter(torch.empty(config.width, config.output_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels)  # (n, width, grid height, grid width)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (n, patches, width)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)[:, 0] @ self.proj


class ImageCLIP(nn.Module):
    """The image half of open_clip's CLIP: the tower under CLIP's name for it, `visual`, so the
    checkpoint's `visual.` names and code written for open_clip's model (model.visual,
    model.encode_image) hold unchanged."""

    def __init__(self, visual: VisionTransformer):
        super().__init__()
        self.visual = visual

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(pixels)
        return F.normalize(features, dim=-1) if normalize else features


def load(model_cfg: dict, visual_state: dict[str, torch.Tensor]) -> ImageCLIP:
    """The tower of `model_cfg` holding `visual_state` (a checkpoint's `visual.` tensors, names
    without the prefix) without copying them: memory-mapped weights stay mapped. Raises
    RuntimeError when names or shapes differ from open_clip's (a checkpoint open_clip converts
    or resizes on load)."""
    with torch.device("meta"):
        tower = VisionTransformer(ViTConfig.from_model_cfg(model_cfg))
    # float32 like the parameters open_clip copies a checkpoint into (a float16 file included).
    state = {name: t.float() if t.is_floating_point() else t for name, t in visual_state.items()}
    tower.load_state_dict(state, strict=True, assign=True)
    return ImageCLIP(tower).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# preprocessing: open_clip's image_transform(is_train=False) for 'shortest' and 'squash'


def preprocess_config(config_preprocess: dict, model_cfg: dict) -> dict:
    """The inference preprocessing open_clip's factory settles on (model.visual.preprocess_cfg):
    its defaults, overlaid by a checkpoint's preprocess_cfg (unknown keys and None values
    skipped), with the tower's own input size."""
    merged = dict(PREPROCESS_DEFAULTS)
    merged.update({k: v for k, v in config_preprocess.items() if k in PREPROCESS_DEFAULTS and v is not None})
    merged["size"] = _pair(model_cfg["vision_cfg"].get("image_size", 224))  # the tower's, as open_clip sets it
    return merged


class Preprocess:
    """PIL image -> normalised float32 (3, height, width) tensor, bit-identical to open_clip's
    inference transform: resize (torchvision's sizes, PIL's resampling, in the image's own
    mode), center crop, RGB, /255, normalise."""

    def __init__(self, preprocess_cfg: dict):
        self.size = _pair(preprocess_cfg["size"])  # (height, width)
        self.squash = preprocess_cfg["resize_mode"] == "squash"  # else 'shortest': resize to cover, crop
        # torchvision maps its modes to PIL's filters; 'random' means bicubic at inference. A
        # non-square 'shortest' target goes through open_clip's ResizeKeepRatio, which it builds
        # without the configured interpolation: bicubic whatever the config says.
        bilinear = preprocess_cfg["interpolation"] == "bilinear" and (self.squash or self.size[0] == self.size[1])
        self.resample = Image.Resampling.BILINEAR if bilinear else Image.Resampling.BICUBIC
        # Float32 constants as Normalize makes them, so (x - mean) / std rounds the same.
        self.mean = torch.tensor(preprocess_cfg["mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(preprocess_cfg["std"], dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = _resize(image, self.size if self.squash else self._covering_size(image), self.resample)
        if not self.squash:
            image = _center_crop(image, self.size)
        rgb = np.array(image.convert("RGB"), dtype=np.uint8)
        pixels = torch.from_numpy(rgb).permute(2, 0, 1).contiguous().float().div(255)  # torchvision's to_tensor
        return pixels.sub_(self.mean).div_(self.std)

    def _covering_size(self, image: Image.Image) -> tuple[int, int]:
        """(height, width) scaled so the image covers the target, rounded as open_clip does."""
        width, height = image.size
        target_height, target_width = self.size
        if target_height == target_width:  # torchvision's Resize(int): the long side truncated
            short, long = sorted((width, height))
            scaled_long = int(target_height * long / short)
            return (scaled_long, target_height) if width <= height else (target_height, scaled_long)
        ratio = min(height / target_height, width / target_width)  # ResizeKeepRatio: rounded
        return round(height / ratio), round(width / ratio)


def _resize(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    height, width = size
    return image if image.size == (width, height) else image.resize((width, height), resample)


def _center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """torchvision's center_crop; the image always covers `size` here, so it never pads."""
    height, width = size
    top = int(round((image.height - height) / 2.0))
    left = int(round((image.width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))
