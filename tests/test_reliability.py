"""Bad inputs and faults, each driven through a real script (VE or Pretrain on a tiny model and the demo
data): the run ends with one line naming the culprit and exit status 2 (3 after a stop signal), and
leaves no checkpoint it should not have written."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_scripts import demo, engine_logging_removed, main_error, run_opts  # noqa: F401 - fixtures

import checkpoints
import Pretrain
import Retrieval
import utils
import VE

ROOT = Path(__file__).resolve().parents[1]
VE_CONFIG = str(ROOT / "configs" / "VE_demo.yaml")


def ve_args(demo: Path, tmp_path: Path, out: str, *opts: str, max_steps: int | None = 1) -> list[str]:
    steps = ["--max_steps", str(max_steps)] if max_steps else []
    return ["--config", VE_CONFIG, "--device", "cpu", "--output_dir", str(tmp_path / out), *steps,
            *run_opts("VE", "path", demo, tmp_path / "small"), *opts]


def ve_entries(demo: Path, n: int = 8) -> list[dict]:
    return json.loads((demo / "ve_train.json").read_text())[:n]


def write(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def saved(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.pth*")) if out.exists() else []


# ------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_a_damaged_png_names_file_and_entry(damage, demo, tmp_path, capsys):
    entries = ve_entries(demo)
    data = (demo / entries[0]["image"]).read_bytes()
    middle = len(data) // 2
    bad = data[:middle] if damage == "truncated" else data[:middle] + bytes(range(64)) + data[middle + 64:]
    (tmp_path / "bad.png").write_bytes(bad)
    train = write(tmp_path / "train.json", [dict(e, image=str(tmp_path / "bad.png")) for e in entries])
    err = main_error("VE", ve_args(demo, tmp_path, "out", f"train_file={train}"), capsys)
    assert f"cannot load image {tmp_path / 'bad.png'} (annotation {train} entry " in err, err
    assert saved(tmp_path / "out") == []


def skipping_pretrain(demo: Path, tmp_path: Path, image: str, workers: int = 0) -> list[str]:
    """Pretrain args, 8 entries, batch 4, one epoch: `image` "two" (1 and 5), "all" or "none" unreadable."""
    entries = json.loads((demo / "pretrain.json").read_text())[:8]
    for i in {"all": range(8), "two": (1, 5), "none": ()}[image]:
        entries[i]["image"] = "images/missing.png"
    train = write(tmp_path / "train.json", entries)
    opts = run_opts("Pretrain", "path", demo, tmp_path / "small")
    return ["--config", str(ROOT / "configs" / "Pretrain_demo.yaml"), "--device", "cpu", "--output_dir",
            str(tmp_path / "out"), *opts, f"train_file={train}", "skip_bad_images=true", f"num_workers={workers}",
            "schedular.epochs=1", "val_file=null"]


def test_skipped_images_are_summed_over_workers_into_log_txt(demo, tmp_path):
    Pretrain.main(skipping_pretrain(demo, tmp_path, "two", workers=2))
    log = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert log[-1]["epoch"] == 0 and log[-1]["train_skipped"] == 2  # each visited once, both workers counted


def test_a_wrong_image_root_stops_early_naming_it(demo, tmp_path, capsys):
    argv = skipping_pretrain(demo, tmp_path, "all") + [f"image_root={tmp_path / 'nowhere'}"]
    err = main_error("Pretrain", argv, capsys)
    assert "loads: check image_root" in err and "nowhere" in err, err


# -------------------------------------------------------------------------------------- annotations


@pytest.mark.parametrize("case", ["numeric caption", "empty file"])
def test_bad_annotations_are_one_line(case, demo, tmp_path, capsys):
    entries = ve_entries(demo)
    entries[3]["sentence"] = 7
    train = write(tmp_path / "train.json", entries if case == "numeric caption" else [])
    err = main_error("VE", ve_args(demo, tmp_path, "out", f"train_file={train}"), capsys)
    expected = f"{train} entry 3: 'sentence' must be text" if case == "numeric caption" else f"no entries in {train}"
    assert expected in err, err


# ---------------------------------------------------------------------------------------- steps


def test_zero_steps_and_batch_size_0_are_errors(demo, tmp_path, capsys):
    err = main_error("VE", ve_args(demo, tmp_path, "a", "batch_size_train=100"), capsys)
    assert "0 optimizer steps per epoch: 8 samples make 0 batches of 100" in err, err
    assert saved(tmp_path / "a") == [] and not (tmp_path / "a" / "log.txt").exists()
    err = main_error("VE", ve_args(demo, tmp_path, "b", "batch_size_train=0"), capsys)
    assert f"error: --opts batch_size_train (config file {VE_CONFIG}): invalid config: batch_size_train must be >= 1, " \
           "got 0" in err, err


def test_a_diverging_run_stops_and_saves_nothing(demo, tmp_path, capsys):
    err = main_error("VE", ve_args(demo, tmp_path, "out", "optimizer.lr=1e30", "schedular.lr=1e30",
                                   "schedular.warmup_lr=1e30", "schedular.min_lr=1e30", max_steps=None), capsys)
    assert "non-finite loss at epoch 0 step" in err and "loss nan" in err, err
    assert saved(tmp_path / "out") == []


# ----------------------------------------------------------------------------------- checkpoints


def test_checkpoint_faults(demo, tmp_path, capsys):
    """Bit rot is caught, a weights-only file is refused for --resume, a finished run is left alone."""
    VE.main(ve_args(demo, tmp_path, "run"))
    last, best = tmp_path / "run" / "checkpoint_last.pth", tmp_path / "run" / "checkpoint_best.pth"
    log, stamp = (tmp_path / "run" / "log.txt").read_text(), last.stat().st_mtime_ns
    utils.run_main(VE.main, ve_args(demo, tmp_path, "run", "--resume", str(last)))  # returns: exit status 0
    assert "is a finished run" in capsys.readouterr().out
    assert last.stat().st_mtime_ns == stamp and (tmp_path / "run" / "log.txt").read_text() == log

    err = main_error("VE", ve_args(demo, tmp_path, "b", "--resume", str(best)), capsys)
    assert f"{best} holds no training state" in err and "only checkpoint_last.pth and checkpoint_XX.pth" in err

    data = bytearray(last.read_bytes())
    start = data.index(b"data/0") + 4096  # inside the first tensor's bytes, not the archive's directory
    data[start:start + 4096] = bytes(4096)
    rotten = tmp_path / "rotten.pth"
    rotten.write_bytes(data)
    err = main_error("VE", ve_args(demo, tmp_path, "c", "--resume", str(rotten), max_steps=2), capsys)
    assert f"error: {rotten}: corrupted: " in err and "fails its checksum" in err, err


def test_a_full_disk_is_one_line_and_leaves_no_tmp(demo, tmp_path, capsys, monkeypatch):
    def full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoint_last.pth.tmp").write_bytes(b"stale")  # a killed save of an earlier run
    err = main_error("VE", ve_args(demo, tmp_path, "out"), capsys)
    assert "no space left on device: needs about" in err and str(tmp_path / "out") in err, err
    assert saved(tmp_path / "out") == []  # the stale .tmp removed at start-up, the new one after failing
    assert "left by an interrupted save" in (tmp_path / "out" / "run.log").read_text()


def test_a_kill_between_the_epoch_saves_loses_no_log_line(demo, tmp_path, monkeypatch):
    real = checkpoints.save_checkpoint

    def killed_at_last(path, state):
        if path.endswith("checkpoint_last.pth"):
            raise KeyboardInterrupt  # the process dies here
        real(path, state)

    monkeypatch.setattr(checkpoints, "save_checkpoint", killed_at_last)
    argv = skipping_pretrain(demo, tmp_path, "none")
    with pytest.raises(KeyboardInterrupt):
        Pretrain.main(argv)
    out = tmp_path / "out"
    assert saved(out) == ["checkpoint_00.pth"]
    assert json.loads((out / "log.txt").read_text().splitlines()[-1])["epoch"] == 0


# ------------------------------------------------------------------------------------ preemption


DRIVER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import utils, VE
lr_at = utils.lr_at
def signalled(epoch, i, *args):
    if (epoch, i) == (0, 2):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 2
    return lr_at(epoch, i, *args)
utils.lr_at = signalled
utils.run_main(VE.main)
"""


def test_sigterm_saves_the_exact_position_and_resume_equals_a_straight_run(demo, tmp_path):
    train = write(tmp_path / "train.json", ve_entries(demo) * 3)  # 24 pairs: 6 steps of 4
    straight = ve_args(demo, tmp_path, "straight", f"train_file={train}", max_steps=None)
    VE.main(straight)
    (tmp_path / "driver.py").write_text(DRIVER.format(root=str(ROOT)))
    stopped = ve_args(demo, tmp_path, "stopped", f"train_file={train}", max_steps=None)
    res = subprocess.run([sys.executable, str(tmp_path / "driver.py"), *stopped], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    last = tmp_path / "stopped" / "checkpoint_last.pth"
    assert res.returncode == checkpoints.PREEMPTED_STATUS, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == (f"stopped by SIGTERM at epoch 0 step 3: {last} holds the "
                                                   "position; --resume it")
    state = torch.load(last, weights_only=True)
    assert (state["step"], state["step_in_epoch"]) == (3, 3)
    VE.main(stopped + ["--resume", str(last)])
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pth", weights_only=True)["model"]
    b = torch.load(last, weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], {k: (a[k] - b[k]).abs().max() for k in a}


def test_stop_signals_are_restored_after_fit():
    before = signal.getsignal(signal.SIGTERM)
    with checkpoints.StopSignals() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop.handle
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received() == signal.SIGUSR1
    assert signal.getsignal(signal.SIGTERM) == before


# ------------------------------------------------------------------------------------ clear errors


def test_no_config_refuses_to_guess_and_lists_the_configs(tmp_path, capsys):
    err = main_error("VE", ["--output_dir", str(tmp_path / "out")], capsys)
    assert err == ("error: no --config given; this script's configs: configs/VE.yaml, configs/VE_demo.yaml (*_demo: "
                   "the demo data from `make data`; the others: the original data and weights)\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["VE", "Retrieval", "Pretrain"])
def test_help_explains_every_flag_and_points_to_the_config_keys(name, capsys, monkeypatch):
    parsers = []
    real = utils.task_parser
    monkeypatch.setattr(utils, "task_parser", lambda *a, **k: parsers.append(real(*a, **k)) or parsers[-1])
    with pytest.raises(SystemExit):
        {"VE": VE, "Retrieval": Retrieval, "Pretrain": Pretrain}[name].parse_args(["--help"])
    assert [a.option_strings for a in parsers[0]._actions if not a.help] == []  # the script's own flags too
    assert f"Config keys are documented by the comments in configs/{name}" in capsys.readouterr().out


def test_opts_errors_name_opts(demo, tmp_path, capsys):
    err = main_error("VE", ve_args(demo, tmp_path, "a", "optimizer.lr=fast"), capsys)
    assert err.startswith(f"error: --opts optimizer.lr (config file {VE_CONFIG}): 'optimizer.lr' expects float"), err
    err = main_error("VE", ve_args(demo, tmp_path, "b", "crop_scale=[0.5, 1"), capsys)
    assert err.startswith("error: --opts 'crop_scale=[0.5, 1': the value is not valid YAML"), err


def test_a_diverging_pretraining_names_the_divergence_not_multinomial(demo, tmp_path, capsys):
    """Weights blown up by step 0 make step 1's hard-negative sampling fail inside forward; the error says why."""
    argv = skipping_pretrain(demo, tmp_path, "none") + ["optimizer.lr=1e30", "schedular.lr=1e30",
                                                        "schedular.warmup_lr=1e30", "schedular.min_lr=1e30"]
    err = main_error("Pretrain", argv, capsys)
    assert err.startswith("error: forward failed on non-finite values at epoch 0 step 1 (probability tensor"), err
    assert re.search(r"the largest \|weight\| is 1(\.\d+)?e\+30", err), err
    assert saved(tmp_path / "out") == []


def test_retrieval_resume_of_a_finished_run_or_of_weights_only(demo, tmp_path, capsys):
    """Retrieval through fit: resuming a finished run says so; resuming a weights-only file is one line."""
    argv = ["--config", str(ROOT / "configs" / "Retrieval_demo.yaml"), "--device", "cpu", "--output_dir",
            str(tmp_path / "out"), *run_opts("Retrieval", "path", demo, tmp_path / "small")]
    Retrieval.main(argv)
    last, log = tmp_path / "out" / "checkpoint_last.pth", (tmp_path / "out" / "log.txt").read_text()
    utils.run_main(Retrieval.main, argv + ["--resume", str(last)])
    assert "is a finished run" in capsys.readouterr().out and (tmp_path / "out" / "log.txt").read_text() == log
    torch.save({"model": torch.load(last, weights_only=True)["model"]}, tmp_path / "weights.pth")
    err = main_error("Retrieval", argv + ["--resume", str(tmp_path / "weights.pth")], capsys)
    assert "weights.pth holds no training state (keys: model)" in err, err
