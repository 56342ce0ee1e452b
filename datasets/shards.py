"""Pretraining data as WebDataset tar shards, img2dataset's layout: `000000.tar` holding `key.jpg` (or
.png, .webp, ...) with `key.txt` (the caption) and/or `key.json` (its `"caption"`: str | [str]).

The format side of streaming: which shards a pattern names, how shards are read (through the
`webdataset` package, so local paths, URLs and `pipe:` commands all work), how a sample becomes
(image tensor, caption) with the same transform and `pre_caption` as the JSON path, and how an ALBEF
JSON list is written as shards (scripts/json_to_shards.py). The training order (shards per (seed,
epoch), split over ranks and workers, a fixed sample count per epoch, resume) is the engine's
`datasets.loaders.ResumableStream`, the streaming counterpart of the map-style loader.

Bad data never stops a run midway: a shard that cannot be opened or is truncated, a member that does
not decode and a sample without an image or a caption are skipped, counted and named (shard and key)
in a warning. What cannot be skipped fails at once with the shard named: a pattern that names nothing,
a missing local shard, shards with no samples at all.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import webdataset as wds
from PIL import Image

from datasets.base import (
    AnnotationError,
    Annotations,
    ImageLoadError,
    PathLike,
    image_path,
)
from datasets.text import pre_caption

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")  # the member types read as the image, first found wins


class ShardError(Exception):
    """Shards that cannot be trained on: a pattern naming nothing, a missing local shard, no samples."""


class CorruptSample(Exception):
    """One sample that cannot be used; the message names its shard and key. Skipped and counted."""


def _local_path(url: str) -> str | None:
    """The file of a local shard (a plain path or file:), None for URLs and pipe: commands."""
    if url.startswith("file:"):
        return url[len("file:"):]
    return None if "://" in url or url.startswith("pipe:") else url


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """The shards `spec` names, in order: webdataset's brace syntax (`dir/{000000..000123}.tar`), `::`
    joining several patterns, or a list of patterns. Local shards must exist (the error lists the
    missing ones); URLs and `pipe:` commands are checked when read."""
    urls: list[str] = []
    for pattern in [spec] if isinstance(spec, str) else spec:
        urls += wds.shardlists.expand_urls(pattern)
    if not urls:
        raise ShardError(f"train_shards {spec!r} names no shard")
    missing = [u for u in urls if (path := _local_path(u)) is not None and not os.path.isfile(path)]
    if missing:
        more = f", ... ({len(missing)} in all)" if len(missing) > 5 else ""
        raise ShardError(f"{len(missing)} of the {len(urls)} shards of {spec!r} not found: "
                         f"{', '.join(missing[:5])}{more}")
    return urls


class PretrainShards:
    """Image-caption pairs in shards: reading (tolerant of bad data) and decoding (as PretrainDataset).

    `num_corrupt` counts the samples this process skipped (each DataLoader worker counts its own; every
    skip is also a warning naming shard and key, with that process's running count).
    """

    def __init__(self, shards: str | Sequence[str], transform: Callable, max_words: int = 30,
                 shuffle_buffer: int = 1000):
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.urls = expand_shards(shards)
        self.transform, self.max_words, self.shuffle_buffer = transform, max_words, shuffle_buffer
        self.num_corrupt = 0

    WARNINGS = 10  # skips logged per process; the rest are counted only (the engine logs each epoch's total)

    def skip(self, message: str) -> None:
        self.num_corrupt += 1
        if self.num_corrupt <= self.WARNINGS:
            more = "; further skips are counted, not logged" if self.num_corrupt == self.WARNINGS else ""
            logger.warning("skipping corrupt data (%d so far in this process): %s%s", self.num_corrupt, message, more)

    def _handler(self, exn: Exception) -> bool:
        """webdataset's error hook: a shard that fails to open or read on is skipped from there on."""
        text = " ".join(map(str, exn.args))  # webdataset appends the url, or the open file's name
        shard = next((u for u in self.urls if u in exn.args), None) or next((u for u in self.urls if u in text), "?")
        first = str(exn.args[0]) if exn.args else ""
        self.skip(f"shard {shard}: {type(exn).__name__}: {first}")
        return True  # continue with the next member or shard

    def samples(self, urls: Iterable[str], rng: random.Random) -> Iterator[dict]:
        """Raw samples `{"__key__", "__url__", ext: bytes, ...}` of `urls` read in order, shuffled in a
        buffer of `shuffle_buffer` samples drawn with `rng` (0: stream order)."""
        stream = wds.tarfile_to_samples(handler=self._handler)(dict(url=u) for u in urls)
        if self.shuffle_buffer > 1:
            # initial = bufsize: the buffer fills before the first draw (webdataset's default, 100, is less random)
            stream = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(stream)
        return stream

    def decode(self, sample: dict) -> tuple[torch.Tensor, str]:
        """(transformed image, pre_caption'd caption); CorruptSample naming shard and key otherwise.
        A caption list gives one caption drawn with Python's `random` (ALBEF parity, as the JSON path)."""
        where = f"shard {sample.get('__url__')} key {sample.get('__key__')}"
        members = sorted(k for k in sample if not k.startswith("__"))
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise CorruptSample(f"{where}: no image member (has {members})")
        caption = None
        try:
            if "json" in sample:
                caption = json.loads(sample["json"]).get("caption")
            if caption is None and "txt" in sample:
                caption = sample["txt"].decode("utf-8")
        except (ValueError, AttributeError) as e:  # bad JSON or UTF-8, JSON that is not an object
            raise CorruptSample(f"{where}: unreadable caption: {type(e).__name__}: {e}") from e
        if isinstance(caption, list):
            caption = random.choice(caption) if caption else None
        if not isinstance(caption, str):
            raise CorruptSample(f"{where}: no caption (members {members})")
        try:
            with Image.open(io.BytesIO(sample[ext])) as img:
                image = img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for broken files
            raise CorruptSample(f"{where}: cannot decode {sample['__key__']}.{ext}: {type(e).__name__}: {e}") from e
        return self.transform(image), pre_caption(caption, self.max_words)


def write_shards(ann_files: PathLike | Sequence[PathLike], out_dir: PathLike, image_root: PathLike | None = None,
                 shard_size: int = 1000) -> tuple[list[str], int]:
    """Write the entries of ALBEF JSON lists as shards `out_dir/000000.tar`, ...: key `%09d` (the entry's
    position), the image file's bytes as they are (`key.jpg`, `key.png`, ...), `key.json` (the entry:
    `image`, `caption` str or list, any other fields) and `key.txt` (the caption, the first of a list,
    as img2dataset writes it). Returns (shard paths, samples). A missing image is an error naming the entry."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    ann = Annotations(ann_files)
    if not len(ann):
        raise AnnotationError(f"no entries in {ann.files}")
    os.makedirs(out_dir, exist_ok=True)
    paths: list[str] = []
    writer = None
    for i in range(len(ann)):
        if i % shard_size == 0:
            if writer is not None:
                writer.close()
            paths.append(os.path.join(os.fspath(out_dir), f"{len(paths):06d}.tar"))
            writer = wds.TarWriter(paths[-1], mtime=0)  # fixed: same bytes each time; int: no pax headers
        path = image_path(image_root, ann.field(i, "image"))
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise AnnotationError(f"{ann.where(i)}: image {path} is not one of {', '.join(IMAGE_EXTS)}")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageLoadError(f"cannot read image {path} (annotation {ann.where(i)}): {e}") from e
        caption = ann.field(i, "caption")
        first = caption[0] if isinstance(caption, list) and caption else caption
        writer.write({"__key__": f"{i:09d}", ext: data, "json": dict(ann[i]), "txt": str(first)})
    writer.close()
    return paths, len(ann)
