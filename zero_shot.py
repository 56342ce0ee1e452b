"""What a pretrained model knows before any fine-tuning, on held-out pictures: zero-shot retrieval ranked
by ITC alone and re-ranked by ITM (the original's evaluation: ITM logit of the ITC top K_TEST), and ITM
balanced accuracy (and AUC) on pairs whose caption has one attribute swapped (`scripts/score_pairs.py`'s format
with a `kind` per entry). `make demo` (scripts/demo.py) and scripts/ablate_vilta.py report it.
"""

from __future__ import annotations

import torch

from datasets.retrieval import (
    PairDataset,
    RetrievalEvalDataset,
    accuracy_by_kind,
    recall_metrics,
    retrieval_features,
    retrieval_scores,
    roc_auc,
)
from datasets.text import build_tokenizer
from datasets.transforms import test_transform
from models.bert import resolve_pretrained
from models.retrieval import load_scorer, pair_scores
from task_configs import PretrainConfig

K_TEST = 16  # ITC candidates re-ranked by ITM, as configs/Retrieval_demo.yaml


@torch.no_grad()
def measure(weights: str | dict, cfg: PretrainConfig, test_file: str, pairs_file: str) -> dict:
    """Retrieval (ITC, ITM re-ranked) and ITM balanced accuracy by kind of swap, percent."""
    model, _ = load_scorer(cfg, weights)
    tokenizer = build_tokenizer(resolve_pretrained(cfg.tokenizer_source))
    device = torch.device("cpu")
    dataset = RetrievalEvalDataset(test_file, test_transform(cfg.image_res), cfg.image_root, cfg.max_words)
    feats = retrieval_features(model, dataset, tokenizer, device)
    out = {}
    for rank_by in ("itc", "itm"):
        i2t, t2i = retrieval_scores(model, feats, K_TEST, rank_by)
        metrics = recall_metrics(i2t.numpy(), t2i.numpy(), dataset.txt2img, dataset.img2txt)
        out |= {f"{rank_by}_{k}": metrics[k] for k in ("img_r1", "img_r5", "txt_r1", "txt_r5")}
    pairs = PairDataset(pairs_file, test_transform(cfg.image_res), cfg.image_root, cfg.max_words)
    p_match, _ = pair_scores(model, pairs, tokenizer, device, amp=cfg.amp)  # under the autocast it was trained with
    kinds = [e["kind"] for e in pairs.ann.entries]
    balanced = accuracy_by_kind(p_match, pairs.labels, kinds)
    auc = accuracy_by_kind(p_match, pairs.labels, kinds, metric=roc_auc)
    return out | {f"itm_{k}": v for k, v in balanced.items()} | {f"itm_auc_{k}": v for k, v in auc.items()}
