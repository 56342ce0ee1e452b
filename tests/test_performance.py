"""The speed options compute the same function as the plain path (tiny models, CPU): shared image
keys/values in the fusion passes, gradient checkpointing, `torch.compile` left out of the state dict;
the benchmark's FLOP counter and time split by part; bf16 autocast near fp32 on the parity fixture."""

import torch
from torch.utils import flop_counter

from models.albef import ALBEF, apply_mlm_mask
from models.bert import BertModel, select_image_kv
from scripts.benchmark import count_flops, instrument, split_by_part
from tests.test_albef import TINY_BERT, tiny_batch, tiny_cfg
from tests.test_parity import build as build_reference
from tests.test_parity import load_case


def build(**kw) -> ALBEF:
    torch.manual_seed(0)
    return ALBEF(tiny_cfg(**kw), TINY_BERT).train()  # train mode: dropout on


def loss_and_grads(model: ALBEF, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the same negatives, masks and dropout for both models
    out = model(*batch, alpha=0.4)
    loss = sum(v for k, v in out.items() if k.startswith("loss"))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_shared_image_kv_equals_projecting_every_row():
    torch.manual_seed(0)
    bert = BertModel(TINY_BERT).eval()  # no dropout: two passes to compare
    image = torch.randn(3, 5, TINY_BERT.encoder_width, requires_grad=True)
    text = torch.randn(6, 4, TINY_BERT.hidden_size)
    mask = torch.ones(6, 4, dtype=torch.long)
    mask[1, 2:] = 0
    rows = torch.tensor([0, 1, 2, 2, 0, 1])
    plain = bert.fuse(text, mask, image[rows])
    grads_plain = torch.autograd.grad(plain.square().sum(), [image, *bert.parameters()], allow_unused=True)
    shared = bert.fuse(text, mask, image_kv=select_image_kv(bert.image_kv(image), rows))
    grads_shared = torch.autograd.grad(shared.square().sum(), [image, *bert.parameters()], allow_unused=True)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_shared, grads_plain):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_checkpointing_gives_the_same_losses_and_gradients():
    batch = tiny_batch()
    plain, checkpointed = build(), build(grad_checkpointing=True)
    assert checkpointed.visual_encoder.grad_checkpointing and checkpointed.bert.grad_checkpointing
    assert not checkpointed.visual_encoder_m.grad_checkpointing  # twins run without gradient
    assert not checkpointed.text_encoder_m.bert.grad_checkpointing
    loss, grads = loss_and_grads(plain, batch)
    loss_c, grads_c = loss_and_grads(checkpointed, batch)
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_c.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_compile_keeps_state_dict_names_and_leaves_twins_alone():
    plain, compiled = build(), build(compile=True)  # compilation itself happens at the first call
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert compiled.visual_encoder.blocks[0]._compiled_call_impl is not None
    assert compiled.bert.encoder.layer[0]._compiled_call_impl is not None
    assert compiled.visual_encoder_m.blocks[0]._compiled_call_impl is None
    assert compiled.text_encoder_m.bert.encoder.layer[0]._compiled_call_impl is None


def test_flop_count_includes_cpu_attention():
    B, H, L, D = 2, 3, 5, 4
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    linear = torch.nn.Linear(8, 6)
    x = torch.randn(7, 8)

    def forward():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).sum() + linear(x).sum()

    forward_flops, backward = count_flops(forward)
    total = forward_flops + backward
    shape = (B, H, L, D)  # torch's formulas for CUDA SDPA: forward QK^T, PV; backward 5 matmuls
    attention = flop_counter.sdpa_flop_count(shape, shape, shape) + flop_counter.sdpa_backward_flop_count(*[shape] * 4)
    linear = 2 * 7 * 8 * 6  # forward; backward the same again (dW only: x needs no gradient)
    assert attention == 14 * B * H * L * L * D and total == attention + 2 * linear
    assert backward == flop_counter.sdpa_backward_flop_count(*[shape] * 4) + linear


def test_time_split_by_part_covers_the_steps():
    model = build()
    optimizer = torch.optim.AdamW(model.parameters())
    instrument(model)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = model(*tiny_batch(), alpha=0.4)
        sum(v for k, v in out.items() if k.startswith("loss")).backward()
        optimizer.step()
    parts = split_by_part(prof, cuda=False)
    for part in ("vision", "text", "image K/V", "fusion (ITM + MLM)", "MLM head"):
        assert parts[part]["forward"] > 0 and parts[part]["backward"] > 0, part
    assert parts["momentum"]["forward"] > 0 and parts["momentum"]["backward"] == 0


def test_bf16_autocast_stays_near_fp32_on_the_pretrain_fixture(ref_dir, monkeypatch):
    """The fixture's losses under bf16 autocast, with the recorded masks and negatives, against fp32:
    within a few bf16 roundings (bf16 keeps 8 bits of mantissa, eps 2^-7 = 0.0078). Sizes, inputs and
    draws all come from the fixture set."""
    cfg, sd, inputs, _ = load_case("pretrain")
    losses = {}
    for amp in ("fp32", "bf16"):
        for case, inp in inputs.items():
            rec = inp["recorded"]
            model = build_reference(ALBEF, cfg, sd, "pretrain/state_dict.pt")
            draws = {k: rec[f"mlm_draw_{k}"] for k in ("select", "to_mask_token", "to_random", "random_words")}
            draws = {k: v if k == "random_words" else v.bool() for k, v in draws.items()}
            masked = apply_mlm_mask(inp["input_ids"], draws, model.bert_cfg)
            monkeypatch.setattr(model, "mask_tokens", lambda ids, masked=masked: masked)
            neg = (rec["neg_image_idx_for_text"], rec["neg_text_idx_for_image"])
            monkeypatch.setattr(model, "sample_negatives", lambda w_t2i, w_i2t, neg=neg: neg)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
                out = model(inp["image"], inp["input_ids"], inp["attention_mask"], alpha=inp["alpha"])
            losses[amp, case] = torch.stack([out[k].float() for k in ("loss_ita", "loss_itm", "loss_mlm")])
    for case in inputs:  # measured: 0.5 % apart at most
        torch.testing.assert_close(losses["bf16", case], losses["fp32", case], rtol=0.02, atol=0.01)


def _page_faults_of_reallocations(keep: bool) -> list[int]:
    """Minor page faults of each of 7 re-allocations of a 96 MiB tensor (a word-embedding gradient), in
    a fresh process with or without `utils.keep_freed_memory`."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import resource, torch, utils
if {keep}:
    assert utils.keep_freed_memory()
for _ in range(2):  # first touches: the heap grows
    torch.zeros(32768, 768)
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.zeros(32768, 768)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return [int(n) for n in out.stdout.split()]


def test_keep_freed_memory_stops_page_faults_on_large_reallocations():
    """glibc's default maps, unmaps and faults in every re-allocation; kept, the heap serves them (the
    median one faults nothing; now and then the heap's top moves and one grows it again)."""
    pages = 32768 * 768 * 4 // 4096
    assert min(_page_faults_of_reallocations(keep=False)) > 0.9 * pages
    assert sorted(_page_faults_of_reallocations(keep=True))[3] < 0.05 * pages


def test_explicit_cpu_attention_equals_sdpa():
    """The bf16 CPU path (two matmuls and a softmax) against fp32 SDPA, with a padding mask."""
    from models.attention import attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 4:] = False
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    explicit = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert explicit.dtype == torch.bfloat16
    torch.testing.assert_close(explicit.float(), reference, rtol=0.02, atol=0.02)
    torch.testing.assert_close(attention(q, k, v, mask), reference)  # fp32: SDPA itself
    # dropout: every output is a sum of kept, rescaled probabilities times v; all-ones v shows them
    torch.manual_seed(1)
    kept = attention(q, k, torch.ones_like(v), mask, dropout_p=0.5)
    assert not torch.allclose(kept, torch.ones_like(kept)) and (kept >= 0).all() and (kept <= 2).all()


def test_vit_attention_equals_timm_attention():
    from timm.layers import Attention

    from models.attention import ViTAttention

    torch.manual_seed(0)
    ours, timm_attention = ViTAttention(16, num_heads=2, qkv_bias=True), Attention(16, num_heads=2, qkv_bias=True)
    ours.load_state_dict(timm_attention.state_dict())
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(ours(x), timm_attention(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(ours(x).float(), timm_attention(x).float(), rtol=0.02, atol=0.02)


def test_cls_only_last_layer_equals_the_full_pass():
    """`fuse(cls_only=n)`: [CLS] of the first n rows and the other rows whole, values and gradients as
    the full pass."""
    torch.manual_seed(0)
    bert = BertModel(TINY_BERT).eval()
    image = torch.randn(3, 5, TINY_BERT.encoder_width, requires_grad=True)
    text = torch.randn(5, 4, TINY_BERT.hidden_size, requires_grad=True)
    mask = torch.ones(5, 4, dtype=torch.long)
    mask[1, 2:] = 0
    kv = select_image_kv(bert.image_kv(image), torch.tensor([0, 1, 2, 2, 0]))
    full = bert.fuse(text, mask, image_kv=kv)
    cls, rest = bert.fuse(text, mask, image_kv=kv, cls_only=3)
    torch.testing.assert_close(cls, full[:3, 0])
    torch.testing.assert_close(rest, full[3:])
    weights = torch.randn(3, TINY_BERT.hidden_size)
    grads_full = torch.autograd.grad((full[:3, 0] * weights).sum() + full[3:].sum(), [image, text])
    kv = select_image_kv(bert.image_kv(image), torch.tensor([0, 1, 2, 2, 0]))
    cls, rest = bert.fuse(text, mask, image_kv=kv, cls_only=3)
    for a, b in zip(torch.autograd.grad((cls * weights).sum() + rest.sum(), [image, text]), grads_full):
        torch.testing.assert_close(a, b)


def test_training_path_gives_the_losses_of_the_full_outputs_path():
    """The step's fast path (batched passes, [CLS]-only ITM layer, vocabulary head at masked positions)
    against `return_outputs`, the path the parity tests hold to the original: same draws, same losses."""
    model = build().eval()  # no dropout: the two paths draw the same masks and negatives from one seed
    batch = tiny_batch()
    losses = {}
    for full in (False, True):
        torch.manual_seed(1)
        out = model(*batch, alpha=0.4, return_outputs=full)
        losses[full] = torch.stack([out[k] for k in ("loss_ita", "loss_itm", "loss_mlm")])
        model.load_state_dict(build().state_dict())  # undo the momentum update and the queue write
    torch.testing.assert_close(losses[False], losses[True], rtol=1e-6, atol=1e-6)


def test_linear_patch_embedding_equals_timm_conv():
    from timm.layers import PatchEmbed

    from models.vit import LinearPatchEmbed

    torch.manual_seed(0)
    conv, linear = PatchEmbed(32, 16, 3, 8), LinearPatchEmbed(32, 16, 3, 8)
    linear.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(linear(x), conv(x))
    grads = [torch.autograd.grad(m(x).square().sum(), m.proj.weight)[0] for m in (linear, conv)]
    torch.testing.assert_close(*grads)
