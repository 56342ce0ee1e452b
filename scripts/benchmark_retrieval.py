"""Speed of the retrieval evaluation: the batched ITM re-ranking against the original's one query at a
time, on the same model and gallery, plus the recall and time of each ranking mode (itc, itm, itc+itm).

    python scripts/benchmark_retrieval.py --checkpoint output/demo_pretrain/checkpoint_last.pth
    python scripts/benchmark_retrieval.py --config configs/Retrieval_demo.yaml --split test --threads 1
    python scripts/benchmark_retrieval.py --config configs/Retrieval_flickr.yaml --synthetic 1000 5000 \
        --device cuda          # Flickr30K-size gallery, full-size model, random weights and pixels

Both re-rankings read the same features; the results must agree (same candidates, scores to 1e-4, same
recall). The feature pass is timed too, as this repository runs it (texts cut to their batch's longest)
and as the original does (every text at 30 tokens), so the end-to-end ratio is also reported.
Without --checkpoint the weights are random: the timing holds, the recalls mean nothing. `--synthetic`
needs no data or tokenizer: random pixels and token ids (8-25 tokens), text i belonging to image i % I.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
from datasets.retrieval import (  # noqa: E402
    RetrievalEvalDataset,
    feature_similarity,
    recall_metrics,
    retrieval_features,
    retrieval_scores,
)
from datasets.text import TOKENIZER_SETTINGS, build_tokenizer, tokenize  # noqa: E402
from datasets.transforms import test_transform  # noqa: E402
from models.albef import build_bert_config  # noqa: E402
from models.bert import resolve_pretrained  # noqa: E402
from models.retrieval import ALBEFRetrieval, load_retrieval_weights, rerank_itm_plain  # noqa: E402
from task_configs import RetrievalConfig  # noqa: E402


def timed(fn, *args, **kwargs):
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    return out, time.perf_counter() - start


@torch.no_grad()
def original_features(model, dataset, tokenizer, device, batch_size: int) -> None:
    """The original's feature pass (images, then every text padded to 30 tokens), for timing only."""
    ids, mask = tokenize(tokenizer, dataset.texts, **TOKENIZER_SETTINGS["retrieval_eval"])
    for i in range(0, len(dataset.texts), batch_size):
        model.encode_text(ids[i:i + batch_size].to(device), mask[i:i + batch_size].to(device))
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        model.encode_image(images.to(device))


class SyntheticGallery(torch.utils.data.Dataset):
    """Random images and texts of the config's sizes; `input_ids`/`attention_mask` replace tokenisation."""

    def __init__(self, cfg, images: int, texts: int, vocab_size: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(images, 3, cfg.image_res, cfg.image_res, generator=g)
        lengths = torch.randint(8, 26, (texts,), generator=g)
        self.attention_mask = (torch.arange(30)[None] < lengths[:, None]).long()
        self.input_ids = torch.randint(1000, vocab_size, (texts, 30), generator=g) * self.attention_mask
        self.input_ids[:, 0] = 101
        self.texts = [""] * texts
        self.txt2img = [t % images for t in range(texts)]
        self.img2txt = [list(range(i, texts, images)) for i in range(images)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i


class _SyntheticTokenizer:
    """Stands in for the tokenizer in `tokenize`: returns the gallery's ids whatever the texts."""

    def __init__(self, gallery: SyntheticGallery):
        self.gallery = gallery

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 1

    def __call__(self, texts, **kwargs):
        return {"input_ids": self.gallery.input_ids, "attention_mask": self.gallery.attention_mask}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/Retrieval_demo.yaml")
    p.add_argument("--checkpoint", help="pretraining or retrieval checkpoint (default: random weights)")
    p.add_argument("--split", choices=["val", "test"], default="test")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--synthetic", nargs=2, type=int, metavar=("IMAGES", "TEXTS"), help="random gallery of this size")
    p.add_argument("--out", help="also write the result JSON here")
    p.add_argument("--opts", nargs="*", default=[], help="config overrides (k_test=..., itm_batch_size=...)")
    return p.parse_args(argv)


def setup(args):
    """(config, model in eval mode on the device, gallery, tokenizer)."""
    cfg, _ = utils.load_config(args.config, args.opts, RetrievalConfig)
    torch.manual_seed(0)
    model = ALBEFRetrieval(cfg, build_bert_config(cfg))
    if args.checkpoint:
        load_retrieval_weights(model, args.checkpoint)
    model.to(args.device).eval()
    if args.synthetic:
        dataset = SyntheticGallery(cfg, *args.synthetic, model.bert_cfg.vocab_size)
        return cfg, model, dataset, _SyntheticTokenizer(dataset)
    dataset = RetrievalEvalDataset(getattr(cfg, f"{args.split}_file"), test_transform(cfg.image_res),
                                   cfg.image_root, cfg.max_words)
    return cfg, model, dataset, build_tokenizer(resolve_pretrained(cfg.text_encoder))


def measure(cfg, model, dataset, tokenizer, device) -> dict:
    """Times and scores of: the features (ours, the original's), each ranking mode, the plain loop."""
    bs, metrics = cfg.batch_size_test, functools.partial(recall_metrics, txt2img=dataset.txt2img,
                                                         img2txt=dataset.img2txt)
    feats = retrieval_features(model, dataset, tokenizer, device, bs)  # warm-up: CUDA context, caches
    few = {k: v[:8] if k.startswith("image") else v[:16] for k, v in feats.items()}
    retrieval_scores(model, few, 4, "itm", cfg.itm_batch_size)
    rerank_itm_plain(model, feature_similarity(few), few["image_embeds"], few["text_embeds"], few["text_mask"], 4)
    out = {}
    feats, out["features_seconds"] = timed(retrieval_features, model, dataset, tokenizer, device, bs)
    _, out["features_original_seconds"] = timed(original_features, model, dataset, tokenizer, device, bs)
    out["modes"] = {}
    for mode in ("itc", "itm", "itc+itm"):
        scores, seconds = timed(retrieval_scores, model, feats, cfg.k_test, mode, cfg.itm_batch_size)
        out["modes"][mode] = {"seconds": seconds} | metrics(scores[0].numpy(), scores[1].numpy())
        out["scores"] = scores if mode == "itm" else out.get("scores")
    plain, out["plain_seconds"] = timed(rerank_itm_plain, model, feature_similarity(feats), feats["image_embeds"],
                                        feats["text_embeds"], feats["text_mask"], cfg.k_test)
    out["plain_scores"] = (plain[0].cpu(), plain[1].cpu())
    out["plain_metrics"] = metrics(out["plain_scores"][0].numpy(), out["plain_scores"][1].numpy())
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, model, dataset, tokenizer = setup(args)
    device = torch.device(args.device)
    with utils.autocast_context(cfg.amp, device):
        m = measure(cfg, model, dataset, tokenizer, device)
    ours, plain, t_ours = m["scores"], m["plain_scores"], m["modes"]["itm"]["seconds"]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "amp": cfg.amp,
        "threads": torch.get_num_threads(), "images": len(dataset), "texts": len(dataset.texts),
        "k_test": cfg.k_test, "itm_batch_size": cfg.itm_batch_size, "checkpoint": args.checkpoint,
        "rerank_batched_seconds": round(t_ours, 3), "rerank_plain_seconds": round(m["plain_seconds"], 3),
        "rerank_speedup": round(m["plain_seconds"] / t_ours, 2),
        "features_seconds": round(m["features_seconds"], 3),
        "features_original_seconds": round(m["features_original_seconds"], 3),
        "end_to_end_speedup": round((m["features_original_seconds"] + m["plain_seconds"])
                                    / (m["features_seconds"] + t_ours), 2),
        "same_candidates": all(torch.equal(a == -100, b == -100) for a, b in zip(ours, plain)),
        "max_abs_score_diff": max(float((a - b).abs().max()) for a, b in zip(ours, plain)),
        # candidates whose logits differ by less than the float noise may swap places (a weak ITM head)
        "candidate_score_std": float(ours[0][ours[0] != -100].std()),
        "same_recall": m["plain_metrics"] == {k: v for k, v in m["modes"]["itm"].items() if k != "seconds"},
        "plain_r_mean": m["plain_metrics"]["r_mean"],
        "modes": {k: {n: round(x, 3) for n, x in v.items()} for k, v in m["modes"].items()},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
