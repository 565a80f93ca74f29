"""megatron-core modules for the hybrid family's sequence mixers, each a drop-in for a TransformerLayer's
`self_attention` slot ([s, b, h] in, (output, bias=None) out), computing the reference layer's math
(models/gated_deltanet.py, models/mamba2.py, ops/attention.py) on this tensor-parallel rank's heads.

Tensor parallelism, as megatron's attention does it: `in_proj` is a ColumnParallelLinear (under sequence
parallelism it all-gathers the sequence; its backward reduce-scatters the input gradient), the mixing
runs on the full sequence for this rank's heads, `out_proj` is a RowParallelLinear (reduce-scatter back to
sequence shards). What the heads share needs care (the weight mapping is parallelism/megatron/hybrid_mapping.py):
- per-head parameters (A_log, dt_bias, D, conv channels, Mamba2's norm weight) are cut by head and carry
  megatron's `tensor_model_parallel` attributes (so grad-norm and clipping count every shard once);
- GDN's o_norm weight (one [d] vector used by every head) is replicated: each rank's gradient covers its
  heads only, so it is marked `sequence_parallel` and megatron's finalize_model_grads sums it over TP;
- Mamba2's B and C (one group for all heads) are projected and convolved as N/tp channel shards, then
  all-gathered over TP; the backward reduce-scatters, summing what every rank's heads asked of them;
- Mamba2's gated RMSNorm spans all heads' channels: the sum of squares is all-reduced over TP, forward
  and backward (every rank uses the total differently, so the gradients are summed too).
Sliding-window (`W`) and block-sparse (`B`) attention are megatron's SelfAttention with
`MaskedCoreAttention` (ops.attention: FlexAttention on GPU, a dense SDPA mask on CPU).

Packed documents (data.reset_at_documents): megatron's `attention_mask` argument carries the engine's
document ids of the whole sequence [b, S] down to every mixer, which masks attention and resets linear
states and convolutions at document starts. Context parallelism: parallelism/megatron/cp.py (linear
mixers pass halos and states between CP ranks; attention spreads its heads over the CP ranks by an
all-to-all, cp.core_attention).
"""

from __future__ import annotations

import functools

import torch
import torch.utils.checkpoint
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import all_gather_last_dim_from_tensor_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from ...models.gated_deltanet import GatedDeltaNet, gated_deltanet_mix
from ...models.layers import RMSNorm as ReferenceRMSNorm
from ...models.mamba2 import Mamba2, ssd_mix
from ...ops.attention import BlockSparse
from ...ops.chunking import Carry
from ...ops.short_conv import conv_silu
from .cp import CPSide, core_attention, exchange_halos, recv_state, send_state


class _SumOverTP(torch.autograd.Function):
    """All-reduce (sum) over the TP group in forward and in backward: for a statistic that each rank
    computes over its own heads and that every rank then uses in its own, different computation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _tp_group(pg_collection):
    if pg_collection is not None and hasattr(pg_collection, "tp"):
        return pg_collection.tp
    return parallel_state.get_tensor_model_parallel_group()


def _head_param(config, *shape: int) -> torch.nn.Parameter:
    """A parameter cut by head over TP (megatron's attributes: partition dim 0, stride 1)."""
    device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
    param = torch.nn.Parameter(torch.empty(*shape, device=device, dtype=config.params_dtype))
    set_tensor_model_parallel_attributes(param, True, 0, 1)
    return param


def _refuse_extras(packed_seq_params, inference_context) -> None:
    if packed_seq_params is not None or inference_context is not None:
        raise NotImplementedError("hybrid mixers: packed sequences and inference contexts are not supported")


def _cp_group(pg_collection):
    if pg_collection is not None and hasattr(pg_collection, "cp"):
        return pg_collection.cp
    return parallel_state.get_context_parallel_group()


class _LinearMixer(MegatronModule):
    """What the GDN and Mamba2 twins share: TP and CP groups, head counts, the in/out projections, and the
    forward around each one's `_mix`: on the whole local sequence, or under context parallelism per half
    with halos and states passed between CP ranks (parallelism/megatron/cp.py)."""

    def __init__(self, config, model_cfg, in_features: int, pg_collection=None):
        super().__init__(config=config)
        self.tp_group, self.cp_group = _tp_group(pg_collection), _cp_group(pg_collection)
        tp = self.tp_group.size()
        if tp > 1 and not config.sequence_parallel:
            raise NotImplementedError("hybrid mixers under tensor parallelism need sequence_parallel")
        if model_cfg.linear_heads % tp:
            raise ValueError(f"linear_heads {model_cfg.linear_heads} do not split over tp {tp}")
        self.heads = model_cfg.linear_heads // tp  # this rank's heads
        self.head_dim, self.chunk, self.conv_size = model_cfg.linear_head_dim, model_cfg.chunk_size, model_cfg.conv_size
        self.inner = self.heads * self.head_dim  # this rank's value channels
        self.in_proj = ColumnParallelLinear(
            model_cfg.dim, in_features, config=config, init_method=config.init_method, bias=False,
            gather_output=False, skip_bias_add=True, tp_group=self.tp_group)
        self.out_proj = RowParallelLinear(
            model_cfg.linear_heads * model_cfg.linear_head_dim, model_cfg.dim, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, tp_group=self.tp_group)

    def forward(self, hidden_states, attention_mask=None, *, packed_seq_params=None, inference_context=None,
                **_unused):
        """attention_mask: the engine's document ids of the whole sequence [b, S] (every CP rank's part;
        parallelism/megatron/engine.py), or None."""
        _refuse_extras(packed_seq_params, inference_context)
        proj = self._project_in(hidden_states)
        if self.cp_group.size() == 1:
            return self._project_out(self._mix(proj, attention_mask))
        return self._project_out(self._context_parallel(proj, attention_mask))

    def _context_parallel(self, proj: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
        """The two halves of this CP rank's sequence (chunks r and 2cp-1-r), each started from the halo and
        state of the chunk before it, in the chain order of parallelism/megatron/cp.py."""
        side = CPSide(self.cp_group, doc_ids, self.conv_size)
        r, cp, group = side.rank, side.cp, side.group
        halves = proj.chunk(2, dim=1)
        ids, halo_ids = side.local_doc_ids(), side.halo_doc_ids()
        halos = exchange_halos(*(self._conv_input(h)[:, -side.halo:] for h in halves), side)
        shape = self._state_shape(proj.shape[0])
        init = None if r == 0 else recv_state(halves[0], shape, proj.dtype, side.global_rank(r - 1), group)
        out_a, final_a = self._half(halves[0], ids[0], Carry(halos[0], halo_ids[0], init), side.keeps_state(0))
        if r < cp - 1:
            out_a = send_state(out_a, final_a, side.global_rank(r + 1), group)
            init = recv_state(out_a, shape, proj.dtype, side.global_rank(r + 1), group)
        else:
            init = final_a
        out_b, final_b = self._half(halves[1], ids[1], Carry(halos[1], halo_ids[1], init), side.keeps_state(1))
        if r > 0:
            out_b = send_state(out_b, final_b, side.global_rank(r - 1), group)
        return torch.cat([out_a, out_b], dim=1)

    def _half(self, proj, doc_ids, carry: Carry, keep: torch.Tensor | None):
        """_mix of one half; its entering state is dropped where a document starts at its first token."""
        if carry.state is not None and keep is not None:
            carry.state = carry.state * keep.to(carry.state.dtype).view(-1, 1, 1, 1)
        return self._mix(proj, doc_ids, carry)

    def backward_dw(self) -> None:
        """megatron's EP-overlap schedule (train.overlap_moe_comm, fine_grained_callables._BackwardDWWrapper)
        takes this from every `self_attention` and calls it only under delay_wgrad_compute, which raytron
        leaves off: the weight gradients are computed in the backward itself, nothing is deferred."""

    def _core(self, fn, *args):
        """The chunked scan `fn(*args)`; under selective recompute (megatron's core_attn switch, which
        covers attention cores only) checkpointed like them: its chunk matrices and states are rebuilt
        in backward from the projections. Deterministic, so no RNG state to replay."""
        selective = self.config.recompute_granularity == "selective" and "core_attn" in self.config.recompute_modules
        if selective and self.training:
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _project_in(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[s/tp, b, dim] (sequence-parallel shard; [s, b, dim] without TP) -> [b, s, this rank's outputs]."""
        proj, _ = self.in_proj(hidden_states)
        return proj.transpose(0, 1)

    def _project_out(self, mixed: torch.Tensor) -> tuple[torch.Tensor, None]:
        """[b, s, this rank's channels] -> ([s/tp, b, dim], no bias)."""
        out, _ = self.out_proj(mixed.transpose(0, 1).contiguous())
        return out, None


class GatedDeltaNetMixer(_LinearMixer):
    """models.gated_deltanet.GatedDeltaNet on this TP rank's heads (module docstring)."""

    def __init__(self, config, model_cfg, layer_number: int | None = None, pg_collection=None, **_unused):
        inner, heads = model_cfg.linear_heads * model_cfg.linear_head_dim, model_cfg.linear_heads
        super().__init__(config, model_cfg, 4 * inner + 2 * heads, pg_collection)  # [q, k, v, g, a, b]
        self.conv_weight = _head_param(config, 3 * self.inner, model_cfg.conv_size)  # [q, k, v] channels
        self.A_log = _head_param(config, self.heads)
        self.dt_bias = _head_param(config, self.heads)
        self.o_norm = ReferenceRMSNorm(self.head_dim, model_cfg.norm_eps).to(self.conv_weight.device,
                                                                             config.params_dtype)
        self.o_norm.weight.sequence_parallel = config.sequence_parallel  # TP grad sum (module docstring)
        if config.perform_initialization:
            GatedDeltaNet.reset_special_parameters(self)  # the reference's init of A_log, dt_bias, conv

    def _mix(self, proj, doc_ids=None, carry: Carry | None = None):
        """[b, s, in_proj outputs] -> [b, s, this rank's channels] (and the final state with a carry)."""
        inner, heads = self.inner, self.heads
        qkv, gate, a, b = proj.split([3 * inner, inner, heads, heads], dim=-1)
        return self._core(gated_deltanet_mix, qkv, a, b, gate, self.conv_weight, self.A_log, self.dt_bias,
                          self.o_norm, self.head_dim, self.chunk, doc_ids, carry)

    def _conv_input(self, proj: torch.Tensor) -> torch.Tensor:
        return proj[..., :3 * self.inner]

    def _state_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.heads, self.head_dim, self.head_dim)


class Mamba2Mixer(_LinearMixer):
    """models.mamba2.Mamba2 on this TP rank's heads, B/C gathered over TP (module docstring)."""

    def __init__(self, config, model_cfg, layer_number: int | None = None, pg_collection=None, **_unused):
        inner, heads = model_cfg.linear_heads * model_cfg.linear_head_dim, model_cfg.linear_heads
        n = model_cfg.ssm_state_dim
        super().__init__(config, model_cfg, 2 * inner + 2 * n + heads, pg_collection)  # [z, x, B, C, dt]
        tp = self.tp_group.size()
        if n % tp:
            raise ValueError(f"ssm_state_dim {n} does not split over tp {tp}")
        self.state_dim, self.state_shard, self.full_inner = n, n // tp, inner
        self.eps = model_cfg.norm_eps
        self.conv_weight = _head_param(config, self.inner + 2 * self.state_shard, model_cfg.conv_size)  # [x, B, C]
        self.A_log = _head_param(config, self.heads)
        self.dt_bias = _head_param(config, self.heads)
        self.D = _head_param(config, self.heads)
        self.norm_weight = _head_param(config, self.inner)
        if config.perform_initialization:
            Mamba2.reset_special_parameters(self)  # the reference's init of A_log, dt_bias, D, conv
            torch.nn.init.ones_(self.norm_weight)

    def _mix(self, proj, doc_ids=None, carry: Carry | None = None):
        """[b, s, in_proj outputs] -> [b, s, this rank's channels] (and the final state with a carry)."""
        inner, n_r = self.inner, self.state_shard
        z, xbc, dt = proj.split([inner, inner + 2 * n_r, self.heads], dim=-1)
        bsz, seq = z.shape[:2]
        halo = {} if carry is None else {"halo": carry.conv_halo, "halo_doc_ids": carry.halo_doc_ids}
        xbc = conv_silu(xbc, self.conv_weight.to(xbc.dtype), doc_ids, **halo)
        xs, bc = xbc.split([inner, 2 * n_r], dim=-1)
        # [B_r, C_r] of every rank -> [b, s, tp, 2, N/tp] -> full B, C [b, s, N]
        bc = all_gather_last_dim_from_tensor_parallel_region(bc.contiguous(), self.tp_group)
        bc = bc.view(bsz, seq, -1, 2, n_r)
        b_in, c_in = bc[..., 0, :].reshape(bsz, seq, -1), bc[..., 1, :].reshape(bsz, seq, -1)
        y = self._core(ssd_mix, xs.reshape(bsz, seq, self.heads, self.head_dim), b_in, c_in, dt, self.A_log,
                       self.dt_bias, self.D, self.chunk, doc_ids, None if carry is None else carry.state,
                       carry is not None)
        y, final = y if carry is not None else (y, None)
        y = self._gated_norm(y.reshape(bsz, seq, inner) * F.silu(z))
        return y if carry is None else (y, final)

    def _conv_input(self, proj: torch.Tensor) -> torch.Tensor:
        return proj[..., self.inner:2 * self.inner + 2 * self.state_shard]

    def _state_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.heads, self.state_dim, self.head_dim)


    def _gated_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The reference's RMSNorm over all heads' channels (fp32 statistics), from this rank's share."""
        xf = x.float()
        sum_sq = xf.pow(2).sum(-1, keepdim=True)
        if self.tp_group.size() > 1:
            sum_sq = _SumOverTP.apply(sum_sq, self.tp_group)
        out = xf * torch.rsqrt(sum_sq / self.full_inner + self.eps)
        return (out * self.norm_weight.float()).to(x.dtype)


class MaskedCoreAttention(MegatronModule):
    """Core attention with the reference's sliding-window or block-sparse mask (ops.attention.attention:
    FlexAttention on GPU, SDPA with a dense mask on CPU): q [sq, b, np, hn], k/v [sk, b, ng, hn] ->
    [sq, b, np*hn]. Built through `functools.partial(MaskedCoreAttention, window=... | sparse=...)`."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str, *, window: int = 0,
                 sparse: BlockSparse | None = None, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal or softmax_scale is not None:
            raise NotImplementedError("MaskedCoreAttention: causal masks with the default 1/sqrt(d) scale only")
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) != 0:
            raise NotImplementedError("MaskedCoreAttention runs without attention dropout")
        self.window, self.sparse, self.cp_group = window, sparse, _cp_group(pg_collection)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """attention_mask: the engine's document ids of the whole sequence [b, S], or None."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("MaskedCoreAttention: packed sequences and attention bias are not supported")
        return core_attention(query, key, value, self.cp_group, doc_ids=attention_mask, window=self.window,
                              sparse=self.sparse)


def self_attention_spec(kind: str, cfg) -> dict:
    """megatron_spec.layer_spec keywords for a layer whose sequence mixer is `kind` (see models/config.py)."""
    if kind == "*":
        if cfg.attention == "mla":
            from .mla import mla_attention_spec

            return {"self_attention": mla_attention_spec()}
        return {}
    if kind == "W":
        return {"core_attention": functools.partial(MaskedCoreAttention, window=cfg.window)}
    if kind == "B":
        sparse = BlockSparse(cfg.sparse_block, cfg.sparse_local_blocks, cfg.sparse_global_blocks)
        return {"core_attention": functools.partial(MaskedCoreAttention, sparse=sparse)}
    mixers = {"G": GatedDeltaNetMixer, "M": Mamba2Mixer}
    if kind not in mixers:
        raise ValueError(f"no megatron module for layer kind {kind!r}")
    return {"self_attention": ModuleSpec(module=mixers[kind], params={"model_cfg": cfg})}

