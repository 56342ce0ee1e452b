"""Grad-CAM (models/gradcam.py) on tiny random models: shapes, sign, finiteness, dependence on the word,
agreement of the explicit attention path with SDPA, the gradient against a finite difference, layer
validation, and scripts/visualize.py end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.bert import BertConfig
from models.gradcam import (check_block_num, default_block_num, gradcam, itc_map, itm_token_maps, kept_cross_attention,
                            sentence_map)
from models.retrieval import ALBEFRetrieval, RetrievalModelConfig


def tiny_model(layers: int = 4, fusion: int = 2, image_res: int = 32, seed: int = 0) -> ALBEFRetrieval:
    torch.manual_seed(seed)
    cfg = RetrievalModelConfig(text_encoder=None, image_res=image_res, vit_patch_size=8, vit_width=16,
                               vision_width=16, vit_depth=2, vit_heads=2, embed_dim=8, queue_size=8)
    bert = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=40, fusion_layer=fusion, encoder_width=16)
    return ALBEFRetrieval(cfg, bert).eval()


def batch(B: int = 3, L: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (B, L), generator=g)
    ids[:, 0] = 1  # [CLS]
    mask = torch.ones(B, L, dtype=torch.long)
    mask[min(1, B - 1), 4:] = 0
    ids = ids * mask
    return torch.randn(B, 3, 32, 32, generator=g), ids, mask


def test_token_maps_are_finite_non_negative_on_the_patch_grid_and_zero_at_padding():
    model = tiny_model()
    image, ids, mask = batch()
    maps, logits = itm_token_maps(model, image, ids, mask, block_num=2)
    assert maps.shape == (3, 7, 4, 4) and logits.shape == (3, 2)  # 32 px / 8 px patches
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    assert maps[1, 4:].abs().sum() == 0 and maps[0].sum() > 0
    assert all(p.grad is None for p in model.parameters())  # only the map's gradient is taken
    att = model.bert.encoder.layer[2].crossattention.self
    assert att.keep_attention is False and att.attention_map is None  # the opt-in is switched off again


def test_map_changes_when_the_word_changes():
    model = tiny_model()
    image, ids, mask = batch()
    other = ids.clone()
    other[0, 3] = 7 if ids[0, 3] != 7 else 8
    maps, _ = itm_token_maps(model, image, ids, mask, 2)
    changed, _ = itm_token_maps(model, image, other, mask, 2)
    assert not torch.allclose(maps[0, 3], changed[0, 3])
    assert not torch.allclose(sentence_map(maps, mask)[0], sentence_map(changed, mask)[0])
    torch.testing.assert_close(maps[1:], changed[1:])  # the other pairs do not see it


def test_explicit_attention_path_gives_the_sdpa_score():
    model = tiny_model()
    image, ids, mask = batch()
    _, logits = itm_token_maps(model, image, ids, mask, 3)
    with torch.no_grad():
        image_embeds, _ = model.encode_image(image)
        text_embeds, _ = model.encode_text(ids, mask)
        expected = model.itm_score(image_embeds, text_embeds, mask)
    torch.testing.assert_close(logits[:, 1], expected, atol=1e-5, rtol=1e-5)


def test_gradient_is_that_of_the_attention_map(monkeypatch):
    """The kept map's gradient against a finite difference (double precision): adding delta to one
    cross-attention probability of layer 2 moves the ITM match logit by grad * delta."""
    model = tiny_model().double()
    image, ids, mask = batch(B=2)
    image = image.double()
    softmax = torch.Tensor.softmax

    def match_logit(bump: float = 0.0, keep=None):
        def bumped(t, dim):
            out = softmax(t, dim=dim)
            return out + torch.zeros_like(out).index_put_((torch.tensor(0), torch.tensor(1), torch.tensor(2),
                                                           torch.tensor(5)), torch.tensor(bump, dtype=out.dtype))
        monkeypatch.setattr(torch.Tensor, "softmax", bumped)  # only the kept layer calls Tensor.softmax
        try:
            with kept_cross_attention(model, 2) as att:
                fused = model.bert.fuse(model.encode_text(ids, mask)[0], mask, model.encode_image(image)[0])
                logit = model.itm_head(fused[:, 0])[0, 1]
                return logit if keep is None else torch.autograd.grad(logit, att.attention_map)[0]
        finally:
            monkeypatch.setattr(torch.Tensor, "softmax", softmax)

    grad = match_logit(keep=True)
    eps = 1e-6
    with torch.no_grad():
        numeric = (match_logit(eps) - match_logit(-eps)) / (2 * eps)
    torch.testing.assert_close(grad[0, 1, 2, 5], numeric, atol=1e-7, rtol=1e-4)


def test_last_fusion_layer_only_explains_cls_and_the_default_avoids_it():
    model = tiny_model(layers=4, fusion=2)
    image, ids, mask = batch()
    maps, _ = itm_token_maps(model, image, ids, mask, 3)
    assert maps[:, 1:].abs().sum() == 0 and maps[:, 0].sum() > 0
    assert default_block_num(model) == 2
    assert default_block_num(tiny_model(layers=12, fusion=6)) == 8  # the paper's third fusion layer


def test_sentence_map_is_the_mean_over_the_texts_own_tokens_and_batch_independent():
    model = tiny_model()
    image, ids, mask = batch()
    maps, _ = itm_token_maps(model, image, ids, mask, 2)
    torch.testing.assert_close(sentence_map(maps, mask)[1], maps[1, :4].mean(0))
    torch.testing.assert_close(sentence_map(maps, mask, with_cls=False)[1], maps[1, 1:4].mean(0))
    alone = gradcam(model, image[1:2], ids[1:2, :4], mask[1:2, :4], "itm", 2)
    torch.testing.assert_close(alone[0], sentence_map(maps, mask)[1], atol=1e-6, rtol=1e-4)


def test_itc_map_shape_sign_and_dependence_on_text():
    model = tiny_model()
    image, ids, mask = batch()
    maps, sims = itc_map(model, image, ids, mask, block_num=1)
    assert maps.shape == (3, 4, 4) and sims.shape == (3,)
    assert torch.isfinite(maps).all() and (maps >= 0).all() and maps.sum() > 0
    other = ids.clone()
    other[0, 2] = 7 if ids[0, 2] != 7 else 8
    assert not torch.allclose(itc_map(model, image, other, mask, 1)[0][0], maps[0])
    assert model.visual_encoder.blocks[1].attn.fused_attn  # timm's fused path is restored


def test_block_num_out_of_range_is_a_clear_error():
    model = tiny_model(layers=4, fusion=2)
    image, ids, mask = batch()
    with pytest.raises(ValueError, match=r"block_num 1 is not a fusion .* valid are 2\.\.3"):
        itm_token_maps(model, image, ids, mask, 1)
    with pytest.raises(ValueError, match=r"block_num 4 is not a fusion"):
        check_block_num(model, 4, "itm")
    with pytest.raises(ValueError, match=r"block_num 2 is not a ViT block .* 0\.\.1"):
        itc_map(model, image, ids, mask, 2)
    with pytest.raises(ValueError, match="gradcam_mode"):
        check_block_num(model, 2, "gradient")


# ----------------------------------------------------------------------------- scripts/visualize.py


@pytest.fixture
def tiny_checkpoint(tmp_path, bert_vocab_dir):
    """A retrieval checkpoint of a tiny model with the real BERT vocabulary size, and its config."""
    bert = {"vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
            "intermediate_size": 32, "max_position_embeddings": 40, "fusion_layer": 1, "encoder_width": 16}
    (tmp_path / "bert.json").write_text(json.dumps(bert))
    cfg = RetrievalModelConfig(bert_config=str(tmp_path / "bert.json"), text_encoder=str(bert_vocab_dir),
                               image_res=32, vit_patch_size=8, vit_width=16, vision_width=16, vit_depth=1,
                               vit_heads=2, embed_dim=8, queue_size=8)
    torch.manual_seed(0)
    model = ALBEFRetrieval(cfg, BertConfig(**bert))
    path = tmp_path / "tiny.pth"
    torch.save({"model": model.state_dict(), "config": cfg.__dict__}, path)
    return path


def test_visualize_writes_one_png_per_text(tmp_path, tiny_checkpoint):
    from scripts import visualize

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8)).save(tmp_path / "im.png")
    out = tmp_path / "heat.png"
    res = visualize.main([str(tmp_path / "im.png"), "A red, unbelievably round circle!", "--checkpoint",
                          str(tiny_checkpoint), "--out", str(out)])
    assert res["words"] == ["a", "red", "unbelievably", "round", "circle"]  # pieces merged, punctuation dropped
    assert abs(sum(res["shares"]) - 1) < 1e-5 and 0 <= res["itm_prob"] <= 1
    png = Image.open(out)
    assert png.width > 7 * 100 and png.height > 2 * 100  # 8 panels: image, 5 words, sentence, [CLS]: 2 rows
    res = visualize.main([str(tmp_path / "im.png"), "a circle", "--checkpoint", str(tiny_checkpoint), "--out",
                          str(tmp_path / "itc.png"), "--gradcam_mode", "itc", "--image_res", "64"])
    assert res["words"] == ["a", "circle"] and (tmp_path / "itc.png").is_file()


def test_visualize_errors_name_the_problem(tmp_path, tiny_checkpoint):
    from models.checkpoint import CheckpointError
    from scripts import visualize

    Image.new("RGB", (8, 8)).save(tmp_path / "im.png")
    with pytest.raises(Exception, match="missing.png"):
        visualize.main([str(tmp_path / "missing.png"), "a", "--checkpoint", str(tiny_checkpoint)])
    with pytest.raises(ValueError, match="block_num 5 is not a fusion"):
        visualize.main([str(tmp_path / "im.png"), "a", "--checkpoint", str(tiny_checkpoint), "--block_num", "5",
                        "--out", str(tmp_path / "x.png")])
    sd = torch.load(tiny_checkpoint, weights_only=True)
    sd["model"] = {k: v for k, v in sd["model"].items() if not k.startswith("itm_head")}
    torch.save(sd, tmp_path / "ve_like.pth")
    with pytest.raises(CheckpointError, match="has no itm_head"):
        visualize.main([str(tmp_path / "im.png"), "a", "--checkpoint", str(tmp_path / "ve_like.pth")])
