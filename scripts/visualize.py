"""Per-word Grad-CAM heat maps: which image regions drive ALBEF's image-text matching score.

    python scripts/visualize.py IMAGE "TEXT" --checkpoint CKPT [--config YAML] --out heatmap.png

Writes one PNG: the image, one overlay per word (WordPiece pieces merged), the whole-sentence map (the
mean of the word maps) and, in ITM mode, the map of [CLS], each word labelled with its share of the
words' total heat, under a header with the text, the ITM match probability, the mode and the layer. Any checkpoint with an ITM head works (pretraining, retrieval,
grounding, the official refcoco.pth); its own `config` is used unless `--config` (any task YAML) is
given. `--image_res` runs the model at another resolution (position embeddings resized): a finer
patch grid, e.g. 128 for the 64 px demo model (4 x 4 -> 8 x 8 patches), if the model copes.

Modes (models/gradcam.py): `itm` (default) reads fusion layer `--block_num` (default: the third fusion
layer, or the first of the demo's two); `itc` reads ViT block `--block_num` and scores image-text
similarity, which has no per-token attention: each word's map is that of the word alone as the text.
Colours show each map above its own minimum (heat spread evenly over the image stays uncoloured), on
a scale shared by the word maps (`--normalize shared`: a faint map is a word the score ignores);
`--normalize word` stretches each map to its own range, as the original notebook.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datasets.base import open_image  # noqa: E402
from datasets.text import TOKENIZER_SETTINGS, build_tokenizer, pre_caption, tokenize  # noqa: E402
from datasets.transforms import test_transform  # noqa: E402
from models.albef import build_bert_config  # noqa: E402
from models.bert import resolve_pretrained  # noqa: E402
from models.gradcam import (  # noqa: E402
    check_block_num,
    default_block_num,
    fusion_layer_range,
    itc_map,
    itm_token_maps,
    sentence_map,
)
from models.checkpoint import CheckpointError, load_checkpoint_file, read_state_dict  # noqa: E402
from models.retrieval import ALBEFRetrieval, RetrievalModelConfig, load_retrieval_weights  # noqa: E402

logger = logging.getLogger("visualize")
COLUMNS = 7


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image")
    p.add_argument("text")
    p.add_argument("--checkpoint", required=True, help="pretraining, retrieval or grounding checkpoint")
    p.add_argument("--config", help="YAML with the model keys (default: the checkpoint's own config)")
    p.add_argument("--out", default="heatmap.png")
    p.add_argument("--gradcam_mode", choices=["itm", "itc"], default="itm")
    p.add_argument("--block_num", type=int, help="fusion layer (itm) or ViT block (itc)")
    p.add_argument("--image_res", type=int, help="run the model at this resolution instead of the config's")
    p.add_argument("--normalize", choices=["shared", "word"], default="shared")
    p.add_argument("--panel", type=int, default=160, help="panel size in pixels (longer side)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ model


def model_config(args, ckpt: dict) -> RetrievalModelConfig:
    """The model keys of `--config` or of the checkpoint's `config` (other task keys are ignored)."""
    if args.config:
        from ruamel.yaml import YAML

        with open(args.config) as f:
            raw = YAML(typ="safe", pure=True).load(f) or {}
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict):
        raw = ckpt["config"]
    else:
        raise SystemExit(f"{args.checkpoint} carries no config: pass --config (e.g. configs/Grounding.yaml)")
    names = {f.name for f in dataclasses.fields(RetrievalModelConfig)}
    values = {k: v for k, v in raw.items() if k in names}
    if isinstance(values.get("bert_config"), str) and not os.path.exists(values["bert_config"]):
        values["bert_config"] = str(ROOT / values["bert_config"])  # repo-relative, run from elsewhere
    if args.image_res:
        values["image_res"] = args.image_res
    return RetrievalModelConfig(**values)


def load_model(args) -> tuple[ALBEFRetrieval, RetrievalModelConfig]:
    ckpt = load_checkpoint_file(args.checkpoint)
    sd = read_state_dict(ckpt)
    if not any(k.startswith("itm_head.") for k in sd):
        raise CheckpointError(f"{args.checkpoint} has no itm_head (a VQA, NLVR or VE model?): Grad-CAM explains "
                              "the ITM score; pass a pretraining, retrieval or grounding checkpoint")
    cfg = model_config(args, ckpt)
    model = ALBEFRetrieval(dataclasses.replace(cfg, queue_size=_queue_size(sd, cfg)), build_bert_config(cfg))
    load_retrieval_weights(model, sd, args.checkpoint)
    return model.eval().to(args.device), cfg


def _queue_size(sd: dict, cfg: RetrievalModelConfig) -> int:
    return sd["image_queue"].shape[1] if "image_queue" in sd else cfg.queue_size


# ------------------------------------------------------------------------------------------- maps


def word_maps(model, image, text: str, tokenizer, mode: str, block_num: int):
    """(words, maps [W, g, g], sentence map [g, g], [CLS] map [g, g] or None, ITM match probability) for
    one image and text. In ITM mode the sentence map is the mean of the word maps; [CLS]'s own map (which
    Grounding.py's sentence map includes by default) is returned apart."""
    ids, mask = tokenize(tokenizer, [text], **TOKENIZER_SETTINGS["longest"])
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    groups: list[list[int]] = []
    for i, tok in enumerate(tokens[1:], start=1):  # [CLS] is no word
        if tok.startswith("##") and groups:
            groups[-1].append(i)
        else:
            groups.append([i])
    words = ["".join(tokens[i].removeprefix("##") for i in g) for g in groups]
    token_maps, logits = itm_token_maps(model, image, ids, mask, block_num if mode == "itm" else
                                        default_block_num(model))
    prob = float(logits.softmax(-1)[0, 1])
    if mode == "itm":
        maps = torch.stack([token_maps[0, g].mean(0) for g in groups])
        return words, maps, sentence_map(token_maps, mask, with_cls=False)[0], token_maps[0, 0], prob
    # ITC: one map per text; a word's map is that of the word alone as the text
    w_ids, w_mask = tokenize(tokenizer, [text] + words, **TOKENIZER_SETTINGS["longest"])
    cams = itc_map(model, image.expand(len(w_ids), -1, -1, -1), w_ids, w_mask, block_num)[0]
    return words, cams[1:], cams[0], None, prob


# ------------------------------------------------------------------------------------------ render


def jet(x: np.ndarray) -> np.ndarray:
    """Matplotlib's 'jet' colour map: [..] in [0, 1] -> [.., 3] RGB in [0, 1]."""
    return np.stack([np.clip(1.5 - np.abs(4 * x - c), 0, 1) for c in (3, 2, 1)], axis=-1)


def overlay(rgb: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The heat map [g, g] (values in [0, 1]) resized bicubically to the image and blended over it as
    the original notebook: (1 - m^0.7) * image + m^0.7 * jet(m)."""
    h, w = rgb.shape[:2]
    m = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((w, h), Image.BICUBIC))
    m = np.clip(m, 0, 1)
    a = m[..., None] ** 0.7
    return (1 - a) * rgb + a * jet(m)


def render(image: Image.Image, words: list[str], maps: np.ndarray, sentence: np.ndarray, cls: np.ndarray | None,
           header: str, normalize: str, panel: int) -> Image.Image:
    """A grid of labelled panels: the image, each word's overlay, the sentence overlay (and [CLS]'s, each
    of these two stretched to its own maximum)."""
    scale = panel / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    rgb = np.asarray(image.resize(size, Image.BICUBIC), dtype=np.float32) / 255
    shares = maps.sum((1, 2)) / max(maps.sum(), 1e-12)
    lifted = maps - maps.min((1, 2), keepdims=True)  # a map's floor (heat spread everywhere) stays uncoloured
    top = lifted.max() if normalize == "shared" else None
    tiles = [(rgb, "image")]
    for word, m, share in zip(words, lifted, shares):
        tiles.append((overlay(rgb, m / max(top if top is not None else m.max(), 1e-12)), f"{word} {100 * share:.0f}%"))
    for label, m in (("[sentence]", sentence), ("[CLS]", cls)):
        if m is not None:
            m = m - m.min()
            tiles.append((overlay(rgb, m / max(m.max(), 1e-12)), label))

    font, small = ImageFont.load_default(size=max(12, panel // 10)), ImageFont.load_default(size=13)
    label_h, pad, head_h = max(12, panel // 10) + 8, 6, 44
    cols = min(COLUMNS, len(tiles))
    rows = -(-len(tiles) // cols)
    canvas = Image.new("RGB", (pad + cols * (size[0] + pad), head_h + rows * (size[1] + label_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(header.splitlines()[:2]):
        draw.text((pad, 4 + 18 * k), line, fill="black", font=small)
    for k, (pixels, label) in enumerate(tiles):
        x = pad + (k % cols) * (size[0] + pad)
        y = head_h + (k // cols) * (size[1] + label_h + pad)
        canvas.paste(Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)), (x, y))
        draw.text((x + size[0] / 2, y + size[1] + 2), label, fill="black", font=font, anchor="mt")
    return canvas


def main(argv=None) -> dict:
    """Writes the PNG; returns {"words", "shares", "itm_prob", "seconds"} (tests, scripting)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    image = open_image(args.image)  # errors name the file
    model, cfg = load_model(args)
    block = default_block_num(model) if args.block_num is None and args.gradcam_mode == "itm" else \
        args.block_num if args.block_num is not None else 0
    check_block_num(model, block, args.gradcam_mode)
    if args.gradcam_mode == "itm" and block == fusion_layer_range(model)[-1] and len(fusion_layer_range(model)) > 1:
        logger.warning("block %d is the last fusion layer: only [CLS] reaches the ITM head there, so every word "
                       "map is zero", block)
    tokenizer = build_tokenizer(resolve_pretrained(cfg.tokenizer_source))
    text = pre_caption(args.text, 30)
    pixels = test_transform(cfg.image_res)(image)[None].to(args.device)
    words, maps, sentence, cls, prob = word_maps(model, pixels, text, tokenizer, args.gradcam_mode, block)
    maps, sentence = maps.cpu().numpy(), sentence.cpu().numpy()
    cls = None if cls is None else cls.cpu().numpy()
    where = f"fusion layer {block}" if args.gradcam_mode == "itm" else f"ViT block {block}"
    header = (f'"{text}"   ITM p(match) {prob:.2f}\n'
              f"{Path(args.checkpoint).name}: {args.gradcam_mode} Grad-CAM, {where}, {cfg.image_res} px, "
              f"{maps.shape[-1]}x{maps.shape[-1]} patches, {args.normalize} colours")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    render(image, words, maps, sentence, cls, header, args.normalize, args.panel).save(args.out, optimize=True)
    seconds = time.perf_counter() - start
    shares = (maps.sum((1, 2)) / max(maps.sum(), 1e-12)).tolist()
    logger.info("%s: %s (p(match) %.2f) in %.1f s", args.out, "  ".join(f"{w} {100 * s:.0f}%" for w, s in
                                                                         zip(words, shares)), prob, seconds)
    return {"words": words, "shares": shares, "itm_prob": prob, "seconds": seconds}


if __name__ == "__main__":
    main()
