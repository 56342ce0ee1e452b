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


def build_vit(image_res: int, patch_size: int, width: int, depth: int, heads: int) -> VisionTransformer:
    """A ViT whose `forward_features` gives [B, 1 + (image_res/patch)^2, width] token states."""
    if image_res % patch_size:
        raise ValueError(f"image_res {image_res} is not a multiple of the patch size {patch_size}")
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
        embed_layer=LinearPatchEmbed,
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
