"""Image-text retrieval (and grounding): ITC with image-id positives + ITM with hard negatives, and the
batched ITM re-ranking used to evaluate it.

The text encoder is the bare BERT (keys `text_encoder.embeddings.*`, no MLM head); `idx_queue` holds the
image id of every queued feature so that captions of the same image are positives of each other, in the
batch and in the queue. The official mscoco.pth / flickr30k.pth (and the grounding checkpoints, same class)
load with `strict=True`; `convert_pretrain_state_dict` turns a pretraining checkpoint into this layout.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.albef import ALBEFBase, ALBEFConfig, build_bert_config, queue_similarities, soft_cross_entropy
from models.checkpoint import adapt_pos_embed, is_pretraining, load_weights
from models.bert import KV, BertConfig, self_attention_mask

logger = logging.getLogger(__name__)


@dataclass
class RetrievalModelConfig(ALBEFConfig):
    distill: bool = True  # momentum distillation of the ITC targets (the original's `distill`)


class ALBEFRetrieval(ALBEFBase):
    """`forward(image, input_ids, attention_mask, alpha, idx)` -> {"loss_ita", "loss_itm", "temp"}."""

    momentum_names = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")

    def __init__(self, cfg: RetrievalModelConfig | ALBEFConfig, bert_cfg: BertConfig):
        super().__init__(cfg, bert_cfg, mlm_head=False)
        text_width = bert_cfg.hidden_size
        self.distill = getattr(cfg, "distill", True)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.build_momentum()
        self.register_queues(cfg.embed_dim, cfg.queue_size, with_idx=True)

    def itc(self, image_feat, text_feat, image_feat_m, text_feat_m, idx, alpha: float, out: dict):
        """Contrastive loss against [in-batch momentum features; queue]; every column whose image id
        equals the row's is a positive (targets spread evenly over them).

        ALBEF parity: the queue is read BEFORE this step's update, and `temp` is never clamped here.
        """
        with torch.no_grad():
            idx_all = torch.cat([idx, self.idx_queue[0]])
            pos = (idx[:, None] == idx_all[None, :]).float()
            sim_targets = pos / pos.sum(1, keepdim=True)
            image_queue, text_queue = self.queues_for_matmul()
            targets_i2t = targets_t2i = sim_targets
            if self.distill:
                sim_i2t_m = queue_similarities(image_feat_m, text_feat_m, text_queue, self.temp)
                sim_t2i_m = queue_similarities(text_feat_m, image_feat_m, image_queue, self.temp)
                targets_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
                targets_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
                out.update(sim_i2t_m=sim_i2t_m, sim_t2i_m=sim_t2i_m)
        sim_i2t = queue_similarities(image_feat, text_feat_m, text_queue, self.temp)
        sim_t2i = queue_similarities(text_feat, image_feat_m, image_queue, self.temp)
        loss_i2t = soft_cross_entropy(sim_i2t, targets_i2t)
        loss_t2i = soft_cross_entropy(sim_t2i, targets_t2i)
        out.update(sim_targets=sim_targets, sim_i2t=sim_i2t, sim_t2i=sim_t2i, sim_i2t_targets=targets_i2t,
                   sim_t2i_targets=targets_t2i, loss_i2t=loss_i2t, loss_t2i=loss_t2i)
        return (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i

    def forward(self, image, input_ids, attention_mask, alpha: float, idx, return_outputs: bool = False):
        """Losses {"loss_ita", "loss_itm"} (+ "temp" for the log); with `return_outputs` every
        intermediate tensor too. `idx` [B] is the image id of each pair."""
        out: dict[str, torch.Tensor] = {}
        image_embeds, image_feat = self.encode_image(image)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)
        with torch.no_grad():
            self.momentum_update(self.cfg.momentum)  # ALBEF parity: before any momentum feature
            image_embeds_m, image_feat_m = self.encode_image(image, momentum=True)
            _, text_feat_m = self.encode_text(input_ids, attention_mask, momentum=True)

        loss_ita, sim_i2t, sim_t2i = self.itc(image_feat, text_feat, image_feat_m, text_feat_m, idx, alpha, out)
        self.dequeue_and_enqueue(image_feat_m, text_feat_m, idx)
        # ALBEF parity: every pair of the same image is excluded from the negatives (the original adds
        # 1e-4 to the similarities before the softmax, which changes nothing).
        same = idx[:, None] == idx[None, :]
        loss_itm = self.itm(image_embeds, text_embeds, attention_mask, sim_i2t, sim_t2i, same, out, full=return_outputs)

        losses = {"loss_ita": loss_ita, "loss_itm": loss_itm, "temp": self.temp.detach()}
        if return_outputs:
            out.update(image_embeds=image_embeds, image_embeds_m=image_embeds_m, text_embeds=text_embeds,
                       image_feat=image_feat, text_feat=text_feat, image_feat_m=image_feat_m,
                       text_feat_m=text_feat_m)
            return losses | out
        return losses

    @torch.no_grad()
    def gallery_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images, batch_size: int,
                         device) -> dict[str, torch.Tensor]:
        """Every gallery feature the evaluation needs, on `device`: text-mode states `text_embeds` [T, L, H]
        with `text_mask` [T, L] and `text_feat` [T, E] of the tokenised texts; ViT states `image_embeds`
        [I, N, W] and `image_feat` [I, E] of the image batches `images` yields. Eval mode.

        Texts run in order of length, each batch cut to its longest text; the states of padded positions
        are left at 0 (the original computes them, but being masked keys they never reach a score).
        """
        self.eval()
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        lengths = attention_mask.sum(1)
        order = torch.sort(lengths, stable=True).indices
        text_embeds = text_feat = None
        with shape_agnostic_attention():  # text batches differ in length
            for i in range(0, len(order), batch_size):
                rows = order[i:i + batch_size]
                L = int(lengths[rows].max())
                embeds, feat = self.encode_text(input_ids[rows, :L], attention_mask[rows, :L])
                if text_embeds is None:
                    text_embeds = embeds.new_zeros(len(order), input_ids.shape[1], embeds.shape[-1])
                    text_feat = feat.new_empty(len(order), feat.shape[-1])
                text_embeds[rows, :L] = embeds * attention_mask[rows, :L, None].to(embeds.dtype)
                text_feat[rows] = feat
            image_embeds, image_feat = zip(*(self.encode_image(x.to(device)) for x in images))
        return {"text_embeds": text_embeds, "text_mask": attention_mask, "text_feat": text_feat,
                "image_embeds": torch.cat(image_embeds), "image_feat": torch.cat(image_feat)}

    def rerank(self, sims: torch.Tensor, feats: dict[str, torch.Tensor], k: int, batch_size: int = 256,
               rank: int = 0, world_size: int = 1, add_sims: bool = False):
        """`rerank_itm` of the gallery features `feats` (`gallery_features`)."""
        return rerank_itm(self, sims, feats["image_embeds"], feats["text_embeds"], feats["text_mask"], k,
                          batch_size, rank, world_size, add_sims)

    def itm_score(self, image_embeds, text_embeds, text_mask) -> torch.Tensor:
        """[N] ITM 'match' logit of N (image, text) pairs: fusion of text-mode states [N, L, H] (mask
        [N, L]) with image tokens [N, P, W], then itm_head on [CLS], class 1 (ALBEF parity: the raw logit
        ranks, no softmax)."""
        fused = self.bert.fuse(text_embeds, text_mask, image_embeds)
        return self.itm_head(fused[:, 0])[:, 1]


# ------------------------------------------------------------------------------------- checkpoints


def convert_retrieval(state_dict: dict, queue_size: int) -> dict:
    """Any checkpoint the retrieval model starts from, in its keys. A fine-tuned retrieval or grounding
    one passes unchanged; a pretraining one is converted as the original Retrieval.py's loading got it:
    `text_encoder(_m).bert.X` -> `text_encoder(_m).X`, the MLM head (`cls.*`) dropped, queues and
    pointer kept, `idx_queue` all -100.

    A queue of another size than `queue_size` (a pretraining run with another `queue_size`; the original
    would fail) is replaced by a fresh random one, with the pointer at 0.
    """
    if not is_pretraining(state_dict):
        return dict(state_dict)
    logger.info("pretraining checkpoint: converting it to the retrieval layout")
    sd = {}
    for key, value in state_dict.items():
        if ".cls." in key and key.startswith("text_encoder"):
            continue
        sd[key.replace("bert.", "", 1) if key.startswith("text_encoder") else key] = value
    if "image_queue" in sd and sd["image_queue"].shape[1] != queue_size:
        logger.warning("checkpoint queues %s do not fit queue_size %d: starting from fresh queues",
                       tuple(sd["image_queue"].shape), queue_size)
        for key in ("image_queue", "text_queue"):
            sd[key] = F.normalize(torch.randn(sd[key].shape[0], queue_size), dim=0)
        sd["queue_ptr"] = torch.zeros_like(sd["queue_ptr"])
    if "image_queue" in sd:
        sd["idx_queue"] = torch.full((1, sd["image_queue"].shape[1]), -100, dtype=torch.long,
                                     device=sd["image_queue"].device)
    return sd


def convert_pretrain_state_dict(state_dict: dict, model: ALBEFRetrieval) -> dict:
    """`convert_retrieval` of a pretraining state dict for `model`, `pos_embed` resized (the parity tests' view)."""
    return adapt_pos_embed(convert_retrieval(state_dict, model.image_queue.shape[1]), model)


def load_retrieval_weights(model: ALBEFRetrieval, source: str | dict, name: str | None = None) -> None:
    """A pretraining (converted), fine-tuned retrieval or grounding checkpoint into `model`, strictly."""
    load_weights(model, source, functools.partial(convert_retrieval, queue_size=model.image_queue.shape[1]),
                 name=name)


# -------------------------------------------------------------------------------------- re-ranking
#
# Every candidate pair's score is fusion(text_embeds[t], image_embeds[i]) -> itm_head, L-F fusion layers.
# The batched path computes the same function with less work, each step exact:
#  - a pair proposed by both directions is scored once;
#  - a batch is one image with up to `batch_size` of its candidate texts, ordered by length and cut to
#    the longest (padded keys are masked, so they never reach [CLS]);
#  - cross-attention keys and values read only the image: projected once per image and layer, and the
#    batch's text queries attend to them as one long query sequence (no copy of the image per pair);
#  - the first fusion layer's self-attention, and its cross-attention query, read only the text: once
#    per text, not per pair;
#  - the last layer only feeds [CLS] to itm_head: its queries, cross-attention and FFN run for [CLS] only.
# Batches are planned on the host up front, so the device never waits for the host inside the loop.


def shape_agnostic_attention():
    """SDPA without the cuDNN backend, whose per-shape plan building costs seconds at each new shape:
    here every batch has its own (text count, text length)."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def topk_candidates(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k indices of every row of `sims` [I, T] (texts per image) and of every column (images per
    text): ([I, k], [T, k]); k is capped at the gallery size."""
    return sims.topk(min(k, sims.shape[1]), dim=1).indices, sims.T.topk(min(k, sims.shape[0]), dim=1).indices


def candidate_pairs(top_i2t: torch.Tensor, top_t2i: torch.Tensor, num_texts: int) -> torch.Tensor:
    """Distinct (image, text) pairs [P, 2] among both directions' candidates, sorted by image then text."""
    i2t = torch.arange(top_i2t.shape[0], device=top_i2t.device)[:, None] * num_texts + top_i2t
    t2i = top_t2i * num_texts + torch.arange(top_t2i.shape[0], device=top_t2i.device)[:, None]
    keys = torch.unique(torch.cat([i2t.flatten(), t2i.flatten()]))
    return torch.stack([keys // num_texts, keys % num_texts], dim=1)


def _cross_attend(att, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked multi-head attention of `att` (a BertSelfAttention) for projected queries q [B, Lq, D] of
    B texts to ONE image's projected keys/values [1, N, D]: the B*Lq queries are independent, so they
    run as one sequence."""
    B, Lq, D = q.shape
    def heads(x):
        return x.view(1, -1, att.num_heads, D // att.num_heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    return out.transpose(1, 2).reshape(B, Lq, D)


class PairScorer:
    """ITM match logits of one image with many texts, equal to `ALBEFRetrieval.itm_score` (eval mode, no
    dropout) but with the per-text and per-image parts of the fusion computed once (see above)."""

    def __init__(self, model: ALBEFRetrieval, text_embeds, text_mask, batch_size: int = 256):
        self.model, self.text_mask = model, text_mask
        self.layers = list(model.bert.encoder.layer[model.bert_cfg.fusion_layer:])
        if not self.layers:
            raise ValueError("ITM needs at least one fusion layer (fusion_layer < num_hidden_layers)")
        first, text_x, text_q = self.layers[0], [], []
        for s in range(0, len(text_embeds), batch_size):
            x, m = text_embeds[s:s + batch_size], text_mask[s:s + batch_size]
            text_x.append(first.attention(x, x, self_attention_mask(m)))
            text_q.append(first.crossattention.self.query(text_x[-1]))
        self.text_x, self.text_q = torch.cat(text_x), torch.cat(text_q)

    def image_kv(self, image_embeds: torch.Tensor) -> list[KV]:
        """Cross-attention keys and values [1, N, H] of every fusion layer for one image [1, N, W]."""
        return self.model.bert.image_kv(image_embeds)

    def __call__(self, text: torch.Tensor, length: int, kv: list[KV]) -> torch.Tensor:
        """[B] scores of texts `text` [B] (none longer than `length` tokens) with the image of `kv`."""
        mask = self_attention_mask(self.text_mask[text, :length])
        x = None
        for j, layer in enumerate(self.layers):
            cut = 1 if j == len(self.layers) - 1 else length  # the last layer: [CLS] queries only
            if j == 0:
                h, q = self.text_x[text, :cut], self.text_q[text, :cut]
            else:
                h = layer.attention(x[:, :cut], x, mask)  # ALBEF parity: [CLS] attends to every token
                q = layer.crossattention.self.query(h)
            h = layer.crossattention.output(_cross_attend(layer.crossattention.self, q, *kv[j]), h)
            x = layer.output(layer.intermediate(h), h)
        return self.model.itm_head(x[:, 0])[:, 1]


def plan_batches(pairs: torch.Tensor, lengths: torch.Tensor, batch_size: int):
    """Each image's pairs ordered by text length, `batch_size` at a time: (order [P], batches), where
    batch b is (image, start, end, longest text) over `order[start:end]`. `pairs` [P, 2] sorted by
    image; all on the host."""
    order, batches, start = [], [], 0
    images, counts = torch.unique_consecutive(pairs[:, 0], return_counts=True)
    text_len = lengths[pairs[:, 1]]
    for image, n in zip(images.tolist(), counts.tolist()):
        rows = start + torch.sort(text_len[start:start + n], stable=True).indices
        order.append(rows)
        for s in range(0, n, batch_size):
            end = min(s + batch_size, n)
            batches.append((image, start + s, start + end, int(text_len[rows[end - 1]])))
        start += n
    return (torch.cat(order) if order else torch.zeros(0, dtype=torch.long)), batches


@torch.no_grad()
def score_pairs(model: ALBEFRetrieval, pairs: torch.Tensor, image_embeds, text_embeds, text_mask,
                batch_size: int = 256) -> torch.Tensor:
    """[P] float32 ITM match logits of `pairs` [P, 2] (image, text), sorted by image."""
    device = image_embeds.device
    with shape_agnostic_attention():
        return _score_pairs(model, pairs, image_embeds, text_embeds, text_mask, batch_size, device)


def _score_pairs(model, pairs, image_embeds, text_embeds, text_mask, batch_size, device) -> torch.Tensor:
    scorer = PairScorer(model, text_embeds, text_mask, batch_size)
    order, batches = plan_batches(pairs.cpu(), text_mask.sum(1).cpu(), batch_size)
    order = order.to(device)
    texts = pairs[:, 1].to(device)[order]
    out = torch.empty(len(pairs), device=device)
    image, kv = None, None
    for img, start, end, length in batches:
        if img != image:
            image, kv = img, scorer.image_kv(image_embeds[img:img + 1])
        out[order[start:end]] = scorer(texts[start:end], length, kv).float()
    return out


@torch.no_grad()
def rerank_itm(model: ALBEFRetrieval, sims: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
               text_mask: torch.Tensor, k: int, batch_size: int = 256, rank: int = 0, world_size: int = 1,
               add_sims: bool = False):
    """The original's evaluation scores, batched and sharded: (score_i2t [I, T], score_t2i [T, I]) hold
    the ITM match logit (plus `sims` with `add_sims`) at each image's k best texts and each text's k
    best images by `sims`, -100 elsewhere (ALBEF parity: the raw ITM logit of class 1). Eval mode.
    Rank 0's candidates are used on every rank; each rank scores 1/world_size of the distinct pairs,
    all get the full float32 matrices.
    """
    I, T = sims.shape
    top_i2t, top_t2i = topk_candidates(sims, k)
    if world_size > 1:  # features computed on each rank may differ in the last bit: one candidate list
        dist.broadcast(top_i2t, 0)
        dist.broadcast(top_t2i, 0)
    pairs = candidate_pairs(top_i2t, top_t2i, T)
    per_rank = math.ceil(len(pairs) / world_size)
    mine = pairs[rank * per_rank:(rank + 1) * per_rank]
    scores = torch.zeros(per_rank, device=sims.device)
    if len(mine):
        scores[:len(mine)] = score_pairs(model, mine, image_embeds, text_embeds, text_mask, batch_size)
    if world_size > 1:
        gathered = [torch.empty_like(scores) for _ in range(world_size)]
        dist.all_gather(gathered, scores)
        scores = torch.cat(gathered)
    pair_scores = torch.zeros(I, T, device=sims.device)
    pair_scores[pairs[:, 0], pairs[:, 1]] = scores[:len(pairs)]
    if add_sims:
        pair_scores += sims
    mask_i2t = torch.zeros(I, T, dtype=torch.bool, device=sims.device).scatter_(1, top_i2t, True)
    mask_t2i = torch.zeros(T, I, dtype=torch.bool, device=sims.device).scatter_(1, top_t2i, True)
    fill = torch.tensor(-100.0, device=sims.device)
    return torch.where(mask_i2t, pair_scores, fill), torch.where(mask_t2i, pair_scores.T, fill)


@torch.no_grad()
def rerank_itm_plain(model: ALBEFRetrieval, sims, image_embeds, text_embeds, text_mask, k: int):
    """The original's loop, one query at a time (k pairs per `itm_score` call, texts at their full padded
    length): the reference the batched `rerank_itm` is tested and benchmarked against."""
    I, T = sims.shape
    score_i2t = torch.full((I, T), -100.0, device=sims.device)
    score_t2i = torch.full((T, I), -100.0, device=sims.device)
    for i in range(I):
        top = sims[i].topk(min(k, T)).indices
        image = image_embeds[i].repeat(len(top), 1, 1)
        score_i2t[i, top] = model.itm_score(image, text_embeds[top], text_mask[top]).float()
    for t in range(T):
        top = sims[:, t].topk(min(k, I)).indices
        text, mask = text_embeds[t].repeat(len(top), 1, 1), text_mask[t].repeat(len(top), 1)
        score_t2i[t, top] = model.itm_score(image_embeds[top], text, mask).float()
    return score_i2t, score_t2i


# -------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def pair_scores(model: ALBEFBase, dataset, tokenizer, device: torch.device, batch_size: int = 128,
                amp: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(p_match [N], itc_sim [N]) of every pair of `dataset` (a `datasets.retrieval.PairDataset`), in
    file order, `batch_size` pairs at a time."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate_fn(tokenizer),
                                         generator=torch.Generator())  # leaves the caller's RNG stream alone
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    p_match, itc_sim = [], []
    for batch in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=amp == "bf16"):
            p, s = model.match_scores(batch["image"].to(device), batch["input_ids"].to(device),
                                      batch["attention_mask"].to(device))
        p_match.append(p.cpu())
        itc_sim.append(s.cpu())
    return torch.cat(p_match), torch.cat(itc_sim)


def scorer_config(source: str | object) -> RetrievalModelConfig:
    """The model keys of any task YAML file or config object (the rest is not the scorer's business)."""
    if isinstance(source, str):
        with open(source) as f:
            data = yaml.safe_load(f) or {}
    else:
        data = vars(source)
    names = {f.name for f in dataclasses.fields(RetrievalModelConfig)}
    return RetrievalModelConfig(**{k: v for k, v in data.items() if k in names})


def load_scorer(config: str | object, checkpoint: str | dict) -> tuple[ALBEFRetrieval, RetrievalModelConfig]:
    """The retrieval model (ITC + ITM, no MLM head) described by `config` (see `scorer_config`) with the
    weights of a pretraining or retrieval checkpoint (a file, or a state dict in memory), in eval mode."""
    cfg = scorer_config(config)
    model = ALBEFRetrieval(cfg, build_bert_config(cfg))
    load_retrieval_weights(model, checkpoint)
    return model.eval(), cfg
