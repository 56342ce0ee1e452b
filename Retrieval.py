"""Image-text retrieval: fine-tune ALBEF on COCO / Flickr30K (ITC with image-id positives + ITM), evaluate
with ITC candidates re-ranked by ITM, keep the checkpoint with the best validation r_mean.

    torchrun --nproc_per_node=8 Retrieval.py --config configs/Retrieval_coco.yaml \
        --output_dir output/retrieval_coco --checkpoint ALBEF.pth          # from a pretraining checkpoint
    python Retrieval.py --config configs/Retrieval_flickr.yaml --output_dir output/zs \
        --checkpoint ALBEF.pth --evaluate                                   # zero-shot
    python Retrieval.py --config configs/Retrieval_coco.yaml --checkpoint mscoco.pth --evaluate
    python Retrieval.py ... --resume output/retrieval_coco/checkpoint_last.pth

`--checkpoint` takes a pretraining checkpoint (converted on load: `models.retrieval.
convert_pretrain_state_dict`) or a fine-tuned retrieval/grounding one. Every epoch, and with `--evaluate`
once, val and test are scored: `log.txt` gets one JSON line (`val_txt_r1`, ..., `test_r_mean`, `epoch`),
TensorBoard `val/*` and `test/*`; `--save_scores` also writes the score matrices.

Ranking (`rank`), measured with scripts/benchmark_retrieval.py:
- `itm` (default, the original): ITC picks k_test candidates per query, the ITM logit orders them.
- `itc`: cosine similarity only, no fusion pass: ~100x faster (H100, bf16, full-size model, Flickr-size
  gallery 1000 x 5000, k_test 128: 0.08 s against 7.3 s for `itm`; the original's loop takes 38 s).
- `itc+itm`: ITM logit + cosine on the candidates (BLIP's ranking), same cost as `itm`.
On the demo (`make demo-tasks`' 1-epoch fine-tune from the demo checkpoint, test split) r_mean is itc 51.8,
itm 58.0, itc+itm 57.3: once pretraining has taught ITM to read the picture, its re-ranking wins, as in the
paper (docs/demo.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable

import torch

import utils
from datasets.retrieval import (
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    collate_retrieval,
    recall_metrics,
    retrieval_features,
    retrieval_scores,
)
from datasets.text import build_tokenizer
from datasets.transforms import test_transform
from models.albef import build_bert_config
from models.bert import resolve_pretrained
from models.retrieval import ALBEFRetrieval, load_retrieval_weights
from task_configs import RetrievalConfig

logger = logging.getLogger("Retrieval")


def parse_args(argv=None) -> argparse.Namespace:
    configs = ["configs/Retrieval_flickr.yaml", "configs/Retrieval_coco.yaml", "configs/Retrieval_demo.yaml"]
    p = utils.task_parser(__doc__, configs, "output/retrieval_flickr",
                          checkpoint_help="initial weights: a pretraining or a fine-tuned retrieval checkpoint")
    p.add_argument("--save_scores", action="store_true", help="also save the score matrices (scores_*.pt)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Runs the fine-tuning (or `--evaluate`); returns the last evaluation's metrics {"val_*", "test_*"}."""
    args = parse_args(argv)
    dist, cfg = utils.setup_task(args, RetrievalConfig, evaluate_needs_checkpoint=False)  # zero-shot: BERT + ViT

    tokenizer = build_tokenizer(resolve_pretrained(cfg.tokenizer_source))
    splits = {s: RetrievalEvalDataset(f, test_transform(cfg.image_res), cfg.image_root, cfg.max_words)
              for s, f in (("val", cfg.val_file), ("test", cfg.test_file))}
    model = ALBEFRetrieval(cfg, build_bert_config(cfg))
    if args.checkpoint:
        load_retrieval_weights(model, args.checkpoint)
        logger.info("weights from %s", args.checkpoint)
    elif not args.resume:
        logger.warning("no --checkpoint: starting from %s and a %s ViT", cfg.text_encoder, cfg.vit_init or "random")
        model.init_pretrained_encoders()
    model.to(dist.device)
    save_scores = args.output_dir if args.save_scores and dist.is_main else None
    with utils.tb_writer(args.output_dir) as tb:

        def evaluate(epoch: int) -> dict:
            return evaluate_splits(model, splits, tokenizer, cfg, dist, epoch, tb, save_scores,
                                   per_epoch=not args.evaluate)

        if args.evaluate:
            results = evaluate(0)
            utils.append_log(args.output_dir, results | {"epoch": 0})
        else:
            results = train(args, cfg, model, tokenizer, dist, evaluate, tb)
    utils.cleanup_distributed()
    return results


def train(args, cfg: RetrievalConfig, model: ALBEFRetrieval, tokenizer, dist, evaluate: Callable[[int], dict],
          tb) -> dict:
    """Fine-tune with ITC + ITM, evaluating every epoch and keeping the best by val R mean; returns the last
    epoch's results."""
    train_set = RetrievalTrainDataset(cfg.train_file, cfg.train_transform(cfg.image_res), cfg.image_root,
                                      cfg.max_words)
    loader, steps = utils.train_loader(train_set, cfg.batch_size_train, collate_retrieval(tokenizer), cfg, dist,
                                       "pairs")
    optimizer = utils.build_optimizer(model, cfg.optimizer)
    last: dict = {}

    def evaluate_epoch(epoch: int) -> dict:
        last.clear()
        last.update(evaluate(epoch))
        return dict(last)

    utils.fit(model, optimizer, loader, cfg=cfg, dist=dist, output_dir=args.output_dir, resume=args.resume,
              max_steps=args.max_steps, forward_kwargs=utils.alpha_schedule(cfg.alpha, steps, cfg.warm_up),
              evaluate=evaluate_epoch, select="val_r_mean", ddp_kwargs={"broadcast_buffers": False},  # queues are
              tb=tb)  # equal on every rank by design
    if last:
        log_best(args.output_dir)
    return last


def evaluate_splits(model: ALBEFRetrieval, splits: dict[str, RetrievalEvalDataset], tokenizer, cfg: RetrievalConfig,
                    dist, epoch: int, tb, save_dir: str | None, per_epoch: bool) -> dict[str, float]:
    """Recall metrics of every split, {"val_txt_r1", ..., "test_r_mean"}, logged and sent to TensorBoard;
    with `save_dir` the score matrices too (`scores_<split>_<epoch>.pt`, or `scores_<split>.pt`)."""
    results = {}
    for split, dataset in splits.items():
        scores = score(model, dataset, tokenizer, cfg, dist)
        metrics = recall_metrics(scores[0].numpy(), scores[1].numpy(), dataset.txt2img, dataset.img2txt)
        logger.info("%s epoch %d (rank by %s, k_test %d): %s", split, epoch, cfg.rank, cfg.k_test,
                    "  ".join(f"{k}: {v:.2f}" for k, v in metrics.items()))
        results |= {f"{split}_{k}": v for k, v in metrics.items()}
        if tb is not None:
            for k, v in metrics.items():
                tb.add_scalar(f"{split}/{k}", v, epoch + 1)
        if save_dir is not None:
            name = f"scores_{split}_{epoch:02d}.pt" if per_epoch else f"scores_{split}.pt"
            torch.save({"score_i2t": scores[0], "score_t2i": scores[1], "txt2img": dataset.txt2img,
                        "img2txt": dataset.img2txt, "rank": cfg.rank, "k_test": cfg.k_test},
                       os.path.join(save_dir, name))
    return results


def log_best(output_dir: str) -> None:
    """One last log.txt line naming the epoch with the best val r_mean (of every epoch logged, resumed runs too)."""
    with open(os.path.join(output_dir, "log.txt")) as f:
        epochs = [row for row in map(json.loads, f) if "val_r_mean" in row and "epoch" in row]
    best = max(epochs, key=lambda row: row["val_r_mean"])  # the first of equals, as fit's `>`
    logger.info("best epoch %d (val r_mean %.2f)", best["epoch"], best["val_r_mean"])
    utils.append_log(output_dir, {"best_epoch": best["epoch"], "best_val_r_mean": best["val_r_mean"]})


def score(model: ALBEFRetrieval, dataset: RetrievalEvalDataset, tokenizer, cfg: RetrievalConfig, dist):
    """(score_i2t, score_t2i) on the CPU, identical on every rank: features on every rank (as the
    original), the re-ranking sharded over ranks, under bf16 autocast on GPU (`amp: auto`)."""
    start = time.perf_counter()
    with utils.autocast_context(cfg.amp, dist.device):
        feats = retrieval_features(model, dataset, tokenizer, dist.device, cfg.batch_size_test, cfg.num_workers)
        scores = retrieval_scores(model, feats, cfg.k_test, cfg.rank, cfg.itm_batch_size, dist.rank, dist.world_size)
    logger.info("scored %d images x %d texts in %.1f s", len(dataset), len(dataset.texts), time.perf_counter() - start)
    return scores


if __name__ == "__main__":
    utils.run_main(main)
