"""NLVR2: does a sentence hold for a pair of images? And the text-assignment (TA) pretraining that
prepares the two-image encoder for it (the original's `Pretrain_nlvr.py`).

Both models read the pair with `TwoImageBertModel`: F text layers, then each fusion layer of the
pretrained encoder twice, layer F+2i attending to the left image and F+2i+1 to the right one, with the
cross-attention key/value shared per pair. Images arrive as one batch [left images; right images].

The chain of checkpoints is the original's: Pretrain.py -> Pretrain_nlvr.py (`text_assignment_state_dict`
duplicates the fusion layers) -> NLVR.py (`nlvr_state_dict`).
"""

from __future__ import annotations

import functools
import logging
import re

import torch
import torch.nn.functional as F
from torch import nn

from models.albef import ALBEFBase, ALBEFClassifier, ALBEFConfig
from models.bert import BertConfig, TwoImageBertModel
from models.checkpoint import is_pretraining, load_weights

logger = logging.getLogger(__name__)

# ALBEF parity: the TA hard-negative weights use this constant, not the `temp` parameter (the original's
# Pretrain_nlvr model ignores `temp`).
TA_TEMPERATURE = 0.07


class ALBEFNLVR(ALBEFClassifier):
    """`forward(image, input_ids, attention_mask, targets, alpha)` -> {"loss"}; `predict` -> logits [B, 2] for
    image [2B, 3, H, W] = [left; right]: each text reads both its images (`TwoImageBertModel`)."""

    text_encoder_class = TwoImageBertModel

    def __init__(self, cfg: ALBEFConfig, bert_cfg: BertConfig, distill: bool = True):
        super().__init__(cfg, bert_cfg, 2, distill)

    def encode(self, vit, bert, image, input_ids, attention_mask):
        if image.shape[0] != 2 * input_ids.shape[0]:
            raise ValueError(f"NLVR needs 2 images per text: got {image.shape[0]} images, {input_ids.shape[0]} texts")
        image_embeds = vit.forward_features(image)
        return image_embeds, bert(input_ids, attention_mask, image_embeds.split(input_ids.shape[0]))


class ALBEFTextAssignment(ALBEFBase):
    """Text-assignment pretraining: `forward(image, input_ids, attention_mask)` -> {"loss_ta"}.

    For text b the two-image encoder sees (b, a hard negative), (a hard negative, b) or two negatives,
    and `ta_head` names which (labels 0, 1, 2). `text_proj` and `temp` are unused, as in the original,
    but kept: its checkpoints carry them.
    """

    def __init__(self, cfg: ALBEFConfig, bert_cfg: BertConfig):
        super().__init__(cfg, bert_cfg, mlm_head=False)
        self.text_encoder = TwoImageBertModel(bert_cfg)  # in place of the base's one-image encoder
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(bert_cfg.hidden_size, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.ta_head = nn.Linear(bert_cfg.hidden_size, 3)

    @staticmethod
    def assign_images(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(left image, right image, label) per text, the original's rule: with probability 2/3 one negative drawn
        from `weights[b]` and a fair coin puts b left (label 0) or right (label 1); otherwise two
        distinct negatives (label 2). The original loops over the batch; this draws for all rows at
        once (same distribution, another random stream)."""
        B, device = weights.shape[0], weights.device
        one_negative = torch.rand(B, device=device) > 1 / 3
        b_left = torch.rand(B, device=device) > 0.5
        neg = torch.multinomial(weights, 1).squeeze(1)
        two = torch.multinomial(weights, 2)
        own = torch.arange(B, device=device)
        left = torch.where(one_negative, torch.where(b_left, own, neg), two[:, 0])
        right = torch.where(one_negative, torch.where(b_left, neg, own), two[:, 1])
        labels = torch.where(one_negative, (~b_left).long(), torch.full_like(own, 2))
        return left, right, labels

    def forward(self, image, input_ids, attention_mask, return_outputs: bool = False):
        if image.shape[0] < 3:
            raise ValueError("text assignment needs a batch of at least 3 images (two distinct negatives)")
        image_embeds = self.visual_encoder.forward_features(image)
        with torch.no_grad():
            image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
            sim = image_feat @ image_feat.T / TA_TEMPERATURE
            weights = F.softmax(sim.float(), dim=1).fill_diagonal_(0)
        left, right, labels = self.assign_images(weights)
        hidden = self.text_encoder(input_ids, attention_mask, (image_embeds[left], image_embeds[right]))
        prediction = self.ta_head(hidden[:, 0])
        loss = F.cross_entropy(prediction, labels)
        if return_outputs:
            return {"loss_ta": loss, "image_embeds": image_embeds, "image_feat": image_feat, "sim": sim,
                    "sample_weights": weights, "labels": labels, "text_hidden": hidden, "prediction": prediction}
        return {"loss_ta": loss}


# --------------------------------------------------------------------------------------- checkpoints

_LAYER = re.compile(r"^(\w+)\.encoder\.layer\.(\d+)\.(.*)$")


def text_assignment_state_dict(state_dict: dict, fusion_layer: int) -> dict:
    """Pretrain.py layout -> TA layout, Pretrain_nlvr.py's key loop: every key containing "bert" loses
    "bert.", and pretrained fusion layer l (>= fusion_layer) becomes layers F+2(l-F) and F+2(l-F)+1
    (both halves of a pair start equal, so the shared key/value agree). Other keys pass unchanged
    (the TA model has no use for queues, momentum twins or the MLM head; the loader drops them)."""
    out = {}
    for key, value in state_dict.items():
        if "bert" not in key:
            out[key] = value
            continue
        key = key.replace("bert.", "")
        m = _LAYER.match(key)
        if m is None or int(m[2]) < fusion_layer:
            out[key] = value
            continue
        first = fusion_layer + 2 * (int(m[2]) - fusion_layer)
        for layer in (first, first + 1):
            out[f"{m[1]}.encoder.layer.{layer}.{m[3]}"] = value
    return out


def nlvr_state_dict(state_dict: dict, fusion_layer: int) -> dict:
    """Any checkpoint the NLVR model can start from, in its keys: a fine-tuned NLVR or a TA checkpoint
    as it is (NLVR.py has no key loop), a Pretrain.py checkpoint through the TA conversion first.
    From pretraining, the momentum twins are dropped as the TA step would drop them, so both routes
    leave the same keys missing."""
    if not is_pretraining(state_dict):
        return dict(state_dict)
    converted = text_assignment_state_dict(state_dict, fusion_layer)
    return {k: v for k, v in converted.items() if not k.split(".")[0].endswith("_m")}


def _head_or_momentum(key: str) -> bool:
    return key.startswith("cls_head.") or key.split(".")[0].endswith("_m")


def load_nlvr_checkpoint(model: ALBEFNLVR, path: str, copy_momentum_after_load: bool = False) -> dict:
    """Initialise NLVR from a fine-tuned NLVR, a TA or a pretraining checkpoint. Weights the source
    lacks (`cls_head`, and the momentum twins unless it is a fine-tuned NLVR) keep their current values.

    ALBEF parity (`copy_momentum_after_load=False`): NLVR.py copies online to momentum weights BEFORE
    loading, so the momentum twins keep the constructor's weights (BERT text side, untrained ViT) and
    not the checkpoint's. With True they start from the loaded online weights instead.
    """
    result = load_weights(model, path, functools.partial(nlvr_state_dict, fusion_layer=model.bert_cfg.fusion_layer),
                          may_be_missing=_head_or_momentum)
    if copy_momentum_after_load and any(k.split(".")[0].endswith("_m") for k in result["missing"]):
        model.copy_params()
        logger.info("momentum twins copied from the loaded online weights (copy_momentum_after_load)")
    return result


def load_text_assignment_checkpoint(model: ALBEFTextAssignment, path: str) -> dict:
    """Initialise TA pretraining from a Pretrain.py checkpoint (converted; `ta_head` stays new) or
    continue from a TA checkpoint."""
    def convert(sd: dict) -> dict:
        return text_assignment_state_dict(sd, model.bert_cfg.fusion_layer) if is_pretraining(sd) else sd

    return load_weights(model, path, convert, may_be_missing=lambda k: k.startswith("ta_head."))
