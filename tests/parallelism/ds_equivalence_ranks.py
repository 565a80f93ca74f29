"""Rank body for test_deepspeed_equivalence.py (module-level so spawned processes can import it)."""

from __future__ import annotations

import os

import torch

from tests.checkpoint.ckpt_helpers import write_json

STEPS, GBS, MBS, SEQ = 3, 8, 2, 32


def job_spec(ep: int, zero_stage: int, workers: int, model: str = "moe/debug", precision: str = "auto",
             overrides: dict | None = None, z_loss: float = 0.0):
    """`model` "family/flavor" with model `overrides`; `z_loss`: train.router_z_loss_coef."""
    from raytron.config.spec import spec_from_dict

    return spec_from_dict({
        "name": "eq", "model": {**dict(zip(("family", "flavor"), model.split("/"))), "overrides": overrides or {}},
        "checkpoint": {"uri": "/tmp/unused"},
        "train": {"precision": precision, "steps": 10, "seq_len": SEQ, "micro_batch_size": MBS, "global_batch_size": GBS,
                  "lr": 1e-3, "router_z_loss_coef": z_loss},
        "data": {"sources": [{"uri": "builtin://python-stdlib"}]},
        "layout": {"ep": ep, "zero_stage": zero_stage}, "resources": {"workers": workers}})


def batch() -> torch.Tensor:
    """The global batch of every step: fixed random tokens [GBS, SEQ + 1]."""
    return torch.randint(0, 256, (GBS, SEQ + 1), generator=torch.Generator().manual_seed(0))


def document_ids() -> torch.Tensor:
    """Packed-document ids [GBS, SEQ + 1] matching batch(): two to four documents per sample."""
    ids = torch.zeros(GBS, SEQ + 1, dtype=torch.int32)
    for i in range(GBS):
        for start in (5 + i, 11 + 3 * i % 13, 27):
            ids[i, start:] += 1
    return ids


def deepspeed_losses(rank: int, world: int, ep: int, zero_stage: int, out: str, model: str = "moe/debug",
                     precision: str = "auto", overrides: dict | None = None, z_loss: float = 0.0,
                     docs: bool = False) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)
    from raytron.launcher.validate import validate_job
    from raytron.parallelism.deepspeed.engine import DeepSpeedEngine

    spec = job_spec(ep, zero_stage, world, model, precision, overrides, z_loss)
    engine = DeepSpeedEngine(spec, validate_job(spec), rank, world)
    per_rank = GBS // world
    mine = batch()[rank * per_rank:(rank + 1) * per_rank]
    my_docs = list(document_ids()[rank * per_rank:(rank + 1) * per_rank].split(MBS)) if docs else None
    records = []
    for _ in range(STEPS):
        m = engine.train_step(list(mine.split(MBS)), my_docs)
        records.append({"loss": m.loss, "aux_loss": m.aux_loss, "z_loss": m.z_loss, "grad_norm": m.grad_norm,
                        "expert_bias": m.expert_bias})
    if rank == 0:
        write_json(out, records)


def recompute_gradients(rank: int, world: int, family: str, ep: int, out: str) -> None:
    """One forward/backward of the deepspeed engine per train.recompute mode, same weights and batch:
    rank 0 writes {mode: {"loss": ..., "saved": elements saved for backward, "grads": {name: [values]}}}
    (gradients after the DP all-reduce)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)
    from raytron.config.spec import spec_from_dict
    from raytron.launcher.validate import validate_job
    from raytron.parallelism.deepspeed.engine import DeepSpeedEngine

    per_rank = GBS // world
    mine = batch()[rank * per_rank:rank * per_rank + MBS]
    results = {}
    for mode in ("none", "selective", "full"):
        spec = spec_from_dict({
            "name": "rc", "checkpoint": {"uri": "/tmp/unused"}, "model": {"family": family},
            "train": {"steps": 10, "seq_len": SEQ, "micro_batch_size": MBS, "global_batch_size": MBS * world,
                      "lr": 1e-3, "recompute": mode},
            "data": {"sources": [{"uri": "builtin://python-stdlib"}]},
            "layout": {"ep": ep, "zero_stage": 0}, "resources": {"workers": world}})
        engine = DeepSpeedEngine(spec, validate_job(spec), rank, world)
        engine.engine.train()
        saved = [0]  # elements autograd keeps for backward outside any checkpointed region

        def pack(t):
            saved[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lm, aux, _ = engine._forward_loss(mine)
        engine.engine.backward(lm + spec.train.aux_loss_coef * aux)
        results[mode] = {"loss": [float(lm), float(aux)], "saved": saved[0],
                         "grads": {n: p.grad.flatten().tolist() for n, p in engine.module.named_parameters()
                                   if p.grad is not None}}
    if rank == 0:
        write_json(out, results)
