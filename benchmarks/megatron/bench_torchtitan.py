"""Training throughput of TorchTitan 0.3.0's Llama 3 at our dense-1b shape, as bench_throughput.py records (run
under torchrun, beside bench_throughput.py: scripts/gpu_megatron_all.sh runs both in one device call).

TorchTitan's Trainer cannot run on the GPU image (it imports torchdata, datasets, tokenizers, wandb and
torch_checkpointing; no network there). Its model and parallelize path needs only spmd_types and tyro (in the
wheelhouse), so this script drives that path the way torchtitan/trainer.py does, without the Trainer:
- model: `Llama3Model.Config` assembled as the llama3 flavors are (torchtitan/models/llama3/__init__.py,
  `_build_llama3_layers`: fused wqkv, FlexAttention with block-causal masks built from per-token positions,
  ComplexRoPE, depth-scaled init) at the shape of our model (`llama3_shape`: the SwiGLU width comes out of
  TorchTitan's own multiple_of rule; the built model's parameter count must equal ours), fp32 weights;
- parallelism: `parallelize_llama` over ParallelDims(dp_shard = world): per-block torch.compile, FSDP2 over all
  ranks with MixedPrecisionPolicy(param bf16, reduce fp32) on fp32 masters (on one GPU a 1-rank mesh that still
  installs the policy), no activation checkpointing, spmd_backend SPMD_BACKEND (below);
- step: Trainer.train_step without pipelining: per micro-batch, masks from positions (built once: all
  micro-batches have the same, see train_and_time), forward, the llama3
  recipes' ChunkedLossWrapper(CrossEntropyLoss) (compiled; plain CrossEntropyLoss on older torch, pick_loss)
  over the step's global token count, backward, all captured in a CUDA graph as its Trainer does by default
  (`--cuda-graphs off`: eager); then clip_grad_norm_
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
`torchrun --nproc_per_node=2 benchmarks/megatron/bench_torchtitan.py --out smoke.jsonl --workloads dense-debug
--seq 256 --warmup 1 --timed 2`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
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

from raytron import models  # noqa: E402

TITAN_VERSION = "0.3.0"
WORKLOADS = {"dense-1b": ("dense", "1b", {}), "dense-debug": ("dense", "debug", {})}  # debug: CPU smoke runs
MICRO_BATCH = {"dense-1b": 8, "dense-debug": 2}  # dense-1b: as raytron's (bench_throughput.MICRO_BATCH)
STEPS = (2, 5)  # (warm-up, timed) optimizer steps, as raytron's; warm-up covers compilation and graph capture
# TorchTitan 0.3.0 defaults to "spmd_types", whose FSDP call passes torch.distributed.fsdp.DataParallelMeshDims
# to fully_shard, which the image's torch 2.11 has not (2.13 has). "partial_dtensor" (DTensor on model-parallel
# axes only) is its FSDP2 path without it: fully_shard per block over the 1-D "fsdp" mesh.
SPMD_BACKEND = "partial_dtensor"
ATTN_BACKEND = "flex"  # llama3's default; "flex_flash" needs flash-attention's CuTe kernels, "sdpa" is refused
CHUNKED_LOSS_TORCH = (2, 13)  # pick_loss: fails on 2.11, runs on 2.13 (2.12 not tried)
POWERS_OF_TWO = tuple(2**k for k in range(10, -1, -1))  # multiple_of candidates, largest first


# ---- our config -> TorchTitan's llama3 arguments (no TorchTitan needed; tests/benchmarks) ---------------------
def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """TorchTitan 0.3.0's compute_ffn_hidden_dim (models/common/feed_forward.py), restated so the mapping can be
    checked without it; the GPU run builds with its own function and checks the parameter count."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def llama3_shape(cfg: models.ModelConfig) -> dict:
    """TorchTitan llama3 arguments that reproduce our dense ModelConfig; ValueError for what its Llama 3 cannot
    express (non-attention or MoE layers, head size other than dim / heads, RMSNorm eps other than 1e-5, a
    SwiGLU width that no multiple_of yields)."""
    pattern = cfg.layer_pattern()
    n_layers = len(pattern) // 2
    problems = []
    if pattern != "*-" * n_layers:
        problems.append(f"layer pattern {pattern!r} (llama3 blocks are causal attention + SwiGLU MLP)")
    if cfg.attn_head_dim * cfg.num_heads != cfg.dim:
        problems.append(f"head size {cfg.attn_head_dim} != dim / heads")
    if cfg.norm_eps != 1e-5:  # RMSNorm.Config's default, which _build_llama3_layers keeps
        problems.append(f"norm_eps {cfg.norm_eps}")
    multiple_of = next((m for m in POWERS_OF_TWO if ffn_hidden_dim(cfg.dim, m) == cfg.ffn_dim), None)
    if multiple_of is None:
        problems.append(f"ffn_dim {cfg.ffn_dim}: no multiple_of in {POWERS_OF_TWO} gives it from dim {cfg.dim}")
    if problems:
        raise ValueError("TorchTitan's llama3 cannot express " + "; ".join(problems))
    return {"dim": cfg.dim, "n_layers": n_layers, "n_heads": cfg.num_heads, "n_kv_heads": cfg.num_kv_heads,
            "vocab_size": cfg.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": None,
            "rope_theta": cfg.rope_theta, "enable_weight_tying": cfg.tie_embeddings}


def llama3_param_count(shape: dict) -> int:
    """Parameters of TorchTitan's Llama3Model of `shape`, module by module: per block the fused wqkv
    ((heads + 2 kv heads) x head size x dim), wo, w1 / w3 / w2 and two RMSNorm weights; the token embedding, the
    final norm and lm_head (one matrix when tied). No biases (its Linear.Config default)."""
    d, heads, kv = shape["dim"], shape["n_heads"], shape["n_kv_heads"]
    head = d // heads
    hidden = ffn_hidden_dim(d, shape["multiple_of"], shape["ffn_dim_multiplier"])
    block = (heads + 2 * kv) * head * d + heads * head * d + 3 * d * hidden + 2 * d
    return shape["n_layers"] * block + shape["vocab_size"] * d * (1 if shape["enable_weight_tying"] else 2) + d


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


def llama3_model_config(shape: dict, seq: int):
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


@dataclasses.dataclass(frozen=True)
class Setup:
    """One TorchTitan configuration: the model shape and how it trains (batch from bench_throughput's rules)."""

    shape: dict  # llama3_shape
    train: SimpleNamespace  # bench_throughput.make_spec(...).train: seed, lr, weight_decay, grad_clip, global_batch
    world: int
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


def build(setup: Setup) -> SimpleNamespace:
    """Model, loss, optimizer and forward-backward function, set up as Trainer.__init__ sets them up."""
    import spmd_types as spmd
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.optimizer import default_adamw
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.distributed.cudagraph import wrap_with_cuda_graph
    from torchtitan.models.llama3 import parallelize_llama
    from torchtitan.tools.utils import GarbageCollection

    shape, train = setup.shape, setup.train
    training = TrainingConfig(local_batch_size=setup.micro_batch, global_batch_size=train.global_batch_size,
                              seq_len=setup.seq, max_norm=train.grad_clip, mixed_precision_param="bfloat16",
                              mixed_precision_reduce="float32", disable_cuda_graphs=not setup.cuda_graphs)
    parallelism = ParallelismConfig(spmd_backend=SPMD_BACKEND)  # data_parallel_shard_degree -1: all ranks
    compile_config = CompileConfig(enable=True)  # components: "model" (each block) and "loss"
    dist_utils.set_spmd_backend(SPMD_BACKEND)
    dims = ParallelDims.from_config(parallelism, setup.world)
    with torch.device("meta"):
        model = llama3_model_config(shape, setup.seq).build()
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != llama3_param_count(shape):
        raise RuntimeError(f"TorchTitan model has {n_params} parameters, our shape {llama3_param_count(shape)}")
    model = parallelize_llama(model, parallel_dims=dims, training=training, parallelism=parallelism,
                              compile_config=compile_config, ac_config=None, dump_folder=tempfile.gettempdir())
    if setup.device.type == "cpu":  # gloo has no PREMUL_SUM: FSDP sums and divides itself
        for module in model.modules():
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
    model.to_empty(device=setup.device)
    torch.manual_seed(train.seed)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    loss_cfg = CrossEntropyLoss.Config(global_vocab_size=shape["vocab_size"])
    if setup.loss == "chunked":
        loss_cfg = ChunkedLossWrapper.Config(loss_fn=loss_cfg)
    loss_fn = loss_cfg.build(compile_config=compile_config)
    if isinstance(loss_fn, ChunkedLossWrapper):  # as Trainer.__init__: lm_head runs per chunk inside the loss
        loss_fn.set_lm_head(model.lm_head)
        model._skip_lm_head = True
    optimizers = default_adamw(lr=train.lr, weight_decay=train.weight_decay).build(model_parts=[model])
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
    dist_utils.clip_grad_norm_(list(run.model.parameters()), run.training.max_norm, foreach=True)
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
    return {"step_times_s": times, "step_s": step_s, "tokens_per_s_per_gpu": tokens / step_s / setup.world,
            "losses": losses, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}


def run_config(workload: str, rank: int, world: int, device: torch.device, args) -> dict:
    family, flavor, overrides = WORKLOADS[workload]
    mbs = args.micro_batch or MICRO_BATCH[workload]
    rec = bt.base_record("torchtitan", workload, (family, flavor, overrides), world, {"dp": world, "fsdp": world},
                         mbs, args.seq)
    loss, loss_note = pick_loss(args.loss)
    titan = rec["titan"] = {"version": TITAN_VERSION, "spmd_backend": SPMD_BACKEND, "attn_backend": ATTN_BACKEND,
                            "cuda_graphs": args.cuda_graphs == "on" and device.type == "cuda", "compile": True,
                            "activation_checkpointing": False, "loss": loss, "loss_note": loss_note,
                            "attention_masks": "built once", "optimizer": "fused AdamW (default_adamw)"}
    try:
        titan["shims"] = import_torchtitan(device)
        titan["shape"] = llama3_shape(models.get_config(family, flavor, **overrides))
        train = bt.make_spec(family, flavor, overrides, rec["global_batch"], mbs).train
        setup = Setup(shape=titan["shape"], train=train, world=world, micro_batch=mbs, grad_accum=rec["grad_accum"],
                      seq=args.seq, device=device, cuda_graphs=titan["cuda_graphs"], loss=loss)
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
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    failed = False
    for workload in args.workloads.split(","):
        rec = run_config(workload, rank, world, device, args)
        failed = failed or "error" in rec
        if rank == 0:
            bt.write_record(rec, args.out)
        dist.barrier()
    dist.destroy_process_group()
    sys.exit(3 if failed else 0)


if __name__ == "__main__":
    main()
