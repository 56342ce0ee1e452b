"""`make demo`: pretrain the demo ALBEF on easy-VQA pictures and show what it learned.

Runs `Pretrain.py --config configs/Pretrain_demo.yaml` (data from scripts/prepare_demo_data.py), which
evaluates zero-shot ITC retrieval on held-out images before training and after every epoch, then prints
the before/after table against chance and a few retrievals of the final model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from datasets.retrieval import RetrievalEvalDataset, itc_similarity  # noqa: E402
from datasets.text import build_tokenizer  # noqa: E402
from datasets.transforms import test_transform  # noqa: E402
from models.albef import ALBEF, build_bert_config, load_model_checkpoint  # noqa: E402
from models.bert import resolve_pretrained  # noqa: E402
from Pretrain import PretrainConfig  # noqa: E402
from utils import load_config  # noqa: E402


def chance(k: int, candidates: int, positives: int) -> float:
    """Percent of queries with a positive in the top k when ranking at random."""
    miss = 1.0
    for i in range(k):
        miss *= max(0.0, (candidates - positives - i) / (candidates - i))
    return 100 * (1 - miss)


def show_examples(output_dir: str, cfg: PretrainConfig, n: int = 4) -> None:
    model = ALBEF(cfg, build_bert_config(cfg))
    load_model_checkpoint(model, os.path.join(output_dir, "checkpoint_last.pth"))
    dataset = RetrievalEvalDataset(cfg.val_file, test_transform(cfg.image_res), cfg.image_root, cfg.max_words)
    tokenizer = build_tokenizer(resolve_pretrained(cfg.tokenizer_source))
    sims = itc_similarity(model, dataset, tokenizer, torch.device("cpu"))
    print("\nText -> image on held-out pictures (the caption of the retrieved picture shows what it holds):")
    for t in range(0, len(dataset.texts), max(1, len(dataset.texts) // n))[:n]:
        best = int(sims[:, t].argmax())
        mark = "correct" if best == dataset.txt2img[t] else "other picture"
        print(f"  query: {dataset.texts[t]!r}\n    top-1: {dataset.texts[dataset.img2txt[best][0]]!r} ({mark})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "Pretrain_demo.yaml"))
    p.add_argument("--output_dir", default=os.path.join(ROOT, "output", "demo_pretrain"))
    p.add_argument("--opts", nargs="*", default=[])
    args = p.parse_args(argv)

    start = time.time()
    cmd = [sys.executable, os.path.join(ROOT, "Pretrain.py"), "--config", args.config, "--output_dir", args.output_dir]
    if os.path.exists(os.path.join(args.output_dir, "log.txt")):
        os.remove(os.path.join(args.output_dir, "log.txt"))  # a fresh run: the table reads this file
    subprocess.run(cmd + (["--opts", *args.opts] if args.opts else []), check=True, cwd=ROOT)
    minutes = (time.time() - start) / 60

    cfg, _ = load_config(args.config, args.opts, PretrainConfig)
    log = [json.loads(line) for line in open(os.path.join(args.output_dir, "log.txt"))]
    before, after = log[0], log[-1]
    ann = json.load(open(cfg.val_file))
    images, texts = len(ann), sum(len(a["caption"]) for a in ann)
    per_image = texts / images
    print(f"\nZero-shot ITC retrieval on {images} held-out images / {texts} captions ({cfg.val_file}), percent:")
    print(f"{'':<26}{'text->image R@1':>16}{'R@5':>8}{'image->text R@1':>17}{'R@5':>8}")
    rows = [("chance", chance(1, images, 1), chance(5, images, 1), chance(1, texts, per_image), chance(5, texts, per_image)),
            ("before pretraining", before["val_img_r1"], before["val_img_r5"], before["val_txt_r1"], before["val_txt_r5"]),
            (f"after {after['epoch'] + 1} epochs", after["val_img_r1"], after["val_img_r5"], after["val_txt_r1"], after["val_txt_r5"])]
    for name, a, b, c, d in rows:
        print(f"{name:<26}{a:>16.1f}{b:>8.1f}{c:>17.1f}{d:>8.1f}")
    show_examples(args.output_dir, cfg)
    print(f"\nwall time {minutes:.1f} min; checkpoints, log.txt, run.log and tb/ in {args.output_dir}")


if __name__ == "__main__":
    main()
