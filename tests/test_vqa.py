"""VQA: the official accuracy on hand-computed cases, answer weights, collate, the result file, the
model's ranking on a tiny random model, and VQA.py end to end on a slice of the demo data."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import VQA
from datasets.text import build_tokenizer
from datasets.vqa import (answer_weights, collate_vqa_eval, collate_vqa_train, normalize_answer, vqa_accuracy,
                          vqa_score, write_result_file)
from models.albef import ALBEF
from models.checkpoint import CheckpointError
from models.bert import BertConfig
from models.vqa import VQAModel, VQAModelConfig, load_vqa_checkpoint
from scripts import prepare_demo_data
from tests.test_albef import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "VQA_demo.yaml")

# ------------------------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("prediction, expected", [
    ("Two", "2"), ("none", "0"), ("the dog.", "dog"), ("A red-and-white bus", "red and white bus"),
    ("yes!", "yes"), ("1,000", "1000"), ("3.5", "3.5"), ("dont", "don't"), ("couldnt've", "couldn't've"),
    ("  black\tand white\n", "black and white"), ("left / right", "left right"), ("an apple", "apple"),
])
def test_answer_normalisation(prediction, expected):
    assert normalize_answer(prediction) == expected


def test_vqa_score_averages_min_count_over_3_over_leave_one_out_subsets():
    assert vqa_score("2", ["2"] * 4 + ["3"] * 6) == 1.0
    # three humans: leaving one of them out leaves 2 (2/3), leaving another out leaves 3 (1)
    assert vqa_score("2", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_score("2", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_score("2", ["2"] + ["3"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_score("4", ["2"] * 10) == 0.0
    assert vqa_score("two", ["2"] * 10) == 1.0  # the prediction is normalised ...
    assert vqa_score("yes", ["yes."] * 10) == 0.0  # ... human answers only when they disagree
    assert vqa_score("yes", ["yes."] * 5 + ["yes"] * 5) == 1.0
    assert vqa_score("red", ["red"]) == 1.0 and vqa_score("blue", ["red"]) == 0.0  # one reference


def test_vqa_accuracy_in_percent_with_answer_types():
    entries = [{"question_id": 1, "answer": ["yes"] * 10, "answer_type": "yes/no"},
               {"question_id": 2, "answer": ["2"] * 3 + ["3"] * 7, "answer_type": "number"},
               {"question_id": 3, "answer": ["red"] * 10, "answer_type": "other"}]
    result = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "2"},
              {"question_id": 3, "answer": "blue"}]
    acc = vqa_accuracy(result, entries)
    assert acc == pytest.approx({"overall": 100 * (1 + 0.9 + 0) / 3, "yes/no": 100.0, "number": 90.0, "other": 0.0})
    with pytest.raises(KeyError, match="question_id 3"):
        vqa_accuracy(result[:2], entries)


def test_result_file_is_what_the_server_takes(tmp_path):
    path = tmp_path / "result" / "vqa_result_epoch0.json"
    write_result_file([{"question_id": torch.tensor(7), "answer": "yes"}, {"question_id": 8, "answer": "2"}], path)
    rows = json.loads(path.read_text())
    assert rows == [{"question_id": 7, "answer": "yes"}, {"question_id": 8, "answer": "2"}]
    assert all(type(r["question_id"]) is int and type(r["answer"]) is str for r in rows)
    assert not list(tmp_path.glob("result/*.tmp"))


# ---------------------------------------------------------------------------------- data


def test_answer_weights_as_the_original():
    answers, weights = answer_weights(["red", "blue", "red", "red", "green"], "vqa")
    assert answers == ["red", "blue", "green"] and weights == pytest.approx([0.6, 0.2, 0.2])
    assert answer_weights("tree", "vg") == (["tree"], [0.5])


def test_collate_flattens_answers_in_question_order(bert_vocab_dir):
    tok = build_tokenizer(bert_vocab_dir)
    img = torch.zeros(3, 8, 8)
    batch = collate_vqa_train(tok)([(img, "what color is it", ["red[SEP]", "blue[SEP]"], [0.7, 0.3]),
                                    (img, "how many " * 20, ["two[SEP]"], [1.0])])
    assert batch["n"].tolist() == [2, 1] and batch["weights"].tolist() == pytest.approx([0.7, 0.3, 1.0])
    assert batch["answer_ids"].shape[0] == 3 and batch["question_ids"].shape == (2, 25)  # truncated to 25
    red = tok.convert_tokens_to_ids("red")
    assert batch["answer_ids"][0].tolist() == [101, red, 102] and batch["answer_mask"][2].tolist() == [1, 1, 1]
    ev = collate_vqa_eval(tok)([(img, "how many " * 20, 5), (img, "what", 9)])
    assert ev["index"].tolist() == [5, 9] and ev["question_ids"].shape[1] == 41  # no truncation


# --------------------------------------------------------------------------------- model

TINY_BERT = BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=32, fusion_layer=2, encoder_width=16)


def tiny_vqa(distill=True, layers=2) -> VQAModel:
    torch.manual_seed(0)
    base = {k: v for k, v in vars(tiny_cfg()).items()}
    return VQAModel(VQAModelConfig(**base, text_decoder_layers=layers, distill=distill), TINY_BERT).eval()


def answers_with_shared_first_tokens():
    # [CLS] w [SEP] / [CLS] w w2 [SEP]: answers 0 and 1 share their first token, so do 2 and 3
    ids = torch.tensor([[101, 110, 102, 0], [101, 110, 111, 102], [101, 112, 102, 0], [101, 112, 113, 102],
                        [101, 114, 102, 0]])
    return ids, (ids != 0).long()


def tiny_questions(B: int, L: int = 6):
    return torch.randn(B, 3, 32, 32), torch.randint(104, 120, (B, L)), torch.ones(B, L, dtype=torch.long)


def test_ranking_always_answers_and_breaks_first_token_ties_by_list_order():
    model = tiny_vqa()
    image, q_ids, q_mask = tiny_questions(3)
    ids, mask = answers_with_shared_first_tokens()
    out = {}
    _, states = model.encode_question(image, q_ids, q_mask)
    topk_ids, topk_probs = model.rank_answer(states, q_mask, ids, mask, k=50, out=out)  # k > list: capped
    assert topk_ids.shape == (3, 5) and sorted(topk_ids[0].tolist()) == [0, 1, 2, 3, 4]
    assert torch.allclose(topk_probs.sum(1), torch.ones(3)) and bool((topk_probs[:, :-1] >= topk_probs[:, 1:]).all())
    first, probs = out["first_stage_topk_ids"], out["first_stage_topk_probs"]
    for b in range(3):  # tied candidates keep list order
        pos = {a: j for j, a in enumerate(first[b].tolist())}
        assert pos[0] < pos[1] and pos[2] < pos[3]
        assert probs[b, pos[0]] == probs[b, pos[1]]
    # candidate loss: the summed token loss, from a plain full-logits pass
    logits = model.text_decoder(ids, mask, states[:1].expand(5, -1, -1), q_mask[:1].expand(5, -1), causal=True)
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    plain = (nll * mask[:, 1:]).sum(1)
    assert torch.allclose(out["candidate_answer_loss"][:5, 0], plain[first[0]], atol=1e-5)


def test_loss_without_distillation_is_weighted_token_sum_per_question():
    model = tiny_vqa(distill=False)
    assert not hasattr(model, "text_decoder_m")
    ids, mask = answers_with_shared_first_tokens()
    image, q_ids, q_mask = tiny_questions(2)
    weights, n = torch.tensor([0.5, 0.25, 0.25, 1.0, 0.3]), torch.tensor([3, 2])
    out = model(image, q_ids, q_mask, ids, mask, weights, n, alpha=0.4, return_outputs=True)
    _, states = model.encode_question(image, q_ids, q_mask)
    rows = torch.tensor([0, 0, 0, 1, 1])
    expected = weights @ model.candidate_losses(ids, mask, states[rows], q_mask[rows]) / 2
    assert torch.allclose(out["loss"], expected, atol=1e-5)


def test_momentum_update_runs_in_the_training_forward():
    model = tiny_vqa()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias.add_(1.0)
    before = model.text_decoder_m.cls.predictions.bias.clone()
    ids, mask = answers_with_shared_first_tokens()
    model(*tiny_questions(1), ids[:2], mask[:2], torch.ones(2), torch.tensor([2]), alpha=0.4)
    after = model.text_decoder_m.cls.predictions.bias
    assert torch.allclose(after, 0.995 * before + 0.005 * model.text_decoder.cls.predictions.bias)


def test_pretraining_checkpoint_with_too_few_fusion_layers_is_an_error(tmp_path):
    pretrain = ALBEF(tiny_cfg(), TINY_BERT)
    torch.save({"model": pretrain.state_dict()}, tmp_path / "p.pth")
    with pytest.raises(CheckpointError, match="text_decoder_layers"):
        load_vqa_checkpoint(tiny_vqa(layers=3), str(tmp_path / "p.pth"))  # 2 fusion layers only
    with pytest.raises(CheckpointError, match="neither a VQA nor a pretraining"):
        torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "x.pth")
        load_vqa_checkpoint(tiny_vqa(), str(tmp_path / "x.pth"))


# ------------------------------------------------------------------------------ VQA.py end to end


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    prepare_demo_data.main(["--out", str(out), "--limit", "80"])
    return out


def small_opts(demo: Path, **extra) -> list[str]:
    opts = {"train_file": f"[{demo / 'vqa_train.json'}]", "test_file": f"[{demo / 'vqa_test.json'}]",
            "answer_list": str(demo / "answer_list.json"), "vqa_root": str(demo), "vit_depth": 1,
            "batch_size_train": 8, "batch_size_test": 24, "num_workers": 0, "print_freq": 1} | extra
    return [f"{k}={v}" for k, v in opts.items()]


@pytest.fixture(scope="module")
def pretrain_checkpoint(demo, tmp_path_factory) -> str:
    """A demo-sized pretraining checkpoint (random weights), written as Pretrain.py writes it."""
    cfg, _ = VQA.utils.load_config(CONFIG, small_opts(demo), VQA.VQAConfig)
    from models.albef import ALBEFConfig, build_bert_config

    albef_cfg = ALBEFConfig(**{k: getattr(cfg, k) for k in ALBEFConfig.__dataclass_fields__} | {"queue_size": 64})
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_last.pth"
    torch.save({"model": ALBEF(albef_cfg, build_bert_config(albef_cfg)).state_dict(), "epoch": 0}, path)
    return str(path)


def test_evaluate_from_pretraining_then_finetune_then_evaluate(demo, pretrain_checkpoint, tmp_path):
    base = ["--config", CONFIG, "--device", "cpu"]
    out = tmp_path / "eval"
    acc = VQA.main([*base, "--output_dir", str(out), "--evaluate", "--checkpoint", pretrain_checkpoint,
                    "--opts", *small_opts(demo)])
    test = json.loads((demo / "vqa_test.json").read_text())
    answer_list = json.loads((demo / "answer_list.json").read_text())
    rows = json.loads((out / "result" / "vqa_result_epoch0.json").read_text())
    assert [r["question_id"] for r in rows] == [e["question_id"] for e in test]
    assert all(r["answer"] in answer_list for r in rows)
    assert acc["overall"] == pytest.approx(vqa_accuracy(rows, test)["overall"])
    assert "VQA accuracy" in (out / "run.log").read_text()

    run = tmp_path / "train"
    VQA.main([*base, "--output_dir", str(run), "--checkpoint", pretrain_checkpoint, "--max_steps", "2",
              "--opts", *small_opts(demo)])
    assert (run / "checkpoint_last.pth").exists() and (run / "result" / "vqa_result_epoch0.json").exists()
    again = VQA.main([*base, "--output_dir", str(tmp_path / "eval2"), "--evaluate",
                      "--checkpoint", str(run / "checkpoint_last.pth"), "--opts", *small_opts(demo)])
    log = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
    assert log[-1]["test_vqa_acc_overall"] == pytest.approx(again["overall"])  # strict reload, same answers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_trains_and_gathers_every_question_once(demo, pretrain_checkpoint, tmp_path):
    """Two gloo processes: DDP steps, then each rank ranks its share (167 questions: padded shards)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "VQA.py"), "--config", CONFIG, "--output_dir", str(out), "--device", "cpu", "--max_steps", "2",
           "--checkpoint", pretrain_checkpoint, "--opts", *small_opts(demo, batch_size_test=16)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    test = json.loads((demo / "vqa_test.json").read_text())
    rows = json.loads((out / "result" / "vqa_result_epoch0.json").read_text())
    assert [r["question_id"] for r in rows] == [e["question_id"] for e in test]
    assert torch.load(out / "checkpoint_last.pth", weights_only=True)["step"] == 2
