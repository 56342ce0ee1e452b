"""NLVR2 fine-tuning and evaluation: does a sentence hold for a pair of images? Reports dev and test
accuracy after every epoch.

    python Pretrain_nlvr.py --config configs/NLVR_pretrain.yaml --checkpoint ALBEF.pth --output_dir output/nlvr_ta
    torchrun --nproc_per_node=8 NLVR.py --config configs/NLVR.yaml --checkpoint output/nlvr_ta/checkpoint_00.pth
    python NLVR.py --config configs/NLVR.yaml --checkpoint output/nlvr/checkpoint_best.pth --evaluate

`--checkpoint` takes a text-assignment checkpoint (Pretrain_nlvr.py, the original's route), a
pretraining checkpoint (its fusion layers duplicated on the fly; `cls_head` new) or a fine-tuned NLVR
checkpoint. `checkpoint_best.pth` holds the weights of the epoch with the best dev accuracy.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

import classify
import utils
from datasets import loaders
from datasets.base import DataFiles
from datasets.nlvr import NLVRDataset, collate_nlvr
from datasets.text import build_tokenizer
from datasets.transforms import AugmentConfig, test_transform
from models.albef import ALBEFConfig, build_bert_config
from models.bert import resolve_pretrained
from models.nlvr import ALBEFNLVR, load_nlvr_checkpoint

logger = logging.getLogger("NLVR")


@dataclass(kw_only=True)
class NLVRConfig(utils.EngineConfig, ALBEFConfig, AugmentConfig):
    train_file: DataFiles
    val_file: DataFiles
    test_file: DataFiles
    image_root: str = ""  # prefix of the image paths in the files
    batch_size: int = 16  # per GPU, training and evaluation
    max_words: int = 30
    distill: bool = True  # momentum distillation, EMA factor `momentum` (default 0.995: the original hard-codes it)
    warm_up: bool = True  # alpha ramps up linearly over the first epoch
    # ALBEF parity (false): from a checkpoint without momentum weights, the momentum twins keep the
    # constructor's (BERT) weights, since NLVR.py copies before loading; true: copy after loading.
    copy_momentum_after_load: bool = False
    optimizer: utils.OptimizerConfig = field(default_factory=lambda: utils.OptimizerConfig(lr=2e-5))
    schedular: utils.SchedulerConfig = field(default_factory=lambda: utils.SchedulerConfig(lr=2e-5, epochs=10))


def parse_args(argv=None) -> argparse.Namespace:
    configs = ["configs/NLVR.yaml", "configs/NLVR_demo.yaml"]  # full size first
    p = utils.task_parser(__doc__, configs, "output/nlvr",
                          checkpoint_help="initialise from these weights: TA, pretraining or fine-tuned NLVR")
    return p.parse_args(argv)


def main(argv=None) -> ALBEFNLVR:
    """Fine-tunes (or with --evaluate only scores) NLVR; returns the unwrapped model."""
    args = parse_args(argv)
    dist, cfg = utils.setup_task(args, NLVRConfig)

    tokenizer = build_tokenizer(resolve_pretrained(cfg.tokenizer_source))
    collate = collate_nlvr(tokenizer)

    with loaders.seeded(cfg.seed):  # the same new heads on every rank, also for --evaluate (no DDP broadcast)
        model = ALBEFNLVR(cfg, build_bert_config(cfg), distill=cfg.distill)
    if args.checkpoint:
        if not args.evaluate:
            model.init_pretrained_encoders()  # the constructor's weights: what the checkpoint lacks keeps them
        load_nlvr_checkpoint(model, args.checkpoint, cfg.copy_momentum_after_load)
    elif not args.resume:
        model.init_pretrained_encoders()
    classify.run_classifier(model, NLVRDataset, test_transform(cfg.image_res), collate, args=args, cfg=cfg,
                            dist=dist, batch_size=cfg.batch_size, eval_batch_size=cfg.batch_size)
    return model


if __name__ == "__main__":
    utils.run_main(main)
