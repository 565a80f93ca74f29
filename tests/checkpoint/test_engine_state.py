"""The canonical engine state (parallelism/engine_state.py): what either engine's checkpoint, old or new,
becomes before an engine loads it."""

from __future__ import annotations

import pytest
import torch

from raytron import models
from raytron.parallelism.engine_state import canonical, merge_state, routing_bias_names, split_experts

CFG = models.get_config("moe", "debug")
SIGMOID = models.get_config("moe", "debug", router="sigmoid")


def _reference(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in models.Transformer(CFG).named_parameters()}
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def _old_deepspeed_shards(params: dict) -> list[dict]:
    """How the deepspeed engine wrote EP2 before the canonical state: experts one by one over two writers,
    its own step counters and every module buffer."""
    split = split_experts(params)
    mine = [{k: v for k, v in split.items() if "#" not in k or int(k.rpartition("#")[2]) < 2},
            {k: v for k, v in split.items() if "#" in k and int(k.rpartition("#")[2]) >= 2}]
    meta = {"optimizer_step": 5, "has_moments": True, "scheduler_last_epoch": 5, "global_steps": 5,
            "global_samples": 80}
    buffers = {"layers.1.mixer.router.expert_bias": torch.zeros(CFG.num_experts)}
    return [{"params": mine[0], "exp_avg": mine[0], "exp_avg_sq": mine[0], "buffers": buffers, "meta": meta},
            {"params": mine[1], "exp_avg": mine[1], "exp_avg_sq": mine[1]}]


def test_old_deepspeed_checkpoint_becomes_the_megatron_form():
    params = _reference()
    state = merge_state(_old_deepspeed_shards(params), CFG)
    assert state["params"].keys() == params.keys()
    for name, value in params.items():
        assert torch.equal(state["params"][name], value) and torch.equal(state["exp_avg"][name], value), name
    assert state["meta"] == {"engine": "deepspeed", "optimizer_step": 5, "has_moments": True, "steps_done": 5,
                             "global_samples": 80}
    assert state["buffers"] == {}, "a softmax router's bias never moves: not state"
    again = canonical(state, CFG)  # idempotent: an engine's load converts what restore converted
    assert again["meta"] == state["meta"] and all(again[s][n] is t for s in ("params", "exp_avg", "exp_avg_sq")
                                                  for n, t in state[s].items())


def test_megatron_checkpoint_is_already_canonical():
    params = _reference(1)
    bias = {n: torch.randn(CFG.num_experts) for n in routing_bias_names(SIGMOID)}
    meta = {"engine": "megatron", "optimizer_step": 3, "has_moments": True, "steps_done": 3}
    state = canonical({"params": params, "exp_avg": params, "exp_avg_sq": params, "buffers": bias, "meta": meta},
                      SIGMOID)
    assert state["meta"] == meta and state["buffers"].keys() == bias.keys() == {"layers.1.mixer.router.expert_bias",
                                                                                "layers.3.mixer.router.expert_bias"}
    assert all(state["params"][n] is v for n, v in params.items())


@pytest.mark.parametrize("meta, words", [
    ({"optimizer_step": 2, "has_moments": True}, "no step count"),
    ({"optimizer_step": 2, "has_moments": True, "scheduler_last_epoch": 3, "global_steps": 2}, "ambiguous"),
])
def test_unreadable_step_counts_are_named(meta, words):
    with pytest.raises(ValueError, match=words):
        canonical({"params": {}, "meta": meta}, CFG)


def test_a_missing_expert_is_named():
    split = split_experts(_reference())
    del split["layers.1.mixer.w_up#1"]
    with pytest.raises(ValueError, match=r"layers.1.mixer.w_up: experts \[0, 2, 3\]"):
        canonical({"params": split, "meta": {"steps_done": 0, "has_moments": False}}, CFG)
