"""SNLI-VE data in the original's format: JSON lists of `{"image": id or path, "sentence": str,
"label": "entailment" | "neutral" | "contradiction"}`.

The original files name images by Flickr30k id without extension (`"2248275300"` -> `2248275300.jpg`
under `image_root`); a name that has an extension is used as written (the demo's `images/x.png`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch.utils.data import Dataset
from transformers import BertTokenizerFast

from datasets.base import LabelledDataset, image_path, open_image
from datasets.text import collate_image_text, pre_caption

# ALBEF parity: the original's class ids.
LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}

Sample = tuple[torch.Tensor, str, int]


class VEDataset(LabelledDataset, Dataset):
    """(image, normalised hypothesis, class id) triples of one or several annotation files."""

    LABELS = LABELS

    def __getitem__(self, index: int) -> Sample:
        name = str(self.ann.field(index, "image"))
        if not os.path.splitext(name)[1]:
            name += ".jpg"  # ALBEF parity: VE.py opens '%s.jpg' % image
        image = open_image(image_path(self.image_root, name), self.ann.where(index))
        return self.transform(image), pre_caption(self.ann.field(index, "sentence"), self.max_words), self.label(index)


def collate_ve(tokenizer: BertTokenizerFast) -> Callable[[list[Sample]], dict[str, torch.Tensor]]:
    """DataLoader `collate_fn`: samples -> {"image" [B,3,H,W], "input_ids", "attention_mask" [B,L]
    (padded to the longest, no truncation, as VE.py), "targets" [B] in {0, 1, 2}}."""
    return functools.partial(collate_image_text, tokenizer=tokenizer, setting="longest", key="targets")
