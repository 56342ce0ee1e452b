"""The classification tasks' run (NLVR, VE): fine-tune with `utils.fit`, or only score, and report the
accuracy of every evaluation split after each epoch, sharded over ranks and gathered by sample index."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import utils

logger = logging.getLogger(__name__)


def run_classifier(model: nn.Module, dataset_cls: Callable[..., Dataset], test_transform: Callable,
                   collate_fn: Callable, *, args, cfg, dist: utils.DistInfo, batch_size: int,
                   eval_batch_size: int) -> None:
    """`--evaluate`: one line of val and test accuracy in log.txt; otherwise `utils.fit` on `cfg.train_file`
    with the alpha ramp, evaluating val and test after every epoch and keeping the best by val accuracy.
    A split is `dataset_cls(files, transform, cfg.image_root, cfg.max_words)`: the training split with
    the config's `train_transform`, val and test with `test_transform`."""
    model.to(dist.device)

    def dataset(files, transform: Callable) -> Dataset:
        return dataset_cls(files, transform, cfg.image_root, cfg.max_words)

    splits = {"val": dataset(cfg.val_file, test_transform), "test": dataset(cfg.test_file, test_transform)}
    with utils.tb_writer(args.output_dir) as tb:
        evaluate = accuracy_evaluator(model, splits, collate_fn, eval_batch_size, cfg, dist, tb)
        if args.evaluate:
            utils.append_log(args.output_dir, evaluate(-1) | {"epoch": -1})
        else:
            train_set = dataset(cfg.train_file, cfg.train_transform(cfg.image_res))
            loader, steps = utils.train_loader(train_set, batch_size, collate_fn, cfg, dist, "pairs")
            utils.fit(model, utils.build_optimizer(model, cfg.optimizer), loader, cfg=cfg, dist=dist,
                      output_dir=args.output_dir, resume=args.resume, max_steps=args.max_steps,
                      forward_kwargs=utils.alpha_schedule(cfg.alpha, steps, cfg.warm_up), select="val_acc",
                      tb=tb, evaluate=evaluate)
    utils.cleanup_distributed()


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset: Dataset, collate_fn: Callable, *, batch_size: int, dist: utils.DistInfo,
                      amp: str = "auto", num_workers: int = 0) -> dict[str, float]:
    """{"acc": fraction of `model.predict(image, input_ids, attention_mask).argmax(1) == targets`} over the
    whole split (NLVR, VE): rank r scores samples r, r+W, ..., gathered by index."""
    model.eval()
    indices = range(dist.rank, len(dataset), dist.world_size)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=collate_fn,
                        num_workers=num_workers, generator=torch.Generator())  # leaves the training RNG alone
    correct, done = {}, 0
    for batch in loader:
        batch = utils.to_device(batch, dist.device)
        with utils.autocast_context(amp, dist.device):
            logits = model.predict(batch["image"], batch["input_ids"], batch["attention_mask"])
        hits = (logits.argmax(dim=1) == batch["targets"]).tolist()
        correct.update(zip(indices[done:done + len(hits)], hits))
        done += len(hits)
    correct = utils.gather_by_index(correct)
    return {"acc": sum(correct.values()) / max(1, len(correct))}


def accuracy_evaluator(model: nn.Module, splits: dict[str, Dataset], collate_fn: Callable, batch_size: int,
                       cfg: utils.EngineConfig, dist: utils.DistInfo, tb=None) -> Callable[[int], dict[str, float]]:
    """NLVR's and VE's evaluation, `evaluate(epoch)` -> {"val_acc": .., "test_acc": ..}: `evaluate_accuracy` of
    each split (under `cfg.amp`, `cfg.num_workers` loader workers), logged and sent to TensorBoard."""
    def evaluate(epoch: int) -> dict[str, float]:
        stats = {}
        for split, dataset in splits.items():
            acc = evaluate_accuracy(model, dataset, collate_fn, batch_size=batch_size, dist=dist, amp=cfg.amp,
                                    num_workers=cfg.num_workers)
            stats |= {f"{split}_{k}": v for k, v in acc.items()}
        logger.info("epoch %d: %s", epoch, "  ".join(f"{k}: {100 * v:.2f}%" for k, v in stats.items()))
        if tb is not None:
            for k, v in stats.items():
                tb.add_scalar(k.replace("_", "/", 1), v, epoch + 1)
        return stats

    return evaluate
