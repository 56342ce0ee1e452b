"""Checkpoints and the training state they carry: atomic saves that never hold non-finite weights and
never leave a temporary file behind, loads verified against the file's checksums, the position and RNG a
resumed run continues from, and stop signals (preemption) that end a run with its exact position saved.

The file layout is ALBEF's (`model`, `optimizer`, `lr_scheduler`, `config`, `epoch`) plus the resume
fields (`step`, `step_in_epoch`, `rng`, ...; see `resume_state`). Rank 0 writes; every rank reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import random
import shutil
import signal
import threading
import typing
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

from models.checkpoint import CheckpointError, adapt_pos_embed, load_checkpoint_file, load_state_dict_strict

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A loss or the gradient norm is not finite: training stops before saving anything from that state."""


def _is_main() -> bool:
    return not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0


def save_checkpoint(path: str, state: dict) -> None:
    """Write `path.tmp`, then `os.replace` it onto `path`: a crash never leaves a torn checkpoint (a failed
    write removes its temporary file; the previous checkpoint stays; a full disk is a CheckpointError
    saying so). Weights that are not finite are never saved (TrainingDiverged). Rank 0 only."""
    if not _is_main():
        return
    if isinstance(state.get("model"), dict):
        check_finite_weights(state["model"], path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(f"{path}.tmp", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(f"{path}.tmp")
        if isinstance(e, Exception) and out_of_space(e, path, need := tensor_bytes(state)):
            raise CheckpointError(f"no space left on device: needs about {need / 2**30:.2f} GB at {path} "
                                  f"({shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**30:.2f} "
                                  "GB free)") from e
        raise
    os.replace(f"{path}.tmp", path)


def check_finite_weights(state_dict: dict, path: str) -> None:
    """TrainingDiverged when a floating tensor of `state_dict` holds NaN or Inf (one host sync)."""
    names = [k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    finite = torch.stack([state_dict[k].isfinite().all() for k in names]).tolist() if names else []
    bad = [k for k, ok in zip(names, finite) if not ok]
    if bad:
        raise TrainingDiverged(f"{len(bad)} weight tensors are not finite ({', '.join(bad[:3])}, ...): not saving "
                               f"{path}; lower the lr (optimizer.lr, schedular.lr) or set grad_clip")


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in nested dicts and lists (about a checkpoint's size)."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(map(tensor_bytes, obj.values()))
    return sum(map(tensor_bytes, obj)) if isinstance(obj, (list, tuple)) else 0


def out_of_space(error: BaseException, path: str, need: int) -> bool:
    """Whether a failed write of `need` bytes at `path` ran out of disk: ENOSPC in the error or what caused
    it (torch.save reports it as a RuntimeError of its zip writer), or less free space than needed."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    with contextlib.suppress(OSError):
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < need
    return False


def remove_stale_tmp(output_dir: str) -> None:
    """Delete the `*.pth.tmp` files a killed save left in `output_dir` (rank 0), and say so."""
    if _is_main() and os.path.isdir(output_dir):
        for name in sorted(n for n in os.listdir(output_dir) if n.endswith(".pth.tmp")):
            os.remove(os.path.join(output_dir, name))
            logger.info("removed %s, left by an interrupted save", os.path.join(output_dir, name))


def load_checkpoint(path: str) -> dict:
    """`torch.load(weights_only=True)` onto the CPU after verifying the file's checksums; errors
    (CheckpointError, ChecksumError) name the file."""
    state = load_checkpoint_file(path)  # checksums verified there
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(state).__name__}")
    return state


def load_resume_state(path: str) -> dict:
    """`load_checkpoint` of a checkpoint that carries a run's training state (`--resume`)."""
    state = load_checkpoint(path)
    if not {"model", "optimizer", "epoch"} <= state.keys():
        raise CheckpointError(f"{path} holds no training state (keys: {', '.join(sorted(map(str, state))[:6])}): "
                              "only checkpoint_last.pth and checkpoint_XX.pth carry it; use --checkpoint to start "
                              "from these weights")
    return state


def rng_state() -> dict:
    """This process's RNG states as tensors and plain lists (loadable with weights_only)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": [version, list(mt), gauss],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}


def restore_rng(rng: list[dict] | dict, rank: int | None = None) -> None:
    """Put back this rank's entry of a checkpoint's `rng`. Call it last, after building the model and
    optimizer, since building draws random numbers."""
    if rank is None:
        rank = tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0
    if isinstance(rng, list):
        if rank >= len(rng):
            logger.warning("checkpoint has RNG states of %d ranks; rank %d keeps its own seed", len(rng), rank)
            return
        rng = rng[rank]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    version, mt, gauss = rng["python"]
    random.setstate((version, tuple(mt), gauss))
    keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def resume_state(model: nn.Module, optimizer: torch.optim.Optimizer, cfg_dict: dict | typing.Any,
                 epoch: int, step: int, step_in_epoch: int, *, steps_per_epoch: int | None = None,
                 samples_per_step: int | None = None) -> dict:
    """The checkpoint dict: the original's layout (`model`, `optimizer`, `lr_scheduler`, `config`,
    `epoch`) plus `step` (optimizer steps done in all), `step_in_epoch` (done in `epoch`), `rng`
    (a list, one entry per rank), `world_size`, and, where given, `steps_per_epoch` and
    `samples_per_step` (over all ranks) so that a run on another number of processes can find its
    place. A ZeroRedundancyOptimizer's state is gathered on rank 0 first: the file holds the whole
    plain AdamW state either way. Collective: every rank calls it, rank 0 then saves."""
    gathered, world_size = [rng_state()], 1
    if tdist.is_available() and tdist.is_initialized():
        world_size = tdist.get_world_size()
        gathered, local = [None] * world_size, gathered[0]
        tdist.all_gather_object(gathered, local)
    if dataclasses.is_dataclass(cfg_dict):
        cfg_dict = dataclasses.asdict(cfg_dict)
    zero = isinstance(optimizer, ZeroRedundancyOptimizer)
    if zero:
        optimizer.consolidate_state_dict(to=0)  # collective
    optim_state = optimizer.state_dict() if not zero or _is_main() else {}  # ZeRO: rank 0 holds it all
    model = model.module if isinstance(model, DDP) else model
    return {"model": model.state_dict(), "optimizer": optim_state,
            "lr_scheduler": {"step": step}, "config": cfg_dict, "epoch": epoch,
            "step": step, "step_in_epoch": step_in_epoch, "rng": gathered, "world_size": world_size,
            "steps_per_epoch": steps_per_epoch, "samples_per_step": samples_per_step}


def resume_position(state: dict, steps_per_epoch: int, samples_per_step: int | None = None) -> tuple[int, int]:
    """(epoch, step_in_epoch) to continue from. A finished epoch, or an original ALBEF checkpoint
    (no `step_in_epoch`), continues with the next epoch. A checkpoint whose steps held another number
    of samples (another world size, batch size or accum_steps) is placed by samples: at the last step
    boundary before the samples it had done, so fewer than `samples_per_step` samples are seen twice."""
    done = state.get("step_in_epoch", steps_per_epoch)
    old = state.get("samples_per_step")
    if old and samples_per_step and old != samples_per_step:
        if done >= (state.get("steps_per_epoch") or done + 1):
            return state["epoch"] + 1, 0
        done = done * old // samples_per_step
    return (state["epoch"] + 1, 0) if done >= steps_per_epoch else (state["epoch"], done)


def resume_training(model: nn.Module, optimizer: torch.optim.Optimizer, path: str, steps_per_epoch: int,
                    samples_per_step: int | None, world_size: int) -> tuple[int, int, float]:
    """Load a resumable checkpoint into `model` and `optimizer`, restore this rank's RNG; returns
    (epoch, step in epoch, best score) to continue from."""
    state = load_resume_state(path)
    load_state_dict_strict(model, adapt_pos_embed(state["model"], model), path)
    optimizer.load_state_dict(state["optimizer"])
    start_epoch, start_step = resume_position(state, steps_per_epoch, samples_per_step)
    if state.get("world_size", world_size) != world_size:
        logger.warning("%s was written by %d processes, resuming on %d: placed by samples done in the epoch "
                       "(%s per step then, %s now)", path, state["world_size"], world_size,
                       state.get("samples_per_step"), samples_per_step)
    if "rng" in state:
        restore_rng(state["rng"])
    logger.info("resuming %s at epoch %d step %d", path, start_epoch, start_step)
    return start_epoch, start_step, state.get("best", float("-inf"))


class Preempted(Exception):
    """A stop signal was handled: training stopped after a step with `checkpoint_last.pth` saved at that
    exact position. `run_main` exits with PREEMPTED_STATUS."""


PREEMPTED_STATUS = 3  # exit status after a handled stop signal: not a failure (1, 2), not done (0)


class StopSignals:
    """SIGTERM, SIGUSR1 (what clusters send before they kill a job) and SIGINT turn into a request to stop
    after the current step, while the context is active (main thread only). A second SIGINT interrupts
    at once. `received()` is the signal to stop on, the same on every rank: with several ranks, one
    all-reduce of a CPU flag on a gloo group (no device sync) at every call, a collective."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signum, self.old, self.group = 0, {}, None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            self.group = tdist.new_group(backend="gloo")  # collective
        return self

    def handle(self, signum: int, frame) -> None:
        if self.signum == signal.SIGINT == signum:
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        logger.warning("received %s: stopping after this step", signal.Signals(signum).name)

    def stop_if_received(self, save: Callable[[], str], where: str) -> None:
        """If a rank received a stop signal: `save()` (returns the checkpoint's path), then Preempted.
        Collective, like `received`."""
        if signum := self.received():
            raise Preempted(f"stopped by {signal.Signals(signum).name} {where}: {save()} holds the position; "
                            "--resume it")

    def received(self) -> int:
        if self.group is None:
            return self.signum
        flag = torch.tensor([self.signum])
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    def __exit__(self, *exc) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)
        if self.group is not None:
            tdist.destroy_process_group(self.group)
