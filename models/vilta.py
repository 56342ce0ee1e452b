"""ViLTA (Wang et al., ICCV 2023) for ALBEF pretraining: two textual augmentations, each off by default.

1. Cross-distillation for MLM. A frozen masked language model (the teacher) reads the same masked
   caption without the image; its softened prediction joins the MLM target, so a plausible synonym of
   the masked word is no longer punished like a wrong word:
       target = (1 - w) * ALBEF's target + w * softmax(teacher_logits / T)
   where ALBEF's target is the one-hot label ("cross") or ALBEF's momentum-distilled mix ("both").
2. Synthesized ITM negatives. Words of each caption are masked and refilled by the model's own
   language side (no image), sampling likely words other than the original. The caption stays fluent
   but no longer matches its image: one more ITM negative per caption, on top of ALBEF's hard ones.

The paper does not publish its hyperparameters; every choice is a key of the `vilta:` config block
(`ViLTAConfig`) with a documented default. Nothing here is trained or saved in checkpoints: `ViLTA` is a
plain object (not an nn.Module) that the pretraining model holds, rebuilt from its config on resume.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from models.albef import ALBEF, ALBEFConfig
from models.bert import (
    BertConfig,
    BertForMaskedLM,
    load_hf_bert,
    read_hf_bert_state_dict,
    resolve_pretrained,
)

logger = logging.getLogger(__name__)

SOFT_TARGETS = ("momentum", "cross", "both")


@dataclass
class ViLTAConfig:
    """The `vilta:` block of the pretraining config. The defaults are plain ALBEF (both parts off)."""

    mlm_soft_target: str = "momentum"  # "momentum": ALBEF's; "cross": one-hot + teacher; "both": ALBEF's + teacher
    teacher: str | None = None  # HF masked LM (name or folder) with the model's vocabulary; None: `text_encoder`
    cross_weight: float = 0.3  # w above; ramped up linearly over the first epoch, like alpha
    teacher_temperature: float = 1.0  # T above
    synth_negatives: bool = False  # add (image, synthesized caption) negatives to ITM
    synth_rate: float = 0.3  # share of a caption's words replaced, rounded, then clamped to [min, max]
    synth_min_words: int = 1
    synth_max_words: int = 3
    synth_top_k: int = 10  # sample the replacement among the k likeliest tokens other than the original
    synth_synonym_ratio: float | None = None  # also drop tokens the teacher rates >= ratio x the original
    itm_synth_weight: float = 1.0  # weight of loss_itm_synth
    log_examples: int = 4  # synthesized captions written to the log after every epoch

    def __post_init__(self):
        if self.mlm_soft_target not in SOFT_TARGETS:
            raise ValueError(f"vilta.mlm_soft_target must be one of {SOFT_TARGETS}, got {self.mlm_soft_target!r}")
        if not 0.0 <= self.cross_weight <= 1.0 or self.teacher_temperature <= 0:
            raise ValueError("vilta: need 0 <= cross_weight <= 1 and teacher_temperature > 0")
        if not 0.0 <= self.synth_rate <= 1.0 or not 1 <= self.synth_min_words <= self.synth_max_words:
            raise ValueError("vilta: need 0 <= synth_rate <= 1 and 1 <= synth_min_words <= synth_max_words")
        if self.synth_top_k < 1 or (self.synth_synonym_ratio is not None and self.synth_synonym_ratio <= 0):
            raise ValueError("vilta: need synth_top_k >= 1 and synth_synonym_ratio > 0 (or null)")

    @property
    def cross(self) -> bool:
        return self.mlm_soft_target != "momentum"

    @property
    def enabled(self) -> bool:
        return self.cross or self.synth_negatives

    @property
    def needs_teacher(self) -> bool:
        return self.cross or (self.synth_negatives and self.synth_synonym_ratio is not None)


def mixed_mlm_targets(labels: torch.Tensor, probs_m: torch.Tensor | None, probs_t: torch.Tensor, alpha: float,
                      weight: float) -> torch.Tensor:
    """The cross-distilled MLM target [N, V] for N masked positions: (1 - weight) * base + weight * probs_t,
    base = one-hot(labels) mixed with alpha * momentum probabilities `probs_m` when given ("both"). Rows
    sum to one. The training loss computes the same thing term by term (see `ALBEF.mlm`)."""
    base = F.one_hot(labels, probs_t.shape[-1]).to(probs_t.dtype)
    if probs_m is not None:
        base = (1 - alpha) * base + alpha * probs_m
    return (1 - weight) * base + weight * probs_t


def vocabulary_classes(tokens: list[str], special_ids: list[int], vocab_size: int) -> dict[str, torch.Tensor]:
    """Boolean masks over the vocabulary: `word` (a token that starts a word: has a letter or digit, is not
    special, `[unused..]` or a `##` piece) and `piece` (a `##` continuation). Punctuation is neither, so
    it is never chosen nor proposed."""
    word, piece = torch.zeros(vocab_size, dtype=torch.bool), torch.zeros(vocab_size, dtype=torch.bool)
    special = set(special_ids)
    for i, tok in enumerate(tokens[:vocab_size]):
        if i in special or (tok.startswith("[") and tok.endswith("]")):
            continue
        if tok.startswith("##") and len(tok) > 2:
            piece[i] = True
        elif any(c.isalnum() for c in tok):
            word[i] = True
    return {"word": word, "piece": piece}


class MLMTeacher:
    """A frozen Hugging Face masked LM (all its layers, no image), in eval mode, never given gradients."""

    def __init__(self, model: BertForMaskedLM, source: str):
        self.model = model.eval().requires_grad_(False)
        self.source = source

    @classmethod
    def from_pretrained(cls, name_or_path: str, vocab_size: int) -> MLMTeacher:
        folder = resolve_pretrained(name_or_path)
        cfg = BertConfig.from_json(os.path.join(folder, "config.json"))
        cfg = replace(cfg, fusion_layer=cfg.num_hidden_layers)  # a plain BERT: no cross-attention
        if cfg.vocab_size != vocab_size:
            raise ValueError(f"vilta.teacher {name_or_path}: vocabulary of {cfg.vocab_size} tokens, the model has "
                             f"{vocab_size}; the teacher must share the model's vocabulary")
        if not any(k.startswith("cls.predictions.transform") for k in read_hf_bert_state_dict(folder)):
            raise ValueError(f"vilta.teacher {name_or_path}: no masked-LM head (cls.predictions.*) in its weights; "
                             "use a BertForMaskedLM checkpoint (see scripts/ablate_vilta.py for the demo's)")
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten: the training RNG stays as it was
            model = BertForMaskedLM(cfg)
            load_hf_bert(model, folder)
        logger.info("ViLTA teacher: %s (%d layers, frozen)", name_or_path, cfg.num_hidden_layers)
        return cls(model, name_or_path)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] at the N True `positions` [B, L]."""
        hidden = self.model.bert(input_ids, attention_mask, mode="language")
        return self.model.cls(hidden[positions]).float()


class ViLTA:
    """What ViLTA adds to a pretraining model: the config, the teacher and the vocabulary classes."""

    def __init__(self, cfg: ViLTAConfig, vocab: dict[str, torch.Tensor], mask_token_id: int,
                 teacher: MLMTeacher | None = None):
        if cfg.needs_teacher and teacher is None:
            raise ValueError("this vilta config needs a teacher")
        self.cfg, self.vocab, self.mask_token_id, self.teacher = cfg, vocab, mask_token_id, teacher

    @classmethod
    def build(cls, cfg: ViLTAConfig, tokenizer, bert_cfg: BertConfig, text_encoder: str | None) -> ViLTA:
        vocab = vocabulary_classes(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))),
                                   tokenizer.all_special_ids, bert_cfg.vocab_size)
        teacher = None
        if cfg.needs_teacher:
            source = cfg.teacher or text_encoder
            if not source:
                raise ValueError("vilta: set `vilta.teacher` (or `text_encoder`) to a masked LM name or folder")
            teacher = MLMTeacher.from_pretrained(source, bert_cfg.vocab_size)
        return cls(cfg, vocab, bert_cfg.mask_token_id, teacher)

    def to(self, device: torch.device | str) -> ViLTA:
        self.vocab = {k: v.to(device) for k, v in self.vocab.items()}
        if self.teacher is not None:
            self.teacher.model.to(device)
        return self

    # ------------------------------------------------------------------------------ cross-distillation

    @torch.no_grad()
    def teacher_probs(self, masked_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor):
        """softmax(teacher logits / T) [N, V] at the N masked `positions` of the same masked caption."""
        logits = self.teacher.logits(masked_ids, attention_mask, positions)
        return F.softmax(logits / self.cfg.teacher_temperature, dim=-1)

    # ------------------------------------------------------------------------------ synthesized captions

    def choose_words(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] True at the tokens to replace: k random whole words per caption (every piece of a
        word), k = clamp(round(rate * words), min, max), at most the caption's word count."""
        valid = attention_mask.bool()
        start = self.vocab["word"][input_ids] & valid
        piece = self.vocab["piece"][input_ids] & valid
        n_words = start.sum(1)
        k = (n_words.float() * self.cfg.synth_rate).round().long()
        k = k.clamp(self.cfg.synth_min_words, self.cfg.synth_max_words).minimum(n_words)
        score = torch.rand(input_ids.shape, device=input_ids.device).masked_fill(~start, -1.0)
        rank = score.argsort(dim=1, descending=True).argsort(dim=1)
        chosen_start = start & (rank < k[:, None])
        # each `##` piece follows its word's choice: index of the last non-piece token at or before it
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        head = positions.masked_fill(piece, -1).cummax(dim=1).values.clamp(min=0)
        return (start | piece) & chosen_start.gather(1, head)

    @torch.no_grad()
    def synthesize(self, lm: BertForMaskedLM, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(synthesized ids [B, L], replaced [B, L]): the chosen words masked and refilled by `lm` in its
        "language" mode. That runs every layer, the fusion layers without their cross-attention: the MLM
        head was trained on the last layer's states, and without the image the prediction is only what
        the language finds plausible, which makes a fluent caption that need not match the image. Each
        token is sampled among the `synth_top_k` likeliest tokens of its kind (a word for a word, a `##`
        piece for a piece), never the original (nor, with `synth_synonym_ratio`, a token the teacher
        rates nearly as likely as the original). Length, padding and special tokens are unchanged."""
        chosen = self.choose_words(input_ids, attention_mask)
        masked = input_ids.masked_fill(chosen, self.mask_token_id)
        logits = lm.cls(lm.bert(masked, attention_mask, mode="language")[chosen]).float()
        original = input_ids[chosen]
        is_piece = self.vocab["piece"][original][:, None]
        allowed = torch.where(is_piece, self.vocab["piece"][None], self.vocab["word"][None])
        allowed = allowed.scatter(1, original[:, None], False)
        if self.cfg.synth_synonym_ratio is not None and self.teacher is not None:
            probs_t = F.softmax(self.teacher.logits(masked, attention_mask, chosen), dim=-1)
            p_original = probs_t.gather(1, original[:, None])
            allowed &= probs_t < self.cfg.synth_synonym_ratio * p_original
        top = logits.masked_fill(~allowed, float("-inf")).topk(self.cfg.synth_top_k, dim=1)
        pick = torch.multinomial(F.softmax(top.values, dim=1), 1)
        synthesized = input_ids.masked_scatter(chosen, top.indices.gather(1, pick).squeeze(1))
        return synthesized, chosen


class ALBEFViLTA(ALBEF):
    """The pretraining model with ViLTA's additions, through ALBEF's hooks: synthesized captions as extra
    ITM negatives (`extra_texts`, `itm_rows`, `itm_loss`) and the teacher's soft MLM targets
    (`mlm_loss` with `cross_weight`). Its state dict is ALBEF's: the ViLTA object (vocabulary classes,
    frozen teacher) is rebuilt from the config, never saved.

    `forward(..., cross_weight=w)` adds "loss_mlm_cross"; synthesized negatives add "loss_itm_synth"
    (times `itm_synth_weight`), "itm_synth_acc" and "synth_replaced".
    """

    def __init__(self, cfg: ALBEFConfig, bert_cfg: BertConfig, vilta: ViLTA):
        super().__init__(cfg, bert_cfg)
        self.vilta = vilta
        self.cross_weight: float | None = None  # this forward's, set by `forward`

    def to(self, *args, **kwargs) -> ALBEFViLTA:
        super().to(*args, **kwargs)
        self.vilta.to(self.temp.device)
        return self

    def forward(self, image, input_ids, attention_mask, alpha: float = 0.0, image_ids=None, return_outputs=False,
                cross_weight: float | None = None):
        if cross_weight is not None and not self.vilta.cfg.cross:
            raise ValueError("cross_weight needs a model with vilta.mlm_soft_target 'cross' or 'both'")
        self.cross_weight = cross_weight
        return super().forward(image, input_ids, attention_mask, alpha, image_ids, return_outputs)

    def extra_texts(self, input_ids, attention_mask, out: dict) -> list[torch.Tensor]:
        """The synthesized captions (with `synth_negatives`); `out["synth_valid"]` [B] marks those that
        are negatives (a caption with no word to replace is none)."""
        if not self.vilta.cfg.synth_negatives:
            return []
        synth_ids, replaced = self.vilta.synthesize(self.text_encoder, input_ids, attention_mask)
        out.update(synth_input_ids=synth_ids, synth_replaced=replaced.sum() / attention_mask.sum(),
                   synth_valid=replaced.any(1).float())
        return [synth_ids]

    def itm_rows(self, text_embeds, attention_mask, sim_i2t, sim_t2i, same, out: dict, extra_embeds=()):
        """ALBEF's 3B rows, then B rows (synthesized caption b, image b), scored as negatives by `itm_loss`."""
        text, mask, images = super().itm_rows(text_embeds, attention_mask, sim_i2t, sim_t2i, same, out)
        if not extra_embeds:
            return text, mask, images
        rows = torch.arange(text_embeds.shape[0], device=text_embeds.device)
        return torch.cat([text, extra_embeds[0]]), torch.cat([mask, attention_mask]), torch.cat([images, rows])

    def itm_loss(self, cls_states: torch.Tensor, out: dict) -> torch.Tensor:
        """ALBEF's ITM loss on the first 3B rows; the synthesized rows' go to `out["loss_itm_synth"]` (and
        their accuracy to `out["itm_synth_acc"]`), counted where `synth_valid`."""
        if "synth_valid" not in out:
            return super().itm_loss(cls_states, out)
        B, valid = cls_states.shape[0] // 4, out["synth_valid"]
        synth_logits = self.itm_head(cls_states[3 * B:])
        ce = F.cross_entropy(synth_logits, torch.zeros(B, dtype=torch.long, device=cls_states.device),
                             reduction="none")
        out["loss_itm_synth"] = (ce * valid).sum() / valid.sum().clamp(min=1)
        out["itm_synth_acc"] = ((synth_logits.argmax(1) == 0).float() * valid).sum() / valid.sum().clamp(min=1)
        return super().itm_loss(cls_states[:3 * B], out)

    def mlm_loss(self, hidden, hidden_m, masked_ids, labels, attention_mask, alpha: float, out: dict, full=False):
        """Cross-distillation (`cross_weight` w given): the target becomes (1 - w) * base + w * teacher
        (`mixed_mlm_targets`), base = one-hot ("cross") or ALBEF's mix ("both"); the loss, linear in the
        target, is returned as (1 - w) * base loss plus `out["loss_mlm_cross"]` = w * teacher KD."""
        w = self.cross_weight
        if w is None:
            return super().mlm_loss(hidden, hidden_m, masked_ids, labels, attention_mask, alpha, out, full)
        log_probs, ce, kd, valid = self.mlm_terms(hidden, hidden_m, masked_ids, labels, out, full)
        base = ce if self.vilta.cfg.mlm_soft_target == "cross" else (1 - alpha) * ce + alpha * kd
        probs_t = self.vilta.teacher_probs(masked_ids, attention_mask, labels != -100)
        kd_t = -(probs_t * (log_probs[valid] if full else log_probs)).sum(-1)
        out["loss_mlm_cross"] = w * kd_t.mean() if kd_t.numel() else kd_t.sum()
        return (1 - w) * (base * valid).sum() / valid.sum().clamp(min=1)

    def extra_losses(self, out: dict) -> dict[str, torch.Tensor]:
        losses = {k: out[k] for k in ("loss_mlm_cross", "loss_itm_synth", "itm_synth_acc", "synth_replaced") if k in out}
        if "loss_itm_synth" in losses:
            losses["loss_itm_synth"] = self.vilta.cfg.itm_synth_weight * losses["loss_itm_synth"]
        return losses
