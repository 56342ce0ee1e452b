"""Weakly supervised visual grounding on RefCOCO+: fine-tune ALBEF's ITC + ITM on the referring
expressions (image-text pairs only, no boxes), then localise each expression with Grad-CAM and pick the
detector proposal the heat map covers best. Reports the share of expressions whose chosen box has
IoU >= 0.5 with the annotated one on val, testA and testB (`val_d`, `testA_d`, `testB_d`).

    torchrun --nproc_per_node=8 Grounding.py --config configs/Grounding.yaml --output_dir output/refcoco \
        --checkpoint ALBEF.pth
    python Grounding.py --config configs/Grounding.yaml --checkpoint refcoco.pth --evaluate
    python Grounding.py --config configs/Grounding_demo.yaml --output_dir output/demo_grounding \
        --checkpoint output/demo_retrieval_final/checkpoint_best.pth

`--checkpoint` takes a pretraining checkpoint (converted on load, as Retrieval.py) or a retrieval or
grounding one (the official refcoco.pth has the retrieval model's keys). `--gradcam_mode itm` (default)
reads the cross-attention of fusion layer `--block_num` (8 = the third of 6 in the full-size model);
`itc` reads ViT block `--block_num` with the image-text similarity as the score (models/gradcam.py).
Each evaluation writes `grounding_<epoch>.json` (per expression: ref_id, split, chosen and annotated
box, IoU); `checkpoint_best.pth` holds the weights of the best `val_d`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

import utils
from datasets import loaders
from datasets.base import DataFiles
from datasets.grounding import (
    GroundingDataset,
    chance_accuracy,
    collate_grounding_eval,
    grounding_accuracy,
    grounding_predictions,
    load_dets,
    load_refer,
    write_predictions,
)
from datasets.retrieval import collate_retrieval
from datasets.text import build_tokenizer
from datasets.transforms import test_transform, train_transform
from models.albef import build_bert_config
from models.bert import resolve_pretrained
from models.gradcam import check_block_num, gradcam
from models.retrieval import ALBEFRetrieval, RetrievalModelConfig, load_retrieval_weights

logger = logging.getLogger("Grounding")


@dataclass(kw_only=True)
class GroundingConfig(utils.EngineConfig, RetrievalModelConfig):
    train_file: DataFiles  # expressions {"image", "text", "ref_id"}
    test_file: DataFiles  # val and test expressions; each ref's split comes from the refs file
    refcoco_data: str  # folder holding <refer_dataset>/refs(<refer_split_by>).p and instances.json
    refer_dataset: str = "refcoco+"
    refer_split_by: str = "unc"
    det_file: DataFiles  # {str(image_id): [[x, y, w, h, ...], ...]} proposals (several files: merged)
    image_root: str = ""
    batch_size: int = 32  # per GPU, training and evaluation
    max_words: int = 30
    gradcam_mode: Literal["itm", "itc"] = "itm"  # overridden by --gradcam_mode
    block_num: int = 8  # fusion layer (itm) or ViT block (itc); overridden by --block_num
    gradcam_cls: bool = True  # itm: [CLS]'s map is part of the sentence map (the original); false: words only
    box_alpha: float = 0.5  # a box scores (heat inside) / area ** box_alpha
    warm_up: bool = True  # alpha ramps up linearly over the first epoch
    hflip: bool = True  # RefCOCO+ has no location words, so the original flips
    randaugment: bool = True
    optimizer: utils.OptimizerConfig = field(default_factory=lambda: utils.OptimizerConfig(lr=1e-5))
    schedular: utils.SchedulerConfig = field(default_factory=lambda: utils.SchedulerConfig(lr=1e-5, epochs=5))

    def __post_init__(self):
        if self.batch_size < 1 or self.box_alpha < 0:
            raise ValueError(f"need batch_size >= 1 and box_alpha >= 0; got {self.batch_size}, {self.box_alpha}")
        super().__post_init__()


def parse_args(argv=None) -> argparse.Namespace:
    configs = ["configs/Grounding.yaml", "configs/Grounding_demo.yaml"]  # full size first
    p = utils.task_parser(__doc__, configs, "output/refcoco",
                          checkpoint_help="initial weights: pretraining, retrieval or grounding (refcoco.pth)")
    p.add_argument("--gradcam_mode", choices=["itm", "itc"], help="overrides the config's gradcam_mode")
    p.add_argument("--block_num", type=int, help="overrides the config's block_num")
    args = p.parse_args(argv)
    args.opts += [f"gradcam_mode={args.gradcam_mode}"] * bool(args.gradcam_mode)
    args.opts += [f"block_num={args.block_num}"] * (args.block_num is not None)
    return args


def build_model(cfg: GroundingConfig, checkpoint: str | None, resume: str | None) -> ALBEFRetrieval:
    model = ALBEFRetrieval(cfg, build_bert_config(cfg))
    check_block_num(model, cfg.block_num, cfg.gradcam_mode)  # before any slow loading
    if checkpoint:
        load_retrieval_weights(model, checkpoint)
        logger.info("weights from %s", checkpoint)
    elif not resume:
        logger.warning("no --checkpoint: starting from %s and a %s ViT", cfg.text_encoder, cfg.vit_init or "random")
        model.init_pretrained_encoders()
    return model


def evaluate(model, dataset: GroundingDataset, collate, refer, dets, cfg: GroundingConfig, dist) -> list[dict]:
    """Every expression's prediction (`grounding_predictions`, in file order), the same on every rank:
    rank r scores expressions r, r+W, ...; Grad-CAM needs gradients, so this runs with autograd on."""
    model.eval()
    shard = torch.utils.data.Subset(dataset, range(dist.rank, len(dataset), dist.world_size))
    loader = torch.utils.data.DataLoader(shard, batch_size=cfg.batch_size, collate_fn=collate,
                                         num_workers=cfg.num_workers, generator=torch.Generator())
    preds = []
    for batch in loader:
        batch = utils.to_device(batch, dist.device)
        with utils.autocast_context(cfg.amp, dist.device):
            maps = gradcam(model, batch["image"], batch["input_ids"], batch["attention_mask"], cfg.gradcam_mode,
                           cfg.block_num, cfg.gradcam_cls)
        results = [{"ref_id": r, "pred": m} for r, m in zip(batch["ref_id"].tolist(), maps.float().cpu())]
        preds += grounding_predictions(results, refer, dets, cfg.box_alpha)
    return list(utils.gather_by_index(dict(zip(shard.indices, preds))).values())


def main(argv=None) -> dict:
    """Fine-tunes (or with --evaluate only scores); returns the last evaluation {"val_d", "testA_d", ...}."""
    args = parse_args(argv)
    dist, cfg = utils.setup_task(args, GroundingConfig)

    tokenizer = build_tokenizer(resolve_pretrained(cfg.tokenizer_source))
    refer, dets = load_refer(cfg.refcoco_data, cfg.refer_dataset, cfg.refer_split_by), load_dets(cfg.det_file)
    test_set = GroundingDataset(cfg.test_file, test_transform(cfg.image_res), cfg.image_root, cfg.max_words,
                                train=False)
    collate = collate_grounding_eval(tokenizer)
    for split in ("val", "testA", "testB"):
        ids = [test_set.field(i, "ref_id") for i in range(len(test_set)) if refer.refs.get(
            test_set.field(i, "ref_id"), {}).get("split") == split]
        if ids:
            logger.info("%s: %d expressions, chance (random proposal) %.3f", split, len(ids),
                        chance_accuracy(refer, dets, ids))
    with loaders.seeded(cfg.seed):
        model = build_model(cfg, args.checkpoint, args.resume)
    model.to(dist.device)
    logger.info("Grad-CAM: %s mode, block %d%s", cfg.gradcam_mode, cfg.block_num,
                "" if cfg.gradcam_mode == "itc" or cfg.gradcam_cls else ", words only (no [CLS])")
    with utils.tb_writer(args.output_dir) as tb:

        def run_eval(epoch: int) -> dict[str, float]:
            preds = evaluate(model, test_set, collate, refer, dets, cfg, dist)
            stats = grounding_accuracy(preds)
            logger.info("epoch %d: %s", epoch, "  ".join(f"{k}: {v:.3f}" for k, v in stats.items()))
            if dist.is_main:
                name = f"grounding_{'eval' if epoch < 0 else epoch}.json"
                write_predictions(os.path.join(args.output_dir, name), preds)
            if tb is not None:
                for k, v in stats.items():
                    tb.add_scalar(f"grounding/{k}", v, epoch + 1)
            return stats

        if args.evaluate:
            stats = run_eval(-1)
            utils.append_log(args.output_dir, stats | {"epoch": -1})
        else:
            stats = train(args, cfg, model, tokenizer, dist, run_eval, tb)
    utils.cleanup_distributed()
    return stats


def train(args, cfg: GroundingConfig, model, tokenizer, dist, run_eval: Callable[[int], dict], tb) -> dict:
    """Fine-tune with ITC + ITM on the training expressions (images resized, not cropped: boxes stay put),
    scoring val and test every epoch and keeping the best by val accuracy."""
    transform = train_transform(cfg.image_res, None, cfg.hflip, cfg.randaugment)
    train_set = GroundingDataset(cfg.train_file, transform, cfg.image_root, cfg.max_words, train=True)
    loader, steps = utils.train_loader(train_set, cfg.batch_size, collate_retrieval(tokenizer), cfg, dist,
                                       "expressions")
    alpha = utils.alpha_schedule(cfg.alpha, steps, cfg.warm_up)
    return utils.fit(model, utils.build_optimizer(model, cfg.optimizer), loader, cfg=cfg, dist=dist,
                     output_dir=args.output_dir, resume=args.resume, max_steps=args.max_steps,
                     forward_kwargs=alpha, evaluate=run_eval, select="val_d", tb=tb,
                     ddp_kwargs={"broadcast_buffers": False})  # queues are equal on every rank by design


if __name__ == "__main__":
    utils.run_main(main)
