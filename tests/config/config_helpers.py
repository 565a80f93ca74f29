"""Small valid job configs the config tests start from and break one field at a time."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from raytron.config.spec import JobSpec, spec_from_dict
from raytron.launcher.validate import validate_job

# deepspeed: 4 workers, moe/debug (4 experts, 4 heads / 2 kv heads, 2 blocks), EP=2 folded over DP=4.
DEEPSPEED_JOB: dict[str, Any] = {
    "name": "cfg-test",
    "engine": "deepspeed",
    "model": {"family": "moe", "flavor": "debug"},
    "layout": {"ep": 2, "zero_stage": 1},
    "resources": {"workers": 4, "nodes": 1},
    "train": {"steps": 2, "seq_len": 32, "micro_batch_size": 2, "global_batch_size": 16, "lr": 3e-4},
    "data": {"sources": [{"uri": "builtin://python-stdlib"}]},
    "checkpoint": {"uri": "/tmp/raytron-config-tests/runs"},  # never written: plan-only checks
}

# megatron: 8 workers on 2 nodes, moe/debug, TP=2 PP=2 DP=2, EP=2 folded over tp*dp = 4.
MEGATRON_JOB: dict[str, Any] = {
    **copy.deepcopy(DEEPSPEED_JOB),
    "engine": "megatron",
    "layout": {"tp": 2, "pp": 2, "ep": 2, "zero_stage": 1},
    "resources": {"workers": 8, "nodes": 2, "use_gpu": True},
}

DEEPSPEED_YAML = yaml.safe_dump(DEEPSPEED_JOB, sort_keys=False)


def job(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """Copy of `base` with dotted-key changes (`layout__tp=2` sets layout.tp; value None deletes)."""
    raw = copy.deepcopy(base)
    for key, value in changes.items():
        parts = key.split("__")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return raw


def validate_raw(raw: Any, overrides: list[str] = ()) -> tuple[JobSpec, Any]:
    spec = spec_from_dict(raw, list(overrides))
    return spec, validate_job(spec)
