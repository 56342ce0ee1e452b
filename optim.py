"""Optimizer and learning-rate schedule: AdamW (ALBEF's weight-decay groups), the warm-up/cosine lr of
every step, and the first-epoch ramp of the distillation weight.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class OptimizerConfig:
    """The YAML section `optimizer`. Only AdamW exists (ALBEF uses nothing else)."""

    opt: str = "adamW"
    lr: float  # AdamW's lr at construction only: `set_lr` gives every step the schedule's (`schedular`)
    weight_decay: float = 0.02
    # ZeroRedundancyOptimizer: each of N ranks keeps the AdamW state of 1/N of the weights (several
    # processes only); checkpoints still hold the whole state, gathered on rank 0 when saving
    zero_redundancy: bool = False

    def __post_init__(self):
        if self.opt.lower() != "adamw" or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"need opt 'adamW', lr > 0, weight_decay >= 0; got {self}")


@dataclass(kw_only=True)
class SchedulerConfig:
    """The YAML section `schedular` (ALBEF parity: the original's spelling, so its files carry over).

    Warm-up from `warmup_lr`, then one cosine from `lr` to `min_lr`, in one of two ways (`lr_at`):
    - `schedule: original`, the lr of ALBEF's scripts at every step (its timm CosineLRScheduler as
      Pretrain.py and the task scripts drive it): in epoch 0 a staircase of `warmup_epochs` steps, each
      held for `step_size` optimizer steps (the original's misnomer: 20 "epochs" of 100 iterations), then
      `lr` for the rest of epoch 0; from epoch 1 on, one cosine value per epoch.
    - `schedule: smooth`: linear warm-up over `warmup_steps` optimizer steps, then the cosine per step,
      reaching `min_lr` at the last step of `epochs`.
    The original's `decay_rate` and `cooldown_epochs` do nothing with its one cosine cycle: not fields; a
    YAML file that has them loads with a warning (config.REMOVED_KEYS), and the constructor takes and
    drops them so the original's `schedular` dicts build as they are.
    """

    sched: str = "cosine"
    schedule: typing.Literal["original", "smooth"] = "smooth"
    lr: float
    epochs: int
    min_lr: float = 0.0
    warmup_lr: float = 0.0
    warmup_epochs: int = 0  # original: warm-up stairs, in epoch 0 only
    step_size: int = 100  # original: optimizer steps per stair (hard-coded 100 in every original script)
    warmup_steps: int = 0  # smooth: optimizer steps of linear warm-up
    decay_rate: dataclasses.InitVar[float | None] = None  # the original's, a no-op: dropped
    cooldown_epochs: dataclasses.InitVar[int | None] = None  # the original's, a no-op: dropped

    def __post_init__(self, decay_rate: float | None = None, cooldown_epochs: int | None = None):
        if self.sched != "cosine" or self.lr <= 0 or min(self.min_lr, self.warmup_lr) < 0:
            raise ValueError(f"need sched 'cosine', lr > 0, min_lr, warmup_lr >= 0; got {self}")
        if self.epochs < 1 or self.step_size < 1 or min(self.warmup_epochs, self.warmup_steps) < 0:
            raise ValueError("need epochs, step_size >= 1 and warmup_epochs, warmup_steps >= 0")
        if self.schedule == "original" and self.warmup_steps:
            raise ValueError("warmup_steps belongs to schedule 'smooth'; the original warms up over "
                             "warmup_epochs stairs of step_size steps")
        if self.schedule == "smooth" and self.warmup_epochs:
            raise ValueError("warmup_epochs belongs to schedule 'original' (set schedule: original, or "
                             "warmup_steps for the smooth warm-up)")


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW without weight decay on 1-D tensors and `.bias`; frozen params left out. ALBEF parity:
    pos_embed, cls_token and the 0-dim `temp` are decayed, as timm's `add_weight_decay` did.
    With `zero_redundancy` and a process group of several ranks, the same AdamW inside a
    ZeroRedundancyOptimizer (same updates; its `state_dict` is the plain AdamW one once consolidated)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg.weight_decay}]
    fast = {"fused": True}  # one kernel per parameter group, on CUDA and CPU alike
    groups = [g for g in groups if g["params"]]
    if cfg.zero_redundancy and tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        logger.info("ZeroRedundancyOptimizer: AdamW state sharded over %d ranks", tdist.get_world_size())
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=cfg.lr, **fast)
    return torch.optim.AdamW(groups, lr=cfg.lr, **fast)


def lr_at(epoch: int, step_in_epoch: int, steps_per_epoch: int, cfg: SchedulerConfig) -> float:
    """The lr of optimizer step `step_in_epoch` (0-based) of `epoch`, by `cfg.schedule` (see SchedulerConfig)."""
    if cfg.schedule == "original":
        return original_lr(epoch, step_in_epoch, cfg)
    step, total_steps = epoch * steps_per_epoch + step_in_epoch, steps_per_epoch * cfg.epochs
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t))


def original_lr(epoch: int, step_in_epoch: int, cfg: SchedulerConfig) -> float:
    """ALBEF parity: the lr the original scripts train step `step_in_epoch` of `epoch` with, to the bit.

    Their scheduler value at "time" t is warmup_lr + t * ((lr - warmup_lr) / W) for t < W (W =
    `warmup_epochs`), else the cosine at t - W of `epochs`, min_lr past it (one cycle). They set it at
    construction (t = 0: warmup_lr, or lr when W = 0), in epoch 0 after step i when i % step_size == 0
    and i <= W * step_size (t = i // step_size, used from step i + 1 on), and for epoch e >= 1 at
    t = e + W: Pretrain.py, VQA.py and Pretrain_nlvr.py before epoch e, Retrieval.py, NLVR.py, VE.py and
    Grounding.py after epoch e - 1, the same value either way. The float operations are theirs too.
    """
    W = cfg.warmup_epochs
    if epoch == 0 and step_in_epoch == 0:
        return cfg.warmup_lr if W else cfg.lr
    t = epoch + W if epoch else min(W, (step_in_epoch - 1) // cfg.step_size)
    if t < W:
        return cfg.warmup_lr + t * ((cfg.lr - cfg.warmup_lr) / W)
    if t - W >= cfg.epochs:
        return cfg.min_lr
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * (t - W) / cfg.epochs))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def first_epoch_ramp(epoch: int, step_in_epoch: int, steps_per_epoch: int, warm_up: bool = True) -> float:
    """0 -> 1 linearly over the first epoch, then 1 (ALBEF's warm-up of alpha); 1 throughout without `warm_up`."""
    return min(1.0, step_in_epoch / steps_per_epoch) if epoch == 0 and warm_up else 1.0


def alpha_schedule(alpha: float, steps_per_epoch: int, warm_up: bool = True) -> Callable[[int, int], dict]:
    """`fit`'s `forward_kwargs` for the distillation weight: {"alpha": alpha * first_epoch_ramp(...)}."""
    return lambda epoch, i: {"alpha": alpha * first_epoch_ramp(epoch, i, steps_per_epoch, warm_up)}
