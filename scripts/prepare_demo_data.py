"""Build the built-in demo data set (ALBEF's JSON formats) from the `easy-vqa` package, offline.

easy-vqa ships 5,000 64x64 PNGs (4,000 "train", 1,000 "test"), each one shape (circle, rectangle,
triangle) in one of 8 pure colours on a uniform light background (each channel 230-255), drawn at
2x and bilinearly downsampled, plus ~48k template questions with one answer each.

Captions come from the pixels, not the questions: background = the majority corner colour; alpha =
each pixel's projection between background and shape colour; colour = nearest palette colour to
the mean of alpha > 0.5 pixels; shape = fill ratio area / (widest row * tallest column) of alpha
sums (rectangle 1.0, circle ~0.79-0.87, triangle ~0.53-0.68 since small ones blur); position = the
alpha centre of mass on a 3x3 grid; size = tertiles of that box's area over the images used.
Where easy-vqa's answers name an image's colour or shape they win (the agreement of the pixel
reading with them is printed and kept in meta.json); they agree on ~100 %.

easy-VQA's 4,000 train pictures (plus `--extra` drawn ones) are every task's training split; its 1,000
test pictures, shuffled by seed, are held out in quarters: retrieval val, retrieval test (and the ITM
swap pairs itm_val / itm_test on those two), downstream dev and test. VQA is scored on easy-VQA's own
test questions, all of them.
NLVR: each pair of images gets one True and one False sentence of the same template (balanced).
VE: per image an entailment (true statement), a contradiction (one wrong colour, shape or position,
half of them with an extra clause) and a neutral: the true colour and shape plus a clause the
pixels can never settle ("is made of paper"). A clause narrows the label to neutral or
contradiction; only the image tells which. Simple on purpose: the demo only has to be learnable.
Grounding (grounding/, RefCOCO+'s layout, see `grounding_files`): the shape's box is where alpha > 0.5;
8 proposals per image, one near that box. Written last, from its own random stream, so the files
above do not depend on it.
"""

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import easy_vqa
import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from datasets.grounding import compute_iou as iou  # noqa: E402  the metric's own IoU

COLOURS: dict[str, tuple[int, int, int]] = {  # easy-vqa gen_data/color.py
    "black": (0, 0, 0), "gray": (128, 128, 128), "red": (255, 0, 0), "green": (0, 255, 0),
    "blue": (0, 0, 255), "yellow": (255, 255, 0), "teal": (0, 128, 128), "brown": (165, 42, 42),
}
SHAPES = ("circle", "rectangle", "triangle")
SIZES = ("small", "medium", "large")
GRID = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
IN_PHRASE = {p: (f"in the {p} corner" if " " in p else f"on the {p}" if p in ("left", "right")
                 else f"at the {p}" if p in ("top", "bottom") else "in the center") for p in GRID}
CAPTIONS = (
    "a {size} {colour} {shape} {where}", "there is a {size} {colour} {shape} near the {pos}",
    "a {colour} {shape} {where} of the image", "the image shows a {size} {colour} {shape}",
    "a {size} {shape} colored {colour}, {where}", "a picture of a {colour} {shape} on a plain background",
)
VE_FACTS = ("the shape is {colour}", "there is a {shape} in the image", "the image contains a {colour} {shape}",
            "the {shape} is {where}", "a {colour} shape is {where}")
UNKNOWABLE = ("is made of paper", "was drawn by a child", "was painted yesterday", "is made of wood",
              "is someone's favourite shape")
TRIANGLE_MAX_FILL, CIRCLE_MAX_FILL = 0.73, 0.93  # measured: triangles <= 0.69, circles 0.78-0.87


@dataclass
class Item:
    """One easy-vqa image and what we know about its single shape."""

    key: str  # "train_12": easy-vqa split and id, also the file stem under images/
    source: Path
    pixel_colour: str
    pixel_shape: str
    pos: str
    box_frac: float  # (widest row * tallest column) / image area
    ink_frac: float  # alpha sum / image area
    cy: float  # centre of mass row, pixels
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # [x, y, w, h] of the alpha > 0.5 pixels
    colour: str = ""
    shape: str = ""
    size: str = ""
    captions: list[str] = field(default_factory=list)

    @property
    def image(self) -> str:
        return f"images/{self.key}.png"


def measure(key: str, source: Path) -> Item:
    """Read colour, shape, position and extent of the one shape from the pixels."""
    x = np.asarray(Image.open(source).convert("RGB"), dtype=np.float32)
    corners = Counter(tuple(c) for c in (x[0, 0], x[0, -1], x[-1, 0], x[-1, -1]))
    bg = np.array(corners.most_common(1)[0][0], dtype=np.float32)  # a shape covers at most one corner
    dist = np.linalg.norm(x - bg, axis=-1)
    fg = x.reshape(-1, 3)[dist.argmax()] - bg
    alpha = np.clip((x - bg) @ fg / (fg @ fg), 0.0, 1.0)
    mean = x[alpha > 0.5].mean(0)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    colour = list(COLOURS)[int(np.linalg.norm(palette - mean, axis=1).argmin())]
    ink, width, height = alpha.sum(), alpha.sum(1).max(), alpha.sum(0).max()
    fill = ink / (width * height)
    shape = "triangle" if fill < TRIANGLE_MAX_FILL else "circle" if fill < CIRCLE_MAX_FILL else "rectangle"
    rows, cols = np.indices(alpha.shape)
    cy, cx = (rows * alpha).sum() / ink, (cols * alpha).sum() / ink
    r, c = (min(int(v * 3 / n), 2) for v, n in ((cy, x.shape[0]), (cx, x.shape[1])))
    area = x.shape[0] * x.shape[1]
    ys, xs = np.nonzero(alpha > 0.5)
    box = (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))
    return Item(key, source, colour, shape, GRID[3 * r + c], float(width * height / area), float(ink / area), float(cy),
                box)


def draw_picture(path: Path, rng: random.Random, side: int = 64) -> tuple[str, str]:
    """One more picture of easy-vqa's kind at `path`: a light uniform background (each channel 230-255),
    one shape in one of the 8 colours, drawn at 2x and bilinearly downsampled. Returns (colour, shape)."""
    big = 2 * side
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    image = Image.new("RGB", (big, big), tuple(rng.randint(230, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    if shape == "rectangle":
        w, h = rng.randint(big // 8, big * 3 // 4), rng.randint(big // 8, big * 3 // 4)
        x, y = rng.randint(0, big - w), rng.randint(0, big - h)
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLOURS[colour])
    elif shape == "circle":
        d = rng.randint(big // 5, big * 3 // 4)
        x, y = rng.randint(0, big - d), rng.randint(0, big - d)
        draw.ellipse([x, y, x + d - 1, y + d - 1], fill=COLOURS[colour])
    else:
        s = rng.randint(big // 5, big * 3 // 4)
        x, y = rng.randint(0, big - s), rng.randint(0, big - s)
        draw.polygon([(x, y + s - 1), (x + s - 1, y + s - 1), (x + (s - 1) / 2, y)], fill=COLOURS[colour])  # apex up
    image.resize((side, side), Image.BILINEAR).save(path)
    return colour, shape


def generated_items(n: int, folder: Path, seed: int) -> list[Item]:
    """`n` drawn pictures (`gen_<k>.png` in `folder`), measured like easy-vqa's; the drawn colour and
    shape are the truth, as easy-vqa's answers are for its own pictures."""
    rng = random.Random(f"draw-{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for k in range(n):
        path = folder / f"gen_{k}.png"
        colour, shape = draw_picture(path, rng)
        item = measure(f"gen_{k}", path)
        item.colour, item.shape = colour, shape
        items.append(item)
    return items


def read_questions() -> dict[str, list[tuple[str, str]]]:
    """easy-vqa's (question, answer) pairs by image key."""
    out: dict[str, list[tuple[str, str]]] = {}
    for split, qs in (("train", easy_vqa.get_train_questions()), ("test", easy_vqa.get_test_questions())):
        for question, answer, image_id in zip(*qs):
            out.setdefault(f"{split}_{image_id}", []).append((question, answer))
    return out


def known_attributes(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Colour/shape fixed by the answers: a wh-answer names it; a yes/no question affirms it
    ("is there a red shape?" yes, "is no circle present?" no)."""
    known: dict[str, str] = {}
    for question, answer in pairs:
        words = re.findall(r"[a-z]+", question)
        if answer not in ("yes", "no"):
            named = [answer]
        elif (answer == "yes") != ("not" in words or "no" in words):
            named = words
        else:
            continue
        for w in named:
            if w in COLOURS or w in SHAPES:
                known["colour" if w in COLOURS else "shape"] = w
    return known


def load_items(limit: int | None, questions: dict[str, list[tuple[str, str]]]) -> tuple[list[Item], dict]:
    """Measure every image (the first `limit` ones); let easy-vqa's answers override; size tertiles."""
    train = [(f"train_{i}", p) for i, p in sorted(easy_vqa.get_train_image_paths().items())]
    test = [(f"test_{i}", p) for i, p in sorted(easy_vqa.get_test_image_paths().items())]
    if limit is not None:  # keep easy-vqa's 4:1 train/test proportion
        train, test = train[: limit - limit // 5], test[: limit // 5]
    items = [measure(key, Path(p)) for key, p in train + test]
    agree: dict[str, list[bool]] = {"colour": [], "shape": []}
    for item in items:
        known = known_attributes(questions.get(item.key, []))
        for attr in agree:
            pixel = getattr(item, f"pixel_{attr}")
            if attr in known:
                agree[attr].append(pixel == known[attr])
            setattr(item, attr, known.get(attr, pixel))
    cuts = np.quantile([i.box_frac for i in items], [1 / 3, 2 / 3])
    for item in items:
        item.size = SIZES[int(np.searchsorted(cuts, item.box_frac, side="right"))]
    stats = {f"{a}_agreement": round(float(np.mean(v)), 4) if v else None for a, v in agree.items()}
    stats |= {f"{a}_checked": len(v) for a, v in agree.items()} | {"size_cuts": [round(float(c), 4) for c in cuts]}
    return items, stats


def describe(item: Item, rng: random.Random, n: int = 3) -> list[str]:
    """`n` captions from distinct templates."""
    slots = dict(size=item.size, colour=item.colour, shape=item.shape, pos=item.pos, where=IN_PHRASE[item.pos])
    return [t.format(**slots) for t in rng.sample(CAPTIONS, n)]


def nlvr_candidates(a: Item, b: Item, rng: random.Random) -> tuple[list[str], list[str]]:
    """(true, false) sentences about the pair (a left, b right) for one randomly chosen template."""
    kind = rng.choice(("only", "only_right", "both_shape", "both_colour", "same_colour", "larger", "higher"))
    if kind in ("only", "only_right"):
        left, right, (first, second) = (a, b, ("left", "right")) if kind == "only" else (b, a, ("right", "left"))
        says = {c: f"the {first} image contains a {c} shape and the {second} image does not" for c in COLOURS}
        hits = [c for c in COLOURS if left.colour == c != right.colour]
    elif kind == "both_shape":
        says = {s: f"both images contain a {s}" for s in SHAPES}
        hits = [s for s in SHAPES if a.shape == s == b.shape]
    elif kind == "both_colour":
        says = {c: f"both shapes are {c}" for c in COLOURS}
        hits = [c for c in COLOURS if a.colour == c == b.colour]
    elif kind == "same_colour":
        says = {True: "the two shapes have the same color", False: "the two shapes have different colors"}
        hits = [a.colour == b.colour]
    elif kind == "larger":  # only when the box and the ink agree by a clear margin
        says = {d: f"the left image has a {d} shape than the right image" for d in ("larger", "smaller")}
        box, ink = a.box_frac / b.box_frac, a.ink_frac / b.ink_frac
        hits = ["larger"] if min(box, ink) > 1.25 else ["smaller"] if max(box, ink) < 0.8 else []
    else:
        says = {d: f"the shape in the left image is {d} than the shape in the right image" for d in ("higher", "lower")}
        hits = ["higher"] if a.cy < b.cy - 8 else ["lower"] if a.cy > b.cy + 8 else []
    return [says[k] for k in hits], [s for k, s in says.items() if k not in hits]


def nlvr_entries(items: list[Item], rng: random.Random) -> list[dict]:
    """One True and one False sentence for each image paired with a random other one."""
    out = []
    for a in items:
        for _ in range(100):
            b = rng.choice(items)
            true, false = nlvr_candidates(a, b, rng) if b is not a else ([], [])
            if true and false:
                images = [a.image, b.image]
                out += [{"images": images, "sentence": rng.choice(true), "label": "True"},
                        {"images": images, "sentence": rng.choice(false), "label": "False"}]
                break
    rng.shuffle(out)
    return out


def ve_entries(items: list[Item], rng: random.Random) -> list[dict]:
    """An entailment, a contradiction and a neutral hypothesis per image (see module docstring)."""
    out = []
    for item in items:
        true = dict(colour=item.colour, shape=item.shape, where=IN_PHRASE[item.pos])
        far = [p for p in GRID if max(abs(GRID.index(p) // 3 - GRID.index(item.pos) // 3),
                                      abs(GRID.index(p) % 3 - GRID.index(item.pos) % 3)) == 2]
        wrong = dict(colour=[c for c in COLOURS if c != item.colour], shape=[s for s in SHAPES if s != item.shape],
                     where=[IN_PHRASE[p] for p in far])
        template = "the {colour} {shape} " + rng.choice(UNKNOWABLE) if rng.random() < 0.5 else rng.choice(VE_FACTS)
        slot = rng.choice([s for s in wrong if "{" + s + "}" in template and wrong[s]])
        out += [
            {"image": item.image, "sentence": rng.choice(VE_FACTS).format(**true), "label": "entailment"},
            {"image": item.image, "sentence": template.format(**(true | {slot: rng.choice(wrong[slot])})),
             "label": "contradiction"},
            {"image": item.image, "sentence": f"the {item.colour} {item.shape} {rng.choice(UNKNOWABLE)}",
             "label": "neutral"},
        ]
    return out


def far_positions(pos: str) -> list[str]:
    """Grid cells two steps away from `pos` (a neighbouring cell may hold a shape on its border); for the
    center, the corners."""
    if pos == "center":
        return [p for p in GRID if " " in p]
    r, c = divmod(GRID.index(pos), 3)
    return [p for k, p in enumerate(GRID) if max(abs(k // 3 - r), abs(k % 3 - c)) == 2]


def itm_pairs(items: list[Item], rng: random.Random) -> list[dict]:
    """Held-out ITM pairs for `scripts/score_pairs.py`: each caption of each image (label 1) against the
    same template with the colour swapped, with the shape swapped, and with the size or the position
    swapped (whichever the template names; label 0, `kind` says which). Swapped sizes skip a tertile
    (small <-> large; medium -> either) and positions move two grid cells, so no negative sits on a
    boundary the pixels cannot settle."""
    other_size = {"small": ["large"], "medium": ["small", "large"], "large": ["small"]}
    out = []
    for item in items:
        slots = dict(size=item.size, colour=item.colour, shape=item.shape, pos=item.pos, where=IN_PHRASE[item.pos])
        for template in rng.sample(CAPTIONS, 3):
            out.append({"image": item.image, "caption": template.format(**slots), "label": 1, "kind": "match"})
            changes = [("colour", "colour", rng.choice([c for c in COLOURS if c != item.colour])),
                       ("shape", "shape", rng.choice([s for s in SHAPES if s != item.shape]))]
            places = [("size", "size", rng.choice(other_size[item.size]))] if "{size}" in template else []
            if "{pos}" in template or "{where}" in template:
                pos = rng.choice(far_positions(item.pos))
                places.append(("position", "pos", pos))
            if places:
                changes.append(rng.choice(places))
            for kind, slot, value in changes:
                wrong = slots | {slot: value} | ({"where": IN_PHRASE[value]} if slot == "pos" else {})
                out.append({"image": item.image, "caption": template.format(**wrong), "label": 0, "kind": kind})
    return out


def vqa_entries(items: list[Item], questions: dict[str, list[tuple[str, str]]], first_id: int) -> list[dict]:
    """easy-vqa's own questions; ALBEF's answer list holds one answer here, not ten."""
    pairs = [(item, q, a) for item in items for q, a in questions.get(item.key, [])]
    return [{"question_id": first_id + n, "image": item.image, "question": q, "answer": [a], "dataset": "vqa"}
            for n, (item, q, a) in enumerate(pairs)]


# ALBEF's RefCOCO+ forbids location words; so do these expressions.
EXPRESSIONS = ("the {colour} {shape}", "{colour} {shape}", "the {size} {colour} {shape}", "the {colour} one",
               "the {size} {shape}", "a {shape} colored {colour}")


def proposals(box, side: int, rng: random.Random, n: int = 8) -> list[list[float]]:
    """`n` detector-like boxes [x, y, w, h]: the shape's `box` jittered (IoU >= 0.6), a part of the shape,
    the shape with much background, and boxes elsewhere; every other box has IoU < 0.5 with `box`.
    Shuffled, so the good box has no fixed place (ties go to the first box)."""
    x, y, w, h = box

    def clip(bx, by, bw, bh):
        bx, by = min(max(bx, 0.0), side - 1.0), min(max(by, 0.0), side - 1.0)
        return [round(bx, 1), round(by, 1), round(max(1.0, min(bw, side - bx)), 1), round(max(1.0, min(bh, side - by)), 1)]

    def draw(make, accept, tries=200):
        for _ in range(tries):
            cand = clip(*make())
            if accept(iou(box, cand)):
                return cand
        return None

    def jitter():
        return (x + rng.uniform(-0.1, 0.1) * w, y + rng.uniform(-0.1, 0.1) * h,
                w * rng.uniform(0.9, 1.1), h * rng.uniform(0.9, 1.1))

    def part():
        pw, ph = w * rng.uniform(0.35, 0.7), h * rng.uniform(0.35, 0.7)
        return x + rng.uniform(0, w - pw), y + rng.uniform(0, h - ph), pw, ph

    def context():
        cw, ch = w * rng.uniform(1.6, 2.4), h * rng.uniform(1.6, 2.4)
        return x - rng.uniform(0, cw - w), y - rng.uniform(0, ch - h), cw, ch

    def elsewhere():
        bw, bh = rng.uniform(8, side / 2), rng.uniform(8, side / 2)
        return rng.uniform(0, side - bw), rng.uniform(0, side - bh), bw, bh

    boxes = [draw(jitter, lambda v: v >= 0.6) or clip(*box)]
    boxes += [b for b in (draw(part, lambda v: v < 0.5), draw(context, lambda v: v < 0.5)) if b]
    while len(boxes) < n:
        boxes.append(draw(elsewhere, lambda v: v < 0.1) or draw(elsewhere, lambda v: v < 0.5, 10_000))
    rng.shuffle(boxes)
    return boxes


def grounding_files(items: list[Item], splits: dict[str, list[Item]], out: Path, rng: random.Random) -> dict:
    """Weakly supervised grounding in RefCOCO+'s files (what Grounding.py reads), under `out`:
    refcoco+_{train,val,test}.json expressions `{"image", "text", "ref_id"}`; refcoco+/refs(unc).json
    (the official refs(unc).p as JSON: one ref per image, its split and sentences),
    refcoco+/instances.json (COCO-style images and shape boxes), refcoco+/dets.json (proposals).
    Train: 2 expressions per image; val and test: 1. testA holds the small shapes of the test split,
    testB the others (RefCOCO+ splits people from objects; the demo has neither)."""
    folder = out / "refcoco+"
    folder.mkdir(parents=True, exist_ok=True)
    image_id = {item.key: n for n, item in enumerate(items)}
    refs, expressions = [], {"train": [], "val": [], "test": []}
    for split, split_items in splits.items():
        for item in split_items:
            slots = dict(size=item.size, colour=item.colour, shape=item.shape)
            texts = [t.format(**slots) for t in rng.sample(EXPRESSIONS, 2 if split == "train" else 1)]
            ref_split = split if split != "test" else "testA" if item.size == "small" else "testB"
            ref_id = image_id[item.key]
            refs.append({"ref_id": ref_id, "ann_id": ref_id, "image_id": ref_id, "split": ref_split,
                         "category_id": SHAPES.index(item.shape) + 1, "file_name": item.image,
                         "sentences": [{"sent_id": 2 * ref_id + k, "sent": t, "raw": t, "tokens": t.split()}
                                       for k, t in enumerate(texts)]})
            expressions[split] += [{"image": item.image, "text": t, "ref_id": ref_id} for t in texts]
    side = 64  # easy-vqa's size; checked below
    instances = {"images": [{"id": image_id[i.key], "file_name": i.image, "height": side, "width": side} for i in items],
                 "annotations": [{"id": image_id[i.key], "image_id": image_id[i.key], "bbox": list(i.box),
                                  "area": i.box[2] * i.box[3], "category_id": SHAPES.index(i.shape) + 1} for i in items],
                 "categories": [{"id": k + 1, "name": s} for k, s in enumerate(SHAPES)]}
    if any(i.box[0] + i.box[2] > side or i.box[1] + i.box[3] > side for i in items):
        raise ValueError("easy-vqa images are no longer 64 x 64 pixels")
    dets = {str(image_id[i.key]): proposals(i.box, side, rng) for split_items in splits.values() for i in split_items}
    counts = {f"refcoco+_{s}": write_json(out / f"refcoco+_{s}.json", e) for s, e in expressions.items()}
    write_json(folder / "refs(unc).json", refs)
    write_json(folder / "instances.json", instances)
    counts["dets"] = write_json(folder / "dets.json", dets)
    return counts


def write_json(path: Path, data: object) -> int:
    path.write_text(json.dumps(data, indent=None))
    return len(data)  # type: ignore[arg-type]


def copy_images(items: list[Item], folder: Path) -> None:
    """Every item's picture as `folder/<key>.png` (drawn ones are already there); other PNGs removed."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in set(folder.glob("*.png")) - {folder / f"{i.key}.png" for i in items}:
        stale.unlink()
    for item in items:
        if item.source != folder / f"{item.key}.png":
            shutil.copyfile(item.source, folder / f"{item.key}.png")


def main(argv: list[str] | None = None) -> dict:
    """Write every JSON file and copy the images under --out; return meta.json's content."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (tests)")
    parser.add_argument("--extra", type=int, default=0,
                        help="drawn pictures of the same kind added to the training split (pretraining and every task)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    questions = read_questions()
    items, stats = load_items(args.limit, questions)
    for item in generated_items(args.extra, args.out / "images", args.seed):
        item.size = SIZES[int(np.searchsorted(stats["size_cuts"], item.box_frac, side="right"))]
        items.append(item)
    rng = random.Random(args.seed)
    for item in items:  # captions first, in a fixed order, so the split does not change them
        item.captions = describe(item, rng)
    train = [i for i in items if not i.key.startswith("test_")]
    held = [i for i in items if i.key.startswith("test_")]  # easy-vqa's test pictures: no run trains on them
    rng.shuffle(train)
    rng.shuffle(held)
    quarter = len(held) // 4
    ret_val, ret_test, dev, test = (held[k * quarter:(k + 1) * quarter] for k in range(4))

    copy_images(items, args.out / "images")
    vqa_train = vqa_entries(train, questions, 0)
    files: dict[str, list] = {
        "pretrain": [{"image": i.image, "caption": i.captions} for i in train],
        "retrieval_train": [{"image": i.image, "caption": i.captions[n % len(i.captions)], "image_id": n}
                            for n, i in enumerate(train)],  # one caption per picture: a demo-sized epoch
        "retrieval_val": [{"image": i.image, "caption": i.captions} for i in ret_val],
        "retrieval_test": [{"image": i.image, "caption": i.captions} for i in ret_test],
        "vqa_train": vqa_train,
        "vqa_test": vqa_entries(sorted(held, key=lambda i: int(i.key[5:])), questions, len(vqa_train)),
        "itm_val": itm_pairs(ret_val, rng),
        "itm_test": itm_pairs(ret_test, rng),
        "answer_list": easy_vqa.get_answers(),
    }
    for split, split_items in (("train", train), ("dev", dev), ("test", test)):
        files[f"nlvr_{split}"] = nlvr_entries(split_items, rng)
        files[f"ve_{split}"] = ve_entries(split_items, rng)
    counts = {name: write_json(args.out / f"{name}.json", data) for name, data in files.items()}
    meta = {
        "source": "easy-vqa", "seed": args.seed, "limit": args.limit, "images": len(items), "counts": counts,
        "split_images": {"pretrain": len(train), "retrieval_val": len(ret_val), "retrieval_test": len(ret_test),
                         "downstream_dev": len(dev), "downstream_test": len(test)},
        "detection": stats, "colours": list(COLOURS), "shapes": list(SHAPES), "positions": list(GRID),
        "sizes": list(SIZES),
    }
    write_json(args.out / "meta.json", meta)
    grounding = grounding_files(items, {"train": train, "val": dev, "test": test}, args.out / "grounding",
                                random.Random(f"grounding-{args.seed}"))
    print(f"wrote {len(items)} images and {len(files)} files to {args.out} in {time.perf_counter() - start:.1f}s")
    print("  " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    print(f"  pixel vs easy-vqa answers: colour {stats['colour_agreement']} of {stats['colour_checked']}, "
          f"shape {stats['shape_agreement']} of {stats['shape_checked']}")
    print(f"  grounding: {grounding}")
    return meta


if __name__ == "__main__":
    main()
