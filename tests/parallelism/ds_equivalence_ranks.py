"""Rank body for test_deepspeed_equivalence.py (module-level so spawned processes can import it)."""

from __future__ import annotations

import os

import torch

from ckpt_helpers import write_json

STEPS, GBS, MBS, SEQ = 3, 8, 2, 32


def job_spec(ep: int, zero_stage: int, workers: int, model: str = "moe/debug", precision: str = "auto"):
    from raytron.launcher.spec import spec_from_dict

    return spec_from_dict({
        "name": "eq", "model": dict(zip(("family", "flavor"), model.split("/"))), "checkpoint": {"uri": "/tmp/unused"},
        "train": {"precision": precision, "steps": 10, "seq_len": SEQ, "micro_batch_size": MBS, "global_batch_size": GBS, "lr": 1e-3},
        "data": {"sources": [{"uri": "builtin://python-stdlib"}]},
        "layout": {"ep": ep, "zero_stage": zero_stage}, "resources": {"workers": workers}})


def batch() -> torch.Tensor:
    """The global batch of every step: fixed random tokens [GBS, SEQ + 1]."""
    return torch.randint(0, 256, (GBS, SEQ + 1), generator=torch.Generator().manual_seed(0))


def deepspeed_losses(rank: int, world: int, ep: int, zero_stage: int, out: str, model: str = "moe/debug",
                     precision: str = "auto") -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)
    from raytron.launcher.validate import validate_job
    from raytron.parallelism.deepspeed_engine import DeepSpeedEngine

    spec = job_spec(ep, zero_stage, world, model, precision)
    engine = DeepSpeedEngine(spec, validate_job(spec), rank, world)
    per_rank = GBS // world
    mine = batch()[rank * per_rank:(rank + 1) * per_rank]
    records = []
    for _ in range(STEPS):
        m = engine.train_step(list(mine.split(MBS)))
        records.append({"loss": m.loss, "aux_loss": m.aux_loss, "grad_norm": m.grad_norm})
    if rank == 0:
        write_json(out, records)
