"""Text-assignment (TA) pretraining for NLVR: the step between Pretrain.py and NLVR.py.

    torchrun --nproc_per_node=8 Pretrain_nlvr.py --config configs/NLVR_pretrain.yaml --checkpoint ALBEF.pth \\
        --output_dir output/nlvr_ta
    python NLVR.py --config configs/NLVR.yaml --checkpoint output/nlvr_ta/checkpoint_00.pth

The pretraining checkpoint's fusion layers are duplicated into the two-image encoder (layer l into
F+2(l-F), reading the left image, and F+2(l-F)+1, reading the right one); then, on image-caption pairs,
the encoder learns to tell whether a caption belongs to the left image, the right one or neither, the
other images being hard negatives of the batch. A separate script, as in the original, because its
data, batch and checkpoints are pretraining's, not NLVR's.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

import utils
from datasets.base import DataFiles
from datasets.pretrain import PretrainDataset, collate_pretrain
from datasets.text import build_tokenizer
from datasets.transforms import PRETRAIN_SCALE, AugmentConfig
from models.albef import ALBEFConfig, build_bert_config
from models.bert import resolve_pretrained
from models.nlvr import ALBEFTextAssignment, load_text_assignment_checkpoint

logger = logging.getLogger("Pretrain_nlvr")


@dataclass(kw_only=True)
class TAConfig(utils.EngineConfig, ALBEFConfig, AugmentConfig):
    train_file: DataFiles
    image_root: str = ""  # prefix of relative image paths ('' : paths used as written, as the original)
    batch_size: int = 64  # per GPU; at least 3 (two distinct negatives per text)
    max_words: int = 30
    skip_bad_images: bool = False
    crop_scale: list[float] = field(default_factory=lambda: list(PRETRAIN_SCALE))
    optimizer: utils.OptimizerConfig = field(default_factory=lambda: utils.OptimizerConfig(lr=2e-5))
    schedular: utils.SchedulerConfig = field(default_factory=lambda: utils.SchedulerConfig(lr=2e-5, epochs=1))

    def __post_init__(self):
        if self.batch_size < 3:
            raise ValueError(f"batch_size must be >= 3 (two distinct negatives per text), got {self.batch_size}")
        super().__post_init__()


def parse_args(argv=None) -> argparse.Namespace:
    configs = ["configs/NLVR_pretrain.yaml", "configs/NLVR_pretrain_demo.yaml"]  # full size first
    p = utils.task_parser(__doc__, configs, "output/nlvr_ta",
                          checkpoint_help="initialise from a pretraining (Pretrain.py) or TA checkpoint", evaluate=False)
    return p.parse_args(argv)


def main(argv=None) -> ALBEFTextAssignment:
    """Runs TA pretraining; returns the trained (unwrapped) model."""
    args = parse_args(argv)
    dist, cfg = utils.setup_task(args, TAConfig)

    tokenizer = build_tokenizer(resolve_pretrained(cfg.tokenizer_source))
    transform = cfg.train_transform(cfg.image_res)
    dataset = PretrainDataset(cfg.train_file, transform, cfg.image_root, cfg.max_words, cfg.skip_bad_images)
    loader, _ = utils.train_loader(dataset, cfg.batch_size, collate_pretrain(tokenizer), cfg, dist, "pairs")

    model = ALBEFTextAssignment(cfg, build_bert_config(cfg))
    utils.init_weights(model, args, load_text_assignment_checkpoint)
    model.to(dist.device)
    optimizer = utils.build_optimizer(model, cfg.optimizer)
    # ALBEF parity: text_proj and temp are never used (and vision_proj gets no gradient), as in the original
    with utils.tb_writer(args.output_dir) as tb:
        utils.fit(model, optimizer, loader, cfg=cfg, dist=dist, output_dir=args.output_dir, resume=args.resume,
                  max_steps=args.max_steps, keep_every_epoch=True, ddp_kwargs={"find_unused_parameters": True},
                  tb=tb)
    utils.cleanup_distributed()
    return model


if __name__ == "__main__":
    utils.run_main(main)
