"""Weakly supervised grounding data (RefCOCO+, the original's format) and its metric.

Expression files are JSON lists of `{"image": path, "text": expression, "ref_id": int}`. Training uses
image and text only (ITM fine-tuning, no boxes); pairs of one image file share an `idx`, so they are
each other's positives. Evaluation reads, as the original's `refTools.REFER` and `grounding_eval`:
- `<refcoco_data>/<dataset>/refs(<split_by>).p` (the official pickle; a `.json` twin is read first when
  present) -> each ref's `image_id`, `split` (val / testA / testB) and `ann_id`;
- `<refcoco_data>/<dataset>/instances.json` -> the annotation box of each ref and the image sizes;
- `det_file` -> `{str(image_id): [[x, y, w, h, ...], ...]}` detector proposals.
Boxes are [x, y, w, h] in pixels of the original image. A ref is found when the proposal with the best
heat-map score has IoU >= 0.5 with its annotation box.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from datasets.base import AnnotationError, Annotations, PathLike, file_list, image_path, open_image
from datasets.text import collate_image_text, pre_caption

SPLITS = ("val", "testA", "testB")


class GroundingDataset(torch.utils.data.Dataset):
    """Expressions of one or several files. Training samples are (image, text, idx) with `idx` numbering
    the distinct image file names (the original keys images by the last path component); evaluation
    samples are (image, text, ref_id)."""

    def __init__(self, ann_files, transform, image_root: str = "", max_words: int = 30, train: bool = True):
        self.ann = Annotations(ann_files)
        self.transform, self.image_root, self.max_words, self.train = transform, image_root, max_words, train
        self.img_ids: dict[str, int] = {}
        for i in range(len(self.ann)):
            self.field(i, "text")
            if train:
                self.img_ids.setdefault(self.field(i, "image").split("/")[-1], len(self.img_ids))
            else:
                self.field(i, "ref_id")

    def field(self, index: int, key: str):
        return self.ann.field(index, key)

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        path = image_path(self.image_root, self.field(index, "image"))
        image = self.transform(open_image(path, where=self.ann.where(index)))
        text = pre_caption(self.field(index, "text"), self.max_words)
        key = self.img_ids[self.field(index, "image").split("/")[-1]] if self.train else self.field(index, "ref_id")
        return image, text, int(key)


def collate_grounding_eval(tokenizer):
    """Evaluation batches {"image", "input_ids", "attention_mask", "ref_id"}, padded to the longest text
    without truncation (Grounding.py's evaluation call). Training uses `collate_retrieval`."""
    return functools.partial(collate_image_text, tokenizer=tokenizer, setting="longest", key="ref_id")


# --------------------------------------------------------------------------------- reference data


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only: a pickle naming any class or function fails."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refuses to load {module}.{name}: only plain data is accepted")


def read_refs(path: Path) -> list[dict]:
    """The refs list of `refs(<split_by>).json`, or of the official `.p` pickle (plain data only)."""
    json_path = path.with_suffix(".json")
    try:
        if json_path.is_file():
            with open(json_path) as f:
                return json.load(f)
        with open(path, "rb") as f:
            return _PlainDataUnpickler(io.BytesIO(f.read())).load()
    except FileNotFoundError:
        raise AnnotationError(f"refs file not found: {path} (nor {json_path.name})") from None
    except (pickle.UnpicklingError, json.JSONDecodeError, EOFError, ValueError) as e:
        raise AnnotationError(f"cannot read refs file {json_path if json_path.is_file() else path}: {e}") from e


@dataclass
class ReferIndex:
    """What the metric needs of REFER: per ref, its image, split and annotated box; per image, its size."""

    refs: dict[int, dict]  # ref_id -> {"image_id", "split", "ann_id", ...}
    boxes: dict[int, list[float]]  # ref_id -> annotation box [x, y, w, h]
    sizes: dict[int, tuple[int, int]]  # image_id -> (height, width)


def load_refer(data_root: str, dataset: str = "refcoco+", split_by: str = "unc") -> ReferIndex:
    """`REFER(data_root, dataset, split_by)`'s indices, from its two files (errors name them)."""
    folder = Path(data_root) / dataset
    refs = read_refs(folder / f"refs({split_by}).p")
    instances_path = folder / "instances.json"
    try:
        with open(instances_path) as f:
            instances = json.load(f)
        anns = {a["id"]: a for a in instances["annotations"]}
        sizes = {im["id"]: (int(im["height"]), int(im["width"])) for im in instances["images"]}
    except FileNotFoundError:
        raise AnnotationError(f"instances file not found: {instances_path}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise AnnotationError(f"{instances_path}: not a COCO instances file ({type(e).__name__}: {e})") from e
    by_id, boxes = {}, {}
    for ref in refs:
        if ref["ann_id"] not in anns:
            raise AnnotationError(f"ref {ref['ref_id']} names annotation {ref['ann_id']}, absent from {instances_path}")
        by_id[ref["ref_id"]] = ref
        boxes[ref["ref_id"]] = anns[ref["ann_id"]]["bbox"]
    return ReferIndex(by_id, boxes, sizes)


def load_dets(paths: PathLike | list[PathLike]) -> dict[str, list[list[float]]]:
    """Detector proposals `{str(image_id): [[x, y, w, h, ...], ...]}`, of one file or several merged."""
    dets = {}
    for path in file_list(paths):
        try:
            with open(path) as f:
                part = json.load(f)
        except FileNotFoundError:
            raise AnnotationError(f"det_file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise AnnotationError(f"det_file {path}: malformed JSON at line {e.lineno}: {e.msg}") from e
        if not isinstance(part, dict):
            raise AnnotationError(f"det_file {path}: expected {{image_id: [[x, y, w, h], ...]}}")
        dets |= part
    return dets


# ------------------------------------------------------------------------------------------ metric


def compute_iou(box1, box2) -> float:
    """IoU of two [x, y, w, h] boxes.

    ALBEF parity: the intersection counts pixels inclusively (x2 = x + w - 1, +1 on each side) while the
    union uses the plain areas w * h, as the original's `computeIoU`.
    """
    ix1, iy1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    ix2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    iy2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    return float(inter) / (box1[2] * box1[3] + box2[2] * box2[3] - inter)


def score_boxes(heatmap: torch.Tensor, boxes: torch.Tensor, height: int, width: int, alpha: float = 0.5) -> torch.Tensor:
    """Scores [K] of proposals `boxes` [K, 4] ([x, y, w, h], image pixels) under a patch-grid heat map
    [g, g]: the map resized bicubically to the image (height, width), summed inside each box (rows
    int(y)..int(y+h)-1, columns int(x)..int(x+w)-1, as the original's slicing) and divided by
    area**alpha. All boxes at once through a summed-area table (float64)."""
    up = F.interpolate(heatmap.float()[None, None], size=(height, width), mode="bicubic")[0, 0].double()
    table = F.pad(up.cumsum(0).cumsum(1), (1, 0, 1, 0))
    boxes = boxes.double().cpu()
    x1 = boxes[:, 0].trunc().long().clamp(0, width)
    y1 = boxes[:, 1].trunc().long().clamp(0, height)
    x2 = (boxes[:, 0] + boxes[:, 2]).trunc().long().clamp(0, width)
    y2 = (boxes[:, 1] + boxes[:, 3]).trunc().long().clamp(0, height)
    x2, y2 = torch.maximum(x1, x2), torch.maximum(y1, y2)
    table = table.cpu()
    inside = table[y2, x2] - table[y1, x2] - table[y2, x1] + table[y1, x1]
    return inside / (boxes[:, 2] * boxes[:, 3]) ** alpha


def pick_box(heatmap: torch.Tensor, dets: list[list[float]], height: int, width: int, alpha: float = 0.5) -> list[float]:
    """The proposal with the highest `score_boxes` score (the first of equal ones).

    ALBEF parity, except: the original keeps the previous ref's box when no score is > 0; here the
    first proposal is taken.
    """
    boxes = torch.tensor([d[:4] for d in dets], dtype=torch.float64)
    return [float(v) for v in boxes[int(score_boxes(heatmap, boxes, height, width, alpha).argmax())]]


def grounding_predictions(results: list[dict], refer: ReferIndex, dets: dict, alpha: float = 0.5) -> list[dict]:
    """For each result `{"ref_id", "pred": heat map [g, g]}`: `{"ref_id", "split", "pred_box", "gt_box",
    "iou"}`; errors name the ref or image missing from the reference files."""
    out = []
    for res in results:
        ref_id = int(res["ref_id"])
        if ref_id not in refer.refs:
            raise AnnotationError(f"ref_id {ref_id} of the test file is not in the refs file")
        image_id = refer.refs[ref_id]["image_id"]
        if str(image_id) not in dets or not dets[str(image_id)]:
            raise AnnotationError(f"det_file has no proposals for image {image_id} (ref {ref_id})")
        height, width = refer.sizes[image_id]
        box = pick_box(res["pred"], dets[str(image_id)], height, width, alpha)
        gt = refer.boxes[ref_id]
        out.append({"ref_id": ref_id, "split": refer.refs[ref_id]["split"], "pred_box": box, "gt_box": gt,
                    "iou": compute_iou(gt, box)})
    return out


def grounding_accuracy(predictions: list[dict]) -> dict[str, float]:
    """Fraction with IoU >= 0.5 per split present: {"val_d", "testA_d", "testB_d"} (the original's keys;
    it reports all three and fails on an empty one)."""
    out = {}
    for split in SPLITS:
        ious = [p["iou"] for p in predictions if p["split"] == split]
        if ious:
            out[f"{split}_d"] = sum(iou >= 0.5 for iou in ious) / len(ious)
    return out


def chance_accuracy(refer: ReferIndex, dets: dict, ref_ids) -> float:
    """Expected accuracy of a uniformly random proposal: the mean share of proposals with IoU >= 0.5."""
    shares = []
    for ref_id in ref_ids:
        boxes = dets[str(refer.refs[int(ref_id)]["image_id"])]
        shares.append(sum(compute_iou(refer.boxes[int(ref_id)], d[:4]) >= 0.5 for d in boxes) / len(boxes))
    return sum(shares) / max(1, len(shares))


def write_predictions(path: str, predictions: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(predictions, f)
