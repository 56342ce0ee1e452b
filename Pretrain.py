"""ALBEF pretraining: ITC + ITM + MLM on image-caption pairs.

    torchrun --nproc_per_node=8 Pretrain.py --config configs/Pretrain.yaml --output_dir output/pretrain
    python Pretrain.py --config configs/Pretrain_demo.yaml --output_dir output/demo_pretrain
    python Pretrain.py ... --resume output/pretrain/checkpoint_last.pth     # continue a stopped run

With `val_file` set (retrieval format), zero-shot ITC retrieval on it is reported before training and
after every epoch. The `vilta:` block turns on ViLTA's cross-distilled MLM targets and synthesized ITM
negatives (models/vilta.py); off by default.
"""

from __future__ import annotations

import argparse
import logging

import torch

import utils
from datasets import loaders
from datasets.base import Annotations
from datasets.retrieval import evaluate_itc
from datasets.text import TOKENIZER_SETTINGS, build_tokenizer, pre_caption, tokenize
from datasets.transforms import test_transform
from models.albef import ALBEF, build_bert_config
from models.checkpoint import load_weights
from models.bert import resolve_pretrained
from models.vilta import ALBEFViLTA, ViLTA
from task_configs import PretrainConfig, build_train_loader

logger = logging.getLogger("Pretrain")


def parse_args(argv=None) -> argparse.Namespace:
    configs = ["configs/Pretrain.yaml", "configs/Pretrain_demo.yaml"]  # full size first
    p = utils.task_parser(__doc__, configs, "output/pretrain",
                          checkpoint_help="initialise the model from these weights (ALBEF layout)", evaluate=False)
    return p.parse_args(argv)


def main(argv=None) -> ALBEF:
    """Runs the whole pretraining; returns the trained (unwrapped) model for programmatic use."""
    args = parse_args(argv)
    dist, cfg = utils.setup_task(args, PretrainConfig)

    bert_cfg = build_bert_config(cfg)
    tokenizer = build_tokenizer(resolve_pretrained(cfg.tokenizer_source))
    loader, steps_per_epoch = build_train_loader(cfg, tokenizer, dist)

    vilta = ViLTA.build(cfg.vilta, tokenizer, bert_cfg, cfg.text_encoder) if cfg.vilta.enabled else None
    model = ALBEFViLTA(cfg, bert_cfg, vilta) if vilta else ALBEF(cfg, bert_cfg)
    utils.init_weights(model, args, load_weights)
    model.to(dist.device)
    optimizer = utils.build_optimizer(model, cfg.optimizer)
    val = make_val(cfg, tokenizer, dist) if cfg.val_file else None
    examples = example_captions(cfg, cfg.vilta.log_examples) if cfg.vilta.synth_negatives else []

    def alpha(epoch: int, i: int) -> dict:
        # ALBEF parity: alpha ramps up linearly over the first epoch; ViLTA's cross weight does the same
        ramp = utils.first_epoch_ramp(epoch, i, steps_per_epoch)
        return {"alpha": cfg.alpha * ramp} | ({"cross_weight": cfg.vilta.cross_weight * ramp} if cfg.vilta.cross else {})

    with utils.tb_writer(args.output_dir) as tb:
        if val and not args.resume:
            report(val, model, cfg, args.output_dir, tb, epoch=-1, dist=dist)

        def evaluate(epoch: int) -> dict:
            if examples:
                log_synthesized(model, examples, tokenizer, seed=loaders.mix_seed(cfg.seed, epoch))
            if not val:
                return {}
            return {f"val_{k}": v for k, v in report(val, model, cfg, args.output_dir, tb, epoch, dist).items()}

        utils.fit(model, optimizer, loader, cfg=cfg, dist=dist, output_dir=args.output_dir, resume=args.resume,
                  max_steps=args.max_steps, forward_kwargs=alpha, evaluate=evaluate, keep_every_epoch=True,
                  ddp_kwargs={"broadcast_buffers": False}, tb=tb)  # queues are equal on every rank by design
    utils.cleanup_distributed()
    return model


def make_val(cfg: PretrainConfig, tokenizer, dist):
    from datasets.retrieval import RetrievalEvalDataset

    dataset = RetrievalEvalDataset(cfg.val_file, test_transform(cfg.image_res), cfg.image_root, cfg.max_words)
    return dataset, tokenizer


def example_captions(cfg: PretrainConfig, n: int) -> list[str]:
    """The first `n` captions of the training JSON (with shards: of `val_file`), normalised."""
    files = cfg.train_file or cfg.val_file
    ann = Annotations(files) if files and n else []
    captions = [ann.field(i, "caption") for i in range(min(n, len(ann)))]
    return [pre_caption(c[0] if isinstance(c, list) else c, cfg.max_words) for c in captions]


@torch.no_grad()
def log_synthesized(model: ALBEF, captions: list[str], tokenizer, seed: int) -> None:
    """Log what the model's language side invents for `captions` (ViLTA's ITM negatives), under its
    own seed so the training RNG stream is untouched."""
    device = next(model.parameters()).device
    input_ids, attention_mask = tokenize(tokenizer, captions, **TOKENIZER_SETTINGS["pretrain"])
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        synthesized, _ = model.vilta.synthesize(model.text_encoder, input_ids.to(device), attention_mask.to(device))
    model.train(was_training)
    for caption, ids in zip(captions, synthesized):
        logger.info("synthesized negative: %r -> %r", caption, tokenizer.decode(ids, skip_special_tokens=True))


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
    utils.run_main(main)
