"""Pretraining data in the original's format: JSON lists of `{"image": path, "caption": str | [str]}`.

A sample is (image tensor, normalised caption); `collate_pretrain` turns a list of samples into the
pretraining model's forward arguments.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset
from transformers import BertTokenizerFast

from datasets.base import AnnotationError, Annotations, ImageLoadError, PathLike, image_path, open_image
from datasets.text import TOKENIZER_SETTINGS, pre_caption, tokenize

logger = logging.getLogger(__name__)


class PretrainDataset(Dataset):
    """Image-caption pairs from one or several annotation files, concatenated.

    `image_root` is joined to relative image paths (the original's pretraining files hold absolute
    ones). With `skip_bad_images`, an unreadable image is replaced by the next readable entry (the
    same one every time) and counted in `num_skipped`; in DataLoader workers each process counts its
    own skips, so the main process's attribute stays 0. Without it, an ImageLoadError naming the
    image and the entry stops the run.
    """

    def __init__(
        self,
        ann_files: PathLike | Sequence[PathLike],
        transform: Callable,
        image_root: PathLike | None = None,
        max_words: int = 30,
        skip_bad_images: bool = False,
    ):
        self.ann = Annotations(ann_files)
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.skip_bad_images = skip_bad_images
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        for offset in range(len(self.ann)):
            i = (index + offset) % len(self.ann)
            try:
                return self.load(i)
            except ImageLoadError as e:
                if not self.skip_bad_images:
                    raise
                self.num_skipped += 1
                logger.warning("skipping (%d so far in this process): %s", self.num_skipped, e)
        raise ImageLoadError(f"no readable image in {self.ann.files}")

    def load(self, index: int) -> tuple[torch.Tensor, str]:
        """Sample `index` itself (no skipping)."""
        caption = self.ann.field(index, "caption")
        if isinstance(caption, list):
            if not caption:
                raise AnnotationError(f"{self.ann.where(index)}: empty caption list")
            # ALBEF parity: a fresh random caption each time the entry is read (Python's `random`,
            # which DataLoader seeds per worker).
            caption = random.choice(caption)
        path = image_path(self.image_root, self.ann.field(index, "image"))
        image = open_image(path, where=self.ann.where(index))
        return self.transform(image), pre_caption(caption, self.max_words)


Sample = tuple[torch.Tensor, str]


def _collate_pretrain(samples: list[Sample], tokenizer: BertTokenizerFast) -> dict[str, torch.Tensor]:
    images, captions = zip(*samples)
    input_ids, attention_mask = tokenize(tokenizer, list(captions), **TOKENIZER_SETTINGS["pretrain"])
    return {"image": torch.stack(images), "input_ids": input_ids, "attention_mask": attention_mask}


def collate_pretrain(tokenizer: BertTokenizerFast) -> Callable[[list[Sample]], dict[str, torch.Tensor]]:
    """DataLoader `collate_fn`: samples -> {"image" [B,3,H,W] float, "input_ids" [B,L] int64,
    "attention_mask" [B,L] int64}, tokenised as Pretrain.py does (longest, truncated to 25 tokens
    including [CLS]). Keys are the pretraining model's forward arguments; picklable for workers."""
    return functools.partial(_collate_pretrain, tokenizer=tokenizer)
