"""ALBEF VQA: fine-tune the answer decoder, rank the answer list, write the evaluation server's file.

    torchrun --nproc_per_node=8 VQA.py --config configs/VQA.yaml --output_dir output/vqa --checkpoint ALBEF.pth
    python VQA.py --config configs/VQA_demo.yaml --output_dir output/demo_vqa \
        --checkpoint output/demo_pretrain/checkpoint_last.pth
    python VQA.py ... --evaluate --checkpoint output/vqa/checkpoint_07.pth   # rank only

`--checkpoint` takes a pretraining checkpoint (converted: the decoder starts from the fusion layers) or
a VQA one (loaded strictly). After training (or at once with `--evaluate`) every test question gets the
best answer of `answer_list`; `output_dir/result/vqa_result_epoch<N>.json` holds them in the server's
format, and where the test file has answers the VQA accuracy is logged and appended to log.txt.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field

import torch

import utils
from datasets import loaders
from datasets.base import DataFiles
from datasets.text import build_tokenizer
from datasets.transforms import AugmentConfig, test_transform
from datasets.vqa import (
    VQADataset,
    VQAEvalDataset,
    answer_tokens,
    collate_vqa_eval,
    collate_vqa_train,
    vqa_accuracy,
    write_result_file,
)
from models.albef import build_bert_config
from models.bert import resolve_pretrained
from models.vqa import VQAModel, VQAModelConfig, load_vqa_checkpoint

logger = logging.getLogger("VQA")


@dataclass(kw_only=True)
class VQAConfig(utils.EngineConfig, VQAModelConfig, AugmentConfig):
    train_file: DataFiles = field(default_factory=list)
    test_file: DataFiles
    answer_list: DataFiles
    vqa_root: str = ""  # prefix of images of entries with dataset 'vqa'
    vg_root: str = ""  # ... and 'vg'
    batch_size_train: int = 32  # per GPU
    batch_size_test: int = 16
    k_test: int = 128  # answers re-ranked by the full decoder pass
    eos: str = "[SEP]"  # appended to every answer
    warm_up: bool = True  # alpha ramps up over the first epoch
    optimizer: utils.OptimizerConfig = field(default_factory=lambda: utils.OptimizerConfig(lr=2e-5))
    schedular: utils.SchedulerConfig = field(default_factory=lambda: utils.SchedulerConfig(lr=2e-5, epochs=8))


def parse_args(argv=None) -> argparse.Namespace:
    configs = ["configs/VQA.yaml", "configs/VQA_demo.yaml"]  # full size first
    p = utils.task_parser(__doc__, configs, "output/vqa",
                          checkpoint_help="pretraining checkpoint (converted) or VQA checkpoint (strict)")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    """Runs fine-tuning and/or evaluation; returns the test accuracy ({} without test answers)."""
    args = parse_args(argv)
    dist, cfg = utils.setup_task(args, VQAConfig)

    tokenizer = build_tokenizer(resolve_pretrained(cfg.tokenizer_source))
    test_set = VQAEvalDataset(cfg.test_file, test_transform(cfg.image_res), cfg.answer_list, cfg.vqa_root, cfg.vg_root)
    test_loader = loaders.build_loader(test_set, cfg.batch_size_test, shuffle=False, drop_last=False,
                                     collate_fn=collate_vqa_eval(tokenizer), num_workers=cfg.num_workers,
                                     dist=dist, seed=cfg.seed)
    model = VQAModel(cfg, build_bert_config(cfg))
    utils.init_weights(model, args, load_vqa_checkpoint)
    model.to(dist.device)
    answers = [t.to(dist.device) for t in answer_tokens(tokenizer, test_set.answer_list, cfg.eos)]
    epoch = 0
    if not args.evaluate:
        epoch = train(args, cfg, model, tokenizer, dist)
    result = evaluation(model, test_loader, answers, cfg, dist)
    metrics = {}
    if dist.is_main:
        path = os.path.join(args.output_dir, "result", f"vqa_result_epoch{epoch}.json")
        write_result_file(result, path)
        logger.info("%d answers written to %s", len(result), path)
        if test_set.has_answers():
            metrics = vqa_accuracy(result, test_set.ann.entries)
            logger.info("VQA accuracy on %s: %s", cfg.test_file, "  ".join(f"{k}: {v:.2f}" for k, v in metrics.items()))
            utils.append_log(args.output_dir, {f"test_vqa_acc_{k}": v for k, v in metrics.items()} | {"epoch": epoch})
    utils.cleanup_distributed()
    return metrics


def train(args, cfg: VQAConfig, model: VQAModel, tokenizer, dist) -> int:
    """Fine-tune for `schedular.epochs` (checkpoints every epoch); returns the last epoch."""
    if not cfg.train_file:
        raise utils.ConfigError(f"{args.config}: train_file is empty (use --evaluate to rank only)")
    transform = cfg.train_transform(cfg.image_res)
    dataset = VQADataset(cfg.train_file, transform, cfg.vqa_root, cfg.vg_root, cfg.eos)
    loader, steps = utils.train_loader(dataset, cfg.batch_size_train, collate_vqa_train(tokenizer), cfg, dist,
                                       "questions")
    optimizer = utils.build_optimizer(model, cfg.optimizer)
    alpha = utils.alpha_schedule(cfg.alpha, steps, cfg.warm_up)  # ALBEF parity: ramped over epoch 0
    with utils.tb_writer(args.output_dir) as tb:
        log = utils.fit(model, optimizer, loader, cfg=cfg, dist=dist, output_dir=args.output_dir,
                        resume=args.resume, max_steps=args.max_steps, forward_kwargs=alpha, keep_every_epoch=True,
                        tb=tb)
    return log.get("epoch", 0)



@torch.no_grad()
def evaluation(model: VQAModel, loader, answers: list[torch.Tensor], cfg: VQAConfig, dist) -> list[dict]:
    """The best answer of every test question, [{"question_id", "answer"}] in file order on rank 0
    (each rank ranks its share; rows are gathered by sample index, padding duplicates dropped)."""
    model.eval()
    answer_ids, answer_mask = answers
    dataset, picked = loader.dataset, {}
    for i, batch in enumerate(loader):
        batch = utils.to_device(batch, dist.device)
        with utils.autocast_context(cfg.amp, dist.device):
            topk_ids, _ = model.predict(batch["image"], batch["question_ids"], batch["question_mask"],
                                        answer_ids, answer_mask, cfg.k_test)
        picked.update(zip(batch["index"].tolist(), topk_ids[:, 0].tolist()))
        if i % cfg.print_freq == 0:
            logger.info("Generate VQA test result: [%d/%d]", i, len(loader))
    picked = utils.gather_by_index(picked)
    return [{"question_id": dataset.question_id(i), "answer": dataset.answer_list[a]} for i, a in picked.items()]


if __name__ == "__main__":
    utils.run_main(main)
