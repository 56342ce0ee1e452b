"""VQA parity with the original: the tiny fixture's training loss and answer ranking, the official
vqa.pth key list at full size (meta device), and the pretrain -> VQA checkpoint conversion against
what the original VQA.py's key loop produced (`init_from_checkpoint` in keys_vqa.json).

Every size, count and case parameter (k, decoder layers, resolution) comes from the fixture set; nothing
here depends on the public set's particular sizes."""

import json
from dataclasses import fields

import torch

from models.albef import build_bert_config
from models.checkpoint import adapt_pos_embed, load_state_dict_strict
from models.vqa import VQAModel, VQAModelConfig, vqa_state_dict_from_pretrain
from tests.test_parity import assert_close, full_size_config, load_case
from tests.key_lists import assert_official_layout


def model_config(cfg: dict, decoder_layers: int) -> VQAModelConfig:
    names = {f.name for f in fields(VQAModelConfig)}
    kw = {k: v for k, v in cfg.items() if k in names and k != "bert_config"}
    kw.update(text_encoder=None, vit_init=None, text_decoder_layers=decoder_layers)
    kw.setdefault("vision_width", kw["vit_width"])
    return VQAModelConfig(**kw)


def tiny_model(cfg: dict, sd: dict) -> VQAModel:
    model = VQAModel(model_config(cfg, cfg["text_decoder_layers"]), build_bert_config(cfg["bert_config"]))
    load_state_dict_strict(model, sd, "vqa/state_dict.pt")
    return model.eval()


def test_vqa_loss(ref_dir):
    cfg, sd, inputs, outputs = load_case("vqa")
    inp, ref = inputs["loss"], outputs["loss"]
    model = tiny_model(cfg, sd)
    out = model(inp["image"], inp["question_ids"], inp["question_mask"], inp["answer_ids"], inp["answer_mask"],
                inp["weights"], torch.tensor(inp["n"]), alpha=inp["alpha"], return_outputs=True)
    state = model.state_dict()
    out["momentum_params_after"] = {k: state[k] for k in ref["momentum_params_after"]}
    kd = outputs_distill(out, inp)
    out["answer_loss_distill"] = kd
    assert set(ref) <= set(out), f"missing outputs {set(ref) - set(out)}"
    for name in ref:
        assert_close(f"loss/{name}", out[name], ref[name])


def outputs_distill(out: dict, inp: dict) -> torch.Tensor:
    """The KD term alone (the model folds it into the loss), from the logits the model returned."""
    valid = inp["answer_mask"][:, 1:].bool()
    log_probs = torch.log_softmax(out["answer_logits"][:, :-1], -1)
    kd = -(torch.softmax(out["answer_logits_m"], -1) * log_probs).sum(-1)
    return (kd * valid).sum(1)


def test_vqa_rank_answer(ref_dir):
    cfg, sd, inputs, outputs = load_case("vqa")
    inp, ref = inputs["rank_answer"], outputs["rank_answer"]
    model = tiny_model(cfg, sd)
    image_embeds, question_states = model.encode_question(inp["image"], inp["question_ids"], inp["question_mask"])
    out = {"image_embeds": image_embeds, "question_states": question_states}
    topk_ids, topk_probs = model.rank_answer(question_states, inp["question_mask"], inp["answer_ids"],
                                             inp["answer_mask"], inp["k"], out=out)
    out |= {"topk_ids": topk_ids, "topk_probs": topk_probs}
    assert set(ref) <= set(out), f"missing outputs {set(ref) - set(out)}"
    # Stage-1 ties (answers sharing a first token) come in list order here, in torch.topk's
    # unspecified order in the original: compare the stage-1 outputs candidate by candidate.
    order = align_candidates(out["first_stage_topk_ids"], ref["first_stage_topk_ids"], out["first_stage_topk_probs"])
    k = inp["k"]
    for name in ("first_stage_topk_ids", "first_stage_topk_probs", "candidate_log_score"):
        out[name] = out[name].gather(1, order)
    flat = (order + k * torch.arange(order.shape[0])[:, None]).flatten()
    out["candidate_answer_loss"] = out["candidate_answer_loss"][flat]
    for name in ref:
        assert_close(f"rank_answer/{name}", out[name], ref[name])
    # the batched `predict` entry point gives the same ranking
    ids, probs = model.predict(inp["image"], inp["question_ids"], inp["question_mask"], inp["answer_ids"],
                               inp["answer_mask"], inp["k"])
    assert torch.equal(ids, topk_ids) and torch.allclose(probs, topk_probs)


def align_candidates(ours: torch.Tensor, ref: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """[B, k] positions in `ours` of each of `ref`'s candidates; only exactly tied candidates may move."""
    order = (ours[:, None, :] == ref[:, :, None]).int().argmax(-1)
    assert torch.equal(ours.gather(1, order), ref), "stage 1 picked other candidates"
    moved = order != torch.arange(ours.shape[1])
    assert torch.equal(probs.gather(1, order)[moved], probs[moved]), "a non-tied candidate moved"
    return order


# ------------------------------------------------------------------------------ full size, meta device


def full_size(keys: dict) -> VQAModel:
    layers = keys["derived"]["text_decoder.num_hidden_layers"]
    with torch.device("meta"):
        return VQAModel(model_config(full_size_config(keys), layers), build_bert_config(keys["config"]["bert_config"]))


def test_official_key_list(ref_dir):
    keys = json.loads((ref_dir / "keys_vqa.json").read_text())
    model = full_size(keys)
    assert_official_layout(model, keys)


def test_pretrain_conversion_matches_the_original(ref_dir):
    keys = json.loads((ref_dir / "keys_vqa.json").read_text())
    init = keys["init_from_checkpoint"]
    assert init["source_model"] == "pretrain"
    source = json.loads((ref_dir / "keys_pretrain.json").read_text())["keys"]
    sd = {k: torch.empty(shape, device="meta") for k, shape in source.items()}
    model = full_size(keys)
    bert = model.bert_cfg
    converted, unused = vqa_state_dict_from_pretrain(sd, bert.fusion_layer, model.text_decoder.config.num_hidden_layers)

    own = model.state_dict()
    assert sorted(set(own) - set(converted)) == init["missing_keys"]
    assert set(converted) <= set(own)
    assert len(unused) == init["unexpected_keys_count"]
    assert set(init["unexpected_keys_examples"]) <= set(unused)
    assert sum(k not in sd for k in converted) == init["renamed_count"]
    for target, src in init["renamed_examples"].items():
        assert converted[target] is sd[src], f"{target} should come from {src}"
    mismatched = sorted(k for k in converted if converted[k].shape != own[k].shape)
    assert mismatched == sorted(init["shape_mismatch_keys"])


def test_pretrain_conversion_loads_a_tiny_pretraining_checkpoint(ref_dir, tmp_path):
    """The tiny pretraining fixture, converted, fills every VQA key (pos_embed resized to twice the side)."""
    from models.vqa import load_vqa_checkpoint

    cfg, sd, _, _ = load_case("pretrain")
    decoder_layers = load_case("vqa")[0]["text_decoder_layers"]
    model = VQAModel(model_config(dict(cfg, image_res=2 * cfg["image_res"]), decoder_layers),
                     build_bert_config(cfg["bert_config"]))
    torch.save({"model": sd}, tmp_path / "pretrain.pth")
    load_vqa_checkpoint(model, str(tmp_path / "pretrain.pth"))
    state = model.state_dict()
    F = model.bert_cfg.fusion_layer
    for i in range(min(decoder_layers, model.bert_cfg.num_hidden_layers - F)):  # decoder layer i <- fusion layer F+i
        k = f"encoder.layer.{F + i}.crossattention.self.key.weight"
        assert torch.equal(state[f"text_decoder.bert.encoder.layer.{i}.crossattention.self.key.weight"],
                           sd[f"text_encoder.bert.{k}"])
        assert torch.equal(state[f"text_decoder_m.bert.encoder.layer.{i}.crossattention.self.key.weight"],
                           sd[f"text_encoder_m.bert.{k}"])
    assert torch.equal(state["text_decoder.cls.predictions.bias"], sd["text_encoder.cls.predictions.bias"])
    assert torch.equal(state["text_encoder.embeddings.word_embeddings.weight"],
                       sd["text_encoder.bert.embeddings.word_embeddings.weight"])
    resized = adapt_pos_embed({"visual_encoder.pos_embed": sd["visual_encoder.pos_embed"]}, model)
    assert torch.equal(state["visual_encoder.pos_embed"], resized["visual_encoder.pos_embed"])
