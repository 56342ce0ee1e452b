"""SNLI-VE fine-tuning and evaluation: entailment, neutral or contradiction between an image and a
sentence. Reports dev and test accuracy after every epoch.

    torchrun --nproc_per_node=8 VE.py --config configs/VE.yaml --checkpoint ALBEF.pth --output_dir output/ve
    python VE.py --config configs/VE.yaml --checkpoint output/ve/checkpoint_best.pth --evaluate

`--checkpoint` takes a pretraining checkpoint (`bert.` dropped from its keys, momentum twins from its
momentum model, `cls_head` new) or a fine-tuned VE checkpoint. `checkpoint_best.pth` holds the weights
of the epoch with the best dev accuracy.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

import classify
import utils
from datasets import loaders
from datasets.base import DataFiles
from datasets.text import build_tokenizer
from datasets.transforms import AugmentConfig, test_transform
from datasets.ve import VEDataset, collate_ve
from models.albef import ALBEFConfig, build_bert_config
from models.bert import resolve_pretrained
from models.ve import ALBEFVE, load_ve_checkpoint

logger = logging.getLogger("VE")


@dataclass(kw_only=True)
class VEConfig(utils.EngineConfig, ALBEFConfig, AugmentConfig):
    train_file: DataFiles
    val_file: DataFiles
    test_file: DataFiles
    image_root: str = ""  # folder of the images ('<id>.jpg' for ids without extension)
    batch_size_train: int = 32  # per GPU
    batch_size_test: int = 64
    max_words: int = 30
    distill: bool = True  # momentum distillation, EMA factor `momentum` (default 0.995: the original hard-codes it)
    warm_up: bool = False  # alpha ramps up linearly over the first epoch
    optimizer: utils.OptimizerConfig = field(default_factory=lambda: utils.OptimizerConfig(lr=2e-5))
    schedular: utils.SchedulerConfig = field(default_factory=lambda: utils.SchedulerConfig(lr=2e-5, epochs=5))


def parse_args(argv=None) -> argparse.Namespace:
    configs = ["configs/VE.yaml", "configs/VE_demo.yaml"]  # full size first
    p = utils.task_parser(__doc__, configs, "output/ve",
                          checkpoint_help="initialise from these weights: pretraining or fine-tuned VE")
    return p.parse_args(argv)


def main(argv=None) -> ALBEFVE:
    """Fine-tunes (or with --evaluate only scores) VE; returns the unwrapped model."""
    args = parse_args(argv)
    dist, cfg = utils.setup_task(args, VEConfig)

    tokenizer = build_tokenizer(resolve_pretrained(cfg.tokenizer_source))
    collate = collate_ve(tokenizer)

    with loaders.seeded(cfg.seed):  # the same new heads on every rank, also for --evaluate (no DDP broadcast)
        model = ALBEFVE(cfg, build_bert_config(cfg), distill=cfg.distill)
    utils.init_weights(model, args, load_ve_checkpoint)
    classify.run_classifier(model, VEDataset, test_transform(cfg.image_res), collate, args=args, cfg=cfg,
                            dist=dist, batch_size=cfg.batch_size_train, eval_batch_size=cfg.batch_size_test)
    return model


if __name__ == "__main__":
    utils.run_main(main)
