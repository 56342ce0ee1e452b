"""Grad-CAM for ALBEF: which image patches drive the image-text score, per text token.

ITM mode (the original's visualisation and its default for grounding): in one fusion layer's
cross-attention, the probabilities A [B, heads, L, 1+P] from every text token to every image token are
weighted by the positive part of their gradient dS/dA, S = the ITM 'match' logit, and averaged over
heads. Dropping the image [CLS] token leaves one map per text token over the P = g x g patch grid
(padding tokens are zero). The paper finds the third fusion layer (index 8 of 12) localises best.
The whole-sentence map is the mean of the token maps ([CLS] included, as the original Grounding.py).

ITC mode (Grounding.py `--gradcam_mode itc`): the same on one ViT block's self-attention, row of the
image [CLS] token, S = image-text cosine similarity / temp. One map per text; no per-token detail.

Maps are non-negative, finite, in the model's patch grid; `Grounding.py` and `scripts/visualize.py`
both use them. Run the model in eval mode: dropout would make the maps random.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch

GradcamMode = Literal["itm", "itc"]


def fusion_layer_range(model) -> range:
    """Indices (into `model.bert.encoder.layer`) of the layers with cross-attention."""
    return range(model.bert_cfg.fusion_layer, len(model.bert.encoder.layer))


def default_block_num(model) -> int:
    """The third fusion layer (the paper's choice, 8 in the full-size model), but never the last of
    several: only [CLS] of the last layer reaches the ITM head, so its other token maps are all zero
    (the 2-layer demo fusion gets its first layer)."""
    layers = fusion_layer_range(model)
    if not layers:
        raise ValueError("the model has no fusion layer (fusion_layer == num_hidden_layers): no ITM Grad-CAM")
    return layers[max(0, min(2, len(layers) - 2))]


def check_block_num(model, block_num: int, mode: GradcamMode) -> None:
    """A clear error when `block_num` names no layer Grad-CAM can read in this model."""
    if mode == "itm":
        valid = fusion_layer_range(model)
        if block_num not in valid:
            raise ValueError(f"block_num {block_num} is not a fusion (cross-attention) layer of this model: "
                             f"valid are {valid.start}..{valid.stop - 1} (text layers 0..{valid.start - 1} "
                             f"have no cross-attention; the original uses 8, the third fusion layer)")
    elif mode == "itc":
        depth = len(model.visual_encoder.blocks)
        if not 0 <= block_num < depth:
            raise ValueError(f"block_num {block_num} is not a ViT block of this model (itc mode): valid are "
                             f"0..{depth - 1}")
    else:
        raise ValueError(f"gradcam_mode must be 'itm' or 'itc', got {mode!r}")


def patch_grid(num_patches: int) -> int:
    """Side g of the square patch grid holding `num_patches` (image tokens without [CLS])."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} image patches do not form a square grid")
    return side


@contextlib.contextmanager
def kept_cross_attention(model, block_num: int):
    """Layer `block_num`'s cross-attention with `keep_attention` on (explicit attention, map kept)."""
    att = model.bert.encoder.layer[block_num].crossattention.self
    att.keep_attention = True
    try:
        yield att
    finally:
        att.keep_attention, att.attention_map = False, None


@contextlib.contextmanager
def kept_vit_attention(model, block_num: int):
    """A dict whose "map" receives ViT block `block_num`'s attention probabilities [B, heads, N, N]:
    timm's unfused path for that block, with a forward hook on its attention dropout."""
    attn, store = model.visual_encoder.blocks[block_num].attn, {}
    fused = attn.fused_attn
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda module, args, out: store.__setitem__("map", out))
    try:
        yield store
    finally:
        handle.remove()
        attn.fused_attn = fused


def _weighted(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Attention times positive gradient, averaged over heads: [B, heads, ..., N] -> [B, ..., N]."""
    return (attn.float() * grad.float().clamp(min=0)).mean(1)


def itm_token_maps(model, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   block_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token maps [B, L, g, g] float32, ITM logits [B, 2]) of B (image, text) pairs; the maps explain
    the 'match' logit (column 1).

    Only the fusion layers need a graph: the ViT and the text layers run without one and the gradient
    is taken with respect to the kept attention map alone (no parameter gradient is touched).
    """
    check_block_num(model, block_num, "itm")
    with torch.no_grad():
        image_embeds = model.visual_encoder.forward_features(image)
        text_embeds = model.bert(input_ids, attention_mask, mode="text")
    image_embeds.requires_grad_(True)  # a graph from the map to the score even with frozen weights
    with torch.enable_grad(), kept_cross_attention(model, block_num) as att:
        fused = model.bert.fuse(text_embeds, attention_mask, image_embeds)
        logits = model.itm_head(fused[:, 0])
        (grad,) = torch.autograd.grad(logits[:, 1].sum(), att.attention_map)  # pairs are independent
        cam = _weighted(att.attention_map.detach()[..., 1:], grad[..., 1:])  # [B, L, P]
    cam = cam * attention_mask[..., None].to(cam.dtype)
    g = patch_grid(cam.shape[-1])
    return cam.reshape(*cam.shape[:2], g, g), logits.detach().float()


def itc_map(model, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            block_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps [B, g, g] float32, similarities image_feat . text_feat / temp [B]) of B (image, text) pairs,
    from ViT block `block_num` (the image [CLS] row)."""
    check_block_num(model, block_num, "itc")
    with torch.no_grad():
        text_feat = model.encode_text(input_ids, attention_mask)[1]
    image = image.detach().requires_grad_(True)
    with torch.enable_grad(), kept_vit_attention(model, block_num) as store:
        image_feat = model.encode_image(image)[1]
        sim = (image_feat * text_feat).sum(-1) / model.temp  # the diagonal of image_feat @ text_feat.T
        (grad,) = torch.autograd.grad(sim.sum(), store["map"])
        cam = _weighted(store["map"].detach()[:, :, 0, 1:], grad[:, :, 0, 1:])  # [B, P]
    g = patch_grid(cam.shape[-1])
    return cam.reshape(-1, g, g), sim.detach().float()


def sentence_map(token_maps: torch.Tensor, attention_mask: torch.Tensor, with_cls: bool = True) -> torch.Tensor:
    """Mean of the token maps [B, L, g, g] over each text's own tokens -> [B, g, g]; [CLS] (position 0)
    included unless `with_cls` is False (then the mean of the word maps alone).

    ALBEF parity: the original includes [CLS] and averages over the padded length; that is a per-text
    constant factor, which changes no box choice, and dividing by the text's own length keeps a map
    independent of the other texts in its batch.
    """
    mask = attention_mask.to(token_maps.dtype)
    if not with_cls:
        mask = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, 1:]], dim=1)
    return (token_maps * mask[..., None, None]).sum(1) / mask.sum(1).clamp(min=1)[:, None, None]


def gradcam(model, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            mode: GradcamMode, block_num: int, with_cls: bool = True) -> torch.Tensor:
    """Whole-text maps [B, g, g] float32: the sentence map in ITM mode (`with_cls`: see `sentence_map`),
    the image [CLS] map in ITC mode."""
    if mode == "itm":
        maps = itm_token_maps(model, image, input_ids, attention_mask, block_num)[0]
        return sentence_map(maps, attention_mask, with_cls)
    if mode == "itc":
        return itc_map(model, image, input_ids, attention_mask, block_num)[0]
    raise ValueError(f"gradcam_mode must be 'itm' or 'itc', got {mode!r}")
