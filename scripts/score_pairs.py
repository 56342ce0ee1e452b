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
import dataclasses
import json
import logging
import os
import sys

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402
from datasets.retrieval import PairDataset, balanced_accuracy  # noqa: E402
from datasets.text import TOKENIZER_SETTINGS, build_tokenizer, tokenize  # noqa: E402
from datasets.transforms import test_transform  # noqa: E402
from models.albef import ALBEFBase, build_bert_config, load_checkpoint_file, load_state_dict_strict  # noqa: E402
from models.bert import resolve_pretrained  # noqa: E402
from models.retrieval import ALBEFRetrieval, RetrievalModelConfig, retrieval_state_dict  # noqa: E402

logger = logging.getLogger("score_pairs")


def model_config(source: str | object) -> RetrievalModelConfig:
    """The model keys of any task YAML file or config object (the rest is not this tool's business)."""
    if isinstance(source, str):
        with open(source) as f:
            data = yaml.safe_load(f) or {}
    else:
        data = vars(source)
    names = {f.name for f in dataclasses.fields(RetrievalModelConfig)}
    return RetrievalModelConfig(**{k: v for k, v in data.items() if k in names})


def load_scorer(config: str | object, checkpoint: str | dict) -> tuple[ALBEFRetrieval, RetrievalModelConfig]:
    """The retrieval model (ITC + ITM, no MLM head) described by `config` (see `model_config`) with the
    weights of a pretraining or retrieval checkpoint (a file, or a state dict in memory)."""
    cfg = model_config(config)
    model = ALBEFRetrieval(cfg, build_bert_config(cfg))
    ckpt = load_checkpoint_file(checkpoint) if isinstance(checkpoint, str) else checkpoint
    sd = ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt
    source = checkpoint if isinstance(checkpoint, str) else "state dict"
    load_state_dict_strict(model, retrieval_state_dict(sd, model), source)
    return model.eval(), cfg


@torch.no_grad()
def score(model: ALBEFBase, dataset: PairDataset, tokenizer, device: torch.device, batch_size: int = 128,
          amp: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(p_match [N], itc_sim [N]) of every pair of `dataset`, in file order, `batch_size` pairs at a time."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=lambda b: list(zip(*b)),
                                         generator=torch.Generator())  # leaves the caller's RNG stream alone
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    p_match, itc_sim = [], []
    for images, captions, _ in loader:
        ids, mask = tokenize(tokenizer, captions, **TOKENIZER_SETTINGS["retrieval_eval"])
        with torch.autocast(device.type, dtype=dtype, enabled=amp == "bf16"):
            p, s = model.match_scores(torch.stack(images).to(device), ids.to(device), mask.to(device))
        p_match.append(p.cpu())
        itc_sim.append(s.cpu())
    return torch.cat(p_match), torch.cat(itc_sim)


def accuracy_by_kind(p_match: torch.Tensor, labels: list[int], kinds: list[str] | None) -> dict[str, float]:
    """ITM balanced accuracy over all pairs ("all") and, per kind of non-matching pair, of the matching
    pairs against that kind alone."""
    labels_t = torch.tensor(labels)
    out = {"all": balanced_accuracy(p_match, labels_t)}
    for kind in sorted({k for k, y in zip(kinds or [], labels) if y == 0}):
        keep = torch.tensor([y == 1 or k == kind for k, y in zip(kinds, labels)])
        out[kind] = balanced_accuracy(p_match[keep], labels_t[keep])
    return out


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
    cfg = model_config(args.config)
    dataset = PairDataset(args.pairs, test_transform(cfg.image_res), args.image_root)  # bad input fails first
    model, cfg = load_scorer(args.config, args.checkpoint)
    model.to(device)
    tokenizer = build_tokenizer(resolve_pretrained(cfg.tokenizer_source))
    p_match, itc_sim = score(model, dataset, tokenizer, device, args.batch_size, args.amp)
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
