"""Image-text retrieval data: the original's evaluation format and its recall metrics.

Evaluation files are lists of `{"image": path, "caption": [c1, c2, ...]}`; texts are numbered in file
order, so `img2txt[i]` lists the texts of image i and `txt2img[t]` is the image of text t.
"""

from __future__ import annotations

import numpy as np


def index_captions(ann: list[dict]) -> tuple[list[str], list[list[int]], list[int]]:
    """All captions in file order, with `img2txt` and `txt2img` (before any text normalisation)."""
    texts, img2txt, txt2img = [], [], []
    for i, entry in enumerate(ann):
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        img2txt.append(list(range(len(texts), len(texts) + len(captions))))
        texts += captions
        txt2img += [i] * len(captions)
    return texts, img2txt, txt2img


def _rank_of(scores: np.ndarray, targets: list[int]) -> int:
    # ALBEF parity: np.argsort (quicksort) reversed, so ties resolve exactly as in the original.
    order = np.argsort(scores)[::-1]
    return min(int(np.where(order == t)[0][0]) for t in targets)


def recall_metrics(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img, img2txt) -> dict[str, float]:
    """R@1/5/10 both ways in percent, as the original `itm_eval`: an image counts as found at the rank of
    its best-ranked ground-truth caption."""
    i2t = np.array([_rank_of(s, img2txt[i]) for i, s in enumerate(np.asarray(scores_i2t))])
    t2i = np.array([_rank_of(s, [txt2img[t]]) for t, s in enumerate(np.asarray(scores_t2i))])
    out = {}
    for prefix, ranks in (("txt", i2t), ("img", t2i)):
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * float((ranks < k).mean())
        out[f"{prefix}_r_mean"] = (out[f"{prefix}_r1"] + out[f"{prefix}_r5"] + out[f"{prefix}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
