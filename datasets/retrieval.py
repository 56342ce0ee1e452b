"""Image-text retrieval data: the original's training and evaluation formats, its evaluation scores
and its recall metrics.

Training files are lists of `{"image": path, "caption": str, "image_id": any}` (one caption per entry).
Evaluation files are lists of `{"image": path, "caption": [c1, c2, ...]}`; texts are numbered in file
order, so `img2txt[i]` lists the texts of image i and `txt2img[t]` is the image of text t.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from datasets.base import AnnotationError, Annotations, image_path, open_image
from datasets.text import TOKENIZER_SETTINGS, collate_image_text, pre_caption, tokenize


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
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0,
                                         generator=torch.Generator())  # leaves the training RNG stream alone
    for images, _ in loader:
        image_feats.append(model.encode_image(images.to(device))[1])
    return (torch.cat(image_feats) @ torch.cat(text_feats).T).float().cpu()


def evaluate_itc(model, dataset: RetrievalEvalDataset, tokenizer, device, batch_size: int = 128) -> dict[str, float]:
    """Zero-shot recall from ITC similarities alone (the fast ranking; no ITM re-ranking)."""
    sims = itc_similarity(model, dataset, tokenizer, device, batch_size).numpy()
    return recall_metrics(sims, sims.T, dataset.txt2img, dataset.img2txt)


# ------------------------------------------------------------------------------ fine-tuning data


class RetrievalTrainDataset(torch.utils.data.Dataset):
    """Training pairs `{"image": path, "caption": str, "image_id": any}` from one or several files.

    A sample is (image tensor, normalised caption, idx): `idx` numbers the distinct `image_id`s 0, 1, ...
    in order of first appearance (as the original), so captions of one image share it and are treated
    as positives of each other by the model.
    """

    def __init__(self, ann_files, transform, image_root: str = "", max_words: int = 30):
        self.ann = Annotations(ann_files)
        self.transform, self.image_root, self.max_words = transform, image_root, max_words
        self.img_ids: dict = {}
        for i in range(len(self.ann)):
            self.img_ids.setdefault(self.ann.field(i, "image_id"), len(self.img_ids))

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        path = image_path(self.image_root, self.ann.field(index, "image"))
        image = self.transform(open_image(path, where=self.ann.where(index)))
        caption = pre_caption(self.ann.field(index, "caption"), self.max_words)
        return image, caption, self.img_ids[self.ann[index]["image_id"]]


def collate_retrieval(tokenizer):
    """DataLoader `collate_fn`: samples -> the retrieval model's forward arguments {"image", "input_ids",
    "attention_mask", "idx"}, tokenised as the original's training (longest, no truncation)."""
    return functools.partial(collate_image_text, tokenizer=tokenizer, setting="retrieval_train", key="idx")


# ----------------------------------------------------------------------------------- evaluation

RANK_MODES = ("itm", "itc", "itc+itm")


@torch.no_grad()
def retrieval_features(model, dataset: RetrievalEvalDataset, tokenizer, device, batch_size: int = 256,
                       num_workers: int = 0) -> dict[str, torch.Tensor]:
    """Every gallery feature the evaluation needs (`ALBEFRetrieval.gallery_features`): texts tokenised as
    the original's evaluation, images `batch_size` at a time."""
    input_ids, attention_mask = tokenize(tokenizer, dataset.texts, **TOKENIZER_SETTINGS["retrieval_eval"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         generator=torch.Generator())  # leaves the training RNG stream alone
    images = (x for x, _ in loader)
    return model.gallery_features(input_ids, attention_mask, images, batch_size, device)


def feature_similarity(feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """[I, T] cosine similarities in float32, also under autocast (bf16 would tie candidates)."""
    with torch.autocast(feats["image_feat"].device.type, enabled=False):
        return feats["image_feat"].float() @ feats["text_feat"].float().T


@torch.no_grad()
def retrieval_scores(model, feats: dict[str, torch.Tensor], k_test: int, rank_by: str = "itm",
                     itm_batch_size: int = 256, rank: int = 0, world_size: int = 1):
    """(score_i2t [I, T], score_t2i [T, I]) on the CPU, float32, the same on every rank.

    `rank_by`: "itm" the original (ITM logit of the k_test ITC candidates, -100 elsewhere); "itc" the
    cosine similarities alone (no fusion pass); "itc+itm" the ITM logit plus the cosine on the candidates
    (BLIP's ranking), -100 elsewhere.
    """
    if rank_by not in RANK_MODES:
        raise ValueError(f"rank_by must be one of {RANK_MODES}, got {rank_by!r}")
    sims = feature_similarity(feats)
    if rank_by == "itc":
        return sims.cpu(), sims.T.contiguous().cpu()
    score_i2t, score_t2i = model.rerank(sims, feats, k_test, itm_batch_size, rank, world_size, rank_by == "itc+itm")
    return score_i2t.cpu(), score_t2i.cpu()


class PairDataset(torch.utils.data.Dataset):
    """Image-caption pairs to score (`scripts/score_pairs.py`): a JSON list of
    `{"image": path, "caption": str[, "label": 1 | 0]}`; item = (image tensor, normalised caption, index)."""

    def __init__(self, ann_file: str, transform, image_root: str = "", max_words: int = 30):
        self.transform, self.image_root = transform, image_root
        self.ann = Annotations(ann_file)
        self.captions, labels = [], []
        for i in range(len(self.ann)):
            caption = self.ann.field(i, "caption")
            if not isinstance(caption, str):
                raise AnnotationError(f"{self.ann.where(i)}: 'caption' must be one string, got {type(caption).__name__}")
            self.captions.append(pre_caption(caption, max_words))
            label = self.ann[i].get("label")
            if label not in (None, 0, 1, True, False):
                raise AnnotationError(f"{self.ann.where(i)}: 'label' must be 1 (match) or 0, got {label!r}")
            labels.append(label)
        given = [label is not None for label in labels]
        if any(given) and not all(given):
            raise AnnotationError(f"{ann_file}: 'label' is given for {sum(given)} of {len(given)} pairs; give all or none")
        self.labels = [int(label) for label in labels] if all(given) and given else None

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int):
        path = image_path(self.image_root, self.ann.field(index, "image"))
        return self.transform(open_image(path, where=self.ann.where(index))), self.captions[index], index

    def collate_fn(self, tokenizer):
        """Batches of {"image", "input_ids", "attention_mask"}, tokenised as the retrieval evaluation."""
        return functools.partial(collate_image_text, tokenizer=tokenizer, setting="retrieval_eval")


def balanced_accuracy(p_match: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> float:
    """Percent, the mean of the accuracy on true pairs and on false pairs (a model that answers the
    majority label scores 50 whatever the mix)."""
    said = p_match > threshold
    labels = labels.bool()
    if labels.all() or not labels.any():
        raise ValueError("balanced accuracy needs both matching and non-matching pairs")
    return 50.0 * (said[labels].float().mean().item() + (~said[~labels]).float().mean().item())


def roc_auc(p_match: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent, the chance that a matching pair scores above a non-matching one (ties count half): no
    threshold, so the ITM head's prior (its share of "no match" rows in training) does not move it."""
    labels = labels.bool()
    if labels.all() or not labels.any():
        raise ValueError("AUC needs both matching and non-matching pairs")
    # Mann-Whitney U from ranks (tied scores share their mean rank): O(n log n), no P x N comparison matrix
    _, inverse, counts = torch.unique(p_match.double(), return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    ranks = (last - (counts - 1) / 2)[inverse]
    n_pos, n_neg = labels.sum().item(), (~labels).sum().item()
    u = ranks[labels].sum().item() - n_pos * (n_pos + 1) / 2
    return 100.0 * u / (n_pos * n_neg)


def accuracy_by_kind(p_match: torch.Tensor, labels: list[int], kinds: list[str] | None,
                     metric=balanced_accuracy) -> dict[str, float]:
    """`metric` (balanced accuracy, or `roc_auc`) over all pairs ("all") and, per kind of non-matching
    pair, of the matching pairs against that kind alone."""
    labels_t = torch.tensor(labels)
    out = {"all": metric(p_match, labels_t)}
    for kind in sorted({k for k, y in zip(kinds or [], labels) if y == 0}):
        keep = torch.tensor([y == 1 or k == kind for k, y in zip(kinds, labels)])
        out[kind] = metric(p_match[keep], labels_t[keep])
    return out
