"""Score image-caption pairs with a trained ALBEF: ITM p(match) and ITC similarity for each pair, to
filter noisy web pairs or to check what a checkpoint has learned.

    python scripts/score_pairs.py --pairs pairs.json --checkpoint ALBEF.pth --config configs/Pretrain.yaml \
        --image_root /data/cc3m --out scores.json

`--pairs`: a JSON list of `{"image": path, "caption": str[, "label": 1 | 0]}` (1 = the caption fits).
`--checkpoint`: a pretraining or a fine-tuned retrieval checkpoint; `--config`: any task YAML whose model
keys (bert_config, text_encoder, image_res, vit_*, embed_dim) describe it; other keys are ignored.
`--out` gets the input entries with `"p_match"` (ITM) and `"itc_sim"` (cosine of the projected [CLS]
features, in [-1, 1]) added. With labels on every pair it prints the ITM balanced accuracy at p > 0.5,
and per `kind` when the entries carry one (as data/demo/itm_test.json does).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402
from datasets.retrieval import PairDataset, accuracy_by_kind  # noqa: E402
from datasets.text import build_tokenizer  # noqa: E402
from datasets.transforms import test_transform  # noqa: E402
from models.bert import resolve_pretrained  # noqa: E402
from models.retrieval import load_scorer, pair_scores, scorer_config  # noqa: E402

logger = logging.getLogger("score_pairs")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", required=True, help="JSON list of {image, caption[, label]}")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", required=True, help="a task YAML describing the checkpoint's model")
    p.add_argument("--out", required=True, help="JSON file for the scored pairs")
    p.add_argument("--image_root", default="", help="prefix of relative image paths")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--debug", action="store_true", help="full traceback on a data, config or checkpoint error")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

    device = torch.device(args.device)
    cfg = scorer_config(args.config)
    dataset = PairDataset(args.pairs, test_transform(cfg.image_res), args.image_root)  # bad input fails first
    model, cfg = load_scorer(args.config, args.checkpoint)
    model.to(device)
    tokenizer = build_tokenizer(resolve_pretrained(cfg.tokenizer_source))
    p_match, itc_sim = pair_scores(model, dataset, tokenizer, device, args.batch_size, args.amp)
    scored = [entry | {"p_match": round(float(pm), 6), "itc_sim": round(float(s), 6)}
              for entry, pm, s in zip(dataset.ann.entries, p_match, itc_sim)]
    with open(args.out, "w") as f:
        json.dump(scored, f, indent=1)
    result = {"pairs": len(scored), "out": args.out}
    if dataset.labels is not None:
        kinds = [e.get("kind", "") for e in dataset.ann.entries] if any("kind" in e for e in dataset.ann.entries) else None
        result["balanced_accuracy"] = accuracy_by_kind(p_match, dataset.labels, kinds)
        logger.info("ITM balanced accuracy (p_match > 0.5), percent: %s",
                    "  ".join(f"{k} {v:.1f}" for k, v in result["balanced_accuracy"].items()))
    logger.info("scored %d pairs -> %s", len(scored), args.out)
    return result


if __name__ == "__main__":
    utils.run_main(main)
