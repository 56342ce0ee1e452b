"""SNLI-VE visual entailment: does the image entail, contradict or leave open a sentence?

The full text-encoder pass (text layers, then fusion layers cross-attending to the image) feeds a
3-way classifier on the [CLS] state; training distils from momentum twins as the original does.
Class ids are the original's: contradiction 0, neutral 1, entailment 2.
"""

from __future__ import annotations


from models.albef import ALBEFClassifier, ALBEFConfig
from models.bert import BertConfig
from models.checkpoint import load_weights

NUM_CLASSES = 3


class ALBEFVE(ALBEFClassifier):
    """`forward(image, input_ids, attention_mask, targets, alpha)` -> {"loss"}; `predict` -> logits [B, 3]."""

    def __init__(self, cfg: ALBEFConfig, bert_cfg: BertConfig, distill: bool = True):
        super().__init__(cfg, bert_cfg, NUM_CLASSES, distill)


def ve_state_dict(state_dict: dict) -> dict:
    """VE.py's key loop: every key containing "bert" loses "bert." (a Pretrain.py checkpoint's
    `text_encoder(_m).bert.*` -> `text_encoder(_m).*`); a fine-tuned VE checkpoint passes unchanged.
    The momentum twins thus come from the checkpoint's momentum model, as in the original."""
    return {k.replace("bert.", "") if "bert" in k else k: v for k, v in state_dict.items()}


def load_ve_checkpoint(model: ALBEFVE, path: str) -> dict:
    """Initialise VE from a pretraining or fine-tuned checkpoint; a source without `cls_head`
    (pretraining) leaves the new heads at their initial values."""
    return load_weights(model, path, ve_state_dict, may_be_missing=lambda k: k.split(".")[0] in ("cls_head", "cls_head_m"))
