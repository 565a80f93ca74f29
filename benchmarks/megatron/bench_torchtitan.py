"""Training throughput of TorchTitan 0.3.0's Llama 3 at our dense-1b shape and its Qwen3-MoE at our moe-olmoe-4l
shape, as bench_throughput.py records (run under torchrun, beside bench_throughput.py:
scripts/gpu_megatron_all.sh runs both in one device call).

TorchTitan's Trainer cannot run on the GPU image (it imports torchdata, datasets, tokenizers, wandb and
torch_checkpointing; no network there). Its model and parallelize path needs only spmd_types and tyro (in the
wheelhouse), so this script drives that path the way torchtitan/trainer.py does, without the Trainer:
- model: `Llama3Model.Config` assembled as the llama3 flavors are (torchtitan/models/llama3/__init__.py,
  `_build_llama3_layers`: fused wqkv, FlexAttention with block-causal masks built from per-token positions,
  ComplexRoPE, depth-scaled init) at the shape of our model (`llama3_shape`: the SwiGLU width comes out of
  TorchTitan's own multiple_of rule; the built model's parameter count must equal ours), fp32 weights;
  MoE: `Qwen3Model.Config` assembled as its Qwen3-MoE flavors are (`qwen3_moe_model_config`; what differs from
  ours: titan_shapes.QWEN3_MOE_DIFFERENCES, recorded; parameter count ours + its q/k norms);
- parallelism: `parallelize_llama` / `parallelize_qwen3` over ParallelDims(dp_shard = world, ep as raytron's
  layout at that world): expert parallelism over the FSDP ranks with its standard all-to-all dispatcher and
  its expert-bias update before each optimizer step, per-block torch.compile, FSDP2 over all
  ranks with MixedPrecisionPolicy(param bf16, reduce fp32) on fp32 masters (on one GPU a 1-rank mesh that still
  installs the policy), no activation checkpointing, spmd_backend SPMD_BACKEND (below);
- step: Trainer.train_step without pipelining: per micro-batch, masks from positions (built once: all
  micro-batches have the same, see train_and_time), forward, the llama3
  recipes' ChunkedLossWrapper(CrossEntropyLoss) (compiled; plain CrossEntropyLoss on older torch, pick_loss)
  over the step's global token count, backward, all captured in a CUDA graph as its Trainer does by default
  (`--cuda-graphs off`: eager; also when ep > 1, where its Trainer refuses graphs with that dispatcher, and
  per workload when a graph run fails, noted in the record); then clip_grad_norm_
  (foreach) and `default_adamw` (fused AdamW, betas 0.9 / 0.95, eps 1e-8) with bench_throughput.make_spec's lr,
  weight decay and clip, lr held constant as bench_throughput does; Python GC as its GarbageCollection(50).

Same batch as bench_throughput.py (SEQS_PER_RANK random sequences of 4096 tokens per rank per optimizer step,
gradient accumulation over micro-batches), same timing (median of the timed steps after warm-up,
synchronized), tokens/s/GPU, MFU = tokens/s/GPU x models.flops_per_token(cfg, 4096, "megatron") / 989e12 and
record format (impl "torchtitan"; the record adds `titan`: version, backend, loss, CUDA graphs, shims, shape).
TorchTitan 0.3.0 follows a newer torch than the image's 2.11; import_torchtitan bridges what that needs.

    torchrun --nproc_per_node=4 benchmarks/megatron/bench_torchtitan.py --out bench.jsonl

CPU smoke run of the same code (torchtitan's wheels and triton importable; gloo; FlexAttention's kernel, which
has no CPU backward, replaced by causal SDPA; FSDP reducing by SUM, gloo has no PREMUL_SUM):
`torchrun --nproc_per_node=2 benchmarks/megatron/bench_torchtitan.py --out smoke.jsonl --workloads
dense-debug,moe-debug --seq 256 --warmup 1 --timed 2` (moe-debug under EP2: 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.metadata
import inspect
import os
import statistics
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_throughput, also under `python -P`
import bench_throughput as bt  # noqa: E402
from titan_shapes import (QWEN3_MOE_DIFFERENCES, ffn_hidden_dim, llama3_param_count, llama3_shape,  # noqa: E402,F401
                          qwen3_moe_param_count, qwen3_moe_shape)

from raytron import models  # noqa: E402

TITAN_VERSION = "0.3.0"
# workload -> (family, flavor, overrides, TorchTitan model); the debug ones for CPU smoke runs
WORKLOADS = {"dense-1b": ("dense", "1b", {}, "llama3"), "moe-olmoe-4l": ("moe", "olmoe", bt.MOE_OVERRIDES, "qwen3_moe"),
             # at 2-4 GPUs without expert parallelism (FSDP shards the experts), beside raytron's EP-1 variant
             "moe-olmoe-4l-ep1": ("moe", "olmoe", bt.MOE_OVERRIDES, "qwen3_moe"),
             "dense-debug": ("dense", "debug", {}, "llama3"), "moe-debug": ("moe", "debug", {}, "qwen3_moe")}
DEBUG_MICRO_BATCH = 2  # the real workloads take raytron's micro-batch (bench_throughput.micro_batch)
STEPS = (2, 5)  # (warm-up, timed) optimizer steps, as raytron's; warm-up covers compilation and graph capture
# TorchTitan 0.3.0 defaults to "spmd_types", whose FSDP call passes torch.distributed.fsdp.DataParallelMeshDims
# to fully_shard, which the image's torch 2.11 has not (2.13 has). "partial_dtensor" (DTensor on model-parallel
# axes only) is its FSDP2 path without it: fully_shard per block over the 1-D "fsdp" mesh.
SPMD_BACKEND = "partial_dtensor"
ATTN_BACKEND = "flex"  # llama3's default; "flex_flash" needs flash-attention's CuTe kernels, "sdpa" is refused
CHUNKED_LOSS_TORCH = (2, 13)  # pick_loss: fails on 2.11, runs on 2.13 (2.12 not tried)


# ---- TorchTitan (GPU machine; a CPU smoke run over gloo with the dense-debug workload) -----------------------
def import_torchtitan(device: torch.device) -> list[str]:
    """Make TorchTitan's model path run under this torch (and on CPU for smoke runs); returns the shims applied
    (recorded)."""
    import torch.distributed.fsdp as fsdp

    shims = []
    if not hasattr(fsdp, "DataParallelMeshDims"):
        # torchtitan/distributed/fsdp.py imports it; only the spmd_types / full_dtensor backends pass one on
        fsdp.DataParallelMeshDims = type("DataParallelMeshDims", (), {})
        shims.append(f"torch.distributed.fsdp.DataParallelMeshDims: import placeholder (torch {torch.__version__})")
    version = importlib.metadata.version("torchtitan")
    if version != TITAN_VERSION:
        raise RuntimeError(f"torchtitan {version} installed; this harness follows {TITAN_VERSION}'s trainer")
    from torch.nn.attention.flex_attention import create_block_mask
    from torchtitan.models.common import attention

    if "separate_full_blocks" not in inspect.signature(create_block_mask).parameters:
        # its masks pass separate_full_blocks=True, which is what a torch without the argument always does
        compiled = attention._compiled_create_block_mask

        def compiled_create_block_mask(*args, separate_full_blocks: bool = True, **kwargs):
            if not separate_full_blocks:
                raise RuntimeError(f"TorchTitan asked for separate_full_blocks=False (its batch-invariant mode), which "
                                   f"torch {torch.__version__}'s create_block_mask cannot do: leave that mode off or "
                                   "use a torch whose create_block_mask takes the argument")
            return compiled(*args, **kwargs)

        attention._compiled_create_block_mask = compiled_create_block_mask
        shims.append(f"create_block_mask: separate_full_blocks=True dropped (torch {torch.__version__} always "
                     "separates full blocks)")
    if device.type == "cpu":
        shims += _cpu_smoke_shims()
    return shims


def _cpu_smoke_shims() -> list[str]:
    """CPU smoke runs only: meshes on the CPU, causal SDPA for FlexAttention's kernel (no CPU backward)."""
    import torch.nn.functional as F
    from torchtitan.distributed import parallel_dims
    from torchtitan.models.common.attention import FlexAttention

    parallel_dims.device_type = "cpu"  # its meshes default to "cuda" where no accelerator is found

    def causal_sdpa(q, k, v, *, score_mod, block_mask, scale, enable_gqa, return_aux, kernel_options):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa), None

    FlexAttention.compiled_flex_attn = staticmethod(causal_sdpa)  # one document a row: the same causal mask
    return ["CPU smoke run: meshes on cpu, FlexAttention kernel -> causal SDPA, FSDP reduces by SUM (gloo)"]


def llama3_model_config(shape: dict, seq: int, ep: int):
    """TorchTitan's Llama3Model.Config for `shape`, assembled as its llama3 flavors are, plus the sharding
    declarations Llama3Model.Config.update_from_config would add (that method also imports the Trainer)."""
    from torchtitan.config import ParallelismConfig
    from torchtitan.models import llama3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim
    from torchtitan.models.llama3.sharding import set_llama3_sharding_config

    dim, vocab, heads, tied = shape["dim"], shape["vocab_size"], shape["n_heads"], shape["enable_weight_tying"]
    hidden = compute_ffn_hidden_dim(dim, multiple_of=shape["multiple_of"],
                                    ffn_dim_multiplier=shape["ffn_dim_multiplier"])
    layers = llama3._build_llama3_layers(
        n_layers=shape["n_layers"], dim=dim, n_heads=heads, n_kv_heads=shape["n_kv_heads"], hidden_dim=hidden,
        fuse_qkv=True, attn_backend=ATTN_BACKEND,
        rope=ComplexRoPE.Config(dim=dim // heads, max_seq_len=seq, theta=shape["rope_theta"], scaling="none"))
    cfg = llama3.Llama3Model.Config(
        dim=dim, vocab_size=vocab, enable_weight_tying=tied, layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim,
                                        param_init=llama3._EMBEDDING_SKIP_INIT if tied else llama3._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=llama3._NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=llama3._output_linear_init(dim)))
    set_llama3_sharding_config(cfg, enable_sp=ParallelismConfig().enable_sequence_parallel)
    return cfg


def qwen3_moe_model_config(shape: dict, seq: int, ep: int):
    """TorchTitan's Qwen3Model.Config for a MoE `shape`, assembled as its Qwen3-MoE flavors are (fused wqkv,
    q/k norms, FlexAttention, CosSinRoPE, softmax top-k router renormalized, grouped experts, the standard
    all-to-all token dispatcher, load_balance_coeff 1e-3) plus the sharding declarations its update_from_config
    would add (expert-parallel ones when ep > 1)."""
    from torchtitan.config import ParallelismConfig
    from torchtitan.models import qwen3
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.qwen3.sharding import set_qwen3_sharding_config

    dim, vocab, head = shape["dim"], shape["vocab_size"], shape["head_dim"]
    layers = qwen3._build_qwen3_moe_layers(
        n_layers=shape["n_layers"], dim=dim, n_heads=shape["n_heads"], n_kv_heads=shape["n_kv_heads"], head_dim=head,
        moe_hidden_dim=shape["moe_hidden_dim"], num_experts=shape["num_experts"], top_k=shape["top_k"], fuse_qkv=True,
        attn_backend=ATTN_BACKEND, moe_comm_backend="standard",
        rope=CosSinRoPE.Config(dim=head, max_seq_len=seq, theta=shape["rope_theta"]))
    cfg = qwen3.Qwen3Model.Config(
        vocab_size=vocab, dim=dim, norm=qwen3._qwen3_norm(dim), layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=qwen3._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=qwen3._LINEAR_INIT))
    set_qwen3_sharding_config(cfg, enable_sp=ParallelismConfig().enable_sequence_parallel, enable_ep=ep > 1)
    return cfg


# TorchTitan model -> (our config -> its shape, parameter count of the shape, its model config, its parallelize)
MODELS = {"llama3": (llama3_shape, llama3_param_count, llama3_model_config, "torchtitan.models.llama3:parallelize_llama"),
          "qwen3_moe": (qwen3_moe_shape, qwen3_moe_param_count, qwen3_moe_model_config,
                        "torchtitan.models.qwen3:parallelize_qwen3")}


@dataclasses.dataclass(frozen=True)
class Setup:
    """One TorchTitan configuration: the model shape and how it trains (batch from bench_throughput's rules)."""

    model: str  # a key of MODELS
    shape: dict  # MODELS[model][0] of our config
    train: SimpleNamespace  # bench_throughput.make_spec(...).train: seed, lr, weight_decay, grad_clip, global_batch
    world: int
    ep: int  # expert-parallel degree (MoE; borrowed from the FSDP ranks, as its ParallelDims does)
    micro_batch: int
    grad_accum: int
    seq: int
    device: torch.device
    cuda_graphs: bool  # forward-backward captured in a CUDA graph (its Trainer's default)
    loss: str  # "chunked": ChunkedLossWrapper(CrossEntropyLoss), the llama3 recipes'; "ce": CrossEntropyLoss alone


def pick_loss(requested: str) -> tuple[str, str | None]:
    """(loss, why it differs from the llama3 recipes' chunked loss or None). The chunked loss runs lm_head alone
    out of FSDP's [norm, lm_head] group; FSDP2 before torch 2.13 (seen with 2.11) then frees the group's weights
    before the norm's backward ("data is not allocated yet"), 2.13 handles such partial-group backward."""
    if requested != "auto":
        return requested, None if requested == "chunked" else "requested"
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= CHUNKED_LOSS_TORCH:
        return "chunked", None
    return "ce", f"torch {torch.__version__} < 2.13: FSDP2 without partial-group backward breaks ChunkedLossWrapper"


def build_model(setup: Setup, dims, training, parallelism, compile_config):
    """TorchTitan's model of `setup` on the meta device, its parameter count checked against ours, parallelized
    by its own function (per-block compile, FSDP2, expert parallelism when ep > 1), then materialized and
    initialized with its init_weights."""
    _, param_count, model_config, parallelize = MODELS[setup.model]
    module, fn = parallelize.split(":")
    with torch.device("meta"):
        model = model_config(setup.shape, setup.seq, setup.ep).build()
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != param_count(setup.shape):
        raise RuntimeError(f"TorchTitan model has {n_params} parameters, our shape {param_count(setup.shape)}")
    model = getattr(importlib.import_module(module), fn)(
        model, parallel_dims=dims, training=training, parallelism=parallelism, compile_config=compile_config,
        ac_config=None, dump_folder=tempfile.gettempdir())
    if setup.device.type == "cpu":  # gloo has no PREMUL_SUM: FSDP sums and divides itself
        for part in model.modules():
            if hasattr(part, "set_force_sum_reduction_for_comms"):
                part.set_force_sum_reduction_for_comms(True)
    model.to_empty(device=setup.device)
    torch.manual_seed(setup.train.seed)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    return model, n_params


def build(setup: Setup) -> SimpleNamespace:
    """Model, loss, optimizer and forward-backward function, set up as Trainer.__init__ sets them up."""
    import spmd_types as spmd
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.optimizer import default_adamw, register_moe_load_balancing_hook
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.distributed.cudagraph import wrap_with_cuda_graph
    from torchtitan.tools.utils import GarbageCollection

    shape, train = setup.shape, setup.train
    training = TrainingConfig(local_batch_size=setup.micro_batch, global_batch_size=train.global_batch_size,
                              seq_len=setup.seq, max_norm=train.grad_clip, mixed_precision_param="bfloat16",
                              mixed_precision_reduce="float32", disable_cuda_graphs=not setup.cuda_graphs)
    # data_parallel_shard_degree -1: all ranks; expert parallelism borrows its ranks from them
    parallelism = ParallelismConfig(spmd_backend=SPMD_BACKEND, expert_parallel_degree=setup.ep)
    compile_config = CompileConfig(enable=True)  # components: "model" (each block) and "loss"
    dist_utils.set_spmd_backend(SPMD_BACKEND)
    dims = ParallelDims.from_config(parallelism, setup.world)
    model, n_params = build_model(setup, dims, training, parallelism, compile_config)
    loss_cfg = CrossEntropyLoss.Config(global_vocab_size=shape["vocab_size"])
    if setup.loss == "chunked":
        loss_cfg = ChunkedLossWrapper.Config(loss_fn=loss_cfg)
    loss_fn = loss_cfg.build(compile_config=compile_config)
    if isinstance(loss_fn, ChunkedLossWrapper):  # as Trainer.__init__: lm_head runs per chunk inside the loss
        loss_fn.set_lm_head(model.lm_head)
        model._skip_lm_head = True
    optimizers = default_adamw(lr=train.lr, weight_decay=train.weight_decay).build(model_parts=[model])
    if setup.model == "qwen3_moe":  # its ModelSpec's post_optimizer_build_fn: the expert-bias update
        register_moe_load_balancing_hook(optimizers, [model], dims)
    train_context = dist_utils.get_spmd_context(parallel_dims=dims, spmd_typechecking=False)

    def forward_backward(inputs, labels, global_valid_tokens, extra_kwargs):  # Trainer._forward_backward_body
        with train_context():
            pred = model(inputs, **extra_kwargs)
            loss, _ = loss_fn(pred, labels, global_valid_tokens, positions=extra_kwargs["positions"])
            del pred
            with spmd.no_typecheck():
                loss.backward()
        return loss

    fwd_bwd = wrap_with_cuda_graph(forward_backward) if setup.cuda_graphs else forward_backward
    return SimpleNamespace(model=model, optimizers=optimizers, dims=dims, fwd_bwd=fwd_bwd, training=training,
                           dist_utils=dist_utils, gc=GarbageCollection(gc_freq=training.gc_freq), n_params=n_params)


def train_step(run: SimpleNamespace, micro: list, device: torch.device) -> float:
    """Trainer.train_step without pipelining: one optimizer step over `micro` ([(input_dict, labels)] on the
    host); returns the global mean token loss."""
    dims, dist_utils = run.dims, run.dist_utils
    run.optimizers.zero_grad(set_to_none=run.training.disable_cuda_graphs)
    local_tokens = torch.tensor(sum(labels.numel() for _, labels in micro), dtype=torch.int64)  # none ignored
    global_tokens = local_tokens.to(device)
    if dims.dp_enabled:
        global_tokens = dist_utils.dist_sum_tensor(global_tokens, dims.get_mesh("batch"))
    total = None
    for input_dict, labels in micro:
        inputs, positions = input_dict["input"].to(device), input_dict["positions"].to(device)
        extra = {"positions": positions, "attention_masks": run.masks}
        loss = run.fwd_bwd(inputs, labels.to(device), global_tokens, extra).detach()
        total = loss.clone() if total is None else total.add_(loss)  # a graph's output is overwritten on replay
    dist_utils.clip_grad_norm_(list(run.model.parameters()), run.training.max_norm, foreach=True,
                               ep_enabled=dims.ep_enabled)  # expert and dense parameters on their own meshes
    run.optimizers.step()
    if dims.dp_cp_enabled:
        return dist_utils.dist_sum(total, dims.get_optional_mesh("loss"))
    return float(total)


def synthetic_batch(vocab: int, setup: Setup, rank: int) -> list:
    """grad_accum micro-batches of random tokens as TorchTitan's text loader yields them: one document a row."""
    g = torch.Generator().manual_seed(rank)
    positions = torch.arange(setup.seq).repeat(setup.micro_batch, 1)
    micro = []
    for _ in range(setup.grad_accum):
        tokens = torch.randint(0, vocab, (setup.micro_batch, setup.seq + 1), generator=g)
        micro.append(({"input": tokens[:, :-1].contiguous(), "positions": positions}, tokens[:, 1:].contiguous()))
    return micro


def train_and_time(setup: Setup, rank: int, steps: tuple[int, int]) -> dict:
    """Build, train warm-up + timed optimizer steps on random tokens; the timing fields of a record."""
    from torchtitan.distributed.cudagraph import cudagraph_teardown

    cuda = setup.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run = build(setup)
    micro = synthetic_batch(setup.shape["vocab_size"], setup, rank)
    # Its trainer builds the masks per micro-batch. Here every micro-batch has the same positions, hence the same
    # mask, built once: torch 2.11's BlockMask compares mask functions by identity, and a CUDA graph replays only
    # for inputs of the structure it was captured with (a fresh mask each time would fail that check).
    run.masks = run.model.get_attention_masks(positions=micro[0][0]["positions"].to(setup.device))
    times, losses = [], []
    try:
        for i in range(sum(steps)):
            run.gc.run(i + 1)
            sync()
            t0 = time.perf_counter()
            losses.append(train_step(run, micro, setup.device))
            sync()
            if i >= steps[0]:
                times.append(time.perf_counter() - t0)
    finally:
        cudagraph_teardown()
        gc.enable()  # GarbageCollection turned automatic collection off
    step_s = statistics.median(times)
    tokens = setup.train.global_batch_size * setup.seq
    out = {"step_times_s": times, "step_s": step_s, "tokens_per_s_per_gpu": tokens / step_s / setup.world,
           "losses": losses, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}
    biases = [b.detach().abs().mean() for name, b in run.model.named_buffers() if name.endswith("expert_bias_E")]
    if biases:  # its balancing ran: the routing biases moved off their zero init (0.0 here would mean it did not)
        out["expert_bias_mean_abs"] = float(torch.stack(biases).mean())
    return out


def layout_of(workload: str, world: int) -> tuple[int, int]:
    """(micro-batch, expert-parallel degree) of a workload at `world`: raytron's (bench_throughput's micro-batch
    and layout) for the real workloads; the debug ones use DEBUG_MICRO_BATCH and EP over every rank."""
    if workload in bt.WORKLOADS:
        return bt.micro_batch("raytron", workload, world), bt.WORKLOADS[workload][3][world].get("ep", 1)
    return DEBUG_MICRO_BATCH, world if WORKLOADS[workload][3] == "qwen3_moe" else 1


def why_not(workload: str, world: int) -> str | None:
    """Why `workload` does not run at `world` here, or None: raytron has no layout for it at that world (the
    EP-1 variant at one GPU is moe-olmoe-4l), or its expert parallelism needs FSDP2 per-parameter meshes
    (fully_shard's ShardPlacementResult, which its EP > 1 path imports; torch 2.13 has it, the GPU image's 2.11
    has not)."""
    if workload in bt.WORKLOADS and world not in bt.WORKLOADS[workload][3]:
        return f"no raytron layout at {world} GPU(s)"
    from torch.distributed.fsdp._fully_shard import _fsdp_common

    if layout_of(workload, world)[1] > 1 and not hasattr(_fsdp_common, "ShardPlacementResult"):
        return (f"TorchTitan's expert parallelism needs FSDP2 per-parameter meshes (ShardPlacementResult), "
                f"which torch {torch.__version__} has not")
    return None


def run_config(workload: str, rank: int, world: int, device: torch.device, args) -> dict:
    family, flavor, overrides, model = WORKLOADS[workload]
    mbs, ep = layout_of(workload, world)
    mbs = args.micro_batch or mbs
    rec = bt.base_record("torchtitan", workload, (family, flavor, overrides), world,
                         {"dp": world, "fsdp": world} | ({"ep": ep} if model == "qwen3_moe" else {}), mbs, args.seq)
    loss, loss_note = pick_loss(args.loss)
    graphs = args.cuda_graphs == "on" and device.type == "cuda"
    titan = rec["titan"] = {"version": TITAN_VERSION, "model": model, "spmd_backend": SPMD_BACKEND,
                            "attn_backend": ATTN_BACKEND, "cuda_graphs": graphs and ep == 1, "compile": True,
                            "activation_checkpointing": False, "loss": loss, "loss_note": loss_note,
                            "attention_masks": "built once", "optimizer": "fused AdamW (default_adamw)"}
    if graphs and ep > 1:  # as its Trainer._validate_cuda_graphs refuses them
        titan["cuda_graphs_note"] = "off: its trainer refuses CUDA graphs with the standard all-to-all dispatcher"
    if model == "qwen3_moe":
        titan["differences"] = list(QWEN3_MOE_DIFFERENCES)
    try:
        titan["shims"] = import_torchtitan(device)
        titan["shape"] = MODELS[model][0](models.get_config(family, flavor, **overrides))
        train = bt.make_spec(family, flavor, overrides, rec["global_batch"], mbs).train
        setup = Setup(model=model, shape=titan["shape"], train=train, world=world, ep=ep, micro_batch=mbs,
                      grad_accum=rec["grad_accum"], seq=args.seq, device=device, cuda_graphs=titan["cuda_graphs"],
                      loss=loss)
        steps = (args.warmup, args.timed) if args.warmup >= 0 else STEPS
        rec.update(train_and_time(setup, rank, steps))
        rec["mfu"] = rec["tokens_per_s_per_gpu"] * rec["flops_per_token"] / bt.PEAK_FLOPS
    except Exception as exc:  # recorded (e.g. an API torch 2.11 lacks, out of memory); exit status 3
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        rec["traceback"] = traceback.format_exc()[-3000:]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workloads", default="dense-1b", help=f"of {', '.join(WORKLOADS)}")
    parser.add_argument("--cuda-graphs", choices=("on", "off"), default="on",
                        help="capture forward-backward in a CUDA graph, as TorchTitan's trainer does by default")
    parser.add_argument("--loss", choices=("auto", "chunked", "ce"), default="auto",
                        help="chunked: the llama3 recipes' ChunkedLossWrapper; ce: CrossEntropyLoss; auto: pick_loss")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help=f"override the micro-batch (grad-accum keeps {bt.SEQS_PER_RANK} sequences per rank)")
    parser.add_argument("--warmup", type=int, default=-1, help=f"warm-up steps (default {STEPS[0]})")
    parser.add_argument("--timed", type=int, default=-1, help=f"timed steps (default {STEPS[1]})")
    parser.add_argument("--seq", type=int, default=bt.SEQ, help="sequence length (CPU smoke runs only)")
    args = parser.parse_args()
    unknown = sorted(set(args.workloads.split(",")) - set(WORKLOADS))
    if unknown:
        parser.error(f"--workloads: unknown {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    failed = False
    for workload in args.workloads.split(","):
        reason = why_not(workload, world)
        if reason:
            if rank == 0:
                print(f"[bench] world {world} {workload} torchtitan: not run: {reason}", flush=True)
            continue
        rec = run_config(workload, rank, world, device, args)
        if "error" in rec and rec["titan"]["cuda_graphs"]:  # the same workload eager, as --cuda-graphs off would
            error = rec["error"][:300]
            rec = run_config(workload, rank, world, device, argparse.Namespace(**{**vars(args), "cuda_graphs": "off"}))
            rec["titan"]["cuda_graphs_note"] = f"off: the CUDA-graph run failed ({error})"
        failed = failed or "error" in rec
        if rank == 0:
            bt.write_record(rec, args.out)
        dist.barrier()
    dist.destroy_process_group()
    sys.exit(3 if failed else 0)


if __name__ == "__main__":
    main()
