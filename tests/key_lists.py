"""The check every parity test file runs on a full-size model: its state dict against the original's
official key list (`keys_<model>.json` of the fixtures)."""

from __future__ import annotations

from torch import nn


def assert_official_layout(model: nn.Module, keys: dict) -> dict:
    """Names, shapes, weight ties, non-float32 dtypes, frozen (momentum) parameters and buffers as the
    key list records them. Returns the state dict (keep_vars) for a family's own checks."""
    state = model.state_dict(keep_vars=True)
    ours = {k: list(v.shape) for k, v in state.items()}
    assert sorted(set(keys["keys"]) - set(ours)) == [], "missing keys"
    assert sorted(set(ours) - set(keys["keys"])) == [], "extra keys"
    assert {k: ours[k] for k in keys["keys"]} == keys["keys"], "shapes differ"
    for alias, first in keys["shared_with"].items():
        assert state[alias] is state[first], f"{alias} is not tied to {first}"
    for k, dtype in keys["dtypes_non_float32"].items():
        assert str(state[k].dtype).removeprefix("torch.") == dtype, k
    frozen = [n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad]
    assert len(frozen) == keys["requires_grad_false"]["count"]
    assert all(n.split(".")[0].endswith("_m") for n in frozen)
    assert sorted(n for n, _ in model.named_buffers()) == sorted(keys["buffers"])
    return state
