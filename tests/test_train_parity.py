"""Training parity with the original ALBEF: the fixture's `train/` (3 iterations of the original
Pretrain.py: optimizer, scheduler, loop body) replayed through our engine (`utils.build_optimizer`,
`utils.train_one_epoch` with the original lr schedule, the model's momentum update and queue).

Everything comes from the fixture set (ALBEF_REF_DIR or tests/fixtures/albef_ref): sizes, batches, draws,
alpha, epoch, step_size, the optimizer and schedule sections, the tolerance rule (1e-5 scaled by
max(1, |reference|), as `train/meaning.json` says) and which entries exist; nothing here depends on the
public set's particular sizes. Attention key biases are compared apart (`meaning.json`,
`caveat_key_biases`): their exact gradient is 0, so AdamW turns float32 rounding noise into steps of up
to an lr; their values after the run must be within what AdamW can move them.
"""

import json
import math

import pytest
import torch

import utils
from models.albef import ALBEF, apply_mlm_mask
from tests.test_parity import assert_close, build, load_case

KEY_BIAS_SUFFIXES = (".self.key.bias", ".attn.qkv.bias")  # BERT key biases; the ViT's qkv: its key third


def replay_draws(model: ALBEF, steps: list[dict], monkeypatch) -> None:
    """Each forward takes the next step's recorded MLM draws and hard negatives instead of sampling."""
    masks, negatives = iter(steps), iter(steps)

    def mask_tokens(input_ids):
        rec = next(masks)["recorded"]
        draws = {k: rec[f"mlm_draw_{k}"] for k in ("select", "to_mask_token", "to_random", "random_words")}
        draws = {k: v if k == "random_words" else v.bool() for k, v in draws.items()}
        masked, labels = apply_mlm_mask(input_ids, draws, model.bert_cfg)
        assert torch.equal(masked, rec["mlm_masked_input_ids"]) and torch.equal(labels, rec["mlm_labels"])
        return masked, labels

    def sample_negatives(w_t2i, w_i2t):
        rec = next(negatives)["recorded"]
        return rec["neg_image_idx_for_text"], rec["neg_text_idx_for_image"]

    monkeypatch.setattr(model, "mask_tokens", mask_tokens)
    monkeypatch.setattr(model, "sample_negatives", sample_negatives)


def build_without_dropout(cfg: dict, sd: dict) -> ALBEF:
    """The fixture ran the model in eval mode; the engine puts it in train mode, so dropout goes to 0
    (the same function: dropout is the only difference between the modes)."""
    bert = dict(cfg["bert_config"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return build(ALBEF, dict(cfg, bert_config=bert), sd, "train/state_dict.pt")


def schedule(inputs: dict) -> utils.SchedulerConfig:
    """The fixture's `schedular` section as the original schedule (warm-up stairs of its step_size)."""
    sched = dict(inputs["schedular"], schedule="original", step_size=inputs["step_size"])
    assert inputs["warmup_iterations"] == sched["warmup_epochs"] * sched["step_size"]
    return utils.SchedulerConfig(**sched)


@pytest.fixture(scope="module")
def run(ref_dir):
    """Train the fixture's steps through `train_one_epoch`; record what `train/outputs.pt` records."""
    cfg, sd, inputs, outputs = load_case("train")
    steps = inputs["steps"]
    model = build_without_dropout(cfg, sd)
    optimizer = utils.build_optimizer(model, utils.OptimizerConfig(**inputs["optimizer"]["config"]))
    names = {p: n for n, p in model.named_parameters()}
    rec = {"losses": [], "lr": [], "queue_ptr_after": [], "temp_after": [], "grads": [], "grads_none": []}

    def after_forward(module, args, kwargs, out):
        rec["losses"].append({k: v.detach().clone() for k, v in out.items() if k.startswith("loss")})
        rec["queue_ptr_after"].append(int(module.queue_ptr))

    def before_step(opt, args, kwargs):
        rec["lr"].append([g["lr"] for g in opt.param_groups])
        params = [p for g in opt.param_groups for p in g["params"]]
        rec["grads"].append({names[p]: p.grad.clone() for p in params if p.grad is not None})
        rec["grads_none"].append(sorted(names[p] for p in params if p.grad is None))

    model.register_forward_hook(after_forward, with_kwargs=True)
    optimizer.register_step_pre_hook(before_step)
    optimizer.register_step_post_hook(lambda opt, args, kwargs: rec["temp_after"].append(model.temp.detach().clone()))
    batches = [{k: s[k] for k in ("image", "input_ids", "attention_mask")} for s in steps]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    with pytest.MonkeyPatch.context() as mp:
        replay_draws(model, steps, mp)
        utils.train_one_epoch(model, loader, optimizer, epoch=inputs["epoch"], steps_per_epoch=len(steps),
                              cfg=utils.EngineConfig(amp="fp32", num_workers=0, print_freq=1),
                              sched=schedule(inputs), dist=utils.DistInfo(),
                              forward_kwargs=lambda epoch, i: {"alpha": steps[i]["alpha"]})
    rec["state_dict_after"] = model.state_dict()
    rec["optimizer_state_after"] = {names[p]: s for p, s in optimizer.state.items()}
    rec["names"] = names
    return cfg, sd, inputs, outputs, model, optimizer, rec


def key_bias_part(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the part compared apart, the rest or None): a BERT key bias whole, the ViT qkv bias's key third."""
    if name.endswith(".attn.qkv.bias"):
        third = t.shape[0] // 3
        return t[third:2 * third], torch.cat([t[:third], t[2 * third:]])
    return t, None


def adamw_reach(betas: tuple[float, float], lrs: list[float]) -> float:
    """The most AdamW can move one weight in these steps (no weight decay): at step t, |m_hat / sqrt(v_hat)|
    <= sqrt(sum_i a_i^2 / b_i) by Cauchy-Schwarz, a_i and b_i the bias-corrected EMA weights of gradient i."""
    b1, b2 = betas
    reach = 0.0
    for t, lr in enumerate(lrs, start=1):
        a = [(1 - b1) * b1 ** (t - i) / (1 - b1**t) for i in range(1, t + 1)]
        b = [(1 - b2) * b2 ** (t - i) / (1 - b2**t) for i in range(1, t + 1)]
        reach += lr * math.sqrt(sum(x * x / y for x, y in zip(a, b)))
    return reach


def test_meaning_lists_what_we_compare(ref_dir):
    """Every input and output `meaning.json` defines is one this file reads or compares."""
    meaning = json.loads((ref_dir / "train" / "meaning.json").read_text())
    _, _, inputs, outputs = load_case("train")
    compared = {"losses", "lr", "lr_after_scheduler", "queue_ptr_after", "temp_after", "grads", "grads_none",
                "grads_per_loss_step1", "grads_per_loss_step1_unreached", "state_dict_after", "optimizer_state_after"}
    assert {k.split("[")[0] for k in meaning["outputs"]} == set(outputs) == compared
    assert {k.split("[")[0] for k in meaning["inputs"]} <= set(inputs)
    assert inputs["num_steps"] == len(inputs["steps"]) == len(outputs["losses"])


def test_losses_lr_queue_and_temp_per_step(run):
    *_, inputs, outputs, model, optimizer, rec = run
    sched = schedule(inputs)
    for i, ref in enumerate(outputs["losses"]):
        ours = rec["losses"][i]
        assert_close(f"step {i + 1} loss", sum(ours.values()), ref["loss"])
        for k in ref.keys() - {"loss"}:
            assert_close(f"step {i + 1} {k}", ours[k], ref[k])
    assert rec["lr"] == outputs["lr"]  # exactly: the original schedule, bit for bit
    after = [[utils.lr_at(inputs["epoch"], i + 1, len(inputs["steps"]), sched)] * len(optimizer.param_groups)
             for i in range(len(inputs["steps"]))]
    assert after == outputs["lr_after_scheduler"]
    assert rec["queue_ptr_after"] == outputs["queue_ptr_after"]
    for i, ref in enumerate(outputs["temp_after"]):
        assert_close(f"step {i + 1} temp", rec["temp_after"][i], ref)


def test_optimizer_groups_and_defaults(run):
    *_, inputs, _, model, optimizer, _ = run
    spec = inputs["optimizer"]
    names = {p: n for n, p in model.named_parameters()}
    ours = [(g["weight_decay"], sorted(names[p] for p in g["params"])) for g in optimizer.param_groups]
    assert ours == [(g["weight_decay"], sorted(g["names"])) for g in spec["param_groups"]]
    for k in ("betas", "eps", "amsgrad"):
        assert optimizer.defaults[k] == (tuple(spec["defaults"][k]) if k == "betas" else spec["defaults"][k]), k
    aliases = spec["trainable_aliases"]
    assert sorted(set(aliases.values())) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    state = model.state_dict(keep_vars=True)
    for alias, held in aliases.items():  # tied tensors: one parameter under several names
        assert state[alias] is state[held], alias


def test_gradients_after_each_step(run):
    *_, outputs, _, _, rec = run
    for i, ref in enumerate(outputs["grads"]):
        assert rec["grads_none"][i] == sorted(outputs["grads_none"][i])
        assert sorted(rec["grads"][i]) == sorted(ref), f"step {i + 1}: other parameters have gradients"
        for name, g in ref.items():
            assert_close(f"step {i + 1} grad {name}", rec["grads"][i][name], g)


def test_gradients_of_each_loss_at_step_1(run, monkeypatch):
    """Which parameters each loss reaches, and its gradient there, on step 1's graph (outside the loop)."""
    cfg, sd, inputs, outputs, *_ = run
    step = inputs["steps"][0]
    model = build_without_dropout(cfg, sd)
    replay_draws(model, [step], monkeypatch)
    out = model(step["image"], step["input_ids"], step["attention_mask"], alpha=step["alpha"])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for loss, ref in outputs["grads_per_loss_step1"].items():
        grads = torch.autograd.grad(out[loss], [p for _, p in named], retain_graph=True, allow_unused=True)
        reached = {n: g for (n, _), g in zip(named, grads) if g is not None}
        assert sorted(n for n, _ in named if n not in reached) == sorted(outputs["grads_per_loss_step1_unreached"][loss])
        assert sorted(reached) == sorted(ref)
        for name, g in ref.items():
            assert_close(f"{loss} grad {name}", reached[name], g)


def test_state_dict_after_the_run(run):
    *_, outputs, _, optimizer, rec = run
    ref, ours = outputs["state_dict_after"], rec["state_dict_after"]
    assert sorted(ours) == sorted(ref)
    reach = adamw_reach(optimizer.defaults["betas"], [max(lrs) for lrs in outputs["lr"]])
    no_decay = {n for g in optimizer.param_groups if g["weight_decay"] == 0 for n in map(rec["names"].get, g["params"])}
    for name, value in ref.items():
        if not name.endswith(KEY_BIAS_SUFFIXES) or name.split(".")[0].endswith("_m"):
            assert_close(f"state {name}", ours[name], value)
            continue
        assert name in no_decay  # the reach below leaves weight decay out
        apart, rest = key_bias_part(name, ours[name] - value)
        assert float(apart.abs().max()) <= 2 * reach, f"{name}: {float(apart.abs().max()):.3g} > AdamW reach"
        if rest is not None:
            assert_close(f"state {name} (query, value)", key_bias_part(name, ours[name])[1], key_bias_part(name, value)[1])


def test_adamw_state_after_the_run(run):
    *_, outputs, _, _, rec = run
    ref, ours = outputs["optimizer_state_after"], rec["optimizer_state_after"]
    assert sorted(ours) == sorted(ref)
    for name, state in ref.items():
        assert float(ours[name]["step"]) == float(state["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            assert_close(f"AdamW {k} {name}", ours[name][k], state[k])
