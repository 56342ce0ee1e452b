"""ALBEF: the pieces every task model shares, and the pretraining model (ITC + ITM + MLM).

Attribute names follow the official checkpoints (`visual_encoder`, `text_encoder.bert`, `vision_proj`,
`itm_head`, `*_m` momentum twins, `image_queue`, `queue_ptr`, `temp`) so they load with `strict=True`.
Original behaviour kept on purpose is marked `# ALBEF parity:`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.bert import BertConfig, BertForMaskedLM, BertModel, load_hf_bert, select_image_kv
from models.vit import build_vit, load_vit_weights

logger = logging.getLogger(__name__)


@dataclass
class ALBEFConfig:
    """Model keys of the task YAML files; names are the original's so users' configs carry over."""

    bert_config: str = "configs/config_bert.json"  # BERT sizes + fusion_layer + encoder_width
    text_encoder: str | None = "bert-base-uncased"  # HF name or folder: BERT weights and tokenizer
    tokenizer: str | None = None  # HF name or folder of the vocabulary; None: the text_encoder's
    vit_init: str | None = None  # timm name or local file for the ViT (DeiT-B/16 in the original)
    image_res: int = 256
    vit_patch_size: int = 16
    vit_width: int = 768
    vit_depth: int = 12
    vit_heads: int = 12
    vision_width: int = 768
    embed_dim: int = 256
    temp: float = 0.07
    mlm_probability: float = 0.15
    queue_size: int = 65536
    momentum: float = 0.995
    alpha: float = 0.4
    grad_checkpointing: bool = False  # recompute the student ViT blocks and BERT layers in backward (NLVR: ViT only)
    # torch.compile the student ViT and each student BERT layer (NLVR: ViT only); dropout then draws from
    # inductor's RNG, not eager's (same distribution; torch._inductor.config.fallback_random for the same draws)
    compile: bool = False
    # Keep pretrained text weights as loaded (the demo's speed: AdamW, the EMA and backward skip them); the
    # original trains everything. Embeddings: word (and the MLM decoder tied to it), position, type. With
    # both frozen and no text dropout, the momentum pass takes the frozen layers' states from the student
    # (`shared_text_layers`): a loaded checkpoint's momentum copies of frozen weights go unused.
    freeze_text_embeddings: bool = False
    freeze_text_layers: int = 0  # the first N BERT layers, text layers only (N <= fusion_layer)

    def __post_init__(self):
        if self.freeze_text_layers < 0:
            raise ValueError(f"freeze_text_layers must be >= 0, got {self.freeze_text_layers}")
        if self.vit_width % self.vit_heads:
            raise ValueError(f"vit_width ({self.vit_width}) must be divisible by vit_heads ({self.vit_heads})")
        if self.vision_width != self.vit_width:
            raise ValueError(f"vision_width ({self.vision_width}) must equal vit_width ({self.vit_width})")

    @property
    def tokenizer_source(self) -> str:
        source = self.tokenizer or self.text_encoder
        if not source:
            raise ValueError("set `tokenizer` (or `text_encoder`) to a BERT name or folder with a vocab.txt")
        return source


# --------------------------------------------------------------------------------------------- helpers


@torch.no_grad()
def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated along dim 0 in rank order (no gradient); identity on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def draw_mlm_mask(shape, probability: float, vocab_size: int, device) -> dict[str, torch.Tensor]:
    """The four random draws of BERT masking (candidates, [MASK] or not, random or kept, random ids)."""
    return {
        "select": torch.bernoulli(torch.full(shape, probability, device=device)).bool(),
        "to_mask_token": torch.bernoulli(torch.full(shape, 0.8, device=device)).bool(),
        "to_random": torch.bernoulli(torch.full(shape, 0.5, device=device)).bool(),
        "random_words": torch.randint(vocab_size, shape, device=device),
    }


def apply_mlm_mask(input_ids: torch.Tensor, draws: dict[str, torch.Tensor], cfg: BertConfig):
    """Masked ids and labels (-100 where not predicted) from `draw_mlm_mask`'s draws.

    ALBEF parity: only [PAD] and [CLS] are excluded from the candidates, and a random replacement may be
    any id in [0, vocab), special ids included.
    """
    selected = draws["select"] & (input_ids != cfg.pad_token_id) & (input_ids != cfg.cls_token_id)
    labels = input_ids.masked_fill(~selected, -100)
    to_mask = draws["to_mask_token"] & selected
    to_random = draws["to_random"] & selected & ~to_mask
    masked = torch.where(to_mask, torch.full_like(input_ids, cfg.mask_token_id), input_ids)
    masked = torch.where(to_random, draws["random_words"], masked)
    return masked, labels


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j targets[j] * log_softmax(logits)[j]."""
    return -(F.log_softmax(logits, dim=-1) * targets).sum(-1).mean()


def negative_weights(sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Hard-negative sampling weights: softmax over in-batch columns, positives (and pairs of the same
    image) set to 0. ALBEF parity: not renormalised; `torch.multinomial` does not need it."""
    w = F.softmax(sim.float(), dim=1).masked_fill(same, 0)
    # A row with no valid negative (whole batch from one image) falls back to "any other column".
    empty = w.sum(1, keepdim=True) == 0
    eye = torch.eye(w.shape[0], w.shape[1], dtype=torch.bool, device=w.device)
    return torch.where(empty, (~eye).float(), w)


# ----------------------------------------------------------------------------------------- base class


class ALBEFBase(nn.Module):
    """Encoders, projections, momentum twins and the feature queue; task models call these helpers.

    `momentum_names` lists the online modules that get a `<name>_m` twin (copied at construction,
    requires_grad False, updated by EMA inside the training forward, as the original does).
    """

    momentum_names: tuple[str, ...] = ()

    def __init__(self, cfg: ALBEFConfig, bert_cfg: BertConfig, mlm_head: bool):
        super().__init__()
        self.cfg = cfg
        self.bert_cfg = bert_cfg
        if bert_cfg.encoder_width != cfg.vit_width:
            raise ValueError(f"bert_config.encoder_width {bert_cfg.encoder_width} != vit_width {cfg.vit_width}")
        self.visual_encoder = build_vit(cfg.image_res, cfg.vit_patch_size, cfg.vit_width, cfg.vit_depth, cfg.vit_heads)
        self.text_encoder = BertForMaskedLM(bert_cfg) if mlm_head else BertModel(bert_cfg)
        self.freeze_text(cfg.freeze_text_embeddings, cfg.freeze_text_layers)
        self.set_speed_options(cfg.grad_checkpointing, cfg.compile)

    def freeze_text(self, embeddings: bool, layers: int) -> None:
        """requires_grad False on the embeddings and/or the first `layers` BERT layers (the optimizer,
        `momentum_update` and autograd then skip them; their momentum twins stay equal to them)."""
        if layers > self.bert_cfg.fusion_layer:
            raise ValueError(f"freeze_text_layers {layers} > fusion_layer {self.bert_cfg.fusion_layer}: "
                             "only text layers (below the fusion layers) can be frozen")
        if embeddings:
            self.bert.embeddings.requires_grad_(False)
        for layer in self.bert.encoder.layer[:layers]:
            layer.requires_grad_(False)

    def set_speed_options(self, grad_checkpointing: bool, compile: bool = False) -> None:
        """Gradient checkpointing and `torch.compile` of the student encoders, block by block (the ViT runs
        through `forward_features`, BERT through `fuse` too): the same function (compile: up to rounding
        and dropout draws). Momentum twins copied later keep neither (they run without gradient; a deep
        copy of a compiled module is not compiled); `Module.compile` keeps the state-dict names."""
        self.visual_encoder.set_grad_checkpointing(grad_checkpointing)
        self.bert.grad_checkpointing = grad_checkpointing
        if compile:
            for block in [*self.visual_encoder.blocks, *self.bert.encoder.layer]:
                block.compile()

    @property
    def bert(self) -> BertModel:
        """The bare encoder whichever wrapper holds it (pretraining keeps the MLM wrapper)."""
        return self.text_encoder.bert if isinstance(self.text_encoder, BertForMaskedLM) else self.text_encoder

    def init_pretrained_encoders(self) -> None:
        """Load BERT (`text_encoder`) and ViT (`vit_init`) weights, then refresh the momentum twins."""
        if self.cfg.text_encoder:
            load_hf_bert(self.text_encoder, self.cfg.text_encoder)
        if self.cfg.vit_init:
            load_vit_weights(self.visual_encoder, self.cfg.vit_init)
        self.copy_params()

    def build_momentum(self) -> None:
        for name in self.momentum_names:
            twin = copy.deepcopy(getattr(self, name))
            twin.requires_grad_(False)
            for m in twin.modules():  # runs under no_grad: nothing to recompute
                if hasattr(m, "grad_checkpointing"):
                    m.grad_checkpointing = False
            setattr(self, name + "_m", twin)

    def momentum_pairs(self, trainable_only: bool = False) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(online, twin) parameters in the same order; `trainable_only` leaves out frozen ones."""
        online, twins = [], []
        for name in self.momentum_names:
            for p, p_m in zip(getattr(self, name).parameters(), getattr(self, name + "_m").parameters()):
                if p.requires_grad or not trainable_only:
                    online.append(p)
                    twins.append(p_m)
        return online, twins

    @torch.no_grad()
    def copy_params(self) -> None:
        online, twins = self.momentum_pairs()
        if online:  # a model without momentum twins (text assignment, distill off) has nothing to copy
            torch._foreach_copy_(twins, online)

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """p_m <- momentum * p_m + (1 - momentum) * p, one fused foreach op over all trainable pairs (a frozen
        weight's twin already equals it)."""
        online, twins = self.momentum_pairs(trainable_only=True)
        torch._foreach_lerp_(twins, online, 1.0 - momentum)

    def register_queues(self, embed_dim: int, queue_size: int, with_idx: bool = False) -> None:
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        if with_idx:
            self.register_buffer("idx_queue", torch.full((1, queue_size), -100))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def dequeue_and_enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx=None) -> None:
        """Write all ranks' momentum features at columns ptr..ptr+B-1 (mod queue size); no host sync."""
        image_feat, text_feat = concat_all_gather(image_feat), concat_all_gather(text_feat)
        n, size = image_feat.shape[0], self.image_queue.shape[1]
        if size % n:
            raise ValueError(f"queue_size {size} must be a multiple of the global batch size {n}")
        cols = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % size
        self.image_queue.index_copy_(1, cols, image_feat.T.to(self.image_queue.dtype))
        self.text_queue.index_copy_(1, cols, text_feat.T.to(self.text_queue.dtype))
        if idx is not None:
            self.idx_queue.index_copy_(1, cols, concat_all_gather(idx)[None])
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def encode_image(self, image: torch.Tensor, momentum: bool = False):
        """Token states [B, N, W] and normalised projected CLS [B, E]."""
        vit, proj = (self.visual_encoder_m, self.vision_proj_m) if momentum else (self.visual_encoder, self.vision_proj)
        embeds = vit.forward_features(image)
        return embeds, F.normalize(proj(embeds[:, 0]), dim=-1)

    def encode_text(self, input_ids, attention_mask, momentum: bool = False):
        """Text-mode states [B, L, H] (layers < fusion_layer) and normalised projected CLS [B, E]."""
        enc, proj = (self.text_encoder_m, self.text_proj_m) if momentum else (self.text_encoder, self.text_proj)
        bert = enc.bert if isinstance(enc, BertForMaskedLM) else enc
        embeds = bert(input_ids, attention_mask, mode="text")
        return embeds, F.normalize(proj(embeds[:, 0]), dim=-1)

    def sample_negatives(self, weights_t2i: torch.Tensor, weights_i2t: torch.Tensor):
        """One hard negative per row: an image for every text, then a text for every image."""
        return torch.multinomial(weights_t2i, 1).squeeze(1), torch.multinomial(weights_i2t, 1).squeeze(1)

    def itm_rows(self, text_embeds, attention_mask, sim_i2t, sim_t2i, same: torch.Tensor, out: dict,
                 extra_embeds: list[torch.Tensor] = ()):
        """The ITM pass's rows: (text states [R, L, H], their masks [R, L], the image of each row [R]),
        R = 3B: B positives and 2B hard negatives drawn from the in-batch similarities.

        ALBEF parity: rows are [positives; (text b, negative image); (negative text, image b)] and the
        negative text keeps its own padding mask; labels are 1 for the first B rows. `extra_embeds`: the
        text states of `extra_texts`, for a subclass that adds rows (none here).
        """
        B = text_embeds.shape[0]
        with torch.no_grad():
            weights_i2t = negative_weights(sim_i2t[:, :B], same)
            weights_t2i = negative_weights(sim_t2i[:, :B], same)
        neg_image, neg_text = self.sample_negatives(weights_t2i, weights_i2t)
        out.update(itm_weights_i2t=weights_i2t, itm_weights_t2i=weights_t2i)
        rows = torch.arange(B, device=text_embeds.device)
        text_all = [text_embeds, text_embeds, text_embeds[neg_text]]
        mask_all = [attention_mask, attention_mask, attention_mask[neg_text]]
        image_all = [rows, neg_image, rows]
        return torch.cat(text_all), torch.cat(mask_all), torch.cat(image_all)

    def itm_loss(self, cls_states: torch.Tensor, out: dict) -> torch.Tensor:
        """Cross-entropy of `itm_head` on the fused [CLS] states [3B, H] of `itm_rows` (first B rows positive)."""
        logits = self.itm_head(cls_states)
        B = logits.shape[0] // 3
        labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(logits.device)
        out.update(itm_logits=logits, itm_labels=labels)
        return F.cross_entropy(logits, labels)

    def fuse_itm(self, image_embeds, itm_rows, out: dict, full: bool = False,
                 more_rows: tuple[torch.Tensor, torch.Tensor] | None = None):
        """One student fusion pass over the ITM rows (`itm_rows`) and, if given, `more_rows` = (text states
        [B, L, H], masks [B, L]) of the B captions with their own images (pretraining's MLM rows):
        ([CLS] of the ITM rows [R, H], last states of `more_rows` [B, L, H], empty without them).

        Every row reads its image's keys and values, projected once for the B images, not once per row.
        Only the ITM rows' [CLS] is scored, so their last layer computes it alone (`BertModel.run_layers`'
        `cls_only`) unless `full`; then `out` also gets the fusion states the parity tests compare.
        """
        text, mask, images = itm_rows
        R, B = text.shape[0], image_embeds.shape[0]
        if more_rows is not None:
            text, mask = torch.cat([text, more_rows[0]]), torch.cat([mask, more_rows[1]])
            images = torch.cat([images, torch.arange(B, device=images.device)])
        fused = self.bert.fuse(text, mask, image_kv=select_image_kv(self.bert.image_kv(image_embeds), images),
                               cls_only=0 if full else R)
        if not full:
            return fused
        out.update(fusion_pos_hidden=fused[:B], fusion_neg_hidden=fused[B : 3 * B])
        return fused[:R, 0], fused[R:]

    def itm(self, image_embeds, text_embeds, attention_mask, sim_i2t, sim_t2i, same: torch.Tensor, out: dict,
            full: bool = False) -> torch.Tensor:
        """Image-text matching on B positives and 2B hard negatives (`itm_rows`) in one fusion pass."""
        itm_rows = self.itm_rows(text_embeds, attention_mask, sim_i2t, sim_t2i, same, out)
        cls_states, _ = self.fuse_itm(image_embeds, itm_rows, out, full)
        return self.itm_loss(cls_states, out)

    @torch.no_grad()
    def match_scores(self, image, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the pairs (image[n], text n): (ITM p(match) [N], ITC cosine similarity [N]), the two
        judgements of a trained model on whether a caption fits a picture (to filter noisy web pairs)."""
        image_embeds, image_feat = self.encode_image(image)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)
        fused = self.bert.fuse(text_embeds, attention_mask, image_embeds)
        p_match = F.softmax(self.itm_head(fused[:, 0]).float(), dim=-1)[:, 1]
        return p_match, (image_feat * text_feat).sum(-1).float()

    @torch.no_grad()
    def queues_for_matmul(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of (image_queue, text_queue) for the ITC matmuls: backward reads them after the queues
        are updated in place. Under autocast the copy is the cast, made once here where each of the four
        similarity matmuls would cast all 65536 columns again."""
        device = self.image_queue.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.image_queue.dtype
        return self.image_queue.to(dtype, copy=True), self.text_queue.to(dtype, copy=True)


def queue_similarities(feat: torch.Tensor, feat_m: torch.Tensor, queue: torch.Tensor,
                       temp: torch.Tensor) -> torch.Tensor:
    """[B, B + Q] = feat @ concat(feat_m.T, queue) / temp (ALBEF's layout: this batch's momentum features,
    then the queue), without copying the queue into a concatenation."""
    return torch.cat([feat @ feat_m.T, feat @ queue], dim=1) / temp


# ------------------------------------------------------------------------- classification (NLVR, VE)


def classifier_head(width: int, num_classes: int) -> nn.Sequential:
    """NLVR's and VE's head, Linear(W, W) -> ReLU -> Linear(W, classes): keys `0.*` and `2.*` as the original's
    `cls_head`."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


class ALBEFClassifier(ALBEFBase):
    """NLVR's and VE's model: `cls_head` on the text encoder's [CLS] over the image(s).
    `forward(image, input_ids, attention_mask, targets, alpha)` -> {"loss"}; `predict` -> logits [B, classes].

    With `distill` the loss mixes cross-entropy with the momentum model's soft predictions, (1-alpha) CE +
    alpha KD, the momentum twins updated inside the training forward. ALBEF parity: the update runs before
    the momentum pass, even in eval mode; its factor is the config's `momentum` (the original's NLVR and VE
    hard-code 0.995, its default). A subclass says how text and images meet (`encode`).
    """

    momentum_names = ("visual_encoder", "text_encoder", "cls_head")
    text_encoder_class: type[nn.Module] | None = None  # in place of the base's one-image BERT

    def __init__(self, cfg: ALBEFConfig, bert_cfg: BertConfig, num_classes: int, distill: bool = True):
        super().__init__(cfg, bert_cfg, mlm_head=False)
        if self.text_encoder_class is not None:
            self.text_encoder = self.text_encoder_class(bert_cfg)
        self.cls_head = classifier_head(bert_cfg.hidden_size, num_classes)
        self.distill = distill
        if distill:
            self.build_momentum()
        else:
            self.momentum_names = ()  # no twins: the original builds none without distillation

    def encode(self, vit: nn.Module, bert: nn.Module, image, input_ids, attention_mask):
        """(image states, text hidden states [B, L, H]): each text reads its own image."""
        image_embeds = vit.forward_features(image)
        return image_embeds, bert(input_ids, attention_mask, image_embeds)

    def classify(self, image, input_ids, attention_mask, momentum: bool = False, out=None) -> torch.Tensor:
        """Logits [B, classes] of the online (or momentum) model; `out` collects the hidden states."""
        sfx = "_m" if momentum else ""
        vit, bert, head = (getattr(self, n + sfx) for n in ("visual_encoder", "text_encoder", "cls_head"))
        image_embeds, hidden = self.encode(vit, bert, image, input_ids, attention_mask)
        prediction = head(hidden[:, 0])
        if out is not None:
            out.update({f"image_embeds{sfx}": image_embeds, f"text_hidden{sfx}": hidden,
                        f"prediction{sfx}": prediction})
        return prediction

    @torch.no_grad()
    def predict(self, image, input_ids, attention_mask) -> torch.Tensor:
        return self.classify(image, input_ids, attention_mask)

    def forward(self, image, input_ids, attention_mask, targets, alpha: float = 0.0, return_outputs: bool = False):
        out: dict[str, torch.Tensor] = {}
        prediction = self.classify(image, input_ids, attention_mask, out=out)
        loss = F.cross_entropy(prediction, targets)
        if self.distill:
            with torch.no_grad():
                self.momentum_update(self.cfg.momentum)
                prediction_m = self.classify(image, input_ids, attention_mask, momentum=True, out=out)
            loss = (1 - alpha) * loss + alpha * soft_cross_entropy(prediction, F.softmax(prediction_m, dim=1))
        return {"loss": loss} | (out if return_outputs else {})


# ---------------------------------------------------------------------------------- pretraining model


class ALBEF(ALBEFBase):
    """The pretraining model: `forward(image, input_ids, attention_mask, alpha)` -> named losses."""

    momentum_names = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")

    def __init__(self, cfg: ALBEFConfig, bert_cfg: BertConfig):
        super().__init__(cfg, bert_cfg, mlm_head=True)
        text_width = bert_cfg.hidden_size
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.build_momentum()
        self.register_queues(cfg.embed_dim, cfg.queue_size)

    def mask_tokens(self, input_ids: torch.Tensor):
        draws = draw_mlm_mask(input_ids.shape, self.cfg.mlm_probability, self.bert_cfg.vocab_size, input_ids.device)
        return apply_mlm_mask(input_ids, draws, self.bert_cfg)

    def itc(self, image_feat, text_feat, image_feat_m, text_feat_m, alpha: float, out: dict):
        """Contrastive loss against [in-batch momentum features; queue], with momentum-distilled targets.

        ALBEF parity: similarities use the queue as it was BEFORE this step (it is updated afterwards).
        """
        image_queue, text_queue = self.queues_for_matmul()
        with torch.no_grad():
            sim_i2t_m = queue_similarities(image_feat_m, text_feat_m, text_queue, self.temp)
            sim_t2i_m = queue_similarities(text_feat_m, image_feat_m, image_queue, self.temp)
            targets = torch.zeros_like(sim_i2t_m)
            targets.fill_diagonal_(1)
            sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * targets
            sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * targets
        sim_i2t = queue_similarities(image_feat, text_feat_m, text_queue, self.temp)
        sim_t2i = queue_similarities(text_feat, image_feat_m, image_queue, self.temp)
        loss_i2t = soft_cross_entropy(sim_i2t, sim_i2t_targets)
        loss_t2i = soft_cross_entropy(sim_t2i, sim_t2i_targets)
        out.update(sim_i2t=sim_i2t, sim_t2i=sim_t2i, sim_i2t_m=sim_i2t_m, sim_t2i_m=sim_t2i_m,
                   sim_i2t_targets=sim_i2t_targets, sim_t2i_targets=sim_t2i_targets, loss_i2t=loss_i2t,
                   loss_t2i=loss_t2i)
        return (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i

    def shared_text_layers(self) -> int:
        """How many text layers the momentum pass may take from the student: frozen embeddings and first
        layers have twins equal to themselves (`freeze_text`), so without dropout both compute the same
        states. 0 otherwise: the momentum pass runs every text layer, as the original."""
        bert_cfg = self.bert.config
        dropout = bert_cfg.hidden_dropout_prob or bert_cfg.attention_probs_dropout_prob
        if not self.cfg.freeze_text_embeddings or dropout:
            return 0
        return self.cfg.freeze_text_layers

    def text_passes(self, texts: list[torch.Tensor], attention_mask: torch.Tensor, momentum: bool = False,
                    shared: torch.Tensor | None = None):
        """Text-mode states [B, L, H] of each id tensor in `texts` (all [B, L], sharing `attention_mask`),
        computed in one batched pass of the student (or momentum) text layers; and the states of the first
        two after the `shared_text_layers` (None when 0). Given as `shared`, those start the pass there."""
        bert = self.text_encoder_m.bert if momentum else self.bert
        B, k = attention_mask.shape[0], self.shared_text_layers()
        mask, layers = attention_mask.repeat(len(texts), 1), bert.encoder.layer[: bert.config.fusion_layer]
        x = shared if shared is not None else bert.run_layers(bert.embeddings(torch.cat(texts)), mask, layers[:k])
        states = bert.run_layers(x, mask, layers[k:])
        return states.split(B), (x[: 2 * B] if k else None)

    def extra_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, out: dict) -> list[torch.Tensor]:
        """More captions [B, L] (sharing `attention_mask`) for the student text pass, whose states reach
        `itm_rows` as `extra_embeds`: a hook for subclasses (models/vilta.py); plain ALBEF has none."""
        return []

    def extra_losses(self, out: dict) -> dict[str, torch.Tensor]:
        """Named outputs a subclass adds to forward's losses, from `out`; plain ALBEF has none."""
        return {}

    def mlm_terms(self, hidden, hidden_m, masked_ids, labels, out: dict, full: bool = False):
        """(log-probabilities, cross-entropy, distillation term, valid) of the masked LM at the masked
        positions (every position with `full`), from the last hidden states [B, L, H] of the student and
        momentum passes over the masked ids.

        ALBEF parity: the logits come from a separate full pass over the masked ids (not from the ITM
        fusion pass), and the soft targets from the momentum encoder with the momentum image states.
        The vocabulary head runs only at masked positions (15 % of them) unless `full` logits are asked
        for; the loss is the same either way.
        """
        targets = labels
        if not full:
            selected = labels != -100
            hidden, hidden_m, targets = hidden[selected], hidden_m[selected], labels[selected]
        logits = self.text_encoder.cls(hidden)
        with torch.no_grad():
            logits_m = self.text_encoder_m.cls(hidden_m)
        valid = targets != -100
        log_probs = F.log_softmax(logits.float(), dim=-1)
        ce = -log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        kd = -(F.softmax(logits_m.float(), dim=-1) * log_probs).sum(-1)
        out.update(mlm_input_ids=masked_ids, mlm_labels=labels, mlm_logits=logits, mlm_logits_m=logits_m)
        return log_probs, ce, kd, valid

    def mlm_loss(self, hidden, hidden_m, masked_ids, labels, attention_mask, alpha: float, out: dict, full=False):
        """Masked LM with momentum distillation: (1-alpha) CE + alpha KD, averaged over masked positions."""
        _, ce, kd, valid = self.mlm_terms(hidden, hidden_m, masked_ids, labels, out, full)
        return (((1 - alpha) * ce + alpha * kd) * valid).sum() / valid.sum().clamp(min=1)

    def forward(self, image, input_ids, attention_mask, alpha: float = 0.0, image_ids=None, return_outputs=False):
        """Losses {"loss_mlm", "loss_ita", "loss_itm"} (+ "temp"); with `return_outputs` every
        intermediate tensor too. `image_ids` [B], when given, keeps captions of the same image from being
        drawn as each other's ITM negatives (the original only excludes the diagonal).

        The original's passes, batched where they run the same layers (the same function, fewer and
        larger matmuls): one student text pass over the captions, their masked copies (MLM) and any
        `extra_texts`; one momentum text pass over the captions and masked copies (from the student's
        states after any `shared_text_layers`); one student fusion pass over the ITM rows and the MLM
        rows, which read the B images' keys and values projected once. The ITM rows' last fusion layer
        computes [CLS] only.
        """
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)  # ALBEF parity: clamped in place at every forward
        out: dict[str, torch.Tensor] = {}
        masked_ids, labels = self.mask_tokens(input_ids)
        texts = [input_ids, masked_ids, *self.extra_texts(input_ids, attention_mask, out)]

        image_embeds, image_feat = self.encode_image(image)
        (text_embeds, mlm_text, *extra_embeds), shared = self.text_passes(texts, attention_mask)
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)
        with torch.no_grad():
            self.momentum_update(self.cfg.momentum)  # ALBEF parity: before any momentum feature
            image_embeds_m, image_feat_m = self.encode_image(image, momentum=True)
            (text_embeds_m, mlm_text_m), _ = self.text_passes(texts[:2], attention_mask, momentum=True, shared=shared)
            text_feat_m = F.normalize(self.text_proj_m(text_embeds_m[:, 0]), dim=-1)
            hidden_m = self.text_encoder_m.bert.fuse(mlm_text_m, attention_mask, image_embeds_m)

        loss_ita, sim_i2t, sim_t2i = self.itc(image_feat, text_feat, image_feat_m, text_feat_m, alpha, out)
        self.dequeue_and_enqueue(image_feat_m, text_feat_m)

        same = torch.eye(image.shape[0], dtype=torch.bool, device=image.device)
        if image_ids is not None:
            same = same | (image_ids[:, None] == image_ids[None, :])
        itm_rows = self.itm_rows(text_embeds, attention_mask, sim_i2t, sim_t2i, same, out, extra_embeds)
        itm_cls, hidden = self.fuse_itm(image_embeds, itm_rows, out, full=return_outputs,
                                        more_rows=(mlm_text, attention_mask))
        loss_itm = self.itm_loss(itm_cls, out)
        loss_mlm = self.mlm_loss(hidden, hidden_m, masked_ids, labels, attention_mask, alpha, out, full=return_outputs)

        losses = {"loss_mlm": loss_mlm, "loss_ita": loss_ita, "loss_itm": loss_itm, "temp": self.temp.detach()}
        losses |= self.extra_losses(out)
        if return_outputs:
            out.update(image_embeds=image_embeds, image_embeds_m=image_embeds_m, text_embeds=text_embeds,
                       text_embeds_m=text_embeds_m, image_feat=image_feat, text_feat=text_feat,
                       image_feat_m=image_feat_m, text_feat_m=text_feat_m)
            return losses | out
        return losses


def build_bert_config(cfg: ALBEFConfig | dict | str) -> BertConfig:
    src = cfg.bert_config if isinstance(cfg, ALBEFConfig) else cfg
    return BertConfig.from_dict(src) if isinstance(src, dict) else BertConfig.from_json(src)
