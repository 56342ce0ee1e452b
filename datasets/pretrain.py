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

from datasets.base import (
    FAILURES_BEFORE_GIVING_UP,
    AnnotationError,
    Annotations,
    ImageLoadError,
    PathLike,
    image_path,
    open_image,
)
from datasets.text import collate_image_text, pre_caption

logger = logging.getLogger(__name__)


class PretrainDataset(Dataset):
    """Image-caption pairs from one or several annotation files, concatenated.

    `image_root` is joined to relative image paths (the original's pretraining files hold absolute
    ones). With `skip_bad_images`, an unreadable image (missing, truncated, undecodable) is replaced by
    the next readable entry (the same one every time) and counted in `num_skipped`, the count of this
    process (each DataLoader worker has its own; the loader hands each batch's count to the engine,
    which sums them over workers and ranks). The first few skips are logged. Without it, an
    ImageLoadError naming the image and the entry stops the run; so does, either way, a process whose
    first FAILURES_BEFORE_GIVING_UP images in a row all fail (a wrong `image_root`, not bad files).
    """

    WARNINGS = 10  # skips logged per process; the rest are counted only

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
        self.loaded_any, self.failed_in_a_row = False, 0

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        for offset in range(len(self.ann)):
            i = (index + offset) % len(self.ann)
            try:
                sample = self.load(i)
            except ImageLoadError as e:
                self.failed(e)
                continue
            self.loaded_any, self.failed_in_a_row = True, 0
            return sample
        raise ImageLoadError(f"none of the {len(self.ann)} images of {', '.join(self.ann.files)} loads: check "
                             f"image_root ({self.image_root!r})")

    def failed(self, error: ImageLoadError) -> None:
        """Count a failed image; re-raise it unless skipping, or when nothing has loaded yet after many."""
        self.failed_in_a_row += 1
        if not self.loaded_any and self.failed_in_a_row >= FAILURES_BEFORE_GIVING_UP:
            raise ImageLoadError(f"the first {self.failed_in_a_row} images all failed to load: check image_root "
                                 f"({self.image_root!r}); the last: {error}") from error
        if not self.skip_bad_images:
            raise error
        self.num_skipped += 1
        if self.num_skipped <= self.WARNINGS:
            more = "; further skips are counted, not logged" if self.num_skipped == self.WARNINGS else ""
            logger.warning("skipping (%d so far in this process): %s%s", self.num_skipped, error, more)

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


def collate_pretrain(tokenizer: BertTokenizerFast) -> Callable[[list[Sample]], dict[str, torch.Tensor]]:
    """DataLoader `collate_fn`: samples -> {"image" [B,3,H,W] float, "input_ids" [B,L] int64,
    "attention_mask" [B,L] int64}, tokenised as Pretrain.py does (longest, truncated to 25 tokens
    including [CLS]). Keys are the pretraining model's forward arguments; picklable for workers."""
    return functools.partial(collate_image_text, tokenizer=tokenizer, setting="pretrain")
