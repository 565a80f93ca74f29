"""Mixture-of-experts layer: router (top-k softmax or sigmoid), routed SwiGLU experts, shared experts.

Plain single-device PyTorch: the reference that DeepSpeed-MoE and Megatron's MoELayer must match.
Load balancing: the auxiliary loss is Switch/GShard's `E * sum_e P_e * f_e`, with P_e the mean router
probability of expert e and f_e the fraction of tokens whose *first* choice is e (the form DeepSpeed's
top-2 gate computes, so both engines optimize the same objective). Aux-loss-free balancing keeps a
per-expert bias that only affects which experts are selected, nudged toward uniform load each step.
Routing options (DeepSeek-V3): sigmoid scores with normalised top-k, node/device-limited groups
(`n_group` / `topk_group`), a routed scaling factor, shared experts; the router z-loss is reported per
forward for the training loop to weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.moe import expert_swiglu
from .config import ModelConfig
from .layers import SwiGLU


def route(logits: torch.Tensor, cfg: ModelConfig, expert_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routing rule, from router logits [tokens, experts] (fp32): (expert ids [tokens, k], combine
    weights [tokens, k], probs [tokens, experts]). Experts are chosen by score + bias (the aux-loss-free
    bias), within the `topk_group` best of `n_group` groups; the weights are the unbiased scores,
    renormalised over the k chosen when norm_topk, times routed_scaling_factor. probs: softmax, or for
    sigmoid routers the scores normalised to sum to 1 (what the aux loss and balance statistics see).
    Shared by every engine (DeepSpeed's gate calls it), so they route alike."""
    probs = torch.softmax(logits, -1) if cfg.router == "softmax" else torch.sigmoid(logits)
    select = probs + expert_bias
    if cfg.n_group > 1:
        select = _limit_to_groups(select, cfg)
    _, ids = torch.topk(select, cfg.top_k, dim=-1)
    weights = probs.gather(-1, ids)
    if cfg.norm_topk:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    if cfg.router == "sigmoid":
        probs = probs / probs.sum(-1, keepdim=True)
    return ids, weights, probs


def _limit_to_groups(select: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """`select` with the experts outside each token's `topk_group` best groups set to -inf; a group's
    rank is the sum of its top (top_k // topk_group) scores (DeepSeek-V3: top 2 of 8 groups, k = 8, 4 groups)."""
    tokens = select.shape[0]
    grouped = select.view(tokens, cfg.n_group, -1)
    group_scores = grouped.topk(cfg.top_k // cfg.topk_group, dim=-1).values.sum(-1)
    chosen = group_scores.topk(cfg.topk_group, dim=-1).indices
    allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
    return grouped.masked_fill(~allowed[..., None], float("-inf")).view(tokens, -1)


def load_balancing_loss(probs: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard's `E * sum_e P_e * f_e`, f_e counting first choices only (see the module docstring)."""
    first = F.one_hot(ids[:, 0], num_experts).float().mean(0)
    return num_experts * (probs.mean(0) * first).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: the token mean of logsumexp(logits)^2 (weighted by train.router_z_loss_coef)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def bias_step(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """The aux-loss-free balancing update: raise the bias of under-loaded experts, lower over-loaded ones."""
    load = load.float()
    return bias + rate * torch.sign(load.mean() - load)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.dim))
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, dim] -> router logits [tokens, experts] in fp32."""
        return F.linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [tokens, dim] -> (expert ids [tokens, k], weights [tokens, k], probs [tokens, experts])."""
        return route(self.logits(x), self.cfg, self.expert_bias)


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
        self.last_z_loss: torch.Tensor | None = None  # router z-loss of the last forward (unweighted)
        self.last_load: torch.Tensor | None = None  # assignments per expert in the last forward
        self.step_load: torch.Tensor | None = None  # summed over training forwards since the last update_bias
        self.last_dropped = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        logits = self.router.logits(x2)
        ids, weights, probs = route(logits, self.cfg, self.router.expert_bias)
        keep = torch.ones_like(ids, dtype=torch.bool)
        if self.cfg.capacity_factor > 0:
            keep = apply_capacity(ids, self.cfg.num_experts, expert_capacity(self.cfg, x2.shape[0]))
        self.last_dropped = int((~keep).sum())
        out = expert_swiglu(x2, ids, weights * keep, self.w_gate, self.w_up, self.w_down)
        if self.shared is not None:
            out = out + self.shared(x2)
        e = self.cfg.num_experts
        self.last_aux_loss = load_balancing_loss(probs, ids, e)
        self.last_z_loss = router_z_loss(logits)
        self.last_load = torch.bincount(ids[keep], minlength=e).detach()
        if self.training and self.cfg.bias_update_rate > 0:
            self.step_load = self.last_load if self.step_load is None else self.step_load + self.last_load
        return out.reshape(shape).to(x.dtype)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing step over the load of every training forward since the last call."""
        if self.cfg.bias_update_rate <= 0 or self.step_load is None:
            return
        self.router.expert_bias.copy_(bias_step(self.router.expert_bias, self.step_load, self.cfg.bias_update_rate))
        self.step_load = None
