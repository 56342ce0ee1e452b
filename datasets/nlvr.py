"""NLVR2 data in the original's format: JSON lists of `{"images": [left, right], "sentence": str,
"label": "True" | "False"}`.

A sample is (left image, right image, normalised sentence, label 0/1); `collate_nlvr` stacks a batch
as the NLVR model reads it: all left images, then all right images.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.data import Dataset
from transformers import BertTokenizerFast

from datasets.base import AnnotationError, LabelledDataset, image_path, open_image
from datasets.text import TOKENIZER_SETTINGS, pre_caption, tokenize

LABELS = {"True": 1, "False": 0}

Sample = tuple[torch.Tensor, torch.Tensor, str, int]


class NLVRDataset(LabelledDataset, Dataset):
    """Image pairs with a sentence each, from one or several annotation files (concatenated)."""

    LABELS = LABELS

    def __getitem__(self, index: int) -> Sample:
        pair = self.ann.field(index, "images")
        if not isinstance(pair, list) or len(pair) != 2:
            raise AnnotationError(f"{self.ann.where(index)}: 'images' must list two image paths, got {pair!r}")
        where = self.ann.where(index)
        left, right = (self.transform(open_image(image_path(self.image_root, p), where)) for p in pair)
        return left, right, pre_caption(self.ann.field(index, "sentence"), self.max_words), self.label(index)


def _collate_nlvr(samples: list[Sample], tokenizer: BertTokenizerFast) -> dict[str, torch.Tensor]:
    left, right, sentences, labels = zip(*samples)
    input_ids, attention_mask = tokenize(tokenizer, list(sentences), **TOKENIZER_SETTINGS["longest"])
    return {"image": torch.stack(left + right), "input_ids": input_ids, "attention_mask": attention_mask,
            "targets": torch.tensor(labels, dtype=torch.long)}


def collate_nlvr(tokenizer: BertTokenizerFast) -> Callable[[list[Sample]], dict[str, torch.Tensor]]:
    """DataLoader `collate_fn`: samples -> {"image" [2B,3,H,W] (left images, then right), "input_ids",
    "attention_mask" [B,L] (padded to the longest, no truncation, as NLVR.py), "targets" [B]}."""
    return functools.partial(_collate_nlvr, tokenizer=tokenizer)
