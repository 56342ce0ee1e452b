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
    evals = {split: VEDataset(files, test_transform(cfg.image_res), cfg.image_root, cfg.max_words)
             for split, files in (("val", cfg.val_file), ("test", cfg.test_file))}

    with loaders.seeded(cfg.seed):  # the same new heads on every rank, also for --evaluate (no DDP broadcast)
        model = ALBEFVE(cfg, build_bert_config(cfg), distill=cfg.distill)
    if args.checkpoint:
        load_ve_checkpoint(model, args.checkpoint)
    elif not args.resume:
        model.init_pretrained_encoders()
    model.to(dist.device)
    tb = utils.build_tb_writer(args.output_dir)
    evaluate = utils.accuracy_evaluator(model, evals, collate, cfg.batch_size_test, cfg, dist, tb)

    if args.evaluate:
        utils.append_log(args.output_dir, evaluate(-1) | {"epoch": -1})
    else:
        transform = cfg.train_transform(cfg.image_res)
        dataset = VEDataset(cfg.train_file, transform, cfg.image_root, cfg.max_words)
        loader, steps = utils.train_loader(dataset, cfg.batch_size_train, collate, cfg, dist, "pairs")
        utils.fit(model, utils.build_optimizer(model, cfg.optimizer), loader, cfg=cfg, dist=dist,
                  output_dir=args.output_dir, resume=args.resume, max_steps=args.max_steps,
                  forward_kwargs=utils.alpha_schedule(cfg.alpha, steps, cfg.warm_up), select="val_acc", tb=tb,
                  evaluate=evaluate)
    utils.finish(tb)
    return model


if __name__ == "__main__":
    utils.run_main(main)
