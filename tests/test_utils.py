"""The engine in utils.py on toy models and datasets: config, optimizer groups, lr, checkpoints, the
resumable sampler and its seeding, exact resume, accumulation, bf16 on CPU, and 2-process DDP."""

import dataclasses
import logging
import math
import os
import random
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoints  # noqa: E402
import utils  # noqa: E402
from datasets import loaders  # noqa: E402
from utils import ConfigError, EngineConfig, OptimizerConfig, SchedulerConfig  # noqa: E402

# ------------------------------------------------------------------------------------------ toys


@dataclass
class ToyModelConfig:
    embed_dim: int = 8
    queue_size: int = 16


@dataclass(kw_only=True)
class ToyTaskConfig(EngineConfig, ToyModelConfig):
    train_file: list[str]
    batch_size: int = 4
    optimizer: OptimizerConfig
    schedular: SchedulerConfig
    extra: dict[str, float] = field(default_factory=dict)


YAML_TEXT = """\
train_file: ['data/coco.json',
             'data/vg.json']
# each train_file (json) contains a python list
embed_dim: 16   # projection size
batch_size: 8
optimizer: {opt: adamW, lr: 1e-4, weight_decay: 0.02}
schedular: {sched: cosine, lr: 1e-4, epochs: 30, min_lr: 1e-5, decay_rate: 1, warmup_lr: 1e-5,
            warmup_steps: 2000, cooldown_epochs: 0}
"""


class NoisyDataset(torch.utils.data.Dataset):
    """x + random augmentation from torch, numpy and random; y a fixed linear target."""

    def __init__(self, n: int = 32, dim: int = 4, augment: bool = True):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, 2, generator=g)
        self.augment = augment

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        if self.augment:
            x = x + 0.1 * torch.randn(x.shape) + float(np.random.uniform(-0.1, 0.1)) + random.uniform(-0.1, 0.1)
        return {"x": x, "y": self.y[i], "idx": torch.tensor(i)}


class SkippingDataset(NoisyDataset):
    """Counts a skip for every 8th index, as PretrainDataset does for an unreadable image."""

    num_skipped = 0

    def __getitem__(self, i):
        self.num_skipped += i % 8 == 0
        return super().__getitem__(i)


class ToyModel(nn.Module):
    def __init__(self, dim: int = 4, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(dim, 16), nn.Dropout(dropout), nn.Linear(16, 2)
        self.norm = nn.LayerNorm(16)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.last_dtype = None

    def forward(self, x, y, idx=None, scale: float = 1.0):
        h = self.fc1(x)
        self.last_dtype = h.dtype
        out = self.fc2(self.drop(torch.relu(self.norm(h)))) * self.temp / 0.07
        loss = ((out.float() - y) ** 2).mean() * scale
        return {"loss_mse": loss, "loss_reg": 1e-3 * self.temp**2, "out_mean": out.mean().detach()}


def _sched(**kw) -> SchedulerConfig:
    return SchedulerConfig(**({"lr": 0.05, "epochs": 2, "min_lr": 0.001, "warmup_lr": 0.005, "warmup_steps": 3} | kw))


def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in utils.unwrap(model).parameters()])


# ---------------------------------------------------------------------------------------- config


def test_config_overrides_nested_and_lists(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text(YAML_TEXT)
    opts = ["batch_size=32", "optimizer.lr=2e-4", "train_file=[a.json,b.json]", "grad_clip=1.0", "extra.w=2"]
    cfg, doc = utils.load_config(str(path), opts, ToyTaskConfig)
    assert cfg.batch_size == 32 and cfg.optimizer.lr == 2e-4 and cfg.train_file == ["a.json", "b.json"]
    assert cfg.grad_clip == 1.0 and cfg.extra == {"w": 2.0} and cfg.embed_dim == 16
    assert cfg.seed == 42 and cfg.queue_size == 16 and cfg.schedular.warmup_steps == 2000  # defaults / file
    assert type(cfg.schedular.min_lr) is float and type(cfg.embed_dim) is int
    assert utils.config_to_dict(cfg)["optimizer"] == {"opt": "adamW", "lr": 2e-4, "weight_decay": 0.02,
                                                      "zero_redundancy": False}
    with pytest.raises(ConfigError, match="batch_size"):
        utils.load_config(str(path), ["batch_size=abc"], ToyTaskConfig)
    with pytest.raises(ConfigError, match="amp"):
        utils.load_config(str(path), ["amp=fp16"], ToyTaskConfig)


def test_config_unknown_key_names_closest_and_file(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text(YAML_TEXT.replace("batch_size: 8", "batch_sise: 8"))
    with pytest.raises(ConfigError) as e:
        utils.load_config(str(path), None, ToyTaskConfig)
    assert "batch_sise" in str(e.value) and "'batch_size'" in str(e.value) and str(path) in str(e.value)
    path.write_text(YAML_TEXT.replace("warmup_steps: 2000", "warmup_step: 2000"))
    with pytest.raises(ConfigError, match=r"schedular\.warmup_steps"):
        utils.load_config(str(path), None, ToyTaskConfig)
    path.write_text(YAML_TEXT.replace("warmup_steps: 2000", "warmup_epochs: 20"))  # the original's key ...
    with pytest.raises(ConfigError, match="set schedule: original"):  # ... belongs to the original schedule
        utils.load_config(str(path), None, ToyTaskConfig)
    assert utils.load_config(str(path), ["schedular.schedule=original"], ToyTaskConfig)[0].schedular.warmup_epochs == 20
    path.write_text(YAML_TEXT)
    with pytest.raises(ConfigError) as e:
        utils.load_config(str(path), ["optimizer.lrr=1"], ToyTaskConfig)
    assert "'optimizer.lr'" in str(e.value) and "--opts" in str(e.value) and str(path) in str(e.value)


def test_a_removed_key_loads_with_one_warning_naming_it(tmp_path, caplog):
    """YAML_TEXT is an original-style file: its schedular carries decay_rate and cooldown_epochs, which
    nothing reads; they are dropped with a warning each, and any other unknown key still fails."""
    path = tmp_path / "old.yaml"
    path.write_text(YAML_TEXT + "eval_ema: false\n")
    with caplog.at_level(logging.WARNING, logger="config"):
        cfg, _ = utils.load_config(str(path), [], ToyTaskConfig)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3 and all(str(path) in w and "is ignored" in w for w in warned)
    assert ["schedular.decay_rate" in w for w in warned].count(True) == 1
    assert ["schedular.cooldown_epochs" in w for w in warned].count(True) == 1
    assert ["'eval_ema'" in w for w in warned].count(True) == 1
    assert cfg.schedular.warmup_steps == 2000 and {"decay_rate", "cooldown_epochs"}.isdisjoint(
        utils.config_to_dict(cfg)["schedular"])
    built = SchedulerConfig(lr=1e-4, epochs=2, decay_rate=1, cooldown_epochs=0)  # an original `schedular` dict
    assert built == SchedulerConfig(lr=1e-4, epochs=2)


def test_save_config_keeps_comments_and_overrides(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text(YAML_TEXT)
    _, doc = utils.load_config(str(path), ["batch_size=32", "optimizer.lr=2e-4"], ToyTaskConfig)
    out = tmp_path / "out" / "config.yaml"
    utils.save_config(doc, str(out))
    text = out.read_text()
    assert "# each train_file (json) contains a python list" in text and "# projection size" in text
    cfg, _ = utils.load_config(str(out), None, ToyTaskConfig)
    assert cfg.batch_size == 32 and cfg.optimizer.lr == 2e-4


# ------------------------------------------------------------------------------- optimizer and lr


def test_optimizer_groups():
    model = ToyModel()
    model.frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)
    opt = utils.build_optimizer(model, OptimizerConfig(lr=1e-4, weight_decay=0.02))
    names = {id(p): n for n, p in model.named_parameters()}
    by_wd = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert by_wd[0.0] == {"fc1.bias", "fc2.bias", "norm.weight", "norm.bias"}
    assert by_wd[0.02] == {"fc1.weight", "fc2.weight", "temp"}  # ALBEF parity: 0-dim temp decayed
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]


def test_fused_adamw_takes_the_steps_of_the_reference_adamw():
    """build_optimizer's fused AdamW (CPU too: ~5 % faster full-size steps) updates like torch's loop."""
    torch.manual_seed(0)
    a, b = ToyModel(), ToyModel()
    b.load_state_dict(a.state_dict())
    fused = utils.build_optimizer(a, OptimizerConfig(lr=1e-2, weight_decay=0.02))
    twin = {id(p): q for p, q in zip(a.parameters(), b.parameters())}
    plain = torch.optim.AdamW([{"params": [twin[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
                               for g in fused.param_groups], lr=1e-2, foreach=False)
    for _ in range(3):
        x, y = torch.randn(5, 4), torch.randn(5, 2)
        for model, opt in ((a, fused), (b, plain)):
            model(x, y)["loss_mse"].backward()
            opt.step()
            opt.zero_grad()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


def test_lr_schedule():
    cfg = SchedulerConfig(lr=1e-4, epochs=2, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=100)  # smooth, per step
    assert utils.lr_at(0, 0, 550, cfg) == pytest.approx(1e-6)
    assert utils.lr_at(0, 50, 550, cfg) == pytest.approx((1e-6 + 1e-4) / 2)
    assert utils.lr_at(0, 100, 550, cfg) == pytest.approx(1e-4)
    assert utils.lr_at(1, 50, 550, cfg) == pytest.approx((1e-4 + 1e-5) / 2)  # global step 600 of 1100
    assert utils.lr_at(2, 0, 550, cfg) == pytest.approx(1e-5)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1.0)
    utils.set_lr(opt, 0.5)
    assert opt.param_groups[0]["lr"] == 0.5


def test_original_lr_schedule_by_hand():
    """A 3-epoch run of 250 steps per epoch under the original scripts' schedule, values worked out by hand
    from timm's CosineLRScheduler as Pretrain.py (and every task script) drives it: warm-up stairs of
    (lr - warmup_lr) / warmup_epochs = 2.25e-5 held for 100 steps, cut short by the end of epoch 0; then
    min_lr + (lr - min_lr)(1 + cos(pi e / epochs)) / 2 for all of epoch e."""
    cfg = SchedulerConfig(schedule="original", lr=1e-4, epochs=3, min_lr=1e-5, warmup_lr=1e-5, warmup_epochs=4)
    by_hand = {(0, 0): 1e-5, (0, 1): 1e-5, (0, 100): 1e-5, (0, 101): 3.25e-5, (0, 200): 3.25e-5,
               (0, 201): 5.5e-5, (0, 249): 5.5e-5,  # stairs 3 and 4 never come: epoch 0 ends first
               (1, 0): 7.75e-5, (1, 249): 7.75e-5,  # 1e-5 + 4.5e-5 * (1 + cos(pi / 3))
               (2, 0): 3.25e-5, (2, 130): 3.25e-5}  # 1e-5 + 4.5e-5 * (1 + cos(2 pi / 3))
    for (epoch, i), value in by_hand.items():
        assert utils.lr_at(epoch, i, 250, cfg) == pytest.approx(value, rel=1e-12), (epoch, i)
    # the original's float operations, bit for bit: warmup_lr + t * step, and its cosine expression
    assert utils.lr_at(0, 101, 250, cfg) == 1e-5 + 1 * ((1e-4 - 1e-5) / 4)
    assert utils.lr_at(1, 7, 250, cfg) == 1e-5 + 0.5 * (1e-4 - 1e-5) * (1 + math.cos(math.pi * 1 / 3))
    # warm-up finished inside epoch 0: lr (the cosine at 0) from step W * 100 + 1 on
    two = dataclasses.replace(cfg, warmup_epochs=2)
    assert [utils.lr_at(0, i, 500, two) for i in (100, 101, 200, 201, 499)] == pytest.approx(
        [1e-5, 5.5e-5, 5.5e-5, 1e-4, 1e-4], rel=1e-12)
    # no warm-up (Retrieval's 1e-5 -> 1e-5 is the same): lr at once, the per-epoch cosine after
    flat = dataclasses.replace(cfg, warmup_epochs=0, warmup_lr=1e-4)
    assert utils.lr_at(0, 0, 250, flat) == 1e-4 and utils.lr_at(0, 150, 250, flat) == pytest.approx(1e-4)
    assert utils.lr_at(2, 3, 250, flat) == pytest.approx(3.25e-5, rel=1e-12)


def test_schedule_keys_belong_to_their_schedule():
    with pytest.raises(ValueError, match="warmup_epochs belongs to schedule 'original'"):
        SchedulerConfig(lr=1e-4, epochs=3, warmup_epochs=20)
    with pytest.raises(ValueError, match="warmup_steps belongs to schedule 'smooth'"):
        SchedulerConfig(schedule="original", lr=1e-4, epochs=3, warmup_steps=2000)


def test_engine_sets_the_original_lr_every_step(tmp_path):
    tb = FakeWriter()
    sched = SchedulerConfig(schedule="original", lr=0.05, epochs=2, min_lr=0.001, warmup_lr=0.005, warmup_epochs=2,
                            step_size=3)
    _run(tmp_path, tb=tb, sched=sched)
    lrs = [v for t, v, _ in tb.scalars if t == "train/lr"]
    assert lrs == pytest.approx([0.005] * 4 + [0.0275] * 3 + [0.05] + [0.001 + 0.049 * (1 + math.cos(math.pi / 2)) / 2] * 8)


# ----------------------------------------------------------------------------------- checkpoints


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pth"
    checkpoints.save_checkpoint(str(path), {"step": 1, "w": torch.ones(3)})

    def torn(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(utils.CheckpointError, match=f"no space left on device: needs about 0.00 GB at {path} "):
        checkpoints.save_checkpoint(str(path), {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = checkpoints.load_checkpoint(str(path))
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint_last.pth"]  # the torn temporary file removed


def test_a_full_disk_reported_by_torch_save_as_a_runtime_error_says_so(tmp_path, monkeypatch):
    """torch.save's zip writer turns the OSError into `RuntimeError: [enforce fail at inline_container.cc]`."""
    def torn(obj, f, *args, **kwargs):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 320 vs 0") from None

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(utils.CheckpointError, match="no space left on device: needs about 0.01 GB"):
        checkpoints.save_checkpoint(str(tmp_path / "c.pth"), {"w": torch.zeros(2**20, dtype=torch.float64)})
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its own error
        checkpoints.save_checkpoint(str(tmp_path / "c.pth"), {"w": torch.zeros(3)})


def test_non_finite_weights_are_never_saved(tmp_path):
    with pytest.raises(checkpoints.TrainingDiverged, match=r"1 weight tensors are not finite \(b, .*c.pth"):
        checkpoints.save_checkpoint(str(tmp_path / "c.pth"), {
            "model": {"a": torch.ones(2), "b": torch.tensor([1.0, math.inf]), "n": torch.tensor([3])}})
    assert os.listdir(tmp_path) == []


def test_stale_tmp_files_are_removed_and_logged(tmp_path, caplog):
    (tmp_path / "checkpoint_last.pth.tmp").write_bytes(b"PK torn")
    (tmp_path / "notes.tmp").write_text("not ours")
    with caplog.at_level(logging.INFO):
        checkpoints.remove_stale_tmp(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["notes.tmp"]
    assert any("checkpoint_last.pth.tmp, left by an interrupted save" in r.getMessage() for r in caplog.records)


def test_checkpoint_atomic_and_weights_only(tmp_path):
    random.random(), np.random.rand(), torch.rand(1)
    path = tmp_path / "ckpt" / "checkpoint_00.pth"
    state = checkpoints.resume_state(ToyModel(), torch.optim.AdamW(ToyModel().parameters()), {"a": 1}, 0, 5, 5)
    checkpoints.save_checkpoint(str(path), state)
    assert os.listdir(path.parent) == ["checkpoint_00.pth"]
    loaded = checkpoints.load_checkpoint(str(path))
    assert loaded["step"] == 5 and loaded["lr_scheduler"] == {"step": 5} and len(loaded["rng"]) == 1
    expect = (random.random(), np.random.rand(), torch.rand(1))
    checkpoints.restore_rng(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expect
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(utils.CheckpointError, match=str(bad)):
        checkpoints.load_checkpoint(str(bad))
    with pytest.raises(utils.CheckpointError, match="missing.pth"):
        checkpoints.load_checkpoint(str(tmp_path / "missing.pth"))


# --------------------------------------------------------------------------------------- sampler


def test_max_train_samples_is_a_seeded_subset_that_sets_the_epoch():
    data = list(range(100))
    a = utils.limit_samples(data, EngineConfig(max_train_samples=30, seed=1))
    again = utils.limit_samples(data, EngineConfig(max_train_samples=30, seed=1))
    other = utils.limit_samples(data, EngineConfig(max_train_samples=30, seed=2))
    picked = [a[i] for i in range(len(a))]
    assert len(a) == 30 and len(set(picked)) == 30 and picked == sorted(picked)  # distinct, in file order
    assert picked == [again[i] for i in range(30)] != [other[i] for i in range(30)]
    assert picked != list(range(30))  # drawn, not the head of the file
    assert utils.limit_samples(data, EngineConfig(max_train_samples=100)) is data
    assert utils.limit_samples(data, EngineConfig()) is data
    _, steps = utils.train_loader(data, 8, None, EngineConfig(max_train_samples=30, num_workers=0),
                                  loaders.DistInfo())
    assert steps == 3  # 30 samples, batches of 8, the last partial one dropped
    with pytest.raises(ValueError, match="max_train_samples"):
        EngineConfig(max_train_samples=0)


def test_loader_workers_leave_stop_signals_to_the_main_process():
    """A cluster's SIGTERM reaches the whole process group: a worker must not die of it mid-epoch."""
    loader = loaders.build_loader(NoisyDataset(32), 4, shuffle=False, drop_last=True, num_workers=1)
    batches = iter(loader)
    first = next(batches)
    os.kill(batches._workers[0].pid, signal.SIGTERM)
    assert [int(b["idx"][0]) for b in [first, *batches]] == list(range(0, 32, 4))


def test_sampler_ranks_disjoint_and_covering():
    keys = []
    for rank in range(2):
        s = loaders.ResumableBatchSampler(20, 3, rank=rank, world_size=2, shuffle=True, drop_last=False, seed=1)
        s.set_epoch(4)
        batches = list(s)
        assert len(batches) == len(s) == 4 and all(e == 4 for b in batches for e, _ in b)
        keys.append([i for b in batches for _, i in b])
    assert not set(keys[0]) & set(keys[1]) and sorted(keys[0] + keys[1]) == list(range(20))
    s2 = loaders.ResumableBatchSampler(20, 3, rank=0, world_size=2, shuffle=True, drop_last=False, seed=1)
    s2.set_epoch(5)
    assert [i for b in s2 for _, i in b] != keys[0]  # a new order each epoch
    s3 = loaders.ResumableBatchSampler(21, 4, rank=1, world_size=2, shuffle=True, drop_last=True)
    assert s3.num_batches == 2 and all(len(b) == 4 for b in s3)


def test_sampler_set_start_skips_batches():
    s = loaders.ResumableBatchSampler(40, 4, rank=1, world_size=2, shuffle=True, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_start(3)
    assert list(s) == full[3:] and len(s) == len(full) - 3


def test_augmentation_seeding_independent_of_workers():
    ds = NoisyDataset(16)

    def epoch_batches(num_workers: int, epoch: int) -> list:
        loader = loaders.build_loader(ds, 4, shuffle=True, drop_last=True, num_workers=num_workers, seed=7)
        loader.batch_sampler.set_epoch(epoch)
        return [b["x"] for b in loader]

    torch.manual_seed(123)
    a = epoch_batches(0, 1)
    torch.manual_seed(456)
    b = epoch_batches(2, 1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = epoch_batches(0, 2)
    assert not torch.equal(torch.cat(a).sum(0), torch.cat(c).sum(0))  # a new augmentation each epoch
    state = torch.get_rng_state()
    epoch_batches(0, 1)
    assert torch.equal(state, torch.get_rng_state())  # loading leaves the training RNG alone


# ---------------------------------------------------------------------------------------- training


class _Stop(Exception):
    pass


def _run(tmp_path, *, resume_from=None, stop_at=None, epochs=2, engine=None, batch_size=4, dropout=0.3,
         augment=True, seed=0, device="cpu", sgd=False, tb=None, sched=None):
    """Train a toy model `epochs` epochs; save + stop after global step `stop_at`; or resume from a file."""
    engine = engine or EngineConfig(num_workers=0, print_freq=3)
    dist = utils.DistInfo(device=torch.device(device))
    utils.seed_everything(seed)
    model = ToyModel(dropout=dropout).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05) if sgd else utils.build_optimizer(model, OptimizerConfig(lr=0.05))
    loader = loaders.build_loader(NoisyDataset(32, augment=augment), batch_size, shuffle=True, drop_last=True,
                                num_workers=engine.num_workers, dist=dist, seed=engine.seed)
    spe = utils.steps_per_epoch(loader, engine.accum_steps)
    sched = sched or _sched(epochs=epochs, **({"lr": 0.005, "warmup_lr": 0.0005} if sgd else {}))  # SGD: stable
    start = (0, 0)
    if resume_from:
        ckpt = checkpoints.load_checkpoint(resume_from)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = checkpoints.resume_position(ckpt, spe)
        checkpoints.restore_rng(ckpt["rng"])

    def on_step(step, step_in_epoch):
        if step == stop_at:
            state = checkpoints.resume_state(model, opt, {}, epoch, step, step_in_epoch)
            checkpoints.save_checkpoint(str(tmp_path / "ckpt.pth"), state)
            raise _Stop

    stats = None
    for epoch in range(start[0], epochs):
        try:
            stats = utils.train_one_epoch(
                model, loader, opt, epoch=epoch, steps_per_epoch=spe,
                start_step_in_epoch=start[1] if epoch == start[0] else 0, cfg=engine, sched=sched, dist=dist, tb=tb,
                forward_kwargs=lambda e, i: {"scale": min(1.0, (e * spe + i + 1) / spe)}, on_step=on_step)
        except _Stop:
            return model, None
    return model, stats


@pytest.mark.parametrize("stop_at", [5, 8, 11])  # mid-epoch, at an epoch's end, mid second epoch
def test_resume_is_exact(tmp_path, stop_at):
    straight, stats = _run(tmp_path)
    assert set(stats) == {"lr", "scale", "loss_mse", "loss_reg", "out_mean"}  # float forward_kwargs are logged too
    _run(tmp_path, stop_at=stop_at)
    resumed, _ = _run(tmp_path, resume_from=str(tmp_path / "ckpt.pth"), seed=99)  # a different seed is overridden
    torch.testing.assert_close(_params(resumed), _params(straight), rtol=0, atol=1e-6)
    other, _ = _run(tmp_path, seed=5)
    assert not torch.allclose(_params(other), _params(straight))  # dropout does matter


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_is_exact_cuda(tmp_path):
    """amp auto (bf16 on CUDA), fused AdamW, pinned memory, 2 workers, CUDA dropout RNG."""
    engine = EngineConfig(num_workers=2, print_freq=3)
    straight, _ = _run(tmp_path, engine=engine, device="cuda")
    assert straight.last_dtype == torch.bfloat16
    assert utils.build_optimizer(straight, OptimizerConfig(lr=0.1)).defaults["fused"]
    _run(tmp_path, stop_at=5, engine=engine, device="cuda")
    resumed, _ = _run(tmp_path, resume_from=str(tmp_path / "ckpt.pth"), seed=99, engine=engine, device="cuda")
    torch.testing.assert_close(_params(resumed), _params(straight), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sgd", [False, True])  # SGD: also sensitive to the gradients' scale
def test_accumulation_matches_large_batch(tmp_path, sgd):
    big, big_stats = _run(tmp_path, batch_size=8, dropout=0.0, sgd=sgd)
    engine = EngineConfig(num_workers=0, accum_steps=2)
    accum, accum_stats = _run(tmp_path, batch_size=4, dropout=0.0, engine=engine, sgd=sgd)
    torch.testing.assert_close(_params(accum), _params(big), rtol=1e-5, atol=1e-6)
    assert accum_stats == pytest.approx(big_stats, rel=1e-5)


def test_bf16_autocast_on_cpu_and_clipping(tmp_path, caplog):
    caplog.set_level("INFO")
    model, stats = _run(tmp_path, epochs=1, engine=EngineConfig(num_workers=0, amp="bf16", grad_clip=0.5))
    assert model.last_dtype == torch.bfloat16 and np.isfinite(stats["loss_mse"]) and "grad_norm" in stats
    assert any("Train Epoch: [0]" in r.message and "eta:" in r.message for r in caplog.records)
    for amp in ("auto", "fp32"):  # auto is fp32 on CPU
        fp32, _ = _run(tmp_path, epochs=1, engine=EngineConfig(num_workers=0, amp=amp))
        assert fp32.last_dtype == torch.float32, amp


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_autocast_only_for_bf16_and_auto_on_cuda(device):
    """fp32 never autocasts, on CUDA either (checked without a GPU: the context itself, not its effect)."""
    import warnings

    dev = torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.autocast("cuda") on a machine without CUDA warns
        contexts = {amp: utils.autocast_context(amp, dev) for amp in ("fp32", "auto", "bf16")}
    on = {"bf16", "auto"} if device == "cuda" else {"bf16"}
    for amp, ctx in contexts.items():
        assert isinstance(ctx, torch.autocast) == (amp in on), amp
        if amp in on:
            assert ctx.device == device and ctx.fast_dtype == torch.bfloat16


def _fit(out: Path, *, seed: int = 0, max_steps: int | None = None, resume: str | None = None) -> nn.Module:
    """`utils.fit` on the toy task: 2 epochs of 8 steps, dropout on."""
    cfg = ToyTaskConfig(train_file=[], num_workers=0, print_freq=100, optimizer=OptimizerConfig(lr=0.05),
                        schedular=_sched(epochs=2))
    dist = utils.DistInfo()
    utils.seed_everything(seed)
    model = ToyModel(dropout=0.3)
    opt = utils.build_optimizer(model, cfg.optimizer)
    loader = loaders.build_loader(NoisyDataset(32), 4, shuffle=True, drop_last=True, num_workers=0, dist=dist,
                                  seed=cfg.seed)
    utils.fit(model, opt, loader, cfg=cfg, dist=dist, output_dir=str(out), resume=resume, max_steps=max_steps)
    return model


def test_a_non_finite_loss_stops_before_the_next_save(tmp_path):
    """Read back at the save_every_steps boundary (not every step): step 2's Inf stops the run before the
    save after step 4, naming the step and each loss."""
    cfg = ToyTaskConfig(train_file=[], num_workers=0, print_freq=100, save_every_steps=4,
                        optimizer=OptimizerConfig(lr=0.05), schedular=_sched(epochs=1))
    dist, model = utils.DistInfo(), ToyModel()
    loader = loaders.build_loader(NoisyDataset(32), 4, shuffle=True, drop_last=True, num_workers=0, dist=dist)
    with pytest.raises(checkpoints.TrainingDiverged, match=r"non-finite loss at epoch 0 step 2 \(optimizer step 2 "
                       r"of the run\): loss_mse inf, loss_reg"):
        utils.fit(model, utils.build_optimizer(model, cfg.optimizer), loader, cfg=cfg, dist=dist,
                  output_dir=str(tmp_path), forward_kwargs=lambda epoch, i: {"scale": math.inf if i == 2 else 1.0})
    assert not list(tmp_path.glob("*.pth*"))


def test_a_non_finite_gradient_norm_is_named():
    with pytest.raises(checkpoints.TrainingDiverged, match=r"non-finite gradient at epoch 1 step 1 \(optimizer step 5 "
                       r"of the run\): loss 0.5, grad_norm inf"):
        utils.check_finite([(4, {"loss": 0.5, "lr": 0.1}), (5, {"loss": 0.5, "grad_norm": math.inf})], 1, 4)


def test_fit_resumes_on_the_same_trajectory(tmp_path):
    """Stopped mid-epoch, resumed through `fit` under another seed: the RNG (dropout) comes back from the
    checkpoint, so the weights end where an uninterrupted run ends."""
    straight = _fit(tmp_path / "a")
    _fit(tmp_path / "b", max_steps=5)
    resumed = _fit(tmp_path / "b", seed=99, resume=str(tmp_path / "b" / "checkpoint_last.pth"))
    torch.testing.assert_close(_params(resumed), _params(straight), rtol=0, atol=1e-6)


class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_tensorboard_gets_every_step(tmp_path):
    tb = FakeWriter()
    _run(tmp_path, epochs=1, tb=tb, engine=EngineConfig(num_workers=0, print_freq=3))
    steps = {tag: [s for t, _, s in tb.scalars if t == tag] for tag, _, _ in tb.scalars}
    assert steps["train/loss_mse"] == steps["train/lr"] == steps["train/out_mean"] == list(range(8))
    assert steps["train/throughput"] == [0, 3, 6, 7]  # at each progress line
    lrs = [v for t, v, _ in tb.scalars if t == "train/lr"]
    assert lrs[0] == pytest.approx(0.005) and lrs[3] == pytest.approx(0.05)  # warm-up over 3 steps


def test_logging_files(tmp_path):
    import logging

    utils.setup_logging(str(tmp_path), rank=0)
    try:
        logging.getLogger("utils").info("hello run.log")
        utils.append_log(str(tmp_path), {"train_lr": 1e-4, "epoch": 0})
        assert "hello run.log" in (tmp_path / "run.log").read_text()
        assert (tmp_path / "log.txt").read_text() == '{"train_lr": 0.0001, "epoch": 0}\n'
        with utils.tb_writer(str(tmp_path)) as writer:
            writer.add_scalar("train/x", 1.0, 0)
        assert any((tmp_path / "tb").iterdir())
    finally:
        root = logging.getLogger()
        for h in [h for h in root.handlers if getattr(h, "_engine", False)]:
            root.removeHandler(h)
            h.close()


def test_tb_writer_is_closed_when_the_run_fails(tmp_path):
    """A data error ends a script inside `tb_writer`: its writer must not outlive the run."""
    with pytest.raises(ValueError, match="bad pair"):
        with utils.tb_writer(str(tmp_path)) as writer:
            writer.add_scalar("train/x", 1.0, 0)
            raise ValueError("bad pair")
    assert writer.all_writers is None  # what SummaryWriter.close() leaves
    assert any((tmp_path / "tb").iterdir())


# ------------------------------------------------------------------------------------- distributed


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = utils.init_distributed("cpu")
    try:
        engine = EngineConfig(num_workers=0, accum_steps=2, print_freq=2)
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        model = utils.wrap_ddp(ToyModel(dropout=0.2), dist)
        utils.seed_everything(engine.seed, dist.rank)
        opt = utils.build_optimizer(model, OptimizerConfig(lr=0.05))
        loader = loaders.build_loader(SkippingDataset(32), 4, shuffle=True, drop_last=True, num_workers=0,
                                    dist=dist, seed=engine.seed)
        spe = utils.steps_per_epoch(loader, engine.accum_steps)
        seen = [int(i) for b in loader for i in b["idx"]]
        stats = utils.train_one_epoch(model, loader, opt, epoch=0, steps_per_epoch=spe,
                                      cfg=engine, sched=_sched(epochs=1), dist=dist)
        state = checkpoints.resume_state(model, opt, {}, 0, spe, spe)
        with checkpoints.StopSignals() as stop:
            stop.signum = signal.SIGTERM if rank == 1 else 0  # one rank got the signal: both stop
            received = stop.received()
        torch.save({"params": _params(model), "seen": seen, "stats": stats, "n_rng": len(state["rng"]),
                    "received": received}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        utils.cleanup_distributed()


def test_ddp_two_processes_stay_in_sync(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)
    assert not set(r0["seen"]) & set(r1["seen"]) and len(r0["seen"]) == len(r1["seen"]) == 16
    assert r0["stats"] == r1["stats"] and r0["n_rng"] == 2
    assert r0["stats"]["skipped"] == 4  # indices 0, 8, 16, 24: summed over both ranks
    assert r0["received"] == r1["received"] == signal.SIGTERM


def test_checksums_catch_flipped_bytes_and_pass_files_without_them(tmp_path):
    from torch.utils.serialization import config

    from models.checkpoint import ChecksumError, verify_checksums

    state = {"model": {"w": torch.randn(256, 256)}, "epoch": 1}
    checkpoints.save_checkpoint(str(tmp_path / "good.pth"), state)
    data = bytearray((tmp_path / "good.pth").read_bytes())
    start = data.index(b"data/0") + 4096
    data[start:start + 16] = bytes(16)
    (tmp_path / "rot.pth").write_bytes(data)
    with pytest.raises(ChecksumError, match=r"rot.pth: corrupted: \w+/data/0 fails its checksum"):
        checkpoints.load_checkpoint(str(tmp_path / "rot.pth"))
    assert torch.equal(checkpoints.load_checkpoint(str(tmp_path / "good.pth"))["model"]["w"], state["model"]["w"])
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # no checksums: loads
    config.save.compute_crc32 = False  # (monkeypatch's undo deletes this config attribute)
    try:
        torch.save(state, tmp_path / "nocrc.pth")
    finally:
        config.save.compute_crc32 = True
    for name in ("legacy.pth", "nocrc.pth"):
        verify_checksums(tmp_path / name)
        assert torch.equal(checkpoints.load_checkpoint(str(tmp_path / name))["model"]["w"], state["model"]["w"])
