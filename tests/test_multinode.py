"""Pretrain.py at scale, on CPU with gloo: two torchrun "nodes" meeting through c10d rendezvous train
from shards; ZeroRedundancyOptimizer gives the same model as plain AdamW and a checkpoint in the plain
layout; a 2-process checkpoint resumes on 1 process."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import Pretrain
import utils
from datasets.shards import write_shards
from models.albef import ALBEF, build_bert_config
from models.checkpoint import load_weights
from tests.test_pretrain import CONFIG, TINY_BERT, free_port, small_opts
from tests.test_shards import synthetic_data

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, str(ROOT / "Pretrain.py")]


def check(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The same 4 steps twice on 2 processes: plain AdamW on 2 nodes x 1 process (rendezvous), and
    ZeroRedundancyOptimizer on 1 node x 2 processes."""
    tmp = tmp_path_factory.mktemp("scale")
    (tmp / "bert_tiny.json").write_text(json.dumps(TINY_BERT))
    write_shards(synthetic_data(tmp, 64), tmp / "shards", tmp, 8)
    opts = small_opts(tmp, train_file="[]", train_shards=str(tmp / "shards" / "{000000..000007}.tar"),
                      train_samples_per_epoch=64, shuffle_buffer=8, **{"schedular.epochs": 1})
    script = ["--config", CONFIG, "--device", "cpu", "--max_steps", str(STEPS), "--opts", *opts]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    port = free_port()
    nodes = [subprocess.Popen(
        torchrun("--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                 "--rdzv_id=albef-test", f"--rdzv_conf=is_host={node == 0}")
        + ["--output_dir", str(tmp / "plain"), *script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for node in (0, 1)]
    for node in nodes:
        out, err = node.communicate(timeout=600)
        check(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    check(subprocess.run(torchrun("--nproc_per_node=2", f"--master_port={free_port()}")
                         + ["--output_dir", str(tmp / "zero"), *script, "optimizer.zero_redundancy=true"],
                         capture_output=True, text=True, env=env, timeout=600))
    return {"tmp": tmp, "opts": opts, "script": script}


def test_two_nodes_meet_by_rendezvous_and_train_from_shards(runs):
    state = torch.load(runs["tmp"] / "plain" / "checkpoint_last.pth", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["step"] == STEPS and state["samples_per_step"] == 2 * 4  # batch_size is per process
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # two ranks, not one twice
    run_log = (runs["tmp"] / "plain" / "run.log").read_text()
    assert "64 pairs, 8 steps per epoch, 2 ranks x batch 4" in run_log


def plain_model(runs) -> ALBEF:
    cfg, _ = utils.load_config(CONFIG, runs["opts"], Pretrain.PretrainConfig)
    return ALBEF(cfg, build_bert_config(cfg))


def test_zero_checkpoint_is_plain_and_matches_adamw(runs):
    plain, zero = (torch.load(runs["tmp"] / d / "checkpoint_last.pth", weights_only=True) for d in ("plain", "zero"))
    assert "AdamW state sharded over 2 ranks" in (runs["tmp"] / "zero" / "run.log").read_text()
    assert zero["step"] == plain["step"] == STEPS
    models = {}
    for name in ("plain", "zero"):
        models[name] = plain_model(runs)
        load_weights(models[name], str(runs["tmp"] / name / "checkpoint_last.pth"))  # strict
    worst = max((zero["model"][k].float() - v.float()).abs().max().item() for k, v in plain["model"].items())
    assert worst <= 1e-6, worst
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 3, 32, 32, generator=g), "attention_mask": torch.ones(4, 9, dtype=torch.long),
             "input_ids": torch.randint(1000, 2000, (4, 9), generator=g)}
    outs = {}
    for name, model in models.items():
        torch.manual_seed(1)  # the same MLM masks
        outs[name] = {k: v.item() for k, v in model(**batch, alpha=0.4).items()}
    print(f"ZeRO vs AdamW after {STEPS} steps: weights max |diff| {worst:.2e}; outputs {outs}")
    assert outs["zero"] == pytest.approx(outs["plain"], rel=1e-5, abs=1e-6)
    # the optimizer state is the whole plain AdamW state, gathered from both ranks
    optimizer = utils.build_optimizer(models["zero"], utils.OptimizerConfig(lr=1e-3))
    optimizer.load_state_dict(zero["optimizer"])
    assert len(zero["optimizer"]["state"]) == len(plain["optimizer"]["state"]) == len(list(
        p for p in models["zero"].parameters() if p.requires_grad))
    for i, s in plain["optimizer"]["state"].items():
        torch.testing.assert_close(zero["optimizer"]["state"][i]["exp_avg_sq"], s["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_resume_on_another_number_of_processes(runs, tmp_path, caplog):
    """The ZeRO checkpoint of 2 processes continues on 1 (plain AdamW there): steps of 4 samples
    instead of 8, so step 4 of 8 becomes step 8 of 16; rank 0's RNG state is used."""
    out = tmp_path / "one"
    out.mkdir()
    (out / "checkpoint_last.pth").write_bytes((runs["tmp"] / "zero" / "checkpoint_last.pth").read_bytes())
    caplog.set_level(logging.INFO)
    argv = [a for a in runs["script"] if a != str(STEPS)]
    argv[argv.index("--max_steps")] = "--max_steps=10"
    Pretrain.main(["--output_dir", str(out), "--resume", str(out / "checkpoint_last.pth"), *argv,
                   "optimizer.zero_redundancy=true"])
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "written by 2 processes, resuming on 1" in messages and "at epoch 0 step 8" in messages
    state = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert state["step"] == 10 and state["world_size"] == 1 and state["samples_per_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
