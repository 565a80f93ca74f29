"""Expert parallelism for the deepspeed engine: the reference MoE layer re-expressed with DeepSpeed-MoE.

`DeepSpeedMoE` replaces a `raytron.models.MoE` module from outside the model. DeepSpeed's MOELayer
dispatches, exchanges (EP all-to-all) and runs the experts; its gate's forward is the reference's routing
(`DeepSpeedMoE._gate` over models/moe.py `route`): softmax or sigmoid scores, normalised top-k of any k,
the aux-loss-free expert bias, node/device-limited groups, the routed scaling factor, the z-loss and the
reference's capacity dropping (DeepSpeed's own gates are top-1/2/k softmax only, and renormalise the kept
weights after dropping, which the reference does not), so both train the same model. Its experts are
the local slice of the reference's stacked experts, and shared experts stay dense. Weight names map
both ways between the reference (`mixer.w_gate[e]`) and DeepSpeed (`...deepspeed_experts.{e_local}.w_gate.weight`).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...models import MoE
from ...models.layers import SwiGLU
from ...models.moe import (bias_step, capacity_slots, expert_capacity, load_balancing_loss, route, router_z_loss,
                          routing_entropy)


class _RouterState(nn.Module):
    """Holds the reference router's `expert_bias` buffer under the reference's name (`...mixer.router.
    expert_bias`), so checkpoints and `load_reference` move it without renaming."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("expert_bias", bias.detach().clone().float(), persistent=True)

    def keep_fp32(self) -> None:
        """bf16 training casts buffers with the model; sign steps of bias_update_rate need fp32."""
        if self.expert_bias.dtype != torch.float32:
            self.expert_bias.data = self.expert_bias.data.float()


class DeepSpeedMoE(nn.Module):
    """Drop-in for a reference MoE mixer; holds experts [ep_rank * local, (ep_rank+1) * local)."""

    def __init__(self, ref: MoE, ep_size: int, ep_rank: int):
        super().__init__()
        from deepspeed.moe.layer import MoE as DSMoE

        cfg = ref.cfg
        self.cfg, self.ep_size, self.ep_rank = cfg, ep_size, ep_rank
        self.num_local = cfg.num_experts // ep_size
        self.moe = DSMoE(
            hidden_size=cfg.dim, expert=SwiGLU(cfg.dim, cfg.moe_ffn_dim), num_experts=cfg.num_experts,
            ep_size=ep_size, k=cfg.top_k, capacity_factor=cfg.capacity_factor or 1.0,
            eval_capacity_factor=cfg.capacity_factor or 1.0, min_capacity=0, noisy_gate_policy=None,
            drop_tokens=cfg.capacity_factor > 0, use_rts=False, top2_2nd_expert_sampling=False)
        self.moe.deepspeed_moe.gate.forward = self._gate  # the reference's routing (module docstring)
        self.router = _RouterState(ref.router.expert_bias)
        self.shared = ref.shared
        self.last_aux_loss: torch.Tensor | None = None
        self.last_z_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None
        self.last_entropy: torch.Tensor | None = None  # [entropy sum, tokens] of the last forward
        self.step_load: torch.Tensor | None = None  # this rank's load over the step's training forwards
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
        self.router.keep_fp32()
        out, aux, counts = self.moe(x)
        self.last_aux_loss, self.last_load = aux, counts.detach()
        if self.training and self.cfg.bias_update_rate > 0 and torch._C._current_graph_task_id() == -1:
            # (a layer recomputed in backward, train.recompute full, routed these tokens already)
            self.step_load = counts.detach() if self.step_load is None else self.step_load + counts.detach()
        if self.shared is not None:
            out = out + self.shared(x)
        return out

    def _gate(self, x: torch.Tensor, used_token=None, sparse_routes: bool = True, use_tutel: bool = False):
        """The reference router (models/moe.py `route`, its capacity or dropless) in the sparse-route form
        DeepSpeed's MOELayer consumes: (aux loss, capacity, experts, expert ids [k, S] (-1 = dropped), slots
        [k, S], weights [k, S], kept assignments per expert). Dropless: the capacity is the largest expert
        load over the EP group, as DeepSpeed's own gates size it. Kept weights are not renormalised."""
        if not sparse_routes or use_tutel:
            raise ValueError("the reference gate serves DeepSpeed's sparse-route MOELayer only (no tutel)")
        cfg, e = self.cfg, self.cfg.num_experts
        gate = self.moe.deepspeed_moe.gate
        logits = F.linear(x.float(), gate.wg.weight.float())
        ids, weights, probs = route(logits, cfg, self.router.expert_bias)
        slots = capacity_slots(ids, e)
        if cfg.capacity_factor > 0:
            capacity = expert_capacity(cfg, x.shape[0])
        else:
            most = torch.bincount(ids.reshape(-1), minlength=e).max()
            if gate.ep_group is not None and dist.get_world_size(gate.ep_group) > 1:
                dist.all_reduce(most, op=dist.ReduceOp.MAX, group=gate.ep_group)
            capacity = max(int(most), 1)
        keep = slots < capacity
        self.last_z_loss = router_z_loss(logits)
        self.last_entropy = routing_entropy(logits, cfg.router)
        counts = torch.bincount(ids[keep], minlength=e).detach()
        routes = torch.where(keep, ids, -1).t().to(torch.int32)
        return (load_balancing_loss(probs, ids, e), capacity, e, routes, (slots * keep).t().to(torch.int32),
                (weights * keep).t(), counts)

    @torch.no_grad()
    def update_bias(self) -> None:
        """The reference's aux-loss-free update (models/moe.py `bias_step`) over the step's global load:
        every rank routes its own tokens over all experts, so the load is summed over the world. Collective."""
        if self.cfg.bias_update_rate <= 0:
            return
        load = self.step_load if self.step_load is not None else torch.zeros(self.cfg.num_experts)
        load = load.to(self.router.expert_bias.device, torch.float64)
        dist.all_reduce(load)
        self.router.expert_bias.copy_(bias_step(self.router.expert_bias, load, self.cfg.bias_update_rate))
        self.step_load = None


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
