"""Checkpoint files: the checksums stored in them, verified before loading.

`torch.save` writes a zip archive, one member per tensor storage, and the zip format stores the CRC-32 of
every member; `torch.load` never reads them, so flipped bytes inside a tensor load silently. Every
archive checkpoint carries them (ours, and the official ALBEF files), so `verify_checksums` needs no
field of its own in the file and checks old checkpoints too. Legacy (pre-zip) files have none and are
loaded unchecked.
"""

from __future__ import annotations

import os
import zipfile
import zlib

_CHUNK = 1 << 24  # bytes read at a time


class ChecksumError(Exception):
    """A checkpoint whose bytes differ from the checksums stored in it: a corrupted file."""


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
