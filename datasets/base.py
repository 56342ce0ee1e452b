"""Annotation files and images, with errors that say which file and which entry is at fault.

ALBEF annotation files are JSON lists of dicts (`{"image": ..., "caption": ...}` and task fields);
a data set may concatenate several. A bad file or image deep into an epoch should name itself.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from collections.abc import Sequence

from PIL import Image, ImageFile

# Not the original: it loads truncated files (common in web-crawled sets), which then train silently as
# half-grey images. Here a truncated or undecodable file fails in `open_image`'s full decode (no extra
# pass: `convert` decodes every byte anyway), and `skip_bad_images` can skip and count it.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# ALBEF parity: PIL's decompression-bomb limit is lifted for very large images.
Image.MAX_IMAGE_PIXELS = None

# Text fields of every task's annotations: a string (or, for captions and answers, a list of strings).
TEXT_KEYS = ("caption", "sentence", "question", "text", "answer")
# A run whose first this-many images in a row all fail to load stops (a wrong image_root, not bad files).
FAILURES_BEFORE_GIVING_UP = 100

PathLike = str | os.PathLike
# A config's data-file key (train_file, test_file, answer_list, det_file, ...): one path, or a list of
# paths read one after the other, whichever the user writes (the original's files use both).
DataFiles = str | list[str]


class AnnotationError(Exception):
    """A missing or malformed annotation file or entry; the message names the file (and entry)."""


class ImageLoadError(Exception):
    """An image that cannot be read; the message names the image file and the annotation entry."""


class Annotations:
    """The entries of one or several annotation files, concatenated in order.

    `entries[i]` is the i-th dict; `where(i)` says which file and which position in that file it came
    from (kept as per-file offsets, not per entry, so millions of entries cost nothing extra).
    """

    def __init__(self, ann_files: PathLike | Sequence[PathLike]):
        files = file_list(ann_files)
        if not files:
            raise AnnotationError("no annotation file given")
        self.entries: list[dict] = []
        self.files: list[str] = []
        self._starts: list[int] = []
        for path in files:
            self._starts.append(len(self.entries))
            self.files.append(os.fspath(path))
            self.entries += read_annotation_file(path)
        if not self.entries:
            raise AnnotationError(f"no entries in {', '.join(self.files)}: an annotation file must list at least "
                                  "one entry")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        return self.entries[index]

    def where(self, index: int) -> str:
        """"<file> entry <k>" for global index `index` (k counts from 0 within that file)."""
        f = bisect_right(self._starts, index) - 1
        return f"{self.files[f]} entry {index - self._starts[f]}"

    def field(self, index: int, key: str):
        """`entries[index][key]`, or an AnnotationError naming the entry when the key is missing."""
        entry = self.entries[index]
        if key not in entry:
            raise AnnotationError(f"{self.where(index)}: missing key {key!r} (has {sorted(entry)})")
        return entry[key]


def file_list(files: PathLike | Sequence[PathLike]) -> list[PathLike]:
    """One path or several, as a list."""
    return [files] if isinstance(files, (str, os.PathLike)) else list(files)


def read_annotation_file(path: PathLike) -> list[dict]:
    """The list of dicts in one JSON file; errors name the file (and line/column for bad JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise AnnotationError(f"annotation file not found: {os.fspath(path)}") from e
    except json.JSONDecodeError as e:
        where = f"{os.fspath(path)} at line {e.lineno}, column {e.colno}"
        raise AnnotationError(f"malformed JSON in annotation file {where}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise AnnotationError(f"annotation file {os.fspath(path)} is not UTF-8 text: {e}") from e
    if not isinstance(data, list):
        found = type(data).__name__
        raise AnnotationError(f"annotation file {os.fspath(path)} must hold a JSON list, found {found}")
    for k, entry in enumerate(data):
        if not isinstance(entry, dict):
            found = type(entry).__name__
            raise AnnotationError(f"{os.fspath(path)} entry {k}: expected an object, found {found}")
        for key in TEXT_KEYS:
            value = entry.get(key, "")
            if not (isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise AnnotationError(f"{os.fspath(path)} entry {k}: {key!r} must be text (a string or a list of "
                                      f"strings), got {type(value).__name__} {value!r:.60}")
    return data


def image_path(image_root: PathLike | None, image: str) -> str:
    """The annotation's `image` joined to `image_root` (absolute paths, or no root, stay as they are)."""
    return os.path.join(image_root, image) if image_root else image


def open_image(path: PathLike, where: str | None = None) -> Image.Image:
    """The image at `path` as RGB; missing or unreadable files raise ImageLoadError naming the file
    and `where` (the annotation entry, see `Annotations.where`)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for broken files
        entry = f" (annotation {where})" if where else ""
        raise ImageLoadError(f"cannot load image {os.fspath(path)}{entry}: {type(e).__name__}: {e}") from e


class LabelledDataset:
    """Annotations whose entries carry a `label` out of `LABELS` (NLVR, VE): the file(s), the transform, the
    image root and the caption length every such dataset keeps, and the label's class id."""

    LABELS: dict[str, int] = {}

    def __init__(self, ann_files: PathLike | Sequence[PathLike], transform, image_root: PathLike | None = None,
                 max_words: int = 30):
        self.ann = Annotations(ann_files)
        self.transform, self.image_root, self.max_words = transform, image_root, max_words

    def __len__(self) -> int:
        return len(self.ann)

    def label(self, index: int) -> int:
        value = self.ann.field(index, "label")
        if value not in self.LABELS:
            raise AnnotationError(f"{self.ann.where(index)}: label must be one of {sorted(self.LABELS)}, got {value!r}")
        return self.LABELS[value]
