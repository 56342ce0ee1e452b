"""The config schemas of Pretrain.py and Retrieval.py, and the pretraining loader its config describes:
what those task scripts share with the tools that run, time or measure them (scripts/demo.py,
ablate_vilta.py, benchmark.py, benchmark_retrieval.py). The task scripts import them from here, so no
tool imports a task script; the other tasks' schemas stay in their scripts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import utils
from datasets import loaders
from datasets.base import DataFiles
from datasets.pretrain import PretrainDataset, collate_pretrain
from datasets.shards import PretrainShards
from datasets.transforms import PRETRAIN_SCALE, AugmentConfig
from models.albef import ALBEFConfig
from models.retrieval import RetrievalModelConfig
from models.vilta import ViLTAConfig


@dataclass(kw_only=True)
class PretrainConfig(utils.EngineConfig, ALBEFConfig, AugmentConfig):
    train_file: DataFiles = field(default_factory=list)  # JSON lists of {"image", "caption"}; or train_shards
    # WebDataset shards instead (img2dataset's layout, scripts/json_to_shards.py): "dir/{000000..000123}.tar",
    # URLs or "pipe:" commands; an epoch is then train_samples_per_epoch samples over all ranks
    train_shards: str | list[str] | None = None
    train_samples_per_epoch: int | None = None
    shuffle_buffer: int = 1000  # with train_shards: samples each reader shuffles among
    image_root: str = ""  # prefix of relative image paths ('' : paths used as written, as the original)
    val_file: DataFiles | None = None  # optional retrieval-format file(s) for zero-shot ITC monitoring
    batch_size: int = 64  # per GPU
    max_words: int = 30
    skip_bad_images: bool = False
    crop_scale: list[float] = field(default_factory=lambda: list(PRETRAIN_SCALE))  # RandomResizedCrop scale
    optimizer: utils.OptimizerConfig = field(default_factory=lambda: utils.OptimizerConfig(lr=1e-4))
    schedular: utils.SchedulerConfig = field(default_factory=lambda: utils.SchedulerConfig(lr=1e-4, epochs=30))
    vilta: ViLTAConfig = field(default_factory=ViLTAConfig)


def build_train_loader(cfg: PretrainConfig, tokenizer, dist: utils.DistInfo):
    """(this rank's training loader, optimizer steps per epoch): JSON lists (`train_file`, through
    `utils.train_loader` as every task) or shards (`train_shards`), the same transform, `pre_caption` and
    collate either way."""
    transform = cfg.train_transform(cfg.image_res)
    collate = collate_pretrain(tokenizer)
    if bool(cfg.train_file) == bool(cfg.train_shards):
        raise utils.ConfigError("set one of train_file (JSON lists) and train_shards (WebDataset shards)")
    if cfg.train_file:
        dataset = PretrainDataset(cfg.train_file, transform, cfg.image_root, cfg.max_words, cfg.skip_bad_images)
        return utils.train_loader(dataset, cfg.batch_size, collate, cfg, dist, "pairs")
    if cfg.max_train_samples is not None:
        raise utils.ConfigError("max_train_samples takes a subset of train_file; with train_shards an epoch is "
                                "train_samples_per_epoch samples")
    if not cfg.train_samples_per_epoch or cfg.train_samples_per_epoch < 1:
        raise utils.ConfigError("train_shards needs train_samples_per_epoch (samples over all ranks; "
                                "json_to_shards.py prints it, img2dataset's *_stats.json count `successes`)")
    source = PretrainShards(cfg.train_shards, transform, cfg.max_words, cfg.shuffle_buffer)
    loader = loaders.build_stream_loader(source, cfg.batch_size, samples_per_epoch=cfg.train_samples_per_epoch,
                                       collate_fn=collate, num_workers=cfg.num_workers, dist=dist, seed=cfg.seed)
    return loader, utils.epoch_steps(loader, cfg.train_samples_per_epoch, cfg, dist, cfg.batch_size, "pairs")


@dataclass(kw_only=True)
class RetrievalConfig(utils.EngineConfig, RetrievalModelConfig, AugmentConfig):
    train_file: DataFiles
    val_file: DataFiles
    test_file: DataFiles
    image_root: str = ""  # prefix of relative image paths
    batch_size_train: int = 32  # per GPU
    batch_size_test: int = 64  # images, and texts, per batch of the feature pass
    k_test: int = 256  # ITC candidates re-ranked by ITM, per query, both directions
    rank: Literal["itm", "itc", "itc+itm"] = "itm"  # itm: the original; itc: no fusion pass; itc+itm: their sum
    itm_batch_size: int = 256  # texts of one image per fusion call in the re-ranking
    warm_up: bool = True  # alpha ramps up linearly over the first epoch
    max_words: int = 30
    optimizer: utils.OptimizerConfig = field(default_factory=lambda: utils.OptimizerConfig(lr=1e-5))
    schedular: utils.SchedulerConfig = field(default_factory=lambda: utils.SchedulerConfig(lr=1e-5, epochs=5))

    def __post_init__(self):
        if self.k_test < 1 or self.itm_batch_size < 1:
            raise ValueError(f"need k_test, itm_batch_size >= 1; got {self.k_test}, {self.itm_batch_size}")
        super().__post_init__()
