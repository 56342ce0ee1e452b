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
import os
from dataclasses import dataclass, field

import torch

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
    total_steps = steps_per_epoch * cfg.schedular.epochs
    logger.info("%d pairs, %d steps per epoch, %d ranks x batch %d", len(dataset), steps_per_epoch,
                dist.world_size, cfg.batch_size)

    model = ALBEF(cfg, bert_cfg)
    if args.checkpoint:
        load_model_checkpoint(model, args.checkpoint)
    elif not args.resume:
        model.init_pretrained_encoders()
    model.to(dist.device)
    optimizer = utils.build_optimizer(model, cfg.optimizer)
    start_epoch, start_step = 0, 0
    if args.resume:
        state = load_model_checkpoint(model, args.resume)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_step = utils.resume_position(state, steps_per_epoch)
        utils.restore_rng(state["rng"]) if "rng" in state else None
        logger.info("resuming %s at epoch %d step %d", args.resume, start_epoch, start_step)
    ddp_model = utils.wrap_ddp(model, dist, broadcast_buffers=False)  # queues are equal on every rank by design

    tb = utils.build_tb_writer(args.output_dir)
    val = make_val(cfg, tokenizer, dist) if cfg.val_file else None
    if val and not args.resume:
        report(val, model, cfg, args.output_dir, tb, epoch=-1, dist=dist)

    def alpha(epoch: int, i: int) -> dict:
        # ALBEF parity: alpha ramps up linearly over the first epoch
        return {"alpha": cfg.alpha * min(1.0, i / steps_per_epoch) if epoch == 0 else cfg.alpha}

    def save(name: str, epoch: int, step: int, step_in_epoch: int) -> None:
        state = utils.resume_state(model, optimizer, cfg, epoch, step, step_in_epoch)
        utils.save_checkpoint(os.path.join(args.output_dir, name), state)

    max_steps = args.max_steps
    def on_step(step: int, step_in_epoch: int) -> None:
        if cfg.save_every_steps and step % cfg.save_every_steps == 0:
            save("checkpoint_last.pth", epoch, step, step_in_epoch)
        if max_steps is not None and step >= max_steps:
            raise StopTraining

    for epoch in range(start_epoch, cfg.schedular.epochs):
        try:
            stats = utils.train_one_epoch(
                ddp_model, loader, optimizer, epoch=epoch, steps_per_epoch=steps_per_epoch,
                total_steps=total_steps, start_step_in_epoch=start_step if epoch == start_epoch else 0,
                cfg=cfg, sched=cfg.schedular, dist=dist, tb=tb, forward_kwargs=alpha, on_step=on_step)
        except StopTraining:
            logger.info("stopped after --max_steps %d; state saved to checkpoint_last.pth", max_steps)
            step_in_epoch = max_steps - epoch * steps_per_epoch
            save("checkpoint_last.pth", epoch, max_steps, step_in_epoch)
            break
        save(f"checkpoint_{epoch:02d}.pth", epoch, (epoch + 1) * steps_per_epoch, steps_per_epoch)
        save("checkpoint_last.pth", epoch, (epoch + 1) * steps_per_epoch, steps_per_epoch)
        log = {f"train_{k}": v for k, v in stats.items()} | {"epoch": epoch}
        if val:
            log |= {f"val_{k}": v for k, v in report(val, model, cfg, args.output_dir, tb, epoch, dist).items()}
        utils.append_log(args.output_dir, log)
    if tb is not None:
        tb.close()
    utils.cleanup_distributed()
    return model


class StopTraining(Exception):
    pass


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
