"""The image encoder: timm's VisionTransformer with ALBEF's settings, and position-embedding resizing.

ALBEF's ViT is DeiT-B/16: pre-norm blocks, qkv bias, MLP ratio 4, exact GELU, LayerNorm eps 1e-6, a CLS
token and learned absolute position embeddings, all tokens returned after the final norm. timm's class
has exactly these parameter names (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.i.attn.qkv`,
...), so the official checkpoints load into it unchanged.
"""

from __future__ import annotations

import logging
import os
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models.attention import ViTAttention

logger = logging.getLogger(__name__)


class LinearPatchEmbed(PatchEmbed):
    """timm's patch embedding as one matmul over the flattened patches: the conv's stride equals its
    kernel, so this is the same function with the same `proj` weights. On CPU the conv's backward took
    ~6x the matmul's (docs/performance.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        (ph, pw), size = self.patch_size, self.img_size
        if self.dynamic_img_pad or not self.flatten or H % ph or W % pw:
            return super().forward(x)
        if size is not None and self.strict_img_size and (H, W) != tuple(size):
            raise ValueError(f"image of {H}x{W} px, the ViT was built for {size[0]}x{size[1]} (image_res)")
        patches = x.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * ph * pw)
        return self.norm(F.linear(patches, self.proj.weight.flatten(1), self.proj.bias))


class ConvStemPatchEmbed(PatchEmbed):
    """A convolutional stem in place of the patch projection (Xiao et al. 2021, "Early convolutions help
    transformers see better"): log2(patch) 3x3 stride-2 convolutions with GELU, channels doubling up to
    the ViT width, then a 1x1 projection; the same token grid as the patch embedding. For a ViT trained
    from scratch on little data (the demo), where a linear patch projection learns shape outlines slowly.
    Not ALBEF's: official checkpoints need the default `vit_stem: patch`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        (patch, _), width, chans = self.patch_size, self.proj.out_channels, self.proj.in_channels
        stages = patch.bit_length() - 1
        if patch != 2**stages or stages < 1 or self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"vit_stem 'conv' needs a square power-of-two patch size, got {self.patch_size}")
        layers, c_in = [], chans
        for k in range(stages):
            c_out = width // 2 ** (stages - k)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
            c_in = c_out
        self.proj = nn.Sequential(*layers, nn.Conv2d(c_in, width, 1))


VIT_STEMS = {"patch": LinearPatchEmbed, "conv": ConvStemPatchEmbed}


def build_vit(image_res: int, patch_size: int, width: int, depth: int, heads: int,
              stem: str = "patch") -> VisionTransformer:
    """A ViT whose `forward_features` gives [B, 1 + (image_res/patch)^2, width] token states."""
    if image_res % patch_size:
        raise ValueError(f"image_res {image_res} is not a multiple of the patch size {patch_size}")
    if stem not in VIT_STEMS:
        raise ValueError(f"vit_stem must be one of {sorted(VIT_STEMS)}, got {stem!r}")
    return VisionTransformer(
        img_size=image_res,
        patch_size=patch_size,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=0,
        global_pool="",
        attn_layer=ViTAttention,
        embed_layer=VIT_STEMS[stem],
    )


def resize_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize [1, 1 + n, D] position embeddings to [1, 1 + num_patches, D] (checkpoint trained at another
    resolution, e.g. 256 -> 384 px when fine-tuning). Bicubic, no antialias: as the original."""
    old = pos_embed.shape[1] - 1
    if old == num_patches:
        return pos_embed
    old_side, new_side = int(old**0.5), int(num_patches**0.5)
    if old_side**2 != old or new_side**2 != num_patches:
        raise ValueError(f"pos_embed: cannot resize a non-square grid ({old} -> {num_patches} patches)")
    logger.info("resizing position embedding from %d to %d patches", old, num_patches)
    return resample_abs_pos_embed(
        pos_embed, (new_side, new_side), (old_side, old_side), num_prefix_tokens=1, antialias=False
    )


def load_vit_weights(vit: VisionTransformer, source: str) -> None:
    """Initialise from a local checkpoint file (DeiT's `{'model': ...}` or a plain state dict) or a timm
    model name (e.g. `deit_base_patch16_224`, fetched by timm). Classifier heads are dropped."""
    if os.path.isfile(source):
        if source.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(source)
        else:
            sd = torch.load(source, map_location="cpu", weights_only=True)
            sd = sd.get("model", sd)
    else:
        import timm

        sd = timm.create_model(source, pretrained=True, num_classes=0).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith(("head", "fc_norm", "dist_token", "head_dist"))}
    sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], vit.patch_embed.num_patches)
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"ViT weights {source}: missing {missing}, unexpected {unexpected}")
    logger.info("image encoder initialised from %s", source)
