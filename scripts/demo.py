"""`make demo`: pretrain the demo ALBEF on easy-VQA-style pictures and show what it learned.

Runs `Pretrain.py --config configs/Pretrain_demo.yaml` (data from scripts/prepare_demo_data.py), then
measures (zero_shot.py) the model before pretraining (the same initialisation) and after, on pictures no
run trains on:
- zero-shot retrieval on data/demo/retrieval_test.json, ranked by ITC alone and re-ranked by ITM (the
  original's evaluation: ITM logit of the ITC top k_test);
- ITM balanced accuracy on data/demo/itm_test.json: every true caption against the same caption with
  its colour, its shape, and its size or position swapped (`scripts/score_pairs.py` on that file).
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

import utils  # noqa: E402
from models.albef import ALBEF, build_bert_config  # noqa: E402
from task_configs import PretrainConfig  # noqa: E402
from zero_shot import K_TEST, measure  # noqa: E402

KINDS = ("colour", "shape", "size", "position")


def initial_state(cfg: PretrainConfig) -> dict:
    """The weights Pretrain.py starts from (same seed, same construction): the 'before' model."""
    utils.seed_everything(cfg.seed)
    model = ALBEF(cfg, build_bert_config(cfg))
    model.init_pretrained_encoders()
    return model.state_dict()


def print_tables(before: dict, after: dict, epochs: int, test_file: str, pairs_file: str) -> None:
    rows = (("before pretraining", before), (f"after {epochs} epochs", after))
    print(f"\nZero-shot retrieval on held-out pictures ({test_file}), percent; ITM re-ranks the ITC top {K_TEST}:")
    print(f"{'':<22}{'ranked by':>10}{'text->image R@1':>17}{'R@5':>7}{'image->text R@1':>17}{'R@5':>7}")
    for name, m in rows:
        for rank_by in ("itc", "itm"):
            print(f"{name:<22}{rank_by.upper():>10}{m[f'{rank_by}_img_r1']:>17.1f}{m[f'{rank_by}_img_r5']:>7.1f}"
                  f"{m[f'{rank_by}_txt_r1']:>17.1f}{m[f'{rank_by}_txt_r5']:>7.1f}")
    print(f"\nITM balanced accuracy on held-out pictures ({pairs_file}), percent (chance 50): each true caption "
          "against itself with one attribute swapped")
    print(f"{'':<22}" + "".join(f"{k + ' swapped':>18}" for k in KINDS) + f"{'all':>8}")
    for name, m in rows:
        print(f"{name:<22}" + "".join(f"{m[f'itm_{k}']:>18.1f}" for k in KINDS) + f"{m['itm_all']:>8.1f}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "Pretrain_demo.yaml"))
    p.add_argument("--output_dir", default=os.path.join(ROOT, "output", "demo_pretrain"))
    p.add_argument("--test_file", default="data/demo/retrieval_test.json")
    p.add_argument("--pairs", default="data/demo/itm_test.json")
    p.add_argument("--opts", nargs="*", default=[])
    args = p.parse_args(argv)

    start = time.time()
    cmd = [sys.executable, os.path.join(ROOT, "Pretrain.py"), "--config", args.config, "--output_dir", args.output_dir]
    if os.path.exists(os.path.join(args.output_dir, "log.txt")):
        os.remove(os.path.join(args.output_dir, "log.txt"))  # a fresh run
    subprocess.run(cmd + (["--opts", *args.opts] if args.opts else []), check=True, cwd=ROOT)
    train_minutes = (time.time() - start) / 60

    cfg, _ = utils.load_config(args.config, args.opts, PretrainConfig)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    before = measure(initial_state(cfg), cfg, args.test_file, args.pairs)
    after = measure(os.path.join(args.output_dir, "checkpoint_last.pth"), cfg, args.test_file, args.pairs)
    print_tables(before, after, cfg.schedular.epochs, args.test_file, args.pairs)
    results = {"before": before, "after": after, "train_minutes": round(train_minutes, 2),
               "total_minutes": round((time.time() - start) / 60, 2)}
    with open(os.path.join(args.output_dir, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\npretraining {train_minutes:.1f} min, all {results['total_minutes']:.1f} min; checkpoints, log.txt, "
          f"run.log, tb/ and demo_results.json in {args.output_dir}")
    return results


if __name__ == "__main__":
    main()
