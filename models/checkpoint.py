"""Checkpoint files: reading them (checksums verified first), and the one path that loads weights into
a model, `load_weights(model, path, convert)`, with a pure `convert_<task>(state_dict)` per task.

`torch.save` writes a zip archive, one member per tensor storage, and the zip format stores the CRC-32 of
every member; `torch.load` never reads them, so flipped bytes inside a tensor load silently. Every
archive checkpoint carries them (ours, and the official ALBEF files), so `verify_checksums` needs no
field of its own in the file and checks old checkpoints too. Legacy (pre-zip) files have none and are
loaded unchecked.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from collections.abc import Callable

import torch
from torch import nn

from models.vit import resize_pos_embed

logger = logging.getLogger(__name__)

_CHUNK = 1 << 24  # bytes read at a time


class ChecksumError(Exception):
    """A checkpoint whose bytes differ from the checksums stored in it: a corrupted file."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, not loadable with weights_only, or of another model or size."""


def verify_checksums(path: str | os.PathLike) -> None:
    """Recompute the CRC-32 of every member of the checkpoint archive at `path` and compare it with the
    one stored when it was written. ChecksumError names the file and the first bad member. Passes
    unchecked: a file that is not a zip archive (legacy format, or not a checkpoint: loading reports
    that) and one written without checksums (torch's `compute_crc32` off: all stored CRCs 0). Cost: one
    read of the file at about 2 GB/s (zlib's CRC-32); `torch.load`'s read then comes from the page cache."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            infos = archive.infolist()
            if all(info.CRC == 0 for info in infos):
                return
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED:
                    archive.testzip()  # not torch's layout: let zipfile decompress and check
                    continue
                f.seek(info.header_offset)
                header = f.read(30)  # the local header: its name and extra lengths place the data
                f.seek(info.header_offset + 30 + int.from_bytes(header[26:28], "little")
                       + int.from_bytes(header[28:30], "little"))
                crc, left = 0, info.file_size
                while left > 0:
                    chunk = f.read(min(_CHUNK, left))
                    if not chunk:
                        raise EOFError(f"{info.filename} ends early")
                    crc, left = zlib.crc32(chunk, crc), left - len(chunk)
                if crc != info.CRC:
                    raise ChecksumError(f"{path}: corrupted: {info.filename} fails its checksum (stored "
                                        f"{info.CRC:08x}, computed {crc:08x}); use another copy of the file")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        raise ChecksumError(f"{path}: corrupted archive: {e}") from e


def load_checkpoint_file(path: str) -> dict:
    """`torch.load` that never unpickles arbitrary objects, after checking the file's stored checksums
    (flipped bytes inside a tensor would load silently); errors name the file."""
    if os.path.isfile(path):
        verify_checksums(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a loadable checkpoint (weights_only): {type(e).__name__}: {e}") from e


def read_state_dict(source: str | dict) -> dict:
    """The state dict of a checkpoint file or of one already in memory: `{'model': state_dict, ...}` (ours,
    the official ALBEF files) unwrapped, a bare state dict as it is."""
    ckpt = load_checkpoint_file(source) if isinstance(source, str) else source
    sd = ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt
    if not isinstance(sd, dict):
        raise CheckpointError(f"{source}: expected a state dict or {{'model': state_dict}}")
    return sd


def is_pretraining(state_dict: dict) -> bool:
    """A Pretrain.py checkpoint: its text encoder is a masked LM, so its keys read `text_encoder.bert.*`
    (every task model keeps the bare encoder, `text_encoder.*`)."""
    return any(k.startswith("text_encoder.bert.") for k in state_dict)


def load_state_dict_strict(model: nn.Module, state_dict: dict, source: str) -> None:
    """`load_state_dict(strict=True)` whose error lists missing, unexpected and mis-shaped keys at once."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def head(xs):
            return "; ".join(xs[:10]) + (f"; ... ({len(xs)} in all)" if len(xs) > 10 else "")
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: "
            f"missing {len(missing)} [{head(missing)}], unexpected {len(unexpected)} [{head(unexpected)}], "
            f"shape mismatches {len(shapes)} [{head(shapes)}]"
        )
    model.load_state_dict(state_dict, strict=True)


def adapt_pos_embed(state_dict: dict, model: nn.Module) -> dict:
    """Resize `visual_encoder(_m).pos_embed` in a state dict to the model's image resolution."""
    sd = dict(state_dict)
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key in sd and hasattr(model, key.split(".")[0]):
            vit = getattr(model, key.split(".")[0])
            sd[key] = resize_pos_embed(sd[key], vit.patch_embed.num_patches)
    return sd


def load_weights(model: nn.Module, source: str | dict, convert: Callable[[dict], dict] | None = None, *,
                 may_be_missing: Callable[[str], bool] | None = None, reinit_mismatched: bool = False,
                 name: str | None = None) -> dict[str, list[str]]:
    """Load a checkpoint (a file, or a checkpoint or state dict in memory) into `model`: the state dict
    unwrapped, `convert(state_dict)` (the task's key conversion) applied, `pos_embed` resized to the
    model's resolution, then a strict load. Every script and task loads its weights here.

    Lenient, for a checkpoint of another task (pretraining -> task), when either is given:
    `may_be_missing(key)` names weights the checkpoint may lack (a new head, momentum twins);
    `reinit_mismatched` lets weights of another shape keep the model's values too. Keys the model lacks
    are then dropped. Returns {"missing": kept at the model's values, "unused": dropped}.
    """
    name = name or (source if isinstance(source, str) else "state dict")
    sd = read_state_dict(source)
    sd = adapt_pos_embed(convert(sd) if convert else sd, model)
    if may_be_missing is None and not reinit_mismatched:
        load_state_dict_strict(model, sd, name)
        return {"missing": [], "unused": []}
    own = model.state_dict()
    fits = {k for k in sd if k in own and (not reinit_mismatched or sd[k].shape == own[k].shape)}
    missing, unused = [k for k in own if k not in fits], sorted(k for k in sd if k not in own)
    required = [k for k in missing if k not in sd and not (may_be_missing and may_be_missing(k))]
    if required:
        more = f"; ... ({len(required)} in all)" if len(required) > 10 else ""
        raise CheckpointError(f"{name} does not fit {type(model).__name__}: it lacks "
                              f"{len(required)} weights [{'; '.join(required[:10])}{more}]")
    load_state_dict_strict(model, {k: sd[k] for k in fits} | {k: own[k] for k in missing}, name)
    logger.info("loaded %s: %d tensors; left at their initial values: %s; unused: %d keys", name, len(fits),
                sorted({k.split(".")[0] for k in missing}), len(unused))
    if reshaped := [k for k in missing if k in sd]:
        logger.warning("shapes differ, kept the model's initialisation: %s", reshaped)
    return {"missing": missing, "unused": unused}
