"""Parity of the retrieval model with the original ALBEF: the training loss and the evaluation procedure
on the tiny fixture, the official key lists of retrieval and grounding at full size (meta device), and
the pretrain -> retrieval checkpoint conversion against what the original Retrieval.py loaded.

Every size, count and case parameter (k_test, gallery, layers) comes from the fixture set; nothing here
depends on the public set's particular sizes."""

import dataclasses
import json
import shutil

import pytest
import torch

from datasets.retrieval import recall_metrics, retrieval_features, retrieval_scores
from datasets.text import build_tokenizer, tokenize
from models.albef import build_bert_config
from models.checkpoint import load_state_dict_strict
from models.retrieval import ALBEFRetrieval, RetrievalModelConfig, convert_pretrain_state_dict, rerank_itm
from tests.test_parity import assert_close, full_size_config, load_case, model_config


def retrieval_config(cfg: dict) -> RetrievalModelConfig:
    return RetrievalModelConfig(**dataclasses.asdict(model_config(cfg)), distill=cfg.get("distill", True))


def build(cfg: dict, sd: dict) -> ALBEFRetrieval:
    model = ALBEFRetrieval(retrieval_config(cfg), build_bert_config(cfg["bert_config"]))
    load_state_dict_strict(model, sd, "retrieval/state_dict.pt")
    return model.eval()


def test_retrieval_loss(ref_dir, monkeypatch):
    cfg, sd, inputs, outputs = load_case("retrieval")
    inp, ref = inputs["loss"], outputs["loss"]
    model = build(cfg, sd)
    neg = (inp["recorded"]["neg_image_idx_for_text"], inp["recorded"]["neg_text_idx_for_image"])
    monkeypatch.setattr(model, "sample_negatives", lambda w_t2i, w_i2t: neg)
    out = model(inp["image"], inp["input_ids"], inp["attention_mask"], alpha=inp["alpha"], idx=inp["idx"],
                return_outputs=True)
    state = model.state_dict()
    out |= {"temp_after": model.temp, "image_queue_after": state["image_queue"],
            "text_queue_after": state["text_queue"], "idx_queue_after": state["idx_queue"],
            "queue_ptr_after": state["queue_ptr"],
            "momentum_params_after": {k: state[k] for k in ref["momentum_params_after"]}}
    assert set(ref) <= set(out), f"missing outputs {set(ref) - set(out)}"
    for name in ref:
        assert_close(f"loss/{name}", out[name], ref[name])


class _Gallery(torch.utils.data.Dataset):
    def __init__(self, images, texts):
        self.images, self.texts = images, texts

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i


@pytest.fixture(scope="module")
def tiny_tokenizer(ref_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_vocab")
    shutil.copy(ref_dir / "tiny_vocab.txt", folder / "vocab.txt")
    return build_tokenizer(folder)


def test_retrieval_evaluation(ref_dir, tiny_tokenizer):
    cfg, sd, inputs, outputs = load_case("retrieval")
    inp, ref = inputs["evaluation"], outputs["evaluation"]
    model = build(cfg, sd)
    ids, mask = tokenize(tiny_tokenizer, inp["texts"], **inp["tokenizer_kwargs"])
    assert_close("text_input_ids", ids, ref["text_input_ids"])
    assert_close("text_attention_mask", mask, ref["text_attention_mask"])

    gallery = _Gallery(inp["images"], inp["texts"])
    feats = retrieval_features(model, gallery, tiny_tokenizer, "cpu", batch_size=inp["image_batch_size"])
    sims = feats["image_feat"] @ feats["text_feat"].T
    ours = {"text_hidden": feats["text_embeds"], "text_embeds": feats["text_feat"],
            "image_hidden": feats["image_embeds"], "image_embeds": feats["image_feat"], "sims_matrix": sims}
    score_i2t, score_t2i = retrieval_scores(model, feats, inp["k_test"], "itm", itm_batch_size=5)
    ours |= {"score_matrix_i2t": score_i2t, "score_matrix_t2i": score_t2i,
             "itm_eval": recall_metrics(score_i2t.numpy(), score_t2i.numpy(), inp["txt2img"], inp["img2txt"])}
    # padded positions are not computed (0): masked keys, they never reach a score
    real = mask.bool()[..., None]
    assert not feats["text_embeds"].masked_select(~real).any()
    ours["text_hidden"] = torch.where(real, feats["text_embeds"], ref["text_hidden"])
    for name in ref:
        if name not in ("text_input_ids", "text_attention_mask"):
            assert_close(f"evaluation/{name}", ours[name], ref[name])
    # the candidates really are where the reference has scores, and every batch size gives the same
    assert torch.equal(score_i2t != -100, ref["score_matrix_i2t"] != -100)
    for bs in (1, 7, len(inp["texts"])):
        again = rerank_itm(model, sims, feats["image_embeds"], feats["text_embeds"], feats["text_mask"],
                           inp["k_test"], bs)
        assert_close("rerank", again[0], ref["score_matrix_i2t"])
        assert_close("rerank", again[1], ref["score_matrix_t2i"])


# ------------------------------------------------------------------------------ full-size key lists


def full_size(keys: dict) -> ALBEFRetrieval:
    cfg = full_size_config(keys)
    with torch.device("meta"):
        return ALBEFRetrieval(retrieval_config(cfg), build_bert_config(cfg["bert_config"]))


@pytest.mark.parametrize("name", ["retrieval", "grounding"])
def test_official_key_list(ref_dir, name):
    keys = json.loads((ref_dir / f"keys_{name}.json").read_text())
    model = full_size(keys)
    state = model.state_dict(keep_vars=True)
    ours = {k: list(v.shape) for k, v in state.items()}
    assert sorted(set(keys["keys"]) - set(ours)) == [], "missing keys"
    assert sorted(set(ours) - set(keys["keys"])) == [], "extra keys"
    assert ours == keys["keys"], "shapes differ"
    for alias, first in keys["shared_with"].items():
        assert state[alias] is state[first], f"{alias} is not tied to {first}"
    non_float = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items() if v.dtype != torch.float32}
    assert non_float == keys["dtypes_non_float32"]
    frozen = [n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad]
    assert len(frozen) == keys["requires_grad_false"]["count"]
    assert all(n.split(".")[0].endswith("_m") for n in frozen)
    assert sorted(n for n, _ in model.named_buffers()) == sorted(keys["buffers"])


@pytest.mark.parametrize("name", ["retrieval", "grounding"])
def test_pretrain_conversion_matches_the_original_loading(ref_dir, name):
    """Full size on the meta device, against the key file's `init_from_checkpoint`: the keys the original
    renamed, the MLM-head keys it dropped, `idx_queue` left missing (-100 from its constructor) and the
    resized pos_embed."""
    target = json.loads((ref_dir / f"keys_{name}.json").read_text())
    source = json.loads((ref_dir / "keys_pretrain.json").read_text())
    init = target["init_from_checkpoint"]
    sd = {k: torch.empty(shape, device="meta") for k, shape in source["keys"].items()}
    for alias, first in source["shared_with"].items():
        sd[alias] = sd[first]
    converted = convert_pretrain_state_dict(sd, full_size(target))

    assert {k: list(v.shape) for k, v in converted.items()} == target["keys"]
    for new, old in init["renamed_examples"].items():
        assert converted[new] is sd[old]
    renamed = [k for k in converted if k not in sd]
    assert sorted(renamed) == sorted(set(init["missing_keys"]) | {k.replace("bert.", "", 1) for k in sd if "bert." in k})
    assert len(renamed) - len(init["missing_keys"]) == init["renamed_count"]
    dropped = [k for k in sd if k not in converted and k.replace("bert.", "", 1) not in converted]
    assert len(dropped) == init["unexpected_keys_count"] and set(init["unexpected_keys_examples"]) <= set(dropped)
    assert sorted(k for k in converted if k in sd and converted[k] is not sd[k]) == init["shape_mismatch_keys"]


def test_pretrain_conversion_values_on_the_tiny_checkpoint(ref_dir):
    """Real values: the tiny pretraining state dict loads strictly into a retrieval model at twice the
    resolution; queues and pointer carry over, idx_queue starts at -100, the encoder weights are the same."""
    cfg, sd, _, _ = load_case("pretrain")
    model = ALBEFRetrieval(retrieval_config(dict(cfg, image_res=2 * cfg["image_res"])),
                           build_bert_config(cfg["bert_config"]))
    load_state_dict_strict(model, convert_pretrain_state_dict(sd, model), "pretrain/state_dict.pt")
    state = model.state_dict()
    assert torch.equal(state["idx_queue"], torch.full_like(state["idx_queue"], -100))
    for k in ("image_queue", "text_queue", "queue_ptr", "temp", "itm_head.weight", "visual_encoder.cls_token"):
        assert torch.equal(state[k], sd[k]), k
    last = cfg["bert_config"]["num_hidden_layers"] - 1  # a fusion layer
    assert torch.equal(state[f"text_encoder_m.encoder.layer.{last}.crossattention.self.key.weight"],
                       sd[f"text_encoder_m.bert.encoder.layer.{last}.crossattention.self.key.weight"])
    patches = sd["visual_encoder.pos_embed"].shape[1] - 1
    assert state["visual_encoder.pos_embed"].shape[1] == 1 + 4 * patches  # twice the side: 4x the patches
