"""The retrieval model's evaluation and script: batched re-ranking against the plain one-query-at-a-time
loop, 2 gloo processes against 1, the training data format, and Retrieval.py end to end (zero-shot
from a pretraining checkpoint, a 2-step fine-tune, re-evaluation of its best checkpoint, a stop and resume
mid-epoch), and the recall metric on hand-made score matrices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import torch.distributed as tdist
import torch.multiprocessing as mp

import Retrieval
from datasets.retrieval import (RetrievalTrainDataset, collate_retrieval, index_captions, recall_metrics,
                                retrieval_scores)
from datasets.text import build_tokenizer
from models.albef import ALBEF, ALBEFConfig
from models.checkpoint import load_state_dict_strict
from models.bert import BertConfig
from models.retrieval import (ALBEFRetrieval, RetrievalModelConfig, convert_pretrain_state_dict, rerank_itm,
                              rerank_itm_plain)
from scripts import prepare_demo_data

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(ROOT / "configs" / "Retrieval_demo.yaml")


def tiny_model(layers: int = 4, fusion: int = 2, seed: int = 0) -> ALBEFRetrieval:
    torch.manual_seed(seed)
    cfg = RetrievalModelConfig(text_encoder=None, image_res=32, vit_width=16, vision_width=16, vit_depth=1,
                               vit_heads=2, embed_dim=8, queue_size=8)
    bert = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=40, fusion_layer=fusion, encoder_width=16)
    return ALBEFRetrieval(cfg, bert).eval()


def tiny_gallery(model: ALBEFRetrieval, images: int = 7, texts: int = 13, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 31, (texts,), generator=g)
    mask = (torch.arange(30)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 50, (texts, 30), generator=g) * mask
    with torch.no_grad():
        image_embeds, image_feat = model.encode_image(torch.randn(images, 3, 32, 32, generator=g))
        text_embeds, text_feat = model.encode_text(ids, mask)
    return {"image_embeds": image_embeds, "image_feat": image_feat, "text_embeds": text_embeds,
            "text_mask": mask, "text_feat": text_feat}


@pytest.mark.parametrize("layers,fusion", [(4, 2), (3, 2), (5, 2)])  # 2, 1 and 3 fusion layers
@pytest.mark.parametrize("k", [4, 20])  # 20: more than the gallery in both directions
def test_batched_rerank_equals_one_query_at_a_time(layers, fusion, k):
    model = tiny_model(layers, fusion)
    f = tiny_gallery(model)
    sims = f["image_feat"] @ f["text_feat"].T
    plain = rerank_itm_plain(model, sims, f["image_embeds"], f["text_embeds"], f["text_mask"], k)
    assert (plain[0] != -100).sum(1).eq(min(k, 13)).all() and (plain[1] != -100).sum(1).eq(min(k, 7)).all()
    for batch_size in (1, 5, 1000):
        fast = rerank_itm(model, sims, f["image_embeds"], f["text_embeds"], f["text_mask"], k, batch_size)
        for a, b in zip(fast, plain):
            assert torch.equal(a == -100, b == -100)
            assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


def test_rank_modes():
    model = tiny_model()
    f = tiny_gallery(model)
    sims = f["image_feat"] @ f["text_feat"].T
    itc = retrieval_scores(model, f, 3, "itc")
    itm = retrieval_scores(model, f, 3, "itm")
    both = retrieval_scores(model, f, 3, "itc+itm")
    assert torch.equal(itc[0], sims) and torch.equal(itc[1], sims.T)
    for a, b, s in zip(both, itm, (sims, sims.T)):
        on = b != -100
        assert torch.equal(a != -100, on) and torch.allclose(a[on], b[on] + s[on])
    with pytest.raises(ValueError, match="rank_by"):
        retrieval_scores(model, f, 3, "mlm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = tiny_model()
        scores = retrieval_scores(model, tiny_gallery(model, images=9, texts=19), 5, "itm", 4, rank, world_size)
        torch.save(scores, f"{out}.{rank}")
    finally:
        tdist.destroy_process_group()


def test_two_gloo_processes_give_the_same_matrices_as_one(tmp_path):
    model = tiny_model()
    single = retrieval_scores(model, tiny_gallery(model, images=9, texts=19), 5, "itm", 4)
    mp.spawn(_gloo_worker, args=(2, _free_port(), str(tmp_path / "scores")), nprocs=2)
    for rank in (0, 1):
        both = torch.load(tmp_path / f"scores.{rank}", weights_only=True)
        for a, b in zip(both, single):
            assert torch.equal(a == -100, b == -100) and torch.allclose(a, b, atol=1e-6)


def test_conversion_replaces_a_queue_of_another_size():
    model = tiny_model()
    sd = {k.replace("text_encoder.", "text_encoder.bert.", 1) if k.startswith("text_encoder") else k: v
          for k, v in model.state_dict().items() if k != "idx_queue"}
    sd |= {"image_queue": torch.randn(8, 16), "text_queue": torch.randn(8, 16), "queue_ptr": torch.tensor([4])}
    converted = convert_pretrain_state_dict(sd, model)
    load_state_dict_strict(model, converted, "test")
    assert int(model.queue_ptr) == 0 and model.idx_queue.shape == (1, 8) and (model.idx_queue == -100).all()


# ------------------------------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    prepare_demo_data.main(["--out", str(out), "--limit", "80"])
    return out


def test_train_dataset_numbers_image_ids_and_collates(demo, bert_vocab_dir):
    ann = json.loads((demo / "retrieval_train.json").read_text())[:6]
    ann[1]["caption"] = "A caption, with punctuation!  and a very long tail " + "word " * 40
    path = demo / "six.json"
    path.write_text(json.dumps(ann))
    dataset = RetrievalTrainDataset([str(path)], lambda img: torch.zeros(3, 4, 4), str(demo), max_words=30)
    first_seen = list(dict.fromkeys(e["image_id"] for e in ann))
    assert [dataset[i][2] for i in range(6)] == [first_seen.index(e["image_id"]) for e in ann]
    assert dataset[1][1].startswith("a caption with punctuation and a very") and len(dataset[1][1].split()) == 30
    batch = collate_retrieval(build_tokenizer(bert_vocab_dir))([dataset[i] for i in range(6)])
    assert sorted(batch) == ["attention_mask", "idx", "image", "input_ids"]
    assert batch["input_ids"].shape[1] > 30  # ALBEF parity: max_length without truncation does nothing
    assert batch["idx"].dtype == torch.long and batch["image"].shape == (6, 3, 4, 4)


# ---------------------------------------------------------------------------------- Retrieval.py


def small_opts(demo: Path, tmp: Path, **extra) -> list[str]:
    bert = json.loads((ROOT / "configs" / "config_bert_demo.json").read_text())
    bert |= {"hidden_size": 32, "num_hidden_layers": 3, "fusion_layer": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "encoder_width": 32}
    (tmp / "bert.json").write_text(json.dumps(bert))
    train = json.loads((demo / "retrieval_train.json").read_text())[:8]
    (tmp / "train8.json").write_text(json.dumps(train))
    opts = {
        "train_file": f"[{tmp / 'train8.json'}]", "val_file": str(demo / "retrieval_val.json"),
        "test_file": str(demo / "retrieval_test.json"), "image_root": str(demo), "bert_config": str(tmp / "bert.json"),
        "vit_width": 32, "vision_width": 32, "vit_depth": 1, "vit_heads": 2, "embed_dim": 16, "queue_size": 8,
        "batch_size_train": 4, "batch_size_test": 4, "k_test": 3, "itm_batch_size": 5, "num_workers": 0,
        "print_freq": 1, "schedular.epochs": 1, "schedular.warmup_steps": 1,
    } | extra
    return [f"{k}={v}" for k, v in opts.items()]


def pretrain_checkpoint(tmp: Path) -> Path:
    """A random pretraining-layout checkpoint of the small sizes (its queues hold 8 columns)."""
    torch.manual_seed(0)
    patch = yaml.safe_load(Path(DEMO_CONFIG).read_text())["vit_patch_size"]  # the demo config's ViT grid
    cfg = ALBEFConfig(image_res=64, vit_patch_size=patch, vit_width=32, vision_width=32, vit_depth=1, vit_heads=2,
                      embed_dim=16, queue_size=8, text_encoder=None)
    model = ALBEF(cfg, BertConfig.from_json(str(tmp / "bert.json")))
    path = tmp / "pretrain.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def test_zero_shot_then_fine_tune_then_evaluate_the_best(demo, tmp_path):
    opts = small_opts(demo, tmp_path)
    ckpt = pretrain_checkpoint(tmp_path)
    base = ["--config", DEMO_CONFIG, "--device", "cpu", "--checkpoint", str(ckpt)]

    zero = Retrieval.main([*base, "--output_dir", str(tmp_path / "zs"), "--evaluate", "--save_scores", "--opts", *opts])
    assert {"val_r_mean", "test_txt_r1", "test_img_r10"} <= set(zero)
    log = [json.loads(line) for line in (tmp_path / "zs" / "log.txt").read_text().splitlines()]
    assert log == [zero | {"epoch": 0}]
    scores = torch.load(tmp_path / "zs" / "scores_test.pt", weights_only=True)
    assert scores["score_i2t"].shape == (4, 12) and ((scores["score_i2t"] != -100).sum(1) == 3).all()

    out = tmp_path / "ft"
    last = Retrieval.main([*base, "--output_dir", str(out), "--opts", *opts])
    assert {p.name for p in out.glob("*.pth*")} == {"checkpoint_best.pth", "checkpoint_last.pth"}
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert log[0]["epoch"] == 0 and {"train_loss_ita", "train_loss_itm", "val_r_mean", "test_r_mean"} <= set(log[0])
    assert log[1] == {"best_epoch": 0, "best_val_r_mean": last["val_r_mean"]}
    assert (out / "tb").is_dir() and (out / "config.yaml").exists()
    state = torch.load(out / "checkpoint_best.pth", weights_only=True)  # weights, as utils.fit keeps the best
    assert set(state) == {"model", "config", "epoch", "val_r_mean"} and state["val_r_mean"] == last["val_r_mean"]
    assert (state["model"]["idx_queue"] != -100).sum() == 8  # 2 steps x 4 ids queued

    again = Retrieval.main(["--config", DEMO_CONFIG, "--device", "cpu", "--output_dir", str(tmp_path / "re"),
                            "--checkpoint", str(out / "checkpoint_best.pth"), "--evaluate", "--opts", *opts])
    assert again == last


def test_stopped_mid_epoch_and_resumed_equals_one_run(demo, tmp_path):
    """Retrieval.py trains through utils.fit: --max_steps stops it inside the first epoch, --resume carries
    on from that step, and the weights at the end are those of one uninterrupted run."""
    opts = small_opts(demo, tmp_path, batch_size_train=2, **{"schedular.epochs": 2})  # 4 steps per epoch
    base = ["--config", DEMO_CONFIG, "--device", "cpu", "--checkpoint", str(pretrain_checkpoint(tmp_path))]
    Retrieval.main([*base, "--output_dir", str(tmp_path / "one"), "--opts", *opts])
    Retrieval.main([*base, "--output_dir", str(tmp_path / "two"), "--max_steps", "3", "--opts", *opts])
    stopped = torch.load(tmp_path / "two" / "checkpoint_last.pth", weights_only=True)
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["step"]) == (0, 3, 3)
    Retrieval.main([*base, "--output_dir", str(tmp_path / "two"), "--resume",
                    str(tmp_path / "two" / "checkpoint_last.pth"), "--opts", *opts])
    one, two = (torch.load(tmp_path / d / "checkpoint_last.pth", weights_only=True) for d in ("one", "two"))
    assert one["step"] == two["step"] == 8
    for key, value in one["model"].items():
        assert torch.equal(value, two["model"][key]), key
    log = [json.loads(line) for line in (tmp_path / "two" / "log.txt").read_text().splitlines()]
    assert [row.get("epoch") for row in log] == [0, None, 0, 1, None] and "best_epoch" in log[-1]  # None: best line


def test_torchrun_fine_tune_and_sharded_evaluation_match_one_process(demo, tmp_path):
    """2 gloo processes fine-tune (DDP, queues gathered) and evaluate with sharded re-ranking; one process
    evaluating the resulting weights gets the same score matrices."""
    opts = small_opts(demo, tmp_path, batch_size_train=2)
    ckpt = pretrain_checkpoint(tmp_path)
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(ROOT / "Retrieval.py"), "--config", DEMO_CONFIG, "--output_dir", str(out), "--device", "cpu",
           "--checkpoint", str(ckpt), "--save_scores", "--opts", *opts]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert len(state["rng"]) == 2 and (state["model"]["idx_queue"] != -100).sum() == 8  # 2 steps x 2 ranks x 2

    Retrieval.main(["--config", DEMO_CONFIG, "--output_dir", str(tmp_path / "one"), "--device", "cpu", "--evaluate",
                    "--save_scores", "--checkpoint", str(out / "checkpoint_last.pth"), "--opts", *opts])
    for split in ("val", "test"):
        two = torch.load(out / f"scores_{split}_00.pt", weights_only=True)
        one = torch.load(tmp_path / "one" / f"scores_{split}.pt", weights_only=True)
        for key in ("score_i2t", "score_t2i"):
            assert torch.allclose(two[key], one[key], atol=1e-5), (split, key)


def test_unknown_rank_mode_is_a_config_error(demo, tmp_path):
    from utils import ConfigError

    with pytest.raises(ConfigError, match="rank"):
        Retrieval.main(["--config", DEMO_CONFIG, "--output_dir", str(tmp_path), "--evaluate",
                        "--opts", *small_opts(demo, tmp_path, rank="mlm")])


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------- recall metrics on hand-made score matrices (captions per image, ties)


def test_index_captions():
    texts, img2txt, txt2img = index_captions([{"image": "a", "caption": ["x", "y"]}, {"image": "b", "caption": "z"}])
    assert texts == ["x", "y", "z"] and img2txt == [[0, 1], [2]] and txt2img == [0, 0, 1]


def test_recall_with_several_captions_per_image():
    # 3 images, 2 captions each: texts 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2
    txt2img = [0, 0, 1, 1, 2, 2]
    img2txt = [[0, 1], [2, 3], [4, 5]]
    i2t = np.array([
        [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # image 0: its 2nd caption is top -> rank 0
        [0.9, 0.0, 0.1, 0.8, 0.0, 0.0],  # image 1: best gt caption (3) at rank 1
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.0],  # image 2: best gt caption (4) at rank 4
    ])
    t2i = i2t.T.copy()  # text t scores images by the same numbers
    m = recall_metrics(i2t, t2i, txt2img, img2txt)
    assert m["txt_r1"] == pytest.approx(100 / 3) and m["txt_r5"] == 100 and m["txt_r10"] == 100
    # text ranks: t0 -> img0 score .1 vs .9,.9 -> rank 2 (ties among others do not matter), t1 -> rank 0,
    # t2 -> img1 .1 vs 0,.7 -> rank 1, t3 -> img1 .8 vs 0,.6 -> rank 0, t4 -> img2 .5 vs 0,0 -> 0, t5 -> 0 vs 0,0 tie
    ranks = []
    for t, s in enumerate(t2i):
        order = np.argsort(s)[::-1]
        ranks.append(int(np.where(order == txt2img[t])[0][0]))
    assert ranks[:5] == [2, 0, 1, 0, 0]
    expected_r1 = 100 * np.mean(np.array(ranks) < 1)
    assert m["img_r1"] == pytest.approx(expected_r1)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)


def test_ties_resolve_as_numpy_argsort_reversed():
    # all scores equal: the original's reversed quicksort puts the LAST index first
    s = np.zeros((1, 4))
    m = recall_metrics(s, np.zeros((4, 1)), [0, 0, 0, 0], [[3]])
    assert m["txt_r1"] == 100.0
    m = recall_metrics(s, np.zeros((4, 1)), [0, 0, 0, 0], [[0]])
    assert m["txt_r1"] == 0.0 and m["txt_r5"] == 100.0
