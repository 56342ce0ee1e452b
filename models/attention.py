"""Scaled dot-product attention for every encoder (ViT, BERT), with the kernel chosen per device.

`attention` computes softmax(q k^T / sqrt(d) + mask) v, with dropout on the probabilities. On CUDA it
is `F.scaled_dot_product_attention` (flash / memory-efficient kernels). On CPU the fused kernel only
pays off in full precision without dropout: in bf16 it runs well below the two AMX matmuls it
replaces, and with dropout SDPA falls back to its math path, which upcasts to fp32 and keeps extra
copies. There the same function is written out: two matmuls and a softmax (over bf16 scores,
accumulated in fp32 inside the kernel, as the fused kernels do). Measured in docs/performance.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """q [B, H, Lq, D], k and v [B, H, Lk, D], boolean `mask` broadcastable to [B, H, Lq, Lk]
    (True = may attend) -> [B, H, Lq, D]. `dropout_p` applies as given: pass 0.0 outside training."""
    if q.device.type != "cpu" or (q.dtype not in (torch.bfloat16, torch.float16) and dropout_p == 0.0):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


class ViTAttention(TimmAttention):
    """timm's ViT self-attention (same parameters and state-dict names) on `attention`; with
    `fused_attn` False, timm's own explicit path (Grad-CAM hooks its attention dropout)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if not self.fused_attn or attn_mask is not None or is_causal or self.gate is not None:
            return super().forward(x, attn_mask, is_causal)  # Grad-CAM's explicit map; options ALBEF lacks
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))))
