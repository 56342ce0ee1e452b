"""Parity with the original ALBEF: tiny random checkpoints and their recorded inputs/outputs, and the
state-dict layout of every official model at full size (built on the meta device).

Every size, count and case parameter comes from the fixture set (ALBEF_REF_DIR, default
tests/fixtures/albef_ref): config.json, inputs.pt and the key files; nothing here depends on the public
set's particular sizes. The other parity files share these helpers.
"""

import json
from dataclasses import fields

import pytest
import torch

from models.albef import ALBEF, ALBEFConfig, apply_mlm_mask, build_bert_config
from models.checkpoint import load_state_dict_strict
from tests.conftest import REF_DIR
from tests.key_lists import assert_official_layout

ATOL = 1e-5


def model_config(cfg: dict) -> ALBEFConfig:
    """The model keys of a fixture config (tiny config.json, or `full_size_config` of a key file)."""
    names = {f.name for f in fields(ALBEFConfig)}
    kw = {k: v for k, v in cfg.items() if k in names and k != "bert_config"}
    kw.update(text_encoder=None, vit_init=None)
    kw.setdefault("vision_width", kw["vit_width"])
    return ALBEFConfig(**kw)


def full_size_config(keys: dict) -> dict:
    """A key file's config and derived facts, with the ViT sizes the original hard-codes (and the key file
    therefore leaves out) read off the key shapes: width, patch size, depth. Heads change no shape."""
    shapes = keys["keys"]
    width = shapes["visual_encoder.cls_token"][-1]
    depth = len({k.split(".")[2] for k in shapes if k.startswith("visual_encoder.blocks.")})
    return dict(keys["config"], **keys.get("derived", {}), vit_width=width, vision_width=width, vit_depth=depth,
                vit_patch_size=shapes["visual_encoder.patch_embed.proj.weight"][-1])


def assert_close(name, ours, ref):
    """1e-5 absolute, scaled by the magnitude above 1 (the fixture README's rule); integers exactly."""
    if isinstance(ref, dict):
        for k in ref:
            assert_close(f"{name}.{k}", ours[k], ref[k])
        return
    ref = torch.as_tensor(ref)
    ours = torch.as_tensor(ours).detach().to(ref.dtype)
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    if not ref.is_floating_point():
        assert torch.equal(ours, ref), f"{name}: integer output differs"
        return
    err = (ours - ref).abs()
    tol = ATOL * ref.abs().clamp(min=1)
    assert bool((err <= tol).all()), f"{name}: max error {err.max().item():.3g}"


def load_case(model_name: str):
    d = REF_DIR / model_name
    cfg = json.loads((d / "config.json").read_text())
    sd = torch.load(d / "state_dict.pt", weights_only=True)
    inputs = torch.load(d / "inputs.pt", weights_only=True)
    outputs = torch.load(d / "outputs.pt", weights_only=True)
    return cfg, sd, inputs, outputs


def build(model_cls, cfg: dict, sd: dict, source: str):
    model = model_cls(model_config(cfg), build_bert_config(cfg["bert_config"]))
    load_state_dict_strict(model, sd, source)
    return model.eval()


def test_pretrain_loss(ref_dir, monkeypatch):
    cfg, sd, inputs, outputs = load_case("pretrain")
    for case, inp in inputs.items():
        ref = outputs[case]
        rec = inp["recorded"]
        model = build(ALBEF, cfg, sd, "pretrain/state_dict.pt")
        draws = {
            "select": rec["mlm_draw_select"].bool(),
            "to_mask_token": rec["mlm_draw_to_mask_token"].bool(),
            "to_random": rec["mlm_draw_to_random"].bool(),
            "random_words": rec["mlm_draw_random_words"],
        }
        masked, labels = apply_mlm_mask(inp["input_ids"], draws, model.bert_cfg)
        assert torch.equal(masked, rec["mlm_masked_input_ids"]) and torch.equal(labels, rec["mlm_labels"])
        monkeypatch.setattr(model, "mask_tokens", lambda ids: (masked, labels))
        neg = (rec["neg_image_idx_for_text"], rec["neg_text_idx_for_image"])
        monkeypatch.setattr(model, "sample_negatives", lambda w_t2i, w_i2t: neg)

        out = model(inp["image"], inp["input_ids"], inp["attention_mask"], alpha=inp["alpha"], return_outputs=True)
        state = model.state_dict()
        out |= {
            "temp_after": model.temp,
            "image_queue_after": state["image_queue"],
            "text_queue_after": state["text_queue"],
            "queue_ptr_after": state["queue_ptr"],
            "momentum_params_after": {k: state[k] for k in ref["momentum_params_after"]},
        }
        assert set(ref) <= set(out), f"missing outputs {set(ref) - set(out)}"
        for name in ref:
            assert_close(f"{case}/{name}", out[name], ref[name])


# ------------------------------------------------------------------------------ full-size key lists

KEY_MODELS = {"pretrain": ALBEF}


def full_size_model(model_cls, keys: dict):
    cfg = full_size_config(keys)
    with torch.device("meta"):
        return model_cls(model_config(cfg), build_bert_config(cfg["bert_config"]))


@pytest.mark.parametrize("name", sorted(KEY_MODELS))
def test_official_key_list(ref_dir, name):
    keys = json.loads((ref_dir / f"keys_{name}.json").read_text())
    model = full_size_model(KEY_MODELS[name], keys)
    assert_official_layout(model, keys)
