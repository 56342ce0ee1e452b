"""Weakly supervised grounding: box scoring (a planted hot region, the original's slicing), IoU as the
original, the reference files (refs pickle as plain data only), the demo grounding split, Grounding.py
end to end, and the full-size config against the official refcoco.pth key list (meta device)."""

import json
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import Grounding
import utils
from datasets.base import AnnotationError
from datasets.grounding import (compute_iou, grounding_accuracy, grounding_predictions, load_dets, load_refer,
                                pick_box, score_boxes)
from models.checkpoint import CheckpointError, load_state_dict_strict
from models.gradcam import check_block_num, default_block_num
from scripts import prepare_demo_data
from tests.test_retrieval import pretrain_checkpoint  # the same sizes and ViT grid (patch 8)

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(ROOT / "configs" / "Grounding_demo.yaml")


def test_box_scoring_picks_the_box_under_a_planted_hot_region():
    heat = torch.rand(8, 8) * 0.05
    heat[2:4, 5:7] = 1.0  # 64 px image: rows 16..31, columns 40..55
    exact, bigger, part, elsewhere = [40, 16, 16, 16], [32, 8, 32, 32], [44, 20, 8, 8], [0, 40, 20, 20]
    for order in ([exact, bigger, part, elsewhere], [elsewhere, part, bigger, exact], [bigger, exact, part, elsewhere]):
        assert pick_box(heat, order, 64, 64) == exact
    scores = score_boxes(heat, torch.tensor([exact, bigger, part, elsewhere]), 64, 64)
    assert scores[0] > scores[1] > scores[3] and scores[0] > scores[2] > scores[3]
    # alpha 0 scores the heat mass alone: the bigger box, which holds all of it and more, wins
    assert pick_box(heat, [exact, bigger, part], 64, 64, alpha=0.0) == bigger


def test_score_boxes_equals_the_originals_loop():
    g = torch.Generator().manual_seed(0)
    heat = torch.rand(24, 24, generator=g)
    H, W = 48, 70
    xy = torch.rand(40, 2, generator=g) * torch.tensor([W, H])
    wh = torch.rand(40, 2, generator=g) * torch.tensor([W, H]) + 0.5
    boxes = torch.cat([xy, wh], 1).double()
    up = F.interpolate(heat[None, None], size=(H, W), mode="bicubic").squeeze()
    expected = torch.stack([up[int(b[1]):int(b[1] + b[3]), int(b[0]):int(b[0] + b[2])].sum() / (b[2] * b[3]) ** 0.5
                            for b in boxes.tolist()]).double()
    torch.testing.assert_close(score_boxes(heat, boxes, H, W), expected, rtol=1e-5, atol=1e-5)


def test_iou_keeps_the_originals_pixel_convention():
    assert compute_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert compute_iou([0, 0, 10, 10], [5, 5, 10, 10]) == pytest.approx(25 / 175)
    assert compute_iou([0, 0, 10, 10], [9, 0, 10, 10]) == 0.0  # a one-pixel overlap counts as none
    assert compute_iou([0, 0, 10, 10], [20, 20, 5, 5]) == 0.0


def write_refer(root: Path, refs, name: str = "refs(unc).p") -> None:
    folder = root / "refcoco+"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    (folder / "instances.json").write_text(json.dumps({
        "images": [{"id": 7, "height": 64, "width": 64}],
        "annotations": [{"id": 70, "image_id": 7, "bbox": [40, 16, 16, 16]}, {"id": 71, "image_id": 7, "bbox": [0, 0, 8, 8]}],
        "categories": []}))


REFS = [{"ref_id": 1, "ann_id": 70, "image_id": 7, "split": "val", "sentences": [{"sent": "the red one"}]},
        {"ref_id": 2, "ann_id": 71, "image_id": 7, "split": "testB", "sentences": [{"sent": "the corner"}]}]


def test_reference_files_and_accuracy_per_split(tmp_path):
    write_refer(tmp_path, REFS)
    refer = load_refer(str(tmp_path))
    assert refer.boxes == {1: [40, 16, 16, 16], 2: [0, 0, 8, 8]} and refer.sizes == {7: (64, 64)}
    (tmp_path / "dets.json").write_text(json.dumps({"7": [[0, 0, 8, 8, 0.9], [40, 16, 16, 16, 0.8], [0, 40, 20, 20]]}))
    dets = load_dets(str(tmp_path / "dets.json"))
    heat = torch.zeros(8, 8)
    heat[2:4, 5:7] = 1.0
    preds = grounding_predictions([{"ref_id": 1, "pred": heat}, {"ref_id": 2, "pred": heat}], refer, dets)
    assert [p["pred_box"] for p in preds] == [[40.0, 16.0, 16.0, 16.0]] * 2
    assert grounding_accuracy(preds) == {"val_d": 1.0, "testB_d": 0.0}
    with pytest.raises(AnnotationError, match="ref_id 3"):
        grounding_predictions([{"ref_id": 3, "pred": heat}], refer, dets)


def test_refs_pickle_must_be_plain_data(tmp_path):
    write_refer(tmp_path, [OrderedDict(REFS[0])])  # any class reference is refused
    with pytest.raises(AnnotationError, match=r"refs\(unc\)\.p.*refuses to load collections.OrderedDict"):
        load_refer(str(tmp_path))
    with pytest.raises(AnnotationError, match="refs file not found"):
        load_refer(str(tmp_path / "nowhere"))
    with pytest.raises(AnnotationError, match="det_file not found"):
        load_dets(str(tmp_path / "dets.json"))


# ------------------------------------------------------------------------------------- demo data


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    prepare_demo_data.main(["--out", str(out), "--limit", "80"])
    return out


def test_demo_grounding_split_boxes_come_from_the_pixels(demo):
    root = demo / "grounding"
    refer = load_refer(str(root))
    dets = load_dets(str(root / "refcoco+" / "dets.json"))
    val = json.loads((root / "refcoco+_val.json").read_text())
    test = json.loads((root / "refcoco+_test.json").read_text())
    assert val and test and {"image", "text", "ref_id"} == set(val[0])
    assert {refer.refs[e["ref_id"]]["split"] for e in val} == {"val"}
    assert {refer.refs[e["ref_id"]]["split"] for e in test} <= {"testA", "testB"}
    for entry in val + test:
        ref_id = entry["ref_id"]
        boxes = dets[str(refer.refs[ref_id]["image_id"])]
        assert len(boxes) == 8 and sum(compute_iou(refer.boxes[ref_id], b) >= 0.5 for b in boxes) == 1
        x, y, w, h = map(int, refer.boxes[ref_id])
        pixels = np.asarray(Image.open(demo / entry["image"]).convert("RGB"), dtype=np.float32)
        background = pixels[0, 0] if (pixels[0, 0] == pixels[-1, -1]).all() else pixels[0, -1]
        distance = np.linalg.norm(pixels - background, axis=-1)
        ink = distance > 0.5 * distance.max()  # at least half way to the shape's colour
        assert ink[y:y + h, x:x + w].sum() >= 0.95 * ink.sum()  # the box holds the shape...
        assert ink[y:y + h, x:x + w].mean() >= 0.4  # ...and not much else (triangles fill ~half)


def small_opts(demo: Path, tmp: Path) -> list[str]:
    bert = json.loads((ROOT / "configs" / "config_bert_demo.json").read_text())
    bert |= {"hidden_size": 32, "num_hidden_layers": 4, "fusion_layer": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "encoder_width": 32}
    (tmp / "bert.json").write_text(json.dumps(bert))
    root = demo / "grounding"
    opts = {"train_file": f"[{root / 'refcoco+_train.json'}]",
            "test_file": f"[{root / 'refcoco+_val.json'},{root / 'refcoco+_test.json'}]",
            "refcoco_data": str(root), "det_file": str(root / "refcoco+" / "dets.json"), "image_root": str(demo),
            "bert_config": str(tmp / "bert.json"), "vit_width": 32, "vision_width": 32, "vit_depth": 1,
            "vit_heads": 2, "embed_dim": 16, "queue_size": 8, "batch_size": 4, "num_workers": 0, "print_freq": 1,
            "block_num": 2, "schedular.warmup_steps": 1}
    return [f"{k}={v}" for k, v in opts.items()]


def test_grounding_script_trains_evaluates_and_reloads(demo, tmp_path):
    opts = small_opts(demo, tmp_path)
    out = tmp_path / "ft"
    base = ["--config", DEMO_CONFIG, "--device", "cpu"]
    log = Grounding.main([*base, "--output_dir", str(out), "--max_steps", "2", "--checkpoint",
                          str(pretrain_checkpoint(tmp_path)), "--opts", *opts])
    assert set(log) == {"val_d", "testA_d", "testB_d", "epoch"}  # no train stats: stopped early
    assert torch.load(out / "checkpoint_last.pth", weights_only=True)["step"] == 2
    n_eval = sum(len(json.loads((demo / "grounding" / f"refcoco+_{s}.json").read_text())) for s in ("val", "test"))
    preds = json.loads((out / "grounding_0.json").read_text())
    assert len(preds) == n_eval and {"ref_id", "split", "pred_box", "gt_box", "iou"} == set(preds[0])
    for split in ("val", "testA", "testB"):  # each split's score is its share of IoU >= 0.5 among the written boxes
        ious = [p["iou"] for p in preds if p["split"] == split]
        assert ious and log[f"{split}_d"] == sum(iou >= 0.5 for iou in ious) / len(ious), split
    assert all(p["iou"] == pytest.approx(compute_iou(p["pred_box"], p["gt_box"])) for p in preds)
    state = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert state["val_d"] == log["val_d"]

    again = Grounding.main([*base, "--output_dir", str(tmp_path / "ev"), "--evaluate", "--checkpoint",
                            str(out / "checkpoint_best.pth"), "--opts", *opts])
    assert again == {k: v for k, v in log.items() if k.endswith("_d")}
    itc = Grounding.main([*base, "--output_dir", str(tmp_path / "itc"), "--evaluate", "--checkpoint",
                          str(out / "checkpoint_best.pth"), "--gradcam_mode", "itc", "--block_num", "0",
                          "--opts", *opts])
    assert set(itc) == set(again)
    with pytest.raises(ValueError, match="block_num 1 is not a fusion"):
        Grounding.main([*base, "--output_dir", str(tmp_path / "bad"), "--evaluate", "--checkpoint",
                        str(out / "checkpoint_best.pth"), "--block_num", "1", "--opts", *opts])


# ------------------------------------------------------------------------ the official refcoco.pth


def test_grounding_yaml_builds_the_official_refcoco_layout(ref_dir):
    keys = json.loads((ref_dir / "keys_grounding.json").read_text())
    cfg, _ = utils.load_config(str(ROOT / "configs" / "Grounding.yaml"), [], Grounding.GroundingConfig)
    with torch.device("meta"):
        model = Grounding.ALBEFRetrieval(cfg, Grounding.build_bert_config(cfg))
        official = {k: torch.empty(shape, dtype=getattr(torch, keys["dtypes_non_float32"].get(k, "float32")))
                    for k, shape in keys["keys"].items()}
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == keys["keys"]
    load_state_dict_strict(model, official, "refcoco.pth")  # what loading the official file checks
    assert default_block_num(model) == cfg.block_num == 8
    check_block_num(model, 8, "itm")
    check_block_num(model, 11, "itc")
    with pytest.raises(ValueError, match=r"valid are 6\.\.11"):
        check_block_num(model, 12, "itm")
    with pytest.raises(CheckpointError, match="missing 1 .*itm_head.weight"):
        load_state_dict_strict(model, {k: v for k, v in official.items() if k != "itm_head.weight"}, "ve.pth")
