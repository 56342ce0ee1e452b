"""Training metrics: smoothed host-side series and the per-step logger that reads device values back
once per progress line."""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections import deque

import numpy as np
import torch
import torch.distributed as tdist

logger = logging.getLogger(__name__)


class SmoothedValue:
    """Median over a window and the global average of a host-side series."""

    def __init__(self, window_size: int = 50, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.window, self.total, self.count, self.fmt = deque(maxlen=window_size), 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.total, self.count = self.total + value * n, self.count + n

    @property
    def global_avg(self) -> float:
        return self.total / max(1, self.count)

    def __str__(self) -> str:
        median, last = (float(np.median(self.window)), self.window[-1]) if self.window else (math.nan, math.nan)
        return self.fmt.format(median=median, global_avg=self.global_avg, value=last)


class MetricLogger:
    """Named SmoothedValues fed with one dict per step. Tensors stay on device until `flush()` reads all
    of them back in one transfer (at print time: no GPU sync inside a step); the buffered per-step
    values then go to TensorBoard at their own global step."""

    def __init__(self, window_size: int = 50, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = {}
        self.window_size, self.delimiter = window_size, delimiter
        self.pending: list[tuple[int, dict[str, float], list[str], torch.Tensor]] = []

    def update(self, step: int, **values: torch.Tensor | float) -> None:
        tensors = {k: v.detach().float().reshape(()) for k, v in values.items() if isinstance(v, torch.Tensor)}
        floats = {k: float(v) for k, v in values.items() if k not in tensors}
        self.pending.append((step, floats, list(tensors), torch.stack(list(tensors.values())) if tensors else None))

    def flush(self, tb=None) -> list[tuple[int, dict[str, float]]]:
        """Read the buffered values back (one transfer) into the meters and TensorBoard; returns them,
        (step, {name: value}) per step."""
        rows = [r for *_, r in self.pending if r is not None]
        flat = iter(torch.cat([r.to(rows[0].device) for r in rows]).tolist() if rows else [])  # the one sync
        flushed = []
        for step, floats, keys, _ in self.pending:
            values = floats | dict(zip(keys, flat))  # zip stops at the end of keys: flat stays aligned
            flushed.append((step, values))
            for k, v in values.items():
                if k not in self.meters:
                    fmt = "{value:.6f}" if k == "lr" else "{median:.4f} ({global_avg:.4f})"
                    self.meters[k] = SmoothedValue(self.window_size, fmt)
                self.meters[k].update(v)
                if tb is not None:
                    tb.add_scalar(f"train/{k}", v, step)
        self.pending.clear()
        return flushed

    def synchronize(self, device: torch.device) -> None:
        """Sum counts and totals over ranks (collective; the windows stay local)."""
        if tdist.is_available() and tdist.is_initialized():
            names = sorted(self.meters)
            t = torch.tensor([[self.meters[k].count, self.meters[k].total] for k in names], dtype=torch.float64)
            t = t.to(device)
            tdist.all_reduce(t)
            for k, (count, total) in zip(names, t.tolist()):
                self.meters[k].count, self.meters[k].total = int(count), total

    def log_progress(self, epoch: int, i: int, steps_per_epoch: int, per_step: float, data_time: SmoothedValue) -> None:
        """The progress line after step `i` of `epoch`: eta, every meter, seconds per step and waiting for data."""
        eta = datetime.timedelta(seconds=int(per_step * (steps_per_epoch - i - 1)))
        parts = [f"Train Epoch: [{epoch}]", f"[{i:>{len(str(steps_per_epoch))}}/{steps_per_epoch}]", f"eta: {eta}",
                 str(self), f"time: {per_step:.4f}", f"data: {data_time.global_avg:.4f}"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
        logger.info(self.delimiter.join(parts))

    def global_avg(self) -> dict[str, float]:
        return {k: m.global_avg for k, m in self.meters.items()}

    def __str__(self) -> str:
        return self.delimiter.join(f"{k}: {m}" for k, m in self.meters.items())


def timed(batches, meter: SmoothedValue):
    """`batches`, recording in `meter` the host time spent waiting for each."""
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        meter.update(time.perf_counter() - t0)
        yield batch
