"""Image-text retrieval data: the original's evaluation format and its recall metrics.

Evaluation files are lists of `{"image": path, "caption": [c1, c2, ...]}`; texts are numbered in file
order, so `img2txt[i]` lists the texts of image i and `txt2img[t]` is the image of text t.
"""

from __future__ import annotations

import numpy as np
import torch

from datasets.base import Annotations, image_path, open_image
from datasets.text import TOKENIZER_SETTINGS, pre_caption, tokenize


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


class RetrievalEvalDataset(torch.utils.data.Dataset):
    """Images of a retrieval evaluation file; `texts` holds the normalised captions in file order."""

    def __init__(self, ann_file: str, transform, image_root: str = "", max_words: int = 30):
        self.transform, self.image_root = transform, image_root
        self.ann = Annotations(ann_file)
        captions, self.img2txt, self.txt2img = index_captions(self.ann.entries)
        self.texts = [pre_caption(c, max_words) for c in captions]

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int):
        path = image_path(self.image_root, self.ann.field(index, "image"))
        return self.transform(open_image(path, where=self.ann.where(index))), index


@torch.no_grad()
def itc_similarity(model, dataset: RetrievalEvalDataset, tokenizer, device, batch_size: int = 128) -> torch.Tensor:
    """[images, texts] cosine similarities of the projected CLS features (no temperature), as the first
    stage of the original's retrieval evaluation."""
    model.eval()
    input_ids, attention_mask = tokenize(tokenizer, dataset.texts, **TOKENIZER_SETTINGS["retrieval_eval"])
    text_feats = []
    for i in range(0, len(dataset.texts), batch_size):
        ids, mask = input_ids[i : i + batch_size].to(device), attention_mask[i : i + batch_size].to(device)
        text_feats.append(model.encode_text(ids, mask)[1])
    image_feats = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    for images, _ in loader:
        image_feats.append(model.encode_image(images.to(device))[1])
    return (torch.cat(image_feats) @ torch.cat(text_feats).T).float().cpu()


def evaluate_itc(model, dataset: RetrievalEvalDataset, tokenizer, device, batch_size: int = 128) -> dict[str, float]:
    """Zero-shot recall from ITC similarities alone (the fast ranking; no ITM re-ranking)."""
    sims = itc_similarity(model, dataset, tokenizer, device, batch_size).numpy()
    return recall_metrics(sims, sims.T, dataset.txt2img, dataset.img2txt)
