"""The training engine shared by every task script: config and CLI (config.py holds the YAML side),
distributed setup, logging, the one training loop `train_one_epoch` and `fit`, save/resume (checkpoints.py),
and `gather_by_index` for evaluation across ranks (classify.py: NLVR and VE). The optimizer and lr are in optim.py, metrics in
metrics.py, malloc tuning in memory.py; their names stay importable from here.

Vocabulary: a *batch* is what the loader yields (one micro-batch); a *step* is one optimizer step,
`accum_steps` batches. Global steps count optimizer steps from the start of training and drive the
lr schedule; checkpoints store them (and every RNG) so a killed run resumes on the same trajectory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Subset

from config import ConfigError, config_to_dict, load_config, save_config  # noqa: F401 - the scripts' names
from datasets.base import AnnotationError, ImageLoadError
from datasets.loaders import SKIPPED, DistInfo, build_loader, loader_position  # DistInfo: re-exported for the scripts
from datasets.shards import ShardError
import checkpoints
from checkpoints import Preempted, TrainingDiverged
from models.bert import PretrainedNotFound
from memory import keep_freed_memory
from metrics import MetricLogger, SmoothedValue, timed
from models.checkpoint import CheckpointError, ChecksumError
from optim import (OptimizerConfig, SchedulerConfig, alpha_schedule, build_optimizer,  # noqa: F401 - the scripts' names
                   first_epoch_ramp, lr_at, set_lr)

logger = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- config


@dataclass(kw_only=True)
class EngineConfig:
    """Knobs of `train_one_epoch` and the loaders. A task schema inherits it beside the model's config,
    EngineConfig first so its `__post_init__` chains on to the model's:
    `@dataclass(kw_only=True) class PretrainConfig(EngineConfig, ALBEFConfig)`."""

    amp: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; "bf16"; "fp32"
    grad_clip: float | None = None  # max global grad norm; None: no clipping (the original)
    accum_steps: int = 1  # batches per optimizer step
    print_freq: int = 50  # optimizer steps between progress lines
    save_every_steps: int = 0  # mid-epoch checkpoints, read by the scripts' on_step; 0: off
    # A short fine-tune: train on a seeded random subset of at most this many training samples, the same
    # subset every epoch, so the lr schedule, the alpha ramp and each epoch's evaluation fit the budget
    # (`--max_steps` only stops early, mid-schedule). None: every sample (the original). JSON lists only.
    max_train_samples: int | None = None
    num_workers: int = 4
    seed: int = 42

    def __post_init__(self):
        if self.amp not in ("auto", "bf16", "fp32"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'fp32', got {self.amp!r}")
        if min(self.accum_steps, self.print_freq) < 1 or min(self.save_every_steps, self.num_workers) < 0:
            raise ValueError("need accum_steps, print_freq >= 1 and save_every_steps, num_workers >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"max_train_samples must be >= 1 or null, got {self.max_train_samples}")
        for f in dataclasses.fields(self):  # every task's batch sizes (batch_size, batch_size_train, ...)
            if "batch_size" in f.name and isinstance(size := getattr(self, f.name), int) and size < 1:
                raise ValueError(f"{f.name} must be >= 1, got {size}")
        if (parent := getattr(super(), "__post_init__", None)) is not None:
            parent()


# ------------------------------------------------------------------------------------- task scripts


def task_parser(doc: str | None, configs: list[str], output_dir: str, *, checkpoint_help: str,
                evaluate: bool = True, max_steps: bool = True) -> argparse.ArgumentParser:
    """The flags every task script shares (scripts add their own): --config --output_dir --checkpoint
    --resume [--evaluate] --seed --device --amp [--max_steps] --opts. `configs`: the script's config
    files, full size first, listed in the help and when --config is missing (no guessing)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"Config keys are documented by the comments in {configs[0]} and by the "
                                       "task's config dataclass (at the top of the script, or in task_configs.py).")
    p.add_argument("--config", help=f"the run's YAML file (required): {', '.join(configs)}")
    p.set_defaults(known_configs=configs)
    p.add_argument("--output_dir", default=output_dir,
                   help=f"config.yaml, run.log, log.txt, tb/ and checkpoints go here (default: {output_dir})")
    p.add_argument("--checkpoint", help=checkpoint_help)
    p.add_argument("--resume", help="continue a run from its checkpoint_last.pth (or checkpoint_XX.pth): weights, "
                                    "optimizer, step, RNG")
    if evaluate:
        p.add_argument("--evaluate", action="store_true", help="evaluation only, no training")
    p.add_argument("--seed", type=int, help="overrides the config's seed")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp32"], help="overrides the config's amp")
    if max_steps:
        p.add_argument("--max_steps", type=int, help="stop after this many optimizer steps (tests, smoke runs)")
    p.add_argument("--opts", nargs="*", default=[],
                   help="config overrides: key=value or section.key=value, the value read as YAML")
    p.add_argument("--debug", action="store_true", help="show the traceback of a config, checkpoint or data error")
    return p


# A user's mistake, not a bug: the message names the file, key or entry, so the traceback adds nothing.
USER_ERRORS = (ConfigError, CheckpointError, ChecksumError, AnnotationError, ImageLoadError, ShardError,
               TrainingDiverged, PretrainedNotFound)


def run_main(main: Callable[[list[str]], typing.Any], argv: list[str] | None = None) -> None:
    """Every script's entry point: `main(argv)`; a USER_ERRORS exception ends the process with one line,
    `error: <message>`, on stderr and exit status 2 (argparse's status for bad arguments), its traceback
    only with `--debug`; a handled stop signal (Preempted) with its line and PREEMPTED_STATUS. Anything
    else is a bug and keeps its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        main(argv)
    except Preempted as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(checkpoints.PREEMPTED_STATUS)
    except USER_ERRORS as e:
        if "--debug" in argv:
            raise
        print(f"error: {error_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)


def error_line(e: BaseException) -> str:
    """The message on one line. An error raised in a DataLoader worker arrives with the worker's traceback
    inside its message; its last line, less the class name, is the original message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def setup_task(args: argparse.Namespace, schema: type,
               evaluate_needs_checkpoint: bool = True) -> tuple[DistInfo, typing.Any]:
    """Process group, logging, config (+ --seed/--amp/--opts, written to output_dir/config.yaml), seeds.
    `--evaluate` without `--checkpoint` is an error first, unless the task can score untrained weights."""
    if evaluate_needs_checkpoint and getattr(args, "evaluate", False) and not args.checkpoint:
        raise ConfigError("--evaluate needs --checkpoint (the weights to evaluate)")
    opts = list(args.opts) + [f"seed={args.seed}"] * (args.seed is not None) + [f"amp={args.amp}"] * bool(args.amp)
    if args.config is None:
        raise ConfigError(f"no --config given; this script's configs: {', '.join(args.known_configs)} (*_demo: the "
                          "demo data from `make data`; the others: the original data and weights)")
    dist = init_distributed(args.device)
    setup_logging(args.output_dir, dist.rank)
    cfg, doc = load_config(args.config, opts, schema)
    save_config(doc, os.path.join(args.output_dir, "config.yaml"))
    seed_everything(cfg.seed, dist.rank)
    return dist, cfg


def init_weights(model: nn.Module, args: argparse.Namespace, load: Callable[[nn.Module, str], typing.Any]) -> None:
    """A task model's first weights: with --checkpoint, `load(model, path)` (the task's conversion and
    checks); without, in a fresh run, the pretrained encoders its config names. A resumed run skips both:
    `fit` loads the run's own weights."""
    if args.checkpoint:
        load(model, args.checkpoint)
    elif not args.resume:
        model.init_pretrained_encoders()


# --------------------------------------------------------------------------------------- distributed


def init_distributed(device: str | None = None) -> DistInfo:
    """From torchrun's RANK, WORLD_SIZE, LOCAL_RANK (absent: one process). `device` "cuda" or "cpu",
    default CUDA when available; the process group is NCCL on CUDA, gloo on CPU."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":
        keep_freed_memory()
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)  # raises when CUDA is absent
    if world_size > 1 and not tdist.is_initialized():
        cuda = dev.type == "cuda"
        tdist.init_process_group(backend="nccl" if cuda else "gloo", device_id=dev if cuda else None)
    logger.info("process %d/%d on %s", rank, world_size, dev)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def is_main_process() -> bool:
    return not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0


def seed_everything(seed: int, rank: int = 0) -> None:
    """ALBEF parity: seed + rank, so ranks draw different dropout and MLM masks."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def wrap_ddp(model: nn.Module, dist: DistInfo, **ddp_kwargs) -> nn.Module:
    """DDP on several processes, the bare model on one."""
    if dist.world_size == 1:
        return model
    return DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


# ------------------------------------------------------------------------------------------- logging


def setup_logging(output_dir: str | None, rank: int = 0) -> None:
    """Rank 0: INFO to stdout and `output_dir/run.log`; other ranks: WARNING to stdout. Once per script
    (again replaces the handlers it added)."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_engine", False)]:
        root.removeHandler(h)
        h.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if rank == 0 and output_dir:
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, "run.log")))
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    for h in handlers:
        h.setFormatter(fmt)
        h._engine = True
        root.addHandler(h)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.captureWarnings(True)


@contextlib.contextmanager
def tb_writer(output_dir: str):
    """A TensorBoard SummaryWriter on `output_dir/tb` for rank 0 (None elsewhere), closed however the
    block ends: a run stopped by a data error leaves no writer thread flushing behind it."""
    if not is_main_process():
        yield None
        return
    from torch.utils.tensorboard import SummaryWriter  # slow import, only where needed

    writer = SummaryWriter(os.path.join(output_dir, "tb"))
    try:
        yield writer
    finally:
        writer.close()


def append_log(output_dir: str, stats: dict) -> None:
    """One JSON line in `output_dir/log.txt`, the original's `{"train_lr": .., ..., "epoch": e}` (numbers
    where it wrote "%.3f" strings); rank 0 only."""
    if is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(stats) + "\n")


# ---------------------------------------------------------------------------------------- training


def train_loader(dataset: Dataset, batch_size: int, collate_fn: Callable, cfg: EngineConfig, dist: DistInfo,
                 what: str = "samples") -> tuple[DataLoader, int]:
    """(this rank's training loader, optimizer steps per epoch): shuffled, the last partial batch dropped,
    resumable mid-epoch (`datasets.loaders.build_loader`), with the config's workers and seed, on at most
    `cfg.max_train_samples` of `dataset` (`limit_samples`). Logs the size."""
    dataset = limit_samples(dataset, cfg, what)
    loader = build_loader(dataset, batch_size, shuffle=True, drop_last=True, collate_fn=collate_fn,
                          num_workers=cfg.num_workers, dist=dist, seed=cfg.seed)
    return loader, epoch_steps(loader, len(dataset), cfg, dist, batch_size, what)


def epoch_steps(loader: DataLoader, samples: int, cfg: EngineConfig, dist: DistInfo, batch_size: int,
                what: str = "samples") -> int:
    """`steps_per_epoch`, logged with the epoch's size: the one line every training loader writes."""
    steps = steps_per_epoch(loader, cfg.accum_steps)
    logger.info("%d %s, %d steps per epoch, %d ranks x batch %d", samples, what, steps, dist.world_size, batch_size)
    return steps


def limit_samples(dataset: Dataset, cfg: EngineConfig, what: str = "samples") -> Dataset:
    """At most `cfg.max_train_samples` of `dataset`: a random subset drawn by `cfg.seed` alone (the same on
    every rank and at every resume), in file order."""
    if cfg.max_train_samples is None or cfg.max_train_samples >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))
    logger.info("max_train_samples: %d of the %d %s (seed %d)", cfg.max_train_samples, len(dataset), what, cfg.seed)
    return Subset(dataset, keep[: cfg.max_train_samples].sort().values.tolist())


def steps_per_epoch(loader: DataLoader, accum_steps: int) -> int:
    """Optimizer steps in one epoch of `loader`; a last incomplete accumulation group is not run.
    None is a ConfigError: a run that trains nothing must not report success."""
    position = loader_position(loader)
    batches = getattr(position, "num_batches", None) or len(loader)
    if batches < accum_steps:
        samples = getattr(position, "num_samples", None) or getattr(loader.dataset, "__len__", lambda: "?")()
        per_rank = getattr(position, "batch_size", None) or loader.batch_size
        raise ConfigError(f"0 optimizer steps per epoch: {samples} samples make {batches} batches of {per_rank} per "
                          f"rank (incomplete batches dropped), fewer than accum_steps {accum_steps}; lower the batch "
                          "size or accum_steps, or use more data")
    return batches // accum_steps


def autocast_context(amp: str, device: torch.device):
    """bf16 autocast for "bf16", and for "auto" on CUDA; nothing for fp32."""
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(obj, device: torch.device):
    """Tensors in nested dicts, lists and tuples moved non_blocking; other objects with `.to` (a
    tokenizer's BatchEncoding) moved whole; anything else left alone."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj.to(device) if callable(getattr(obj, "to", None)) else obj


def place_loader(loader: DataLoader, epoch: int, start_batch: int, batches: int) -> None:
    """Set the loader's epoch and first batch (see `loader_position`); it must hold `batches` batches."""
    position = loader_position(loader)
    if hasattr(position, "set_epoch"):
        position.set_epoch(epoch)
    if hasattr(position, "set_start"):
        position.set_start(start_batch)
        if position.num_batches < batches:
            raise ValueError(f"{batches} batches per epoch needed, the loader has {position.num_batches}")
    elif start_batch:
        raise ValueError("resuming mid-epoch needs a loader from build_loader or build_stream_loader")


def _accumulate(model: nn.Module, batches, micro: int, extra: dict, amp: str, device) -> tuple[dict, int, int]:
    """Forward and backward of `micro` batches: the outputs averaged over them, the sample count and
    the samples the loader skipped to make them. Under DDP, gradients are all-reduced on the last batch
    only (`no_sync` before it)."""
    sums: dict[str, torch.Tensor] = {}
    samples = skipped = 0
    for m in range(micro):
        if (batch := next(batches, None)) is None:
            raise RuntimeError("the loader ran out of batches before the epoch's last step")
        skipped += int(batch.pop(SKIPPED, 0)) if isinstance(batch, dict) else 0
        batch = to_device(batch, device)
        samples += next((len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim), 0)
        with model.no_sync() if isinstance(model, DDP) and m < micro - 1 else contextlib.nullcontext():
            with autocast_context(amp, device):
                out = model(**batch, **extra)
            losses = [v for k, v in out.items() if k.startswith("loss")]
            if not losses:
                raise ValueError(f"forward returned no 'loss*' key, only {sorted(out)}")
            (sum(losses) / micro).backward()
        for k, v in out.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            if v.numel() != 1:
                raise ValueError(f"forward output '{k}' must be a scalar, has shape {tuple(v.shape)}")
            sums[k] = sums[k] + v / micro if k in sums else v / micro
    return sums, samples, skipped


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, *, epoch: int,
                    steps_per_epoch: int, start_step_in_epoch: int = 0,
                    cfg: EngineConfig, sched: SchedulerConfig, dist: DistInfo, tb=None,
                    forward_kwargs: Callable[[int, int], dict] | None = None,
                    on_step: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Train optimizer steps `start_step_in_epoch` .. `steps_per_epoch - 1` of `epoch`.

    Each step: lr = `lr_at(epoch, step in epoch)`; `cfg.accum_steps` batches, each a dict of forward's arguments
    plus `forward_kwargs(epoch, step_in_epoch)`; the sum of the `loss*` outputs backpropagated under
    `cfg.amp`; clipping to `cfg.grad_clip`; the optimizer step; then `on_step(steps done in all, steps
    done in this epoch)`, the values a checkpoint stores. Every output key is logged. Every rank runs
    the same number of forwards (ALBEF updates its queues inside forward). Returns this call's
    averages over all ranks, keyed like the outputs plus `lr` (and `grad_norm` with clipping), and
    `skipped`, the unreadable samples the loaders skipped on all ranks, when there were any.
    Losses and the clipping norm are read back (one transfer) at each progress line, before each
    `save_every_steps` save and at the end; a non-finite one stops training there (TrainingDiverged).
    """
    model.train()
    micro = cfg.accum_steps
    place_loader(loader, epoch, start_step_in_epoch * micro, steps_per_epoch * micro)
    metrics, data_time = MetricLogger(), SmoothedValue()
    batches, params = timed(iter(loader), data_time), [p for p in model.parameters() if p.requires_grad]
    start_time = window_time = time.perf_counter()
    window_samples = skipped = 0
    for i in range(start_step_in_epoch, steps_per_epoch):
        step = epoch * steps_per_epoch + i
        set_lr(optimizer, lr := lr_at(epoch, i, steps_per_epoch, sched))
        extra = forward_kwargs(epoch, i) if forward_kwargs else {}
        try:
            out, samples, skips = _accumulate(model, batches, micro, extra, cfg.amp, dist.device)
        except RuntimeError as e:  # diverged weights can fail inside forward (torch.multinomial on NaN)
            check_finite(metrics.flush(tb), epoch, steps_per_epoch)
            check_forward_error(e, params, epoch, i)
            raise
        if cfg.grad_clip is not None:
            out["grad_norm"] = nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics.update(step, lr=lr, **{k: v for k, v in extra.items() if isinstance(v, float)}, **out)
        window_samples, skipped = window_samples + samples, skipped + skips
        if cfg.save_every_steps and (step + 1) % cfg.save_every_steps == 0:
            check_finite(metrics.flush(tb), epoch, steps_per_epoch)  # nothing non-finite reaches a save
        if (i - start_step_in_epoch) % cfg.print_freq == 0 or i == steps_per_epoch - 1:
            check_finite(metrics.flush(tb), epoch, steps_per_epoch)
            now = time.perf_counter()
            if tb is not None:
                tb.add_scalar("train/throughput", window_samples * dist.world_size / max(now - window_time, 1e-9), step)
            window_time, window_samples = now, 0
            per_step = (now - start_time) / (i - start_step_in_epoch + 1)
            metrics.log_progress(epoch, i, steps_per_epoch, per_step, data_time)
        if on_step is not None:
            on_step(step + 1, i + 1)
    check_finite(metrics.flush(tb), epoch, steps_per_epoch)
    metrics.synchronize(dist.device)
    stats = metrics.global_avg()
    if skipped := int(sum_over_ranks(skipped, dist.device)):
        logger.warning("epoch %d: %d unreadable samples skipped (all ranks)", epoch, skipped)
        stats["skipped"] = skipped
    logger.info("Averaged stats: %s", "  ".join(f"{k}: {v:.4f}" for k, v in stats.items()))
    return stats


def check_finite(rows: list[tuple[int, dict[str, float]]], epoch: int, steps_per_epoch: int) -> None:
    """TrainingDiverged naming the first step of `rows` (MetricLogger.flush's) whose losses or gradient
    norm are not finite, with the epoch, the step and each value."""
    for step, values in rows:
        watched = {k: v for k, v in values.items() if k.startswith("loss") or k == "grad_norm"}
        if not all(map(math.isfinite, watched.values())):
            shown = ", ".join(f"{k} {v:.4g}" for k, v in watched.items())
            what = "loss" if not all(math.isfinite(v) for k, v in watched.items() if k != "grad_norm") else "gradient"
            raise TrainingDiverged(f"non-finite {what} at epoch {epoch} step {step - epoch * steps_per_epoch} "
                                   f"(optimizer step {step} of the run): {shown}; nothing was saved from this "
                                   "state; lower the lr (optimizer.lr, schedular.lr) or set grad_clip")


def check_forward_error(error: RuntimeError, params: list[nn.Parameter], epoch: int, step_in_epoch: int) -> None:
    """TrainingDiverged, from `error`, when forward failed on NaN or Inf (a diverged run's weights)."""
    if re.search(r"\b(nan|inf)\b", str(error), re.IGNORECASE):
        largest = max(p.detach().abs().max().item() for p in params)  # the failure path only
        raise TrainingDiverged(f"forward failed on non-finite values at epoch {epoch} step {step_in_epoch} ({error}); "
                               f"the largest |weight| is {largest:.3g}; nothing was saved from this state; "
                               "lower the lr (optimizer.lr, schedular.lr) or set grad_clip") from error


def finished(resume: str, done: int, total: int, max_steps: int | None) -> bool:
    """Whether a resumed run has nothing left to train (`done` of `total` steps, or of `max_steps`); says so."""
    if done < total and (max_steps is None or done < max_steps):
        return False
    logger.warning("%s is a finished run (%d of %d steps done%s): nothing to train", resume, done, total,
                   f", --max_steps {max_steps}" if max_steps is not None else "")
    return True


def sum_over_ranks(value: int | float, device: torch.device) -> float:
    """`value` summed over all ranks (collective; the value itself on one process)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.item()


class StopTraining(Exception):
    """Raised from an `on_step` hook to end training early (`--max_steps`)."""


def samples_per_step(loader: DataLoader, accum_steps: int, world_size: int) -> int | None:
    """Samples one optimizer step takes over all ranks (None for a loader without a batch size)."""
    batch_size = getattr(loader_position(loader), "batch_size", None) or loader.batch_size
    return batch_size * accum_steps * world_size if batch_size else None


@dataclass
class _Saver:
    """fit's checkpoint writer: resumable `checkpoint_last.pth` / `checkpoint_XX.pth`, and the best weights."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    cfg: typing.Any
    output_dir: str
    steps_per_epoch: int
    samples_per_step: int | None
    best: float = float("-inf")

    def save(self, name: str, epoch: int, step: int, step_in_epoch: int) -> str:
        state = checkpoints.resume_state(self.model, self.optimizer, self.cfg, epoch, step, step_in_epoch,
                                         steps_per_epoch=self.steps_per_epoch, samples_per_step=self.samples_per_step)
        checkpoints.save_checkpoint(path := os.path.join(self.output_dir, name), state | {"best": self.best})
        return path

    def save_if_best(self, stats: dict[str, float], select: str | None, epoch: int) -> None:
        """`checkpoint_best.pth`, weights only, when `stats[select]` beats every earlier epoch."""
        if select is None or not stats[select] > self.best:
            return
        self.best = stats[select]
        checkpoints.save_checkpoint(os.path.join(self.output_dir, "checkpoint_best.pth"), {
            "model": self.model.state_dict(), "config": config_to_dict(self.cfg), "epoch": epoch, select: self.best})


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *, cfg, dist: DistInfo,
        output_dir: str, resume: str | None = None, max_steps: int | None = None,
        forward_kwargs: Callable[[int, int], dict] | None = None,
        evaluate: Callable[[int], dict[str, float]] | None = None, select: str | None = None,
        keep_every_epoch: bool = False, ddp_kwargs: dict | None = None, tb=None) -> dict[str, float]:
    """The epoch loop every task script shares; `cfg` carries the engine knobs and `schedular`.
    `resume`: a checkpoint_last.pth of this run, also one written by another number of processes (placed
    by samples, see `resume_position`); a finished run is said so and left alone.
    Each epoch: `train_one_epoch`, `evaluate(epoch)` (if given), `checkpoint_best.pth` (weights) when
    `stats[select]` improves, `checkpoint_XX.pth` with `keep_every_epoch` (the original's pretraining habit),
    one log.txt line, and last `checkpoint_last.pth` (resumable, also every `save_every_steps`), which
    marks the epoch done: a kill between these saves loses nothing. `max_steps` stops after that many
    steps, evaluated and saved alike. A stop signal stops after the current step with checkpoint_last.pth
    there and raises Preempted. `tb`: the script's TensorBoard writer. Returns the last log.txt line.
    """
    steps = steps_per_epoch(loader, cfg.accum_steps)
    saver = _Saver(model, optimizer, cfg, output_dir, steps, samples_per_step(loader, cfg.accum_steps, dist.world_size))
    checkpoints.remove_stale_tmp(output_dir)
    start_epoch, start_step = 0, 0
    if resume:
        start_epoch, start_step, saver.best = checkpoints.resume_training(model, optimizer, resume, steps,
                                                                          saver.samples_per_step, dist.world_size)
        if finished(resume, start_epoch * steps + start_step, cfg.schedular.epochs * steps, max_steps):
            return {}
    ddp_model = wrap_ddp(model, dist, **(ddp_kwargs or {}))
    epoch, log = start_epoch, {}

    def on_step(step: int, step_in_epoch: int) -> None:
        if step_in_epoch < steps:  # at an epoch's end: after the epoch's saves
            stop.stop_if_received(lambda: saver.save("checkpoint_last.pth", epoch, step, step_in_epoch),
                                  f"at epoch {epoch} step {step_in_epoch}")
        if cfg.save_every_steps and step % cfg.save_every_steps == 0:
            saver.save("checkpoint_last.pth", epoch, step, step_in_epoch)
        if max_steps is not None and step >= max_steps and step_in_epoch < steps:
            raise StopTraining  # at an epoch's end the epoch finishes normally

    with checkpoints.StopSignals() as stop:
        for epoch in range(start_epoch, cfg.schedular.epochs):
            try:
                done, train_stats = steps, train_one_epoch(
                    ddp_model, loader, optimizer, epoch=epoch, steps_per_epoch=steps,
                    start_step_in_epoch=start_step if epoch == start_epoch else 0, cfg=cfg, sched=cfg.schedular,
                    dist=dist, tb=tb, forward_kwargs=forward_kwargs, on_step=on_step)
            except StopTraining:
                done, train_stats = max_steps - epoch * steps, {}
                logger.info("stopped after --max_steps %d; state saved to checkpoint_last.pth", max_steps)
            step, stats = epoch * steps + done, evaluate(epoch) if evaluate else {}
            saver.save_if_best(stats, select, epoch)
            if keep_every_epoch and done == steps:
                saver.save(f"checkpoint_{epoch:02d}.pth", epoch, step, done)
            append_log(output_dir, log := {f"train_{k}": v for k, v in train_stats.items()} | stats | {"epoch": epoch})
            last = saver.save("checkpoint_last.pth", epoch, step, done)
            if max_steps is not None and step >= max_steps:
                break
            if epoch + 1 < cfg.schedular.epochs:
                stop.stop_if_received(lambda: last, f"after epoch {epoch}")
    if select is not None:
        logger.info("best %s: %.4f", select, saver.best)
    return log


def gather_by_index(rows: dict[int, typing.Any]) -> dict[int, typing.Any]:
    """Every rank's {sample index: result} merged and in index order, on every rank (collective; the
    rows themselves on one process). Evaluation shards samples over ranks; keyed by index, nothing is
    dropped and a sample two ranks scored (a padded shard) counts once."""
    if tdist.is_available() and tdist.is_initialized():
        shards = [None] * tdist.get_world_size()
        tdist.all_gather_object(shards, rows)
        rows = {k: v for shard in shards for k, v in shard.items()}
    return dict(sorted(rows.items()))
