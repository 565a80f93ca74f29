"""Expert parallelism for the deepspeed engine: the reference MoE layer re-expressed with DeepSpeed-MoE.

`DeepSpeedMoE` replaces a `raytron.models.MoE` module from outside the model. Its gate is DeepSpeed's
top-2 softmax gate configured to compute exactly the reference router (no gate noise, no second-expert
sampling, no random token selection); with a capacity factor its gate is replaced by the reference's
dropping (`reference_capacity_gate`: DeepSpeed's own renormalizes the kept weights after dropping, the
reference does not), so both train the same model. Its experts are
the local slice of the reference's stacked experts, and shared experts stay dense. Weight names map
both ways between the reference (`mixer.w_gate[e]`) and DeepSpeed (`...deepspeed_experts.{e_local}.w_gate.weight`).
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F
from torch import nn

from ...models import MoE
from ...models.moe import routing_entropy
from ...models.layers import SwiGLU
from ...models.moe import capacity_slots, expert_capacity


class DeepSpeedMoE(nn.Module):
    """Drop-in for a reference MoE mixer; holds experts [ep_rank * local, (ep_rank+1) * local)."""

    def __init__(self, ref: MoE, ep_size: int, ep_rank: int):
        super().__init__()
        from deepspeed.moe.layer import MoE as DSMoE

        cfg = ref.cfg
        _check_supported(cfg)
        self.cfg, self.ep_size, self.ep_rank = cfg, ep_size, ep_rank
        self.num_local = cfg.num_experts // ep_size
        self.moe = DSMoE(
            hidden_size=cfg.dim, expert=SwiGLU(cfg.dim, cfg.moe_ffn_dim), num_experts=cfg.num_experts,
            ep_size=ep_size, k=cfg.top_k, capacity_factor=cfg.capacity_factor or 1.0,
            eval_capacity_factor=cfg.capacity_factor or 1.0, min_capacity=0, noisy_gate_policy=None,
            drop_tokens=cfg.capacity_factor > 0, use_rts=False, top2_2nd_expert_sampling=False)
        if cfg.capacity_factor > 0:
            gate = self.moe.deepspeed_moe.gate
            gate.forward = functools.partial(reference_capacity_gate, gate.wg, cfg)
        self.shared = ref.shared
        self.last_aux_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None
        self.last_entropy: torch.Tensor | None = None  # [entropy sum, tokens] of the last forward
        self.load_reference(ref.state_dict())

    @torch.no_grad()
    def load_reference(self, ref_state: dict) -> None:
        """Copy reference MoE weights (router, this rank's experts, shared) into the DeepSpeed layer."""
        self.moe.deepspeed_moe.gate.wg.weight.copy_(ref_state["router.weight"])
        for local, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
            e = self.ep_rank * self.num_local + local
            expert.w_gate.weight.copy_(ref_state["w_gate"][e])
            expert.w_up.weight.copy_(ref_state["w_up"][e])
            expert.w_down.weight.copy_(ref_state["w_down"][e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, aux, counts = self.moe(x)
        self.last_aux_loss, self.last_load = aux, counts.detach()
        with torch.no_grad():  # DeepSpeed's gate keeps its logits to itself: recompute them (dim x E per token)
            logits = F.linear(x.reshape(-1, x.shape[-1]).float(), self.moe.deepspeed_moe.gate.wg.weight.float())
            self.last_entropy = routing_entropy(logits, "softmax")
        if self.shared is not None:
            out = out + self.shared(x)
        return out


def reference_capacity_gate(wg: nn.Linear, cfg, x: torch.Tensor, used_token=None, sparse_routes: bool = True,
                            use_tutel: bool = False):
    """The reference router with capacity (models/moe.py), in the sparse-route form DeepSpeed's MOELayer
    consumes: (aux loss, capacity, experts, expert ids [2, S] (-1 = dropped), slots [2, S], weights [2, S],
    kept assignments per expert). Weights are normalized over the top-2 *before* dropping and not after."""
    if not sparse_routes or use_tutel:
        raise ValueError("reference_capacity_gate serves DeepSpeed's sparse-route MOELayer only (no tutel)")
    e = cfg.num_experts
    probs = torch.softmax(F.linear(x.float(), wg.weight.float()), -1)
    _, ids = torch.topk(probs, cfg.top_k, dim=-1)
    weights = probs.gather(-1, ids)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
    capacity = expert_capacity(cfg, x.shape[0])
    slots = capacity_slots(ids, e)
    keep = slots < capacity
    aux = e * (probs.mean(0) * F.one_hot(ids[:, 0], e).float().mean(0)).sum()
    counts = torch.bincount(ids[keep], minlength=e).detach()
    routes = torch.where(keep, ids, -1).t().to(torch.int32)
    return aux, capacity, e, routes, (slots * keep).t().to(torch.int32), (weights * keep).t(), counts


def _check_supported(cfg) -> None:
    """The limits of support.MOE_LIMITS, for a layer built directly (the engine checks the whole job first)."""
    from .support import moe_gaps

    problems = [f"{field.rsplit('.', 1)[-1]}={reason}" for field, reason in moe_gaps(cfg)]
    if problems:
        raise ValueError("the deepspeed engine cannot run this MoE config: " + "; ".join(problems)
                         + ". Change the model overrides or use engine: megatron.")


_DS_EXPERT = re.compile(r"^(.*)\.mixer\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(w_gate|w_up|w_down)\.weight$")
_DS_GATE = re.compile(r"^(.*)\.mixer\.moe\.deepspeed_moe\.gate\.wg\.weight$")


def reference_name(ds_name: str, ep_rank: int, num_local: int) -> tuple[str, int | None]:
    """Map a DeepSpeed-model parameter name to (reference name, expert index or None).

    Expert weights map to the stacked reference tensor `...mixer.w_gate` with their global expert
    index; everything else keeps its name (the gate maps to `...mixer.router.weight`)."""
    m = _DS_EXPERT.match(ds_name)
    if m:
        return f"{m.group(1)}.mixer.{m.group(3)}", ep_rank * num_local + int(m.group(2))
    m = _DS_GATE.match(ds_name)
    if m:
        return f"{m.group(1)}.mixer.router.weight", None
    return ds_name, None


def swap_moe_layers(model: nn.Module, ep_size: int, ep_rank: int) -> int:
    """Replace every reference MoE mixer of `model` by a DeepSpeedMoE; returns how many."""
    swapped = 0
    for layer in getattr(model, "layers", []):
        if isinstance(layer.mixer, MoE):
            layer.mixer = DeepSpeedMoE(layer.mixer, ep_size, ep_rank)
            swapped += 1
    return swapped
