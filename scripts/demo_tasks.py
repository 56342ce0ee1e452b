"""`make demo-tasks`: fine-tune and evaluate every downstream task on the demo data, from the demo
pretraining checkpoint and, at the same budget, from no pretraining; print one table of what
pretraining buys.

    python scripts/demo_tasks.py [--checkpoint output/demo_pretrain/checkpoint_last.pth] [--tasks vqa nlvr]

Each run is the task's own script on its demo config (`configs/<Task>_demo.yaml`, bf16), the same steps
either way (`TASKS`: Retrieval's one demo epoch, `BUDGETS` for the others).
From the checkpoint the fine-tuned model is left at output/demo_tasks/<task>/checkpoint_best.pth (VQA has no
validation split in ALBEF: its final weights); the runs from no pretraining (MiniLM text side,
random ViT and fusion) go to output/demo_tasks/scratch/<task>/. Results: output/demo_tasks/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# task -> (script, config, budget flags, {reported name: log.txt key}); accuracies in log.txt are fractions
# (x100 here). The budget is the same from the checkpoint and from no pretraining: Retrieval runs its one
# demo epoch (125 steps of 32); the others whole epochs of a seeded subset of their training file
# (`max_train_samples`), so the lr schedule and the alpha ramp end with the run (`--max_steps` would stop them
# mid-schedule). BUDGETS: task -> (samples per epoch, epochs); every demo task config trains in batches of
# 32. VQA: 400 steps (of 38,575 questions); NLVR: 2 epochs of its 8,000 pairs, 500 steps (1 epoch left it at
# 81.6 / 81.8); VE and grounding: 200 steps. The figures behind each choice: docs/demo.md.
BUDGETS = {"vqa": (12800, 1), "nlvr": (8000, 2), "ve": (6400, 1), "grounding": (6400, 1)}


def budget(task: str) -> list[str]:
    samples, epochs = BUDGETS[task]
    return ["--opts", f"max_train_samples={samples}", f"schedular.epochs={epochs}"]


TASKS: dict[str, tuple[str, str, list[str], dict[str, str]]] = {
    "retrieval": ("Retrieval.py", "configs/Retrieval_demo.yaml", [],
                  {"test text R@1": "test_txt_r1", "test image R@1": "test_img_r1", "test R mean": "test_r_mean"}),
    "vqa": ("VQA.py", "configs/VQA_demo.yaml", budget("vqa"), {}),  # by question kind, from the result file
    "nlvr": ("NLVR.py", "configs/NLVR_demo.yaml", budget("nlvr"), {"dev": "val_acc", "test": "test_acc"}),
    "ve": ("VE.py", "configs/VE_demo.yaml", budget("ve"), {"dev": "val_acc", "test": "test_acc"}),
    "grounding": ("Grounding.py", "configs/Grounding_demo.yaml", budget("grounding"),
                  {"val": "val_d", "testA": "testA_d", "testB": "testB_d"}),
}
FRACTIONS = {"val_acc", "test_acc", "val_d", "testA_d", "testB_d"}


def run_task(task: str, checkpoint: str | None, output_dir: str, amp: str) -> float:
    """One fine-tuning run as a user would start it; returns its wall time in minutes."""
    script, config, budget, _ = TASKS[task]
    if os.path.exists(os.path.join(output_dir, "log.txt")):
        os.remove(os.path.join(output_dir, "log.txt"))  # a fresh run: the table reads this file
    cmd = [sys.executable, os.path.join(ROOT, script), "--config", config, "--output_dir", output_dir, "--amp", amp,
           *budget]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    start = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {task} ({'pretrained' if checkpoint else 'no pretraining'}): "
          f"{' '.join(cmd[1:])}", flush=True)
    with open(os.path.join(output_dir, "stdout.txt"), "w") as log:
        done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode == 0
    if not done:
        print(f"  {task} failed: see {os.path.join(output_dir, 'stdout.txt')}", flush=True)
    return (time.time() - start) / 60 if done else float("nan")


def vqa_by_kind(output_dir: str, test_file: str) -> dict[str, float]:
    """Exact-match accuracy (one answer per easy-VQA question) overall and by the kind of answer; the
    colour and shape names come from the demo data's meta.json, beside `test_file`."""
    with open(os.path.join(os.path.dirname(test_file), "meta.json")) as f:
        meta = json.load(f)
    colours, shapes = set(meta["colours"]), set(meta["shapes"])
    results = sorted(os.listdir(os.path.join(output_dir, "result")))
    with open(os.path.join(output_dir, "result", results[-1])) as f:
        predicted = {r["question_id"]: r["answer"] for r in json.load(f)}
    with open(test_file) as f:
        questions = json.load(f)
    hits: dict[str, list[bool]] = defaultdict(list)
    for q in questions:
        truth = q["answer"][0]
        kind = "colour" if truth in colours else "shape" if truth in shapes else "yes/no"
        hit = predicted[q["question_id"]] == truth
        hits[kind].append(hit)
        hits["overall"].append(hit)
    return {k: 100.0 * sum(v) / len(v) for k, v in sorted(hits.items(), key=lambda kv: kv[0] != "overall")}


def read_metrics(task: str, output_dir: str) -> dict[str, float]:
    """The reported numbers, percent, from the run's log.txt: of the epoch whose weights the script kept as
    checkpoint_best.pth (the engine records that epoch in the checkpoint)."""
    if task == "vqa":
        return vqa_by_kind(output_dir, os.path.join(ROOT, "data", "demo", "vqa_test.json"))
    keys = TASKS[task][3]
    kept = torch.load(os.path.join(output_dir, "checkpoint_best.pth"), map_location="cpu", weights_only=True,
                      mmap=True)["epoch"]
    with open(os.path.join(output_dir, "log.txt")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    best = next(line for line in lines if line.get("epoch") == kept and all(k in line for k in keys.values()))
    return {name: best[k] * (100 if k in FRACTIONS else 1) for name, k in keys.items()}


def print_table(results: dict) -> None:
    print("\nDemo tasks on held-out pictures, percent: fine-tuned from the demo pretraining vs from no "
          "pretraining (same steps)")
    print(f"{'task':<11}{'metric':<16}{'pretrained':>11}{'no pretraining':>16}{'gain':>7}{'minutes':>10}")
    for task, r in results.items():
        for name, value in r["pretrained"].items():
            base = r["scratch"].get(name, float("nan"))
            print(f"{task:<11}{name:<16}{value:>11.1f}{base:>16.1f}{value - base:>+7.1f}"
                  f"{r['minutes']['pretrained']:>5.1f}/{r['minutes']['scratch']:.1f}")


def save_results(path: str, results: dict) -> None:
    """Write `results` into the JSON file at `path`, keeping the other tasks' entries already there (a
    `--tasks` rerun updates its rows only)."""
    kept = {}
    if os.path.exists(path):
        with open(path) as f:
            kept = json.load(f)
    with open(path, "w") as f:
        json.dump(kept | results, f, indent=1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="output/demo_pretrain/checkpoint_last.pth")
    p.add_argument("--output_dir", default="output/demo_tasks")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--skip_scratch", action="store_true", help="only the runs from the checkpoint")
    args = p.parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        print(f"error: {args.checkpoint} not found: run `make demo` first (it writes the demo checkpoint)",
              file=sys.stderr)
        sys.exit(2)

    start = time.time()
    results_path = os.path.join(args.output_dir, "results.json")
    results: dict = {}
    for task in args.tasks:
        runs = {"pretrained": (args.checkpoint, os.path.join(args.output_dir, task))}
        if not args.skip_scratch:
            runs["scratch"] = (None, os.path.join(args.output_dir, "scratch", task))
        results[task] = {"pretrained": {}, "scratch": {}, "minutes": {"pretrained": 0.0, "scratch": 0.0}}
        for name, (checkpoint, out) in runs.items():
            os.makedirs(out, exist_ok=True)
            minutes = run_task(task, checkpoint, out, args.amp)
            results[task]["minutes"][name] = round(minutes, 2)
            if minutes != minutes:  # failed: the table shows nan, the other tasks still run
                continue
            results[task][name] = read_metrics(task, out)
            if task == "vqa":  # no validation split: the final weights are the fine-tuned model
                shutil.copyfile(os.path.join(out, "checkpoint_last.pth"), os.path.join(out, "checkpoint_best.pth"))
        save_results(results_path, results | {"checkpoint": args.checkpoint})
    print_table(results)
    print(f"\nall runs {(time.time() - start) / 60:.1f} min; results in {results_path}")
    return results


if __name__ == "__main__":
    main()
