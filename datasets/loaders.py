"""How samples reach the model: resumable, reproducible loaders for map-style datasets (JSON lists) and
for WebDataset shards.

A sample's augmentation and a batch's contents are pure functions of (seed, epoch, position), never of
the worker count, the global RNG or the resume point, so a resumed run sees the batches the
uninterrupted one would have. `utils.train_one_epoch` drives both loader kinds through `set_epoch`,
`set_start` and `num_batches` (see `loader_position`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    Sampler,
    default_collate,
)

from datasets.base import FAILURES_BEFORE_GIVING_UP
from datasets.shards import CorruptSample, ShardError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits (`utils.init_distributed` fills it in). World size 1 has no process group
    and runs the same code. Defined here, the lowest layer that needs it, so the loaders need no engine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _place(dist: DistInfo | None) -> tuple[int, int, bool]:
    """(rank, world size, pin memory for CUDA) of a DistInfo; one CPU process without one."""
    return (dist.rank, dist.world_size, dist.device.type == "cuda") if dist is not None else (0, 1, False)


def mix_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of `parts`, the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch (CPU), `random` and numpy seeded from `seed`, then put their states back,
    so the training RNG stream (dropout, MLM masks) never depends on data loading."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class EpochPosition:
    """Where a loader stands: `epoch`, and `start`, the first batch of this epoch still to come (mid-epoch
    resume) out of `num_batches`. `train_one_epoch` sets both; `len()` counts the batches to come."""

    epoch: int = 0
    start: int = 0
    num_batches: int

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, batch_index: int) -> None:
        if not 0 <= batch_index <= self.num_batches:
            raise ValueError(f"start batch {batch_index} outside an epoch of {self.num_batches} batches")
        self.start = batch_index

    def __len__(self) -> int:
        return self.num_batches - self.start


class ResumableBatchSampler(EpochPosition, Sampler):
    """Per-rank batches of `(epoch, index)` keys.

    The order is a permutation seeded by (seed, epoch), split across ranks like `DistributedSampler`
    (padded by wrapping, or truncated with `drop_last`), so every rank yields the same number of
    batches. `set_start(b)` skips the first `b` batches without loading them (mid-epoch resume);
    `len()` counts the batches still to come, `num_batches` the whole epoch.
    """

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True, seed: int = 0):
        if batch_size < 1 or num_samples < 1:
            raise ValueError(f"need batch_size >= 1 and samples >= 1, got {batch_size} and {num_samples}")
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.shuffle, self.seed, self.epoch, self.start = shuffle, seed, 0, 0
        div = (lambda a, b: a // b) if drop_last else (lambda a, b: -(-a // b))
        self.per_rank = div(num_samples, world_size)
        self.num_batches = div(self.per_rank, batch_size)

    def rank_indices(self) -> list[int]:
        n, total = self.num_samples, self.per_rank * self.world_size
        order = list(range(n))
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))).tolist()
        order += (order * math.ceil(max(0, total - n) / n))[: max(0, total - n)]
        return order[self.rank:total:self.world_size]

    def __iter__(self):
        idx, bs = self.rank_indices(), self.batch_size
        for b in range(self.start, self.num_batches):
            yield [(self.epoch, i) for i in idx[b * bs:(b + 1) * bs]]


class SeededDataset(Dataset):
    """`dataset[index]` with every RNG seeded from (seed, epoch, index): augmentation is a pure function
    of the sample's key, whatever the worker count or resume point. Attributes of the inner dataset
    (annotations for evaluation) are reachable through the wrapper."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        before = getattr(self.dataset, "num_skipped", 0)
        with seeded(mix_seed(self.seed, "sample", *key)):
            sample = self.dataset[key[1]]
        return key, sample, getattr(self.dataset, "num_skipped", 0) - before

    def __getattr__(self, name: str):
        if name in ("dataset", "seed") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SeededCollate:
    """The dataset's collate of (key, sample, samples skipped to make it) items, seeded from the batch's
    keys, which it then drops; the skips go into the batch (`with_skipped`)."""

    def __init__(self, collate_fn: Callable | None, seed: int):
        self.collate_fn, self.seed = collate_fn or default_collate, seed

    def __call__(self, items: list):
        with seeded(mix_seed(self.seed, "collate", tuple(item[0] for item in items))):
            batch = self.collate_fn([item[1] for item in items])
        return with_skipped(batch, sum(item[2] for item in items))


# The batch key under which a loader reports the samples it skipped (unreadable) to make that batch:
# the one way a count leaves a DataLoader worker. Only present when not 0; the engine pops it, sums it
# over the epoch and over ranks, and logs it (`train_skipped` in log.txt).
SKIPPED = "num_skipped"


def with_skipped(batch, skipped: int):
    """`batch` with `batch[SKIPPED] = skipped` when samples were skipped (dict batches)."""
    if skipped and isinstance(batch, dict):
        batch[SKIPPED] = skipped
    return batch


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's init: SIGTERM, SIGUSR1 and SIGINT are the main process's to handle (it stops
    after its step and shuts the workers down); a signal sent to the whole process group, as clusters and
    Ctrl-C do, would otherwise kill the workers mid-batch and the main process with them."""
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def build_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, drop_last: bool,
                 collate_fn: Callable | None = None, num_workers: int = 4, dist: DistInfo | None = None,
                 seed: int = 0) -> DataLoader:
    """This rank's loader; its batches and augmentations depend only on (seed, epoch, position).
    `train_one_epoch` sets its epoch and start batch (`loader.batch_sampler`)."""
    rank, world_size, cuda = _place(dist)
    sampler = ResumableBatchSampler(len(dataset), batch_size, rank=rank, world_size=world_size,
                                    shuffle=shuffle, drop_last=drop_last, seed=seed)
    return DataLoader(SeededDataset(dataset, seed), batch_sampler=sampler, collate_fn=SeededCollate(collate_fn, seed),
                      num_workers=num_workers, pin_memory=cuda, persistent_workers=num_workers > 0,
                      worker_init_fn=ignore_stop_signals,
                      generator=torch.Generator().manual_seed(seed))  # the workers' base seed: not the global RNG


class ResumableStream(EpochPosition, IterableDataset):
    """Per-rank batches read from shards, the streaming counterpart of ResumableBatchSampler +
    SeededDataset, driven by `train_one_epoch` through the same set_epoch / set_start / num_batches.
    `source` has `urls`, `samples(urls, rng)` (raw samples in read order through a shuffle buffer) and
    `decode(sample)` (raising CorruptSample): datasets.shards.PretrainShards.

    Readers: worker w of rank r's DataLoader (w = 0 without workers) is reader g = r * W + w of
    G = world_size * W. Each epoch the shard list is permuted by (seed, epoch); reader g reads shards
    g, g + G, ... (so ranks and workers read disjoint shards) through a buffer shuffled by (seed, epoch,
    g), and reads them again in a new order if its share runs out before the epoch ends. An epoch is
    `samples_per_epoch` samples over all ranks: every rank yields num_batches = samples_per_epoch //
    (world_size * batch_size) batches, batch b made by worker b % W (the DataLoader's round robin), so
    ranks step in lockstep whatever their shards hold. Decoding and collate are seeded by (seed, epoch,
    shard, key): a sample's augmentation depends neither on the worker count nor on the resume point.

    `set_start(b)` (resume): each reader first drops, without decoding, the samples it put in batches
    before b, and the workers' roles rotate so that the loader's first batch is batch b. With the same
    world size and workers this replays the uninterrupted stream exactly, but for corrupt samples met
    before the stop: they were skipped after decoding, so dropping by count drops that many too few
    and repeats as many samples. With another world size or worker count the shards are dealt anew; each reader
    drops its share of the samples done, which covers the same start of the epoch's shard order up to
    about one shard and one shuffle buffer per reader.
    """

    def __init__(self, source, batch_size: int, *, samples_per_epoch: int, collate_fn: Callable | None = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"need batch_size >= 1, got {batch_size}")
        self.num_batches = samples_per_epoch // (world_size * batch_size)
        if self.num_batches < 1:
            raise ValueError(f"{samples_per_epoch} samples per epoch make no batch of {batch_size} "
                             f"on {world_size} ranks")
        self.source, self.batch_size, self.rank, self.world_size = source, batch_size, rank, world_size
        self.collate, self.seed, self.epoch, self.start = SeededCollate(collate_fn, seed), seed, 0, 0

    def epoch_shards(self) -> list[str]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, "shards", self.epoch))
        return [self.source.urls[i] for i in torch.randperm(len(self.source.urls), generator=g).tolist()]

    def _read(self, reader: int, readers: int, passes: list[int]):
        """The reader's raw samples, its shards read again (re-ordered) for as long as needed."""
        shards = self.epoch_shards()[reader::readers]
        if not shards:
            raise ShardError(f"{len(self.source.urls)} shards for {readers} readers (ranks x workers): "
                             "write smaller shards or use fewer workers")
        for p in itertools.count():
            rng = random.Random(mix_seed(self.seed, "reader", self.epoch, reader, p))
            order = shards if p == 0 else rng.sample(shards, len(shards))
            passes[0], n = p, 0
            for n, sample in enumerate(self.source.samples(order, rng), 1):
                yield sample
            if n == 0:
                raise ShardError(f"no samples in shards {', '.join(order[:5])}{', ...' * (len(order) > 5)}")
            if p == 0:
                logger.info("rank %d reader %d: its %d shards hold fewer samples than its part of epoch %d; "
                            "reading them again", self.rank, reader, len(shards), self.epoch)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        role = (worker + self.start) % workers  # the loader's first batch is batch `start`
        reader, passes, corrupt = self.rank * workers + role, [0], self.source.num_corrupt
        samples = self._read(reader, self.world_size * workers, passes)
        done = len(range(role, self.start, workers))
        for _ in itertools.islice(samples, done * self.batch_size):
            pass  # read, not decoded
        good, first_pass = 0, passes[0]
        for _ in range(role + done * workers, self.num_batches, workers):
            items, before = [], self.source.num_corrupt
            while len(items) < self.batch_size:
                sample = next(samples)
                key = (self.epoch, os.path.basename(sample["__url__"]), sample["__key__"])
                try:
                    with seeded(mix_seed(self.seed, "sample", *key)):
                        items.append((key, self.source.decode(sample), 0))
                    good += 1
                except CorruptSample as e:
                    self.source.skip(str(e))
                    bad = self.source.num_corrupt - corrupt
                    if not good and (passes[0] > first_pass + 1 or bad >= FAILURES_BEFORE_GIVING_UP):
                        raise ShardError(f"rank {self.rank} reader {reader}: no usable sample in its shards "
                                         f"({bad} corrupt in a row; the last: {e})") from e
            yield with_skipped(self.collate(items), self.source.num_corrupt - before)
        if self.source.num_corrupt > corrupt:
            logger.warning("rank %d reader %d skipped %d corrupt samples in epoch %d", self.rank, reader,
                           self.source.num_corrupt - corrupt, self.epoch)


def build_stream_loader(source, batch_size: int, *, samples_per_epoch: int, collate_fn: Callable | None = None,
                        num_workers: int = 4, dist: DistInfo | None = None, seed: int = 0) -> DataLoader:
    """This rank's loader over shards (see ResumableStream). Its workers start anew each epoch (not
    persistent): they read the epoch and start batch that `train_one_epoch` sets."""
    rank, world_size, cuda = _place(dist)
    readers = world_size * max(1, num_workers)
    if len(source.urls) < readers:
        raise ShardError(f"{len(source.urls)} shards for {readers} readers ({world_size} ranks x "
                         f"{max(1, num_workers)} workers): each needs a shard; write smaller shards or use "
                         "fewer workers")
    stream = ResumableStream(source, batch_size, samples_per_epoch=samples_per_epoch, collate_fn=collate_fn,
                             rank=rank, world_size=world_size, seed=seed)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=cuda,
                      worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(seed))  # not the global RNG (dropout, MLM masks)


def loader_position(loader: DataLoader):
    """What holds a loader's epoch and start batch: its ResumableBatchSampler or its ResumableStream
    (None for other loaders)."""
    return next((obj for obj in (loader.batch_sampler, loader.dataset) if hasattr(obj, "set_start")), None)
