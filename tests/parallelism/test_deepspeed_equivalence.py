"""The deepspeed engine computes the reference model: for the same seed, weights and global batch, the
loss, MoE aux loss and gradient norm of DeepSpeed ZeRO + DeepSpeed-MoE (EP over gloo ranks) equal a
plain single-process PyTorch loop over `raytron.models` with AdamW, step after step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F


from tests.checkpoint.ckpt_helpers import read_json, spawn_ranks
from tests.parallelism import ds_equivalence_ranks as ranks

pytestmark = pytest.mark.slow
# fp32 on CPU; the engines differ from the reference only in summation order (all-reduce, all-to-all)
RTOL = 1e-5
# bf16 weights/activations/gradients against the fp32 reference (DeepSpeed's CPU accelerator runs bf16 ZeRO):
# bf16 keeps 8 mantissa bits (relative rounding 2**-9 = 2e-3 per operation)
BF16_RTOL = 2e-2


def reference_losses(spec, docs: bool = False) -> list[dict]:
    """The same training written out by hand: reference model, AdamW (decay on matrices only),
    clipping, warm-up-free cosine schedule, the same micro-batch accumulation; `docs`: the packed
    documents of ranks.document_ids kept apart."""
    from raytron import models
    from raytron.parallelism.schedule import lr_at

    torch.manual_seed(spec.train.seed)
    model = models.build(spec.model.family, spec.model.flavor, **spec.model.overrides)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": spec.train.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=spec.train.lr, betas=(0.9, 0.95), eps=1e-8)
    micro = ranks.batch().split(ranks.MBS)
    doc_micro = ranks.document_ids().split(ranks.MBS) if docs else [None] * len(micro)
    out = []
    for step in range(ranks.STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=spec.train.lr, min_lr=spec.train.min_lr,
                                warmup_steps=spec.train.warmup_steps, total_steps=spec.train.steps)
        opt.zero_grad()
        lm_total = aux_total = z_total = dropped = 0.0
        for mb, ids in zip(micro, doc_micro):
            logits = model(mb[:, :-1], doc_ids=None if ids is None else ids[:, :-1])
            lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mb[:, 1:].reshape(-1))
            aux = torch.stack(model.aux_losses()).sum() if model.aux_losses() else torch.zeros(())
            z = torch.stack(model.z_losses()).sum() if model.z_losses() else torch.zeros(())
            ((lm + spec.train.aux_loss_coef * aux + spec.train.router_z_loss_coef * z) / len(micro)).backward()
            lm_total += lm.item() / len(micro)
            aux_total += aux.item() / len(micro)
            z_total += z.item() / len(micro)
            dropped += sum(m.last_dropped for m in model.moe_layers())
        norm = torch.nn.utils.clip_grad_norm_(params, spec.train.grad_clip)
        opt.step()
        for moe in model.moe_layers():  # aux-loss-free bias over the step's global batch
            moe.update_bias()
        out.append({"loss": lm_total, "aux_loss": aux_total, "z_loss": z_total, "grad_norm": float(norm),
                    "dropped": dropped, "expert_bias": [m.router.expert_bias.tolist() for m in model.moe_layers()]})
    return out


@pytest.mark.parametrize("world,ep,zero_stage,model", [
    (2, 2, 2, "moe/debug"), (2, 1, 1, "moe/debug"), (4, 4, 2, "moe/debug"),
    (2, 2, 0, "moe/debug"),  # replicated: the engine computes the norm (expert part summed over EP) and clips
    (2, 1, 3, "dense/debug"), (2, 1, 3, "hybrid/debug"),  # parameters partitioned too (MoE refuses ZeRO-3)
    (2, 2, 2, "moe/debug-capacity"),  # the reference's token dropping, kept weights not renormalized
    (2, 2, 2, "moe/debug-mla"),  # multi-head latent attention: the reference modules under ZeRO
])
def test_engine_matches_reference(tmp_path, world, ep, zero_stage, model):
    out = tmp_path / "engine.json"
    spawn_ranks(ranks.deepspeed_losses, world, ep, zero_stage, str(out), model, timeout=300)
    engine = read_json(out)
    ref = reference_losses(ranks.job_spec(ep, zero_stage, world, model))
    if "capacity" in model:
        assert sum(r["dropped"] for r in ref) > 0, "the capacity case must drop tokens to test dropping"
    for step, (e, r) in enumerate(zip(engine, ref), start=1):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert math.isclose(e[key], r[key], rel_tol=RTOL), f"step {step} {key}: engine {e[key]} vs reference {r[key]}"


# MoE routing options (models/moe.py `route`) through the engine's reference gate in DeepSpeed's MOELayer;
# 3 steps, so the routing biases updated after steps 1 and 2 steer the routing of the next steps.
ROUTER_CASES = {
    # moe/debug-sigmoid: sigmoid scores, normalised top-2, aux-loss-free bias, a shared expert (DeepSeek-V3)
    "sigmoid-bias-EP2": ("moe/debug-sigmoid", {}, 0.0),
    # top-4 within 2 of 4 expert groups, routed scaling, z-loss (as moe/deepseek-small's router, smaller)
    "groups-z-EP2": ("moe/debug-sigmoid", {"top_k": 4, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5},
                     1e-2),
    # the sigmoid router with capacity dropping (the reference's order, kept weights not renormalised)
    "sigmoid-capacity-EP2": ("moe/debug-sigmoid", {"capacity_factor": 1.0}, 0.0),
}


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_router_options_match_reference(tmp_path, case):
    model, overrides, z_loss = ROUTER_CASES[case]
    out = tmp_path / "engine.json"
    spawn_ranks(ranks.deepspeed_losses, 2, 2, 2, str(out), model, "auto", overrides, z_loss, timeout=300)
    engine = read_json(out)
    ref = reference_losses(ranks.job_spec(2, 2, 2, model, overrides=overrides, z_loss=z_loss))
    assert ref[-1]["expert_bias"] != ref[0]["expert_bias"] and any(any(b) for b in ref[0]["expert_bias"])
    for step, (e, r) in enumerate(zip(engine, ref), start=1):
        for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
            assert math.isclose(e[key], r[key], rel_tol=RTOL), f"step {step} {key}: engine {e[key]} vs reference {r[key]}"
        assert e["expert_bias"] == r["expert_bias"], f"step {step}: routing bias after the update differs"


@pytest.mark.parametrize("world,ep,zero_stage,model", [(2, 2, 2, "moe/debug"), (2, 1, 3, "dense/debug")])
def test_bf16_engine_tracks_reference(tmp_path, world, ep, zero_stage, model):
    """train.precision bf16 (fp32 master weights and Adam state in ZeRO's partitions) on DeepSpeed's CPU
    accelerator: the same training as the fp32 reference up to bf16 rounding."""
    out = tmp_path / "engine.json"
    spawn_ranks(ranks.deepspeed_losses, world, ep, zero_stage, str(out), model, "bf16", timeout=300)
    engine = read_json(out)
    ref = reference_losses(ranks.job_spec(ep, zero_stage, world, model))
    assert len(engine) == ranks.STEPS
    for step, (e, r) in enumerate(zip(engine, ref), start=1):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert math.isclose(e[key], r[key], rel_tol=BF16_RTOL, abs_tol=1e-6), \
                f"bf16 step {step} {key}: engine {e[key]} vs fp32 reference {r[key]}"


def test_engine_keeps_packed_documents_apart(tmp_path):
    """data.reset_at_documents: the engine given the packed samples' document ids trains what the reference
    model trains with those documents kept apart (attention masked, GDN / Mamba2 reset), step after step."""
    out = tmp_path / "engine.json"
    spawn_ranks(ranks.deepspeed_losses, 2, 1, 1, str(out), "hybrid/debug", "auto", None, 0.0, True, timeout=300)
    engine = read_json(out)
    spec = ranks.job_spec(1, 1, 2, "hybrid/debug")
    ref, ref_whole = reference_losses(spec, docs=True), reference_losses(spec)
    assert abs(ref[0]["loss"] - ref_whole[0]["loss"]) > 1e-3, "the documents must change the loss to test them"
    assert len(engine) == ranks.STEPS
    for step, (e, r) in enumerate(zip(engine, ref), start=1):
        for key in ("loss", "grad_norm"):
            assert math.isclose(e[key], r[key], rel_tol=RTOL), f"step {step} {key}: engine {e[key]} vs reference {r[key]}"
