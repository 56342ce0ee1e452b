"""Image transforms of the original scripts, built from torchvision: PIL image in, normalised
float32 tensor [3, image_res, image_res] out.

Random choices draw from torch's generator, so a DataLoader seeds them per worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torchvision import transforms as T

# CLIP's statistics, which the original uses for every task (not ImageNet's).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

PRETRAIN_SCALE = (0.2, 1.0)  # Pretrain.py crops
FINETUNE_SCALE = (0.5, 1.0)  # Retrieval, VQA, NLVR, VE training crops

def rand_augment() -> T.RandAugment:
    """torchvision's RandAugment standing in for the original's own `RandomAugment(2, 7)`.

    The original draws among Identity, AutoContrast, Equalize, Brightness, Sharpness, ShearX/Y,
    TranslateX/Y and Rotate. Same: 2 ops per image at magnitude 7 of 10 (hence 11 bins: rotate 21 degrees, shear 0.21),
    grey (128) fill, bilinear warps. Different: torchvision applies every drawn op (the original
    each with probability 1/2), adds Color/Contrast/Posterize/Solarize to the op pool, signs the
    Brightness/Sharpness change at random (the original always uses factor 1.36), and translates by
    up to ~32 % of the side where the original moves 7 pixels.
    """
    return T.RandAugment(
        num_ops=2, magnitude=7, num_magnitude_bins=11, interpolation=T.InterpolationMode.BILINEAR,
        fill=[128, 128, 128],
    )


def train_transform(image_res: int, scale: tuple[float, float] | None = PRETRAIN_SCALE, hflip: bool = True,
                    randaugment: bool = True) -> T.Compose:
    """Training transform: random resized crop (bicubic) with `scale`, horizontal flip, RandAugment,
    normalisation. `scale=None` resizes to image_res x image_res instead of cropping, as the
    original's Grounding.py training does; use FINETUNE_SCALE for the other fine-tuning tasks.
    `hflip`/`randaugment` off suit captions that name left/right or colours (the demo data)."""
    if scale is None:
        resize = T.Resize((image_res, image_res), interpolation=T.InterpolationMode.BICUBIC)
    else:
        resize = T.RandomResizedCrop(image_res, scale=scale, interpolation=T.InterpolationMode.BICUBIC)
    flip = [T.RandomHorizontalFlip()] if hflip else []
    augment = [rand_augment()] if randaugment else []
    return T.Compose([resize, *flip, *augment, T.ToTensor(), T.Normalize(MEAN, STD)])


def test_transform(image_res: int) -> T.Compose:
    """Evaluation transform: bicubic resize to image_res x image_res (no crop), normalisation."""
    return T.Compose([
        T.Resize((image_res, image_res), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


test_transform.__test__ = False  # not a test, though pytest would collect the name where imported


@dataclass(kw_only=True)
class AugmentConfig:
    """The training-augmentation keys of the task configs (a task schema inherits it): the crop's scale
    range, the horizontal flip and RandAugment."""

    crop_scale: list[float] = field(default_factory=lambda: list(FINETUNE_SCALE))  # RandomResizedCrop scale
    hflip: bool = True  # random horizontal flip
    randaugment: bool = True

    def train_transform(self, image_res: int) -> T.Compose:
        return train_transform(image_res, tuple(self.crop_scale), self.hflip, self.randaugment)
