"""Parity of NLVR, text-assignment pretraining and VE with the original ALBEF: the tiny fixtures' outputs
(recorded draws replayed), the official key lists at full size (shared key/value tensors included), and
the pretrain -> task checkpoint conversions against the fixture's `init_from_checkpoint`.

Every size, count and layer index comes from the fixture set (config.json, inputs.pt, key files);
nothing here depends on the public set's particular sizes.
"""

import json

import pytest
import torch

from models.albef import ALBEF, build_bert_config
from models.checkpoint import CheckpointError, load_state_dict_strict
from models.nlvr import (ALBEFNLVR, ALBEFTextAssignment, load_nlvr_checkpoint, load_text_assignment_checkpoint,
                         nlvr_state_dict, text_assignment_state_dict)
from models.ve import ALBEFVE, load_ve_checkpoint, ve_state_dict
from tests.test_parity import assert_close, full_size_config, load_case, model_config
from tests.key_lists import assert_official_layout


def layers(cfg: dict) -> tuple[int, int]:
    """(fusion_layer F, layers L) of the pretraining BERT a config describes."""
    return cfg["bert_config"]["fusion_layer"], cfg["bert_config"]["num_hidden_layers"]


def with_pretrain_sizes(cfg: dict) -> dict:
    """A task config plus the pretraining-only sizes (queue, projections) of the fixture's pretrain model,
    so that one model family's checkpoint can be built at the other's size."""
    pretrain = load_case("pretrain")[0]
    return cfg | {k: pretrain[k] for k in ("queue_size", "embed_dim")}


def build(model_cls, cfg: dict, sd: dict | None = None):
    model = model_cls(model_config(cfg), build_bert_config(cfg["bert_config"]))
    if sd is not None:
        load_state_dict_strict(model, sd, f"{model_cls.__name__} fixture")
    return model.eval()


def momentum_after(model, names) -> dict:
    state = model.state_dict()
    return {k: state[k] for k in names}


@pytest.mark.parametrize("model_name, model_cls", [("nlvr", ALBEFNLVR), ("ve", ALBEFVE)])
def test_classifier_loss_and_predict(ref_dir, model_name, model_cls):
    cfg, sd, inputs, outputs = load_case(model_name)
    assert cfg["derived"]["momentum"] == 0.995
    for case, inp in inputs.items():
        ref = outputs[case]
        model = build(model_cls, cfg, sd)
        image = inp["images"] if model_name == "nlvr" else inp["image"]
        if case == "predict":
            out = {"prediction": model.predict(image, inp["input_ids"], inp["attention_mask"])}
            probe = {}
            model.classify(image, inp["input_ids"], inp["attention_mask"], out=probe)
            out |= probe
        else:
            out = model(image, inp["input_ids"], inp["attention_mask"], inp["targets"], alpha=inp["alpha"],
                        return_outputs=True)
            out["momentum_params_after"] = momentum_after(model, ref["momentum_params_after"])
        assert set(ref) <= set(out), f"missing outputs {set(ref) - set(out)}"
        for name in ref:
            assert_close(f"{model_name}/{case}/{name}", out[name], ref[name])


def test_text_assignment_loss(ref_dir, monkeypatch):
    cfg, sd, inputs, outputs = load_case("pretrain_nlvr")
    for case, inp in inputs.items():
        ref, rec = outputs[case], inp["recorded"]
        model = build(ALBEFTextAssignment, cfg, sd)
        assert sorted(set(rec["labels"].tolist())) == [0, 1, 2]  # every branch of quirk 14
        drawn = {}

        def replay(weights):
            drawn["weights"] = weights
            return rec["left_image_idx"], rec["right_image_idx"], rec["labels"]

        monkeypatch.setattr(model, "assign_images", replay)
        out = model(inp["image"], inp["input_ids"], inp["attention_mask"], return_outputs=True)
        out["loss"] = out["loss_ta"]
        for name in ref:
            assert_close(f"pretrain_nlvr/{case}/{name}", out[name], ref[name])
        # the replayed choice is one the rule can make: a negative never has weight 0 (not b itself)
        w, idx = drawn["weights"], torch.arange(len(rec["labels"]))
        for b, (l, r, y) in enumerate(zip(rec["left_image_idx"], rec["right_image_idx"], rec["labels"])):
            neg = [l, r] if y == 2 else [r if y == 0 else l]
            assert all(w[b, n] > 0 for n in neg) and (y == 2 or idx[b] in (l, r))


def test_assign_images_rule():
    """The vectorised draw: labels 0/1 put b left/right with one negative, 2 two distinct negatives."""
    torch.manual_seed(0)
    B = 64
    weights = torch.rand(B, B).fill_diagonal_(0)
    left, right, labels = ALBEFTextAssignment.assign_images(weights)
    own = torch.arange(B)
    assert torch.equal(left[labels == 0], own[labels == 0]) and torch.equal(right[labels == 1], own[labels == 1])
    assert bool((left != right).all()) and bool((left[labels == 2] != own[labels == 2]).all())
    assert bool((right[labels == 2] != own[labels == 2]).all())
    frac = torch.bincount(labels, minlength=3).float() / B
    assert 0.15 < frac[2] < 0.55 and frac[0] > 0.1 and frac[1] > 0.1


# ------------------------------------------------------------------------------ full-size key lists

KEY_MODELS = {"nlvr": ALBEFNLVR, "pretrain_nlvr": ALBEFTextAssignment, "ve": ALBEFVE}


@pytest.mark.parametrize("name", sorted(KEY_MODELS))
def test_official_key_list(ref_dir, name):
    keys = json.loads((ref_dir / f"keys_{name}.json").read_text())
    with torch.device("meta"):
        model = build(KEY_MODELS[name], full_size_config(keys))
    state = assert_official_layout(model, keys)
    assert keys["shared_with"] == shared_key_value(keys)
    # nothing else is tied: as many distinct tensors as keys minus aliases
    assert len({id(v) for v in state.values()}) == len(state) - len(keys["shared_with"])
    if "text_encoder.num_hidden_layers" in keys["derived"]:
        assert model.text_encoder.config.num_hidden_layers == keys["derived"]["text_encoder.num_hidden_layers"]


def shared_key_value(keys: dict) -> dict[str, str]:
    """NLVR-family tying from the key file's sizes: cross-attention key and value of layer F+2i+1 are those
    of F+2i, in every encoder that has them (online and momentum); nothing tied elsewhere."""
    F, L = layers(keys["config"])
    if "text_encoder.num_hidden_layers" not in keys["derived"]:
        return {}
    prefixes = sorted({k.split(".")[0] for k in keys["keys"] if k.startswith("text_encoder")})
    return {f"{p}.encoder.layer.{F + 2 * i + 1}.crossattention.self.{kv}.{wb}":
            f"{p}.encoder.layer.{F + 2 * i}.crossattention.self.{kv}.{wb}"
            for p in prefixes for i in range(L - F) for kv in ("key", "value") for wb in ("weight", "bias")}


# ------------------------------------------------------------------------------ checkpoint conversion

CONVERSIONS = {
    "pretrain_nlvr": lambda sd, fusion_layer: text_assignment_state_dict(sd, fusion_layer),
    "nlvr": lambda sd, fusion_layer: nlvr_state_dict(sd, fusion_layer),
    "ve": lambda sd, fusion_layer: ve_state_dict(sd),
}


@pytest.mark.parametrize("name", sorted(CONVERSIONS))
def test_conversion_matches_original_key_loop(ref_dir, name):
    """Each value is its source key's name, so the result says where every weight came from."""
    target = json.loads((ref_dir / f"keys_{name}.json").read_text())
    init = target["init_from_checkpoint"]
    source = json.loads((ref_dir / f"keys_{init['source_model']}.json").read_text())["keys"]
    converted = CONVERSIONS[name]({k: k for k in source}, target["config"]["bert_config"]["fusion_layer"])
    missing = sorted(set(target["keys"]) - set(converted))
    unexpected = sorted(set(converted) - set(target["keys"]))
    assert missing == sorted(init["missing_keys"])
    assert len(unexpected) == init["unexpected_keys_count"]
    assert set(init["unexpected_keys_examples"]) <= set(unexpected)
    renamed = {k: v for k, v in converted.items() if k != v and k in target["keys"]}
    assert len(renamed) == init["renamed_count"]
    for new, old in dict(init["renamed_examples"]).items():
        assert converted[new] == old, new
    mismatched = sorted(k for k in set(converted) & set(target["keys"]) if source[converted[k]] != target["keys"][k])
    assert mismatched == sorted(init["shape_mismatch_keys"])


def _tiny_pretrain_checkpoint(tmp_path, cfg) -> tuple[str, dict]:
    """A pretraining checkpoint at the tiny fixture size, every tensor distinct."""
    torch.manual_seed(0)
    model = build(ALBEF, cfg)
    sd = {k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = str(tmp_path / "pretrain.pth")
    torch.save({"model": sd, "epoch": 0}, path)
    return path, sd


def test_load_chain_pretrain_ta_nlvr(ref_dir, tmp_path):
    """Pretrain -> TA -> NLVR as the original scripts chain them, and Pretrain -> NLVR directly."""
    cfg = with_pretrain_sizes(load_case("pretrain_nlvr")[0])
    path, sd = _tiny_pretrain_checkpoint(tmp_path, cfg)
    ta = build(ALBEFTextAssignment, cfg)
    result = load_text_assignment_checkpoint(ta, path)
    assert result["missing"] == ["ta_head.weight", "ta_head.bias"]
    state = ta.state_dict()
    F_, L = layers(cfg)
    for layer in range(F_, L):  # pretrained fusion layer l -> layers F+2(l-F) and F+2(l-F)+1
        for half in (0, 1):
            new = F_ + 2 * (layer - F_) + half
            for part in ("attention.self.query.weight", "crossattention.self.key.bias", "output.dense.weight"):
                assert torch.equal(state[f"text_encoder.encoder.layer.{new}.{part}"],
                                   sd[f"text_encoder.bert.encoder.layer.{layer}.{part}"])
    assert torch.equal(state["temp"], sd["temp"]) and torch.equal(state["vision_proj.weight"], sd["vision_proj.weight"])
    ta_path = str(tmp_path / "ta.pth")
    torch.save({"model": state}, ta_path)

    nlvr_cfg = load_case("nlvr")[0]
    for src in (ta_path, path):  # the same weights either way, momentum twins left alone (ALBEF parity)
        nlvr = build(ALBEFNLVR, nlvr_cfg)
        before = {k: v.clone() for k, v in nlvr.state_dict().items()}
        result = load_nlvr_checkpoint(nlvr, src)
        assert {k.split(".")[0] for k in result["missing"]} == {"cls_head", "cls_head_m", "visual_encoder_m",
                                                                "text_encoder_m"}
        after = nlvr.state_dict()
        for k in result["missing"]:
            assert torch.equal(after[k], before[k]), k
        for k, v in state.items():
            if k in after:
                assert torch.equal(after[k], v), k
    nlvr = build(ALBEFNLVR, nlvr_cfg)
    load_nlvr_checkpoint(nlvr, ta_path, copy_momentum_after_load=True)
    after = nlvr.state_dict()
    last = F_ + 2 * (L - F_) - 1  # the two-image encoder's last layer
    assert torch.equal(after[f"text_encoder_m.encoder.layer.{last}.crossattention.self.key.weight"],
                       state[f"text_encoder.encoder.layer.{last}.crossattention.self.key.weight"])
    assert torch.equal(after["cls_head_m.0.weight"], after["cls_head.0.weight"])
    # a fine-tuned NLVR checkpoint loads strictly, momentum included
    fine = {k: v + 1 if v.is_floating_point() else v for k, v in after.items()}
    torch.save({"model": fine}, tmp_path / "nlvr.pth")
    again = build(ALBEFNLVR, nlvr_cfg)
    assert load_nlvr_checkpoint(again, str(tmp_path / "nlvr.pth"))["missing"] == []
    assert all(torch.equal(again.state_dict()[k], fine[k]) for k in fine)


def test_load_ve_from_pretrain(ref_dir, tmp_path):
    cfg = with_pretrain_sizes(load_case("ve")[0])
    path, sd = _tiny_pretrain_checkpoint(tmp_path, cfg)
    last = layers(cfg)[1] - 1  # a fusion layer
    model = build(ALBEFVE, cfg)
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("cls_head")}
    result = load_ve_checkpoint(model, path)
    assert sorted(result["missing"]) == sorted(head)
    state = model.state_dict()
    assert torch.equal(state[f"text_encoder_m.encoder.layer.{last}.crossattention.self.value.weight"],
                       sd[f"text_encoder_m.bert.encoder.layer.{last}.crossattention.self.value.weight"])
    assert torch.equal(state["visual_encoder_m.pos_embed"], sd["visual_encoder_m.pos_embed"])
    assert all(torch.equal(state[k], v) for k, v in head.items())
    assert torch.equal(state["cls_head_m.2.weight"], state["cls_head.2.weight"])  # twins start equal
    truncated = tmp_path / "truncated.pth"
    torch.save({"model": {k: v for k, v in sd.items() if f"layer.{last}." not in k}}, truncated)
    with pytest.raises(CheckpointError, match="lacks"):
        load_ve_checkpoint(build(ALBEFVE, cfg), str(truncated))


@pytest.mark.parametrize("model_name, model_cls", [("nlvr", ALBEFNLVR), ("ve", ALBEFVE)])
def test_without_distillation(ref_dir, model_name, model_cls):
    """`distill: false` builds no momentum twins (as the original) and trains on plain cross-entropy."""
    cfg, sd, inputs, outputs = load_case(model_name)
    model = model_cls(model_config(cfg), build_bert_config(cfg["bert_config"]), distill=False)
    load_state_dict_strict(model, {k: v for k, v in sd.items() if not k.split(".")[0].endswith("_m")}, "online")
    model.eval().copy_params()  # nothing to copy
    inp, ref = inputs["loss"], outputs["loss"]
    image = inp["images"] if model_name == "nlvr" else inp["image"]
    out = model(image, inp["input_ids"], inp["attention_mask"], inp["targets"], alpha=inp["alpha"], return_outputs=True)
    assert_close("prediction", out["prediction"], ref["prediction"])
    assert_close("loss", out["loss"], torch.nn.functional.cross_entropy(ref["prediction"], inp["targets"]))
    assert "prediction_m" not in out


def test_text_assignment_from_scratch_initialises():
    """Without a checkpoint, Pretrain_nlvr.py initialises the encoders; a model without twins copies nothing."""
    cfg = load_case("pretrain_nlvr")[0]
    model = build(ALBEFTextAssignment, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.init_pretrained_encoders()  # text_encoder/vit_init None here: only the (empty) momentum copy
    assert model.momentum_names == () and not any(k.split(".")[0].endswith("_m") for k in before)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
