"""SNLI-VE visual entailment: does the image entail, contradict or leave open a sentence?

The full text-encoder pass (text layers, then fusion layers cross-attending to the image) feeds a
3-way classifier on the [CLS] state; training distils from momentum twins as the original does.
Class ids are the original's: contradiction 0, neutral 1, entailment 2.
"""

from __future__ import annotations

import torch

from models.albef import ALBEFBase, ALBEFConfig, classifier_head, distilled_classification
from models.bert import BertConfig
from models.checkpoint import load_weights

NUM_CLASSES = 3


class ALBEFVE(ALBEFBase):
    """`forward(image, input_ids, attention_mask, targets, alpha)` -> {"loss"}; `predict` -> logits [B, 3]."""

    momentum_names = ("visual_encoder", "text_encoder", "cls_head")

    def __init__(self, cfg: ALBEFConfig, bert_cfg: BertConfig, distill: bool = True):
        super().__init__(cfg, bert_cfg, mlm_head=False)
        self.cls_head = classifier_head(bert_cfg.hidden_size, NUM_CLASSES)
        self.distill = distill
        if distill:
            self.build_momentum()
        else:
            self.momentum_names = ()  # no twins: the original builds none without distillation

    def classify(self, image, input_ids, attention_mask, momentum: bool = False, out=None) -> torch.Tensor:
        """Logits [B, 3]; `out` collects the hidden states."""
        sfx = "_m" if momentum else ""
        vit, bert, head = (getattr(self, n + sfx) for n in ("visual_encoder", "text_encoder", "cls_head"))
        image_embeds = vit.forward_features(image)
        hidden = bert(input_ids, attention_mask, image_embeds)
        prediction = head(hidden[:, 0])
        if out is not None:
            out.update({f"image_embeds{sfx}": image_embeds, f"text_hidden{sfx}": hidden,
                        f"prediction{sfx}": prediction})
        return prediction

    @torch.no_grad()
    def predict(self, image, input_ids, attention_mask) -> torch.Tensor:
        return self.classify(image, input_ids, attention_mask)

    def forward(self, image, input_ids, attention_mask, targets, alpha: float = 0.0, return_outputs: bool = False):
        return distilled_classification(self, image, input_ids, attention_mask, targets, alpha, return_outputs)


def ve_state_dict(state_dict: dict) -> dict:
    """VE.py's key loop: every key containing "bert" loses "bert." (a Pretrain.py checkpoint's
    `text_encoder(_m).bert.*` -> `text_encoder(_m).*`); a fine-tuned VE checkpoint passes unchanged.
    The momentum twins thus come from the checkpoint's momentum model, as in the original."""
    return {k.replace("bert.", "") if "bert" in k else k: v for k, v in state_dict.items()}


def load_ve_checkpoint(model: ALBEFVE, path: str) -> dict:
    """Initialise VE from a pretraining or fine-tuned checkpoint; a source without `cls_head`
    (pretraining) leaves the new heads at their initial values."""
    return load_weights(model, path, ve_state_dict, may_be_missing=lambda k: k.split(".")[0] in ("cls_head", "cls_head_m"))
