"""WebDataset shards: json_to_shards gives the JSON path's samples; ranks and workers read disjoint
shards and step in lockstep; corrupt data is skipped, counted and named; resume replays the stream
(exactly with the same layout, within the documented tolerance with another world size); clear errors."""

import hashlib
import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

import Pretrain
import checkpoints
from datasets import loaders
from datasets.base import FAILURES_BEFORE_GIVING_UP
from datasets.pretrain import PretrainDataset
from datasets.shards import PretrainShards, ShardError, expand_shards, write_shards
from datasets.text import pre_caption
from datasets.transforms import test_transform
from scripts import json_to_shards, prepare_demo_data
from utils import ConfigError, DistInfo

ROOT = Path(__file__).resolve().parents[1]


def synthetic_data(tmp: Path, n: int) -> Path:
    """`n` 8 px PNGs (distinct colours) and an ALBEF JSON list of them, one caption each."""
    (tmp / "img").mkdir(parents=True)
    ann = []
    for i in range(n):
        Image.new("RGB", (8, 8), (i % 256, (7 * i) % 256, (13 * i) % 256)).save(tmp / "img" / f"{i}.png")
        ann.append({"image": f"img/{i}.png", "caption": f"picture number {i}"})
    (tmp / "ann.json").write_text(json.dumps(ann))
    return tmp / "ann.json"


def shards(tmp: Path, n: int, shard_size: int) -> list[str]:
    return write_shards(synthetic_data(tmp, n), tmp / "shards", tmp, shard_size)[0]


class KeyShards(PretrainShards):
    """Decodes (checking the sample as PretrainShards does) to "shard/key", to see who read what."""

    def decode(self, sample):
        super().decode(sample)
        return f"{Path(sample['__url__']).stem}/{sample['__key__']}"


def key_source(urls, buffer: int = 4) -> KeyShards:
    return KeyShards(urls, test_transform(8), shuffle_buffer=buffer)


def keys(items) -> list[str]:  # the collate of key streams
    return [k for k in items]


def epoch_batches(source, *, samples, batch=4, rank=0, world=1, epoch=0, start=0, workers=0) -> list[list[str]]:
    dist = DistInfo(rank=rank, world_size=world)
    loader = loaders.build_stream_loader(source, batch, samples_per_epoch=samples, collate_fn=keys,
                                       num_workers=workers, dist=dist, seed=3)
    loaders.loader_position(loader).set_epoch(epoch)
    loaders.loader_position(loader).set_start(start)
    return list(loader)


# ------------------------------------------------------------------------------------- the format


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    prepare_demo_data.main(["--out", str(out), "--limit", "40"])
    return out


def test_json_to_shards_gives_the_json_samples(demo, tmp_path, capsys):
    # one caption per entry (also an ALBEF JSON list), so both paths give each pair exactly once
    ann = [{"image": e["image"], "caption": c} for e in json.loads((demo / "pretrain.json").read_text())
           for c in e["caption"]]
    (tmp_path / "flat.json").write_text(json.dumps(ann))
    paths = json_to_shards.main([str(tmp_path / "flat.json"), str(tmp_path / "shards"), "--image_root", str(demo),
                                 "--shard_size", "20"])
    printed = capsys.readouterr().out
    assert len(paths) == -(-len(ann) // 20) and f"train_samples_per_epoch: {len(ann)}" in printed
    pattern = printed.split("train_shards: ")[1].split("\n")[0].strip("'")
    assert expand_shards(pattern) == paths

    def digest(image: torch.Tensor, caption: str):
        return hashlib.sha1(image.numpy().tobytes()).hexdigest(), caption

    json_path = PretrainDataset(tmp_path / "flat.json", test_transform(32), demo)
    expected = Counter(digest(*json_path[i]) for i in range(len(json_path)))
    source = PretrainShards(pattern, test_transform(32), shuffle_buffer=16)
    batches = epoch_batches(source, samples=len(ann), batch=1)  # one pass: every reader's share exactly once
    got = Counter(digest(*b[0]) for b in batches)
    assert got == expected and len(expected) > 50
    # captions as lists: one of them, through pre_caption, as the JSON path draws them
    write_shards(demo / "pretrain.json", tmp_path / "lists", demo, 50)
    entry = json.loads((demo / "pretrain.json").read_text())[0]
    raw = next(iter(wds.tarfile_to_samples()([{"url": str(tmp_path / "lists" / "000000.tar")}])))
    caption = PretrainShards(str(tmp_path / "lists" / "000000.tar"), test_transform(32)).decode(raw)[1]
    assert caption in {pre_caption(c, 30) for c in entry["caption"]}


def test_ranks_and_workers_read_disjoint_shards(tmp_path):
    urls = shards(tmp_path, 64, 8)  # 8 shards: 2 ranks x 2 workers, 2 shards each
    source = key_source(urls)
    seen = {r: epoch_batches(source, samples=64, rank=r, world=2, workers=2) for r in (0, 1)}
    assert len(seen[0]) == len(seen[1]) == 64 // (2 * 4)  # lockstep: the same number of batches
    flat = {r: [k for b in seen[r] for k in b] for r in seen}
    shards_of = {r: {k.split("/")[0] for k in flat[r]} for r in flat}
    assert not shards_of[0] & shards_of[1] and len(shards_of[0] | shards_of[1]) == 8
    assert sorted(flat[0] + flat[1]) == [f"{i // 8:06d}/{i:09d}" for i in range(64)]  # each sample once
    assert epoch_batches(source, samples=64, rank=0, world=2, workers=2, epoch=1) != seen[0]  # a new order per epoch


def test_epoch_longer_than_the_shards_reads_them_again(tmp_path):
    source = key_source(shards(tmp_path, 12, 4))
    batches = epoch_batches(source, samples=40, world=1)  # 12 samples, 10 batches of 4
    flat = [k for b in batches for k in b]
    assert len(batches) == 10 and len(set(flat[:12])) == len(set(flat)) == 12  # a whole pass, then again


# ------------------------------------------------------------------------------------ corrupt data


def test_corrupt_members_are_skipped_counted_and_named(tmp_path, caplog):
    good = shards(tmp_path, 24, 8)
    bad = tmp_path / "shards" / "bad.tar"
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with wds.TarWriter(str(bad)) as w:
        for i in range(6):
            sample = {"__key__": f"b{i}", "png": png.getvalue(), "txt": f"caption {i}"}
            if i == 2:
                sample["png"] = b"these bytes are no png"
            if i == 4:
                del sample["txt"]
            w.write(sample)
    cut = tmp_path / "shards" / "cut.tar"
    with tarfile.open(good[0]) as tar:
        member = tar.getmembers()[10]
    # a download that stopped inside a member's data (Python's tarfile takes a cut inside a header for the end)
    cut.write_bytes(Path(good[0]).read_bytes()[: member.offset_data + member.size // 2])
    source = key_source([str(bad), str(cut)] + good[1:], buffer=0)
    caplog.set_level(logging.WARNING)
    batches = epoch_batches(source, samples=32, world=1)
    assert len(batches) == 8 and all(len(b) == 4 for b in batches)  # the epoch is complete anyway
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"shard {bad} key b2: cannot decode b2.png" in m for m in messages)
    assert any(f"shard {bad} key b4: no caption" in m for m in messages)
    assert any(f"shard {cut}" in m for m in messages)  # the truncated tar, named
    assert source.num_corrupt >= 3 and any("skipped" in m and "corrupt samples in epoch 0" in m for m in messages)
    assert all("b2" not in k and "b4" not in k for b in batches for k in b)


def test_shards_without_usable_samples_fail_clearly(tmp_path):
    (tmp_path / "000000.tar").write_bytes(b"")
    with pytest.raises(ShardError, match=r"2 of the 3 shards .* not found: .*000001\.tar, .*000002\.tar"):
        expand_shards(str(tmp_path / "{000000..000002}.tar"))
    empty = tmp_path / "empty.tar"
    with wds.TarWriter(str(empty)):
        pass
    with pytest.raises(ShardError, match=r"no samples in shards .*empty\.tar"):
        epoch_batches(key_source([str(empty)]), samples=8)
    garbage = tmp_path / "garbage.tar"
    with wds.TarWriter(str(garbage)) as w:
        for i in range(3):
            w.write({"__key__": f"g{i}", "png": b"not an image", "txt": "x"})
    with pytest.raises(ShardError, match="no usable sample"):
        epoch_batches(key_source([str(garbage)]), samples=8)
    with pytest.raises(ShardError, match=r"2 shards for 4 readers \(2 ranks x 2 workers\)"):
        epoch_batches(key_source(shards(tmp_path / "two", 8, 4)), samples=8, world=2, workers=2)


def test_pretrain_config_names_the_missing_keys(tmp_path):
    base = ["--config", str(ROOT / "configs" / "Pretrain_demo.yaml"), "--output_dir", str(tmp_path), "--opts"]
    with pytest.raises(ConfigError, match="set one of train_file"):
        Pretrain.main([*base, "train_file=[]"])
    with pytest.raises(ConfigError, match="needs train_samples_per_epoch"):
        Pretrain.main([*base, "train_file=[]", f"train_shards={tmp_path}/x.tar"])
    with pytest.raises(ShardError, match=r"not found: .*nothing_here\.tar"):
        Pretrain.main([*base, "train_file=[]", f"train_shards={tmp_path}/nothing_here.tar",
                       "train_samples_per_epoch=8"])


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_replays_the_stream_exactly(tmp_path, workers):
    source = key_source(shards(tmp_path, 64, 8))
    straight = epoch_batches(source, samples=56, workers=workers, epoch=1)  # 14 batches, 2 workers in turn
    for start in (5, 8):  # odd: the workers swap roles
        assert epoch_batches(source, samples=56, workers=workers, epoch=1, start=start) == straight[start:]


def test_resume_on_another_world_size_repeats_little(tmp_path):
    """2 ranks stop after 6 batches each (48 samples); 1 rank resumes at the same count (batch 12)."""
    source = key_source(shards(tmp_path, 128, 8), buffer=4)
    seen = {k for r in (0, 1) for b in epoch_batches(source, samples=128, rank=r, world=2)[:6] for k in b}
    state = {"epoch": 0, "step_in_epoch": 6, "steps_per_epoch": 16, "samples_per_step": 8}
    epoch, start = checkpoints.resume_position(state, 32, samples_per_step=4)
    assert (epoch, start) == (0, 12)
    rest = [k for b in epoch_batches(source, samples=128, start=start) for k in b]
    assert len(rest) == 128 - 48
    # documented tolerance: about one shard (8) plus one shuffle buffer (4) per reader of either layout (3)
    repeated = len(seen & set(rest))
    assert repeated <= 3 * (8 + 4), repeated
    assert len(seen | set(rest)) >= 128 - 3 * (8 + 4)


def test_resume_position_is_placed_by_samples():
    """The JSON path: rank r takes positions r, r + W, ... of one permutation, so a position in samples
    means the same samples on any world size; fewer than one new step's samples are seen twice."""
    state = {"epoch": 2, "step_in_epoch": 5, "steps_per_epoch": 10, "samples_per_step": 8}
    assert checkpoints.resume_position(state, 10, samples_per_step=8) == (2, 5)
    assert checkpoints.resume_position(state, 20, samples_per_step=4) == (2, 10)
    assert checkpoints.resume_position(state, 5, samples_per_step=16) == (2, 2)  # 40 samples done, 32 kept
    assert checkpoints.resume_position(state | {"step_in_epoch": 10}, 21, samples_per_step=4) == (3, 0)  # finished
    # older files
    assert checkpoints.resume_position({"epoch": 0, "step_in_epoch": 3}, 10, samples_per_step=4) == (0, 3)

    def samples(world, start=0, stop=None):
        out = []
        for r in range(world):
            sampler = loaders.ResumableBatchSampler(64, 4, rank=r, world_size=world, seed=1)
            sampler.set_start(start)
            out += [i for b in list(sampler)[: None if stop is None else stop - start] for _, i in b]
        return out

    done = samples(2, stop=5)  # 2 ranks x 5 batches of 4
    state = {"epoch": 0, "step_in_epoch": 5, "samples_per_step": 8, "steps_per_epoch": 8}
    _, start = checkpoints.resume_position(state, 5, samples_per_step=12)  # 3 ranks now: 40 // 12 = step 3
    rest = samples(3, start=start)
    assert len(set(done) & set(rest)) == 40 - 36 and len(set(done) | set(rest)) == 3 * 5 * 4  # the epoch


def test_shard_path_trains_and_resumes_exactly(tmp_path):
    """Pretrain.py on shards: stopped after 3 steps (as after a kill, from checkpoint_last.pth) and
    resumed, the weights equal those of an uninterrupted run."""
    from tests.test_pretrain import CONFIG, TINY_BERT, small_opts, straight_and_resumed

    (tmp_path / "bert_tiny.json").write_text(json.dumps(TINY_BERT))
    urls = shards(tmp_path, 48, 8)
    pattern = str(tmp_path / "shards" / "{000000..000005}.tar")
    assert expand_shards(pattern) == urls
    opts = small_opts(tmp_path, train_file="[]", train_shards=pattern, train_samples_per_epoch=48,
                      shuffle_buffer=8, num_workers=1, **{"schedular.epochs": 1})
    a, b = straight_and_resumed(["--config", CONFIG, "--device", "cpu", "--opts", *opts], tmp_path, 3, 7)
    assert a["step"] == b["step"] == 7 and a["samples_per_step"] == 4
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6, msg=k)


KILLED_LAUNCHER = """
import sys, torch
sys.path.insert(0, {root!r})
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
import Pretrain
Pretrain.main(sys.argv[1:])
"""


def test_shard_run_killed_by_sigkill_resumes_from_its_periodic_checkpoint(tmp_path):
    """A real kill: the run (with a DataLoader worker) is SIGKILLed once its first periodic checkpoint
    exists; resumed from it, the weights equal an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.test_pretrain import CONFIG, TINY_BERT, small_opts

    (tmp_path / "bert_tiny.json").write_text(json.dumps(TINY_BERT))
    shards(tmp_path, 48, 8)
    opts = small_opts(tmp_path, train_file="[]", train_shards=str(tmp_path / "shards" / "{000000..000005}.tar"),
                      train_samples_per_epoch=48, shuffle_buffer=8, num_workers=1, save_every_steps=2,
                      **{"schedular.epochs": 2})  # 24 steps
    base = ["--config", CONFIG, "--device", "cpu", "--opts", *opts]
    launcher = tmp_path / "launch.py"
    launcher.write_text(KILLED_LAUNCHER.format(root=str(ROOT)))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(launcher), "--output_dir", str(killed), *base],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (killed / "checkpoint_last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its loader worker
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    step = torch.load(killed / "checkpoint_last.pth", weights_only=True)["step"]
    assert 2 <= step < 24

    torch.use_deterministic_algorithms(True)
    try:
        Pretrain.main(["--output_dir", str(tmp_path / "straight"), *base])
        Pretrain.main(["--output_dir", str(killed), "--resume", str(killed / "checkpoint_last.pth"), *base])
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = (torch.load(d / "checkpoint_last.pth", weights_only=True) for d in (tmp_path / "straight", killed))
    assert a["step"] == b["step"] == 24
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6, msg=k)


def test_a_reader_whose_first_samples_all_fail_stops_and_logs_a_few(tmp_path, caplog):
    """FAILURES_BEFORE_GIVING_UP corrupt samples in a row before any good one stop the run (a broken export,
    not a few bad files), with the first PretrainShards.WARNINGS skips logged, not all of them."""
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    path = tmp_path / "mostly_garbage.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(FAILURES_BEFORE_GIVING_UP + 20):
            w.write({"__key__": f"g{i:04d}", "png": b"not an image", "txt": "x"})
        for i in range(8):
            w.write({"__key__": f"ok{i}", "png": png.getvalue(), "txt": "fine"})
    caplog.set_level(logging.WARNING)
    with pytest.raises(ShardError, match=rf"no usable sample in its shards \({FAILURES_BEFORE_GIVING_UP} corrupt"):
        epoch_batches(key_source([str(path)], buffer=0), samples=8)
    assert sum("skipping corrupt data" in r.getMessage() for r in caplog.records) == PretrainShards.WARNINGS
