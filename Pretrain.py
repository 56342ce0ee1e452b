"""ALBEF pretraining: ITC + ITM + MLM on image-caption pairs.

    torchrun --nproc_per_node=8 Pretrain.py --config configs/Pretrain.yaml --output_dir output/pretrain
    python Pretrain.py --config configs/Pretrain_demo.yaml --output_dir output/demo_pretrain
    python Pretrain.py ... --resume output/pretrain/checkpoint_last.pth     # continue a stopped run

With `val_file` set (retrieval format), zero-shot ITC retrieval on it is reported before training and
after every epoch.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field


import utils
from datasets.pretrain import PretrainDataset, collate_pretrain
from datasets.retrieval import evaluate_itc
from datasets.text import build_tokenizer
from datasets.transforms import test_transform, train_transform
from models.albef import ALBEF, ALBEFConfig, build_bert_config, load_model_checkpoint
from models.bert import resolve_pretrained

logger = logging.getLogger("Pretrain")


@dataclass(kw_only=True)
class PretrainConfig(utils.EngineConfig, ALBEFConfig):
    train_file: list[str]
    image_root: str = ""  # prefix of relative image paths ('' : paths used as written, as the original)
    val_file: str | None = None  # optional retrieval-format file for zero-shot ITC monitoring
    batch_size: int = 64  # per GPU
    max_words: int = 30
    skip_bad_images: bool = False
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop scale
    hflip: bool = True  # random horizontal flip
    randaugment: bool = True
    optimizer: utils.OptimizerConfig = field(default_factory=lambda: utils.OptimizerConfig(lr=1e-4))
    schedular: utils.SchedulerConfig = field(default_factory=lambda: utils.SchedulerConfig(lr=1e-4, epochs=30))


def parse_args(argv=None) -> argparse.Namespace:
    p = utils.task_parser(__doc__, "configs/Pretrain.yaml", "output/pretrain",
                          checkpoint_help="initialise the model from these weights (ALBEF layout)", evaluate=False)
    return p.parse_args(argv)


def main(argv=None) -> ALBEF:
    """Runs the whole pretraining; returns the trained (unwrapped) model for programmatic use."""
    args = parse_args(argv)
    dist, cfg = utils.setup_task(args, PretrainConfig)

    bert_cfg = build_bert_config(cfg)
    tokenizer = build_tokenizer(resolve_pretrained(cfg.tokenizer_source))
    transform = train_transform(cfg.image_res, tuple(cfg.crop_scale), cfg.hflip, cfg.randaugment)
    dataset = PretrainDataset(cfg.train_file, transform, cfg.image_root, cfg.max_words, cfg.skip_bad_images)
    loader = utils.build_loader(dataset, cfg.batch_size, shuffle=True, drop_last=True,
                                collate_fn=collate_pretrain(tokenizer), num_workers=cfg.num_workers,
                                dist=dist, seed=cfg.seed)
    steps_per_epoch = utils.steps_per_epoch(loader, cfg.accum_steps)
    logger.info("%d pairs, %d steps per epoch, %d ranks x batch %d", len(dataset), steps_per_epoch,
                dist.world_size, cfg.batch_size)

    model = ALBEF(cfg, bert_cfg)
    if args.checkpoint:
        load_model_checkpoint(model, args.checkpoint)
    elif not args.resume:
        model.init_pretrained_encoders()
    model.to(dist.device)
    optimizer = utils.build_optimizer(model, cfg.optimizer)
    tb = utils.build_tb_writer(args.output_dir)
    val = make_val(cfg, tokenizer, dist) if cfg.val_file else None
    if val and not args.resume:
        report(val, model, cfg, args.output_dir, tb, epoch=-1, dist=dist)

    def alpha(epoch: int, i: int) -> dict:
        # ALBEF parity: alpha ramps up linearly over the first epoch
        return {"alpha": cfg.alpha * min(1.0, i / steps_per_epoch) if epoch == 0 else cfg.alpha}

    def evaluate(epoch: int) -> dict:
        return {f"val_{k}": v for k, v in report(val, model, cfg, args.output_dir, tb, epoch, dist).items()} if val else {}

    utils.fit(model, optimizer, loader, cfg=cfg, dist=dist, output_dir=args.output_dir, resume=args.resume,
              max_steps=args.max_steps, forward_kwargs=alpha, evaluate=evaluate, keep_every_epoch=True,
              ddp_kwargs={"broadcast_buffers": False}, tb=tb)  # queues are equal on every rank by design
    if tb is not None:
        tb.close()
    utils.cleanup_distributed()
    return model


def make_val(cfg: PretrainConfig, tokenizer, dist):
    from datasets.retrieval import RetrievalEvalDataset

    dataset = RetrievalEvalDataset(cfg.val_file, test_transform(cfg.image_res), cfg.image_root, cfg.max_words)
    return dataset, tokenizer


def report(val, model, cfg, output_dir, tb, epoch: int, dist) -> dict:
    dataset, tokenizer = val
    metrics = evaluate_itc(model, dataset, tokenizer, dist.device, batch_size=2 * cfg.batch_size)
    logger.info("zero-shot ITC retrieval on %s after epoch %d: %s", cfg.val_file, epoch,
                "  ".join(f"{k}: {v:.2f}" for k, v in metrics.items()))
    if tb is not None:
        for k, v in metrics.items():
            tb.add_scalar(f"val/{k}", v, epoch + 1)
    if epoch < 0:
        utils.append_log(output_dir, {f"val_{k}": v for k, v in metrics.items()} | {"epoch": -1})
    return metrics


if __name__ == "__main__":
    main()
