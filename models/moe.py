"""Mixture-of-experts layer: router (top-k softmax or sigmoid), routed SwiGLU experts, shared experts.

Plain single-device PyTorch: the reference that DeepSpeed-MoE and Megatron's MoELayer must match.
Load balancing: the auxiliary loss is Switch/GShard's `E * sum_e P_e * f_e`, with P_e the mean router
probability of expert e and f_e the fraction of tokens whose *first* choice is e (the form DeepSpeed's
top-2 gate computes, so both engines optimize the same objective). Aux-loss-free balancing keeps a
per-expert bias that only affects which experts are selected, nudged toward uniform load each step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.moe import expert_swiglu
from .config import ModelConfig
from .layers import SwiGLU


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.k, self.norm_topk = cfg.router, cfg.top_k, cfg.norm_topk
        self.num_experts = cfg.num_experts
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.dim))
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [tokens, dim] -> (expert ids [tokens, k], weights [tokens, k], probs [tokens, experts])."""
        logits = F.linear(x.float(), self.weight.float())
        probs = torch.softmax(logits, -1) if self.kind == "softmax" else torch.sigmoid(logits)
        _, ids = torch.topk(probs + self.expert_bias, self.k, dim=-1)
        weights = probs.gather(-1, ids)
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
        if self.kind == "sigmoid":  # aux loss and balance statistics use normalized scores
            probs = probs / probs.sum(-1, keepdim=True)
        return ids, weights, probs


def routing_entropy(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """[sum over tokens of the routing distribution's entropy (nats), token count] as a float64 pair, from
    router logits [..., experts]. The distribution is the softmax of the logits, or for sigmoid routers
    the normalized scores (what the aux loss sees). Detached: a statistic, not part of the loss."""
    logits = logits.detach().float().reshape(-1, logits.shape[-1])
    if kind == "softmax":
        logp = torch.log_softmax(logits, -1)
    else:
        logsig = F.logsigmoid(logits)
        logp = logsig - torch.logsumexp(logsig, -1, keepdim=True)
    total = -(logp.exp() * logp).sum()
    return torch.stack([total.double(), torch.tensor(float(logits.shape[0]), dtype=torch.float64,
                                                     device=logits.device)])


def capacity_slots(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slot [tokens, k] of each assignment in its expert's buffer: first choices before second choices,
    earlier tokens before later ones (GShard's order)."""
    slots = torch.zeros_like(ids)
    used = torch.zeros(num_experts, dtype=torch.long, device=ids.device)
    for choice in range(ids.shape[1]):
        onehot = F.one_hot(ids[:, choice], num_experts)  # [tokens, experts]
        position = used + torch.cumsum(onehot, 0) - 1
        slots[:, choice] = (position * onehot).sum(-1)
        used = used + onehot.sum(0)
    return slots


def expert_capacity(cfg: ModelConfig, tokens: int) -> int:
    """Assignments each expert takes from a batch of `tokens` when cfg.capacity_factor > 0."""
    return math.ceil(cfg.capacity_factor * tokens * cfg.top_k / cfg.num_experts)


def apply_capacity(ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Keep-mask [tokens, k]: each expert takes the first `capacity` assignments in `capacity_slots` order."""
    return capacity_slots(ids, num_experts) < capacity


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        e, d, f = cfg.num_experts, cfg.dim, cfg.moe_ffn_dim
        self.router = Router(cfg)
        self.w_gate = nn.Parameter(torch.empty(e, f, d))  # [experts, ffn, dim]
        self.w_up = nn.Parameter(torch.empty(e, f, d))
        self.w_down = nn.Parameter(torch.empty(e, d, f))
        self.shared = SwiGLU(d, f * cfg.shared_experts) if cfg.shared_experts else None
        self.last_aux_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None  # assignments per expert in the last forward
        self.last_dropped = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        ids, weights, probs = self.router(x2)
        keep = torch.ones_like(ids, dtype=torch.bool)
        if self.cfg.capacity_factor > 0:
            keep = apply_capacity(ids, self.cfg.num_experts, expert_capacity(self.cfg, x2.shape[0]))
        self.last_dropped = int((~keep).sum())
        out = expert_swiglu(x2, ids, weights * keep, self.w_gate, self.w_up, self.w_down)
        if self.shared is not None:
            out = out + self.shared(x2)
        e = self.cfg.num_experts
        first = F.one_hot(ids[:, 0], e).float().mean(0)
        self.last_aux_loss = e * (probs.mean(0) * first).sum()
        self.last_load = torch.bincount(ids[keep], minlength=e).detach()
        return out.reshape(shape).to(x.dtype)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower over-loaded ones."""
        rate = self.cfg.bias_update_rate
        if rate <= 0 or self.last_load is None:
            return
        load = self.last_load.float()
        self.router.expert_bias += rate * torch.sign(load.mean() - load)
