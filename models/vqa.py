"""VQA as ALBEF does it: an image-grounded question encoder and an answer decoder.

The question is encoded by the full text encoder (text layers, then fusion layers cross-attending to
the image); a separate BERT language model (`text_decoder`, cross-attention in every layer) reads the
question states and generates the answer. Training maximises the likelihood of the human answers,
weighted by how many annotators gave them; evaluation ranks a fixed answer list (`predict`).

Attribute names follow the official `vqa.pth` (`text_encoder.*` bare, `text_decoder.bert.*`,
`text_decoder.cls.*`, `*_m` twins) so it loads with `strict=True`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.albef import ALBEFBase, ALBEFConfig
from models.bert import BertConfig, BertForMaskedLM, init_bert_weights, load_hf_bert
from models.checkpoint import CheckpointError, is_pretraining, load_weights, read_state_dict

logger = logging.getLogger(__name__)



@dataclass
class VQAModelConfig(ALBEFConfig):
    """The model keys of VQA.yaml on top of ALBEFConfig (embed_dim, temp, queue_size and momentum are
    unused here: VQA has no contrastive head)."""

    text_decoder_layers: int = 6  # answer decoder depth; its layer i starts from fusion layer i
    distill: bool = True  # momentum twins + distillation of the answer tokens

    def __post_init__(self):
        super().__post_init__()
        if self.text_decoder_layers < 1:
            raise ValueError(f"text_decoder_layers must be >= 1, got {self.text_decoder_layers}")


def decoder_config(bert_cfg: BertConfig, layers: int) -> BertConfig:
    """The answer decoder's BERT: cross-attention in every layer, reading question states (hidden_size
    wide; the original reuses encoder_width, which equals hidden_size at the official sizes)."""
    return dataclasses.replace(bert_cfg, fusion_layer=0, num_hidden_layers=layers, encoder_width=bert_cfg.hidden_size)


def answer_losses(logits, answer_ids, answer_mask, logits_m=None, alpha: float = 0.0) -> torch.Tensor:
    """Per-answer loss [R] of next-token prediction, SUMMED over the answer's tokens after [CLS]
    (its [SEP] included, padding excluded). With momentum logits, (1 - alpha) CE + alpha KD where KD
    is the cross-entropy against the momentum decoder's softmax at the same positions.

    `logits` [R, La, V] (or [R, La-1, V] already shifted), `logits_m` [R, La-1, V].
    """
    labels, valid = answer_ids[:, 1:], answer_mask[:, 1:].bool()
    log_probs = F.log_softmax(logits[:, : labels.shape[1]].float(), dim=-1)
    loss = -(log_probs.gather(-1, labels[..., None]).squeeze(-1) * valid).sum(1)
    if logits_m is not None:
        kd = -(F.softmax(logits_m.float(), dim=-1) * log_probs).sum(-1)
        loss = (1 - alpha) * loss + alpha * (kd * valid).sum(1)
    return loss


class VQAModel(ALBEFBase):
    """`forward(image, question_ids, question_mask, answer_ids, answer_mask, weights, n, alpha)` ->
    {"loss"}; `predict(image, question_ids, question_mask, answer_ids, answer_mask, k)` -> the k best
    answers of the list and their probabilities."""

    momentum_names = ("visual_encoder", "text_encoder", "text_decoder")

    def __init__(self, cfg: VQAModelConfig, bert_cfg: BertConfig):
        super().__init__(cfg, bert_cfg, mlm_head=False)
        self.text_decoder = BertForMaskedLM(decoder_config(bert_cfg, cfg.text_decoder_layers))
        # What `from_pretrained` leaves in weights no checkpoint provides (and the twins copy it).
        init_bert_weights(self.text_encoder, bert_cfg.initializer_range)
        init_bert_weights(self.text_decoder, bert_cfg.initializer_range)
        self.distill = cfg.distill
        if cfg.distill:
            self.build_momentum()
        else:
            self.momentum_names = ()

    def init_pretrained_encoders(self) -> None:
        """Without a checkpoint: BERT weights into the encoder and, as `from_pretrained` did in the
        original, BERT's first layers (and MLM head, if the source has one) into the decoder."""
        if self.cfg.text_encoder:
            load_hf_bert(self.text_decoder, self.cfg.text_encoder)
        super().init_pretrained_encoders()

    def encode_question(self, image, question_ids, question_mask, momentum: bool = False):
        """(image token states [B, N, W], question states [B, Lq, H]) of the full encoder pass."""
        vit, bert = (self.visual_encoder, self.text_encoder)
        if momentum:
            vit, bert = self.visual_encoder_m, self.text_encoder_m
        image_embeds = vit.forward_features(image)
        return image_embeds, bert(question_ids, question_mask, image_embeds)

    def forward(self, image, question_ids, question_mask, answer_ids, answer_mask, weights, n,
                alpha: float = 0.0, return_outputs: bool = False) -> dict[str, torch.Tensor]:
        """Weighted answer-generation loss {"loss"}: sum over answers of weight x summed token loss,
        divided by the number of QUESTIONS (ALBEF parity: token losses are summed over each answer, [SEP]
        included, not averaged).

        Answers are flat: `answer_ids` [R, La] lists question 0's `n[0]` answers first, and so on;
        `weights` [R]; `n` [B] int. With `return_outputs`, every intermediate tensor too.
        """
        B, R = image.shape[0], answer_ids.shape[0]
        rows = torch.repeat_interleave(torch.arange(B, device=image.device), n.to(image.device), output_size=R)
        image_embeds, question_states = self.encode_question(image, question_ids, question_mask)
        out: dict[str, torch.Tensor] = {}
        logits_m = None
        if self.distill:
            with torch.no_grad():
                self.momentum_update(self.cfg.momentum)  # ALBEF parity: before any momentum feature
                image_embeds_m, question_states_m = self.encode_question(image, question_ids, question_mask, True)
                logits_m = self.text_decoder_m(answer_ids, answer_mask, question_states_m[rows], question_mask[rows],
                                               causal=True)[:, :-1]
            out.update(image_embeds_m=image_embeds_m, question_states_m=question_states_m, answer_logits_m=logits_m)
        logits = self.text_decoder(answer_ids, answer_mask, question_states[rows], question_mask[rows], causal=True)
        per_answer = answer_losses(logits, answer_ids, answer_mask, logits_m, alpha)
        loss = (weights * per_answer).sum() / B
        if return_outputs:
            out.update(image_embeds=image_embeds, question_states=question_states, answer_logits=logits,
                       answer_loss_per_answer=per_answer)
            return {"loss": loss} | out
        return {"loss": loss}

    @torch.no_grad()
    def predict(self, image, question_ids, question_mask, answer_ids, answer_mask, k: int):
        """(topk_ids [B, k] indices into the answer list, topk_probs [B, k]), best first."""
        _, question_states = self.encode_question(image, question_ids, question_mask)
        return self.rank_answer(question_states, question_mask, answer_ids, answer_mask, k)

    @torch.no_grad()
    def rank_answer(self, question_states, question_mask, answer_ids, answer_mask, k: int, out: dict | None = None):
        """Two-stage ranking of the answer list ([CLS] answer [SEP] [PAD].., ids [A, La]).

        Stage 1 scores every answer by the probability of its first token after [CLS] (one decoder step
        for all answers); stage 2 scores the k best with a full decoder pass, all questions at once.
        ALBEF parity: the final log-score adds log p(first token) to the summed token loss,
        which already contains it, so the first token counts twice; probabilities are a softmax over
        the k candidates. Answers that share a first token tie in stage 1; the tie is broken by list
        order (a stable sort, the same on every device), where `torch.topk` leaves it unspecified.
        `k` is capped at the list's length, so every question gets an answer.
        """
        B, A = question_states.shape[0], answer_ids.shape[0]
        k = min(k, A)
        start = answer_ids[:1, :1].expand(B, 1)  # [CLS]
        first_logits = self.text_decoder(start, torch.ones_like(start), question_states, question_mask, causal=True)
        first_logits = first_logits[:, 0]
        first_probs = F.softmax(first_logits.float(), dim=-1)[:, answer_ids[:, 1]]
        probs_sorted, ids_sorted = first_probs.sort(dim=1, descending=True, stable=True)
        first_topk_probs, first_topk_ids = probs_sorted[:, :k], ids_sorted[:, :k]

        cand_ids = answer_ids[first_topk_ids].flatten(0, 1)  # [B*k, La], question b's candidates together
        cand_mask = answer_mask[first_topk_ids].flatten(0, 1)
        states, mask = question_states.repeat_interleave(k, 0), question_mask.repeat_interleave(k, 0)
        cand_loss = self.candidate_losses(cand_ids, cand_mask, states, mask)
        log_score = first_topk_probs.log() - cand_loss.view(B, k)
        topk_probs, rerank = F.softmax(log_score, dim=-1).topk(k, dim=1)
        topk_ids = first_topk_ids.gather(1, rerank)
        if out is not None:
            out.update(first_token_logits=first_logits, first_token_probs=first_probs,
                       first_stage_topk_ids=first_topk_ids, first_stage_topk_probs=first_topk_probs,
                       candidate_answer_loss=cand_loss[:, None], candidate_log_score=log_score)
        return topk_ids, topk_probs

    def candidate_losses(self, ids, mask, states, states_mask) -> torch.Tensor:
        """Summed token loss [R] of each answer; the vocabulary head runs only at predicted positions."""
        hidden = self.text_decoder.bert(ids, mask, states, states_mask, causal=True)[:, :-1]
        labels, valid = ids[:, 1:], mask[:, 1:].bool()
        log_probs = F.log_softmax(self.text_decoder.cls(hidden[valid]).float(), dim=-1)
        nll = -log_probs.gather(-1, labels[valid][:, None]).squeeze(-1)
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(valid)[valid]
        return torch.zeros(ids.shape[0], device=ids.device).index_add_(0, rows, nll)


# --------------------------------------------------------------------------------------- checkpoints

_PRETRAIN_TEXT_KEY = re.compile(r"(text_encoder(?:_m)?)\.(bert|cls)\.(.*)")
_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.*)")


def vqa_keys_from_pretrain(key: str, fusion_layer: int, decoder_layers: int) -> list[str]:
    """The VQA keys a pretraining key initialises (none: it is unused).

    `visual_encoder(_m).*` stay; `text_encoder(_m).bert.X` becomes the bare question encoder's `X`; its
    embeddings also seed the decoder's, its MLM head the decoder's head, and its layer fusion_layer + i
    the decoder's layer i (the original's VQA.py, with 6 written for fusion_layer).
    """
    if key.startswith(("visual_encoder.", "visual_encoder_m.")):
        return [key]
    m = _PRETRAIN_TEXT_KEY.fullmatch(key)
    if m is None:
        return []  # vision_proj, text_proj, itm_head, temp, queues
    encoder, part, rest = m.groups()
    decoder = encoder.replace("text_encoder", "text_decoder")
    if part == "cls":
        return [f"{decoder}.cls.{rest}"]
    layer = _LAYER_KEY.fullmatch(rest)
    if layer is None:
        return [f"{encoder}.{rest}", f"{decoder}.bert.{rest}"]
    i = int(layer[1]) - fusion_layer
    return [f"{encoder}.{rest}"] + ([f"{decoder}.bert.encoder.layer.{i}.{layer[2]}"] if 0 <= i < decoder_layers else [])


def vqa_state_dict_from_pretrain(state_dict: dict, fusion_layer: int, decoder_layers: int) -> tuple[dict, list[str]]:
    """(VQA state dict, unused pretraining keys). Values are the same tensors, not copies."""
    out, unused = {}, []
    for key, value in state_dict.items():
        targets = vqa_keys_from_pretrain(key, fusion_layer, decoder_layers)
        unused += [] if targets else [key]
        out.update((t, value) for t in targets)
    return out, unused


def convert_vqa(state_dict: dict, fusion_layer: int, decoder_layers: int) -> dict:
    """Any checkpoint the VQA model starts from, in its keys: a VQA one as it is, a pretraining one through
    `vqa_state_dict_from_pretrain`; anything else is a CheckpointError."""
    if any(k.startswith("text_decoder.") for k in state_dict):
        return dict(state_dict)
    if not is_pretraining(state_dict):
        raise CheckpointError("neither a VQA nor a pretraining checkpoint (no text_decoder.* or "
                              "text_encoder.bert.* keys)")
    converted, unused = vqa_state_dict_from_pretrain(state_dict, fusion_layer, decoder_layers)
    logger.info("VQA model from a pretraining checkpoint; unused: %s", sorted(unused))
    return converted


def load_vqa_checkpoint(model: VQAModel, path: str) -> None:
    """Load a VQA checkpoint strictly, or initialise from a PRETRAINING checkpoint (`convert_vqa`).

    From a pretraining checkpoint the momentum twins come from its `*_m` weights, as in the original.
    Keys whose shapes differ keep the model's BERT initialisation (the demo: its decoder cross-attends
    to hidden_size-wide question states where the pretrained fusion layers read vision_width-wide
    image tokens); any other gap is an error.
    """
    sd = read_state_dict(path)
    try:
        converted = convert_vqa(sd, model.bert_cfg.fusion_layer, model.text_decoder.config.num_hidden_layers)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not is_pretraining(sd):
        load_weights(model, converted, name=path)
        return
    try:
        load_weights(model, converted, reinit_mismatched=True, name=f"{path} (a pretraining checkpoint)")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; text_decoder_layers may exceed its fusion layers") from None
