"""Training throughput of the megatron engine vs megatron-core's own GPTModel + local spec (run under torchrun).

Both sides share megatron-core's GPTModel, its DistributedDataParallel and DistributedOptimizer (bf16,
fp32 masters, Adam), its 1F1B `get_forward_backward_func`, the same TransformerConfig fields and parallel
layout. `raytron` = the engine: parallelism/megatron/spec.py layers (SDPA core attention, fp32-statistics
RMSNorm, reference router, grouped-GEMM experts) and its stand-ins for the TE/apex kernels megatron would
use (megatron/kernels.py: weight-gradient accumulation in the GEMM, fused Adam, foreach clipping;
megatron/modules.py: RoPE, Triton SwiGLU, compiled cross-entropy). `mcore_local` = `get_gpt_layer_local_spec`
as a user gets it without TE/apex (`megatron_as_shipped`: unfused softmax attention, torch norms,
TopKRouter, megatron's local fallbacks, its own compiled SwiGLU). Weights are megatron's own random init
(no reference load), tokens are random.

Both sides train the same global batch: SEQS_PER_RANK sequences of 4096 tokens per DP rank per optimizer
step (micro-batch per micro_batch(): MICRO_BATCH, MICRO_BATCH_AT_WORLD; gradient accumulation for the rest), so the
optimizer's share of a step is the same for both. Reported per config: seconds per optimizer step
(median of the timed steps, after warm-up), tokens/s/GPU = global tokens per step / step time / world, and MFU = tokens/s/GPU x FLOPs/token / 989e12,
with FLOPs/token from models/flops.py in the Megatron convention (matmuls only, fwd + bwd = 3 x fwd,
causal attention counts S/2 keys per query, logits counted, MoE counts the router plus top_k active
experts). Peak GPU memory is torch.cuda.max_memory_allocated on rank 0.

    torchrun --nproc_per_node=4 benchmarks/megatron/bench_throughput.py --out bench.jsonl

dense/3b on one H200 (not in the default --workloads: about a minute more, and 80 GB GPUs do not hold it at
its micro-batch), raytron only, with activation recomputation (train.recompute):

    torchrun --nproc_per_node=1 benchmarks/megatron/bench_throughput.py --impls raytron --workloads dense-3b \
        --recompute selective --out bench.jsonl

Long-context workloads `<model>-<4k|16k|32k|64k>` (dense-1b, hybrid-1b, hybrid-1b-mamba; LONG_MODELS below) train
LONG_STEP_TOKENS per step at their own sequence length, FLOPs/token counted at that length:

    torchrun --nproc_per_node=1 benchmarks/megatron/bench_throughput.py --impls raytron \
        --workloads dense-1b-32k,hybrid-1b-32k,hybrid-1b-mamba-32k --out bench.jsonl

`--precisions bf16,fp8` runs raytron once per train.precision (each config alone, one after another, in the
same launch; records carry `precision`); MFU stays relative to the bf16 peak, so FP8 shows as higher MFU.

`deepspeed` = the deepspeed engine as a raytron job with `engine: deepspeed` builds it (the EngineSupport of
parallelism/engines.py, parallelism/deepspeed/engine.py): the reference model of models/ (its ops/ kernels,
DeepSpeed-MoE for the experts), bf16 with fp32 masters in ZeRO-2 partitions, torch AdamW, the engine's own
train_step; weights are the reference init of train.seed. Same batch, timing and FLOPs as the others:

    torchrun --nproc_per_node=1 benchmarks/megatron/bench_throughput.py --impls deepspeed,raytron \
        --workloads dense-1b,moe-olmoe-4l --out bench.jsonl

On a machine without CUDA it runs over gloo on CPU (the `*-debug-cpu` workloads with `--seq-len` and
`--seqs-per-rank` small; tests/benchmarks/test_bench_deepspeed.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
import traceback
from types import SimpleNamespace

import torch
import torch.distributed as dist

from raytron import models
from raytron.launcher.metrics import device_peak_flops
from raytron.parallelism.layout import ParallelLayout

PEAK_FLOPS = device_peak_flops("H200")  # H100/H200 SXM dense bf16
SEQ = 4096
MOE_OVERRIDES = {"num_layers": 4}  # moe/olmoe at 1/4 depth: 64 experts top-8, hidden 2048 (fits one GPU)

# name -> (family, flavor, overrides, layout fields by world size)
WORKLOADS = {
    "dense-1b": ("dense", "1b", {}, {1: {}, 2: {"dp": 2}, 4: {"dp": 4}}),
    "moe-olmoe-4l": ("moe", "olmoe", MOE_OVERRIDES, {1: {}, 2: {"dp": 2, "ep": 2}, 4: {"dp": 4, "ep": 4}}),
    # the same model with experts replicated (EP 1): data parallelism only, for the scaling comparison
    "moe-olmoe-4l-ep1": ("moe", "olmoe", MOE_OVERRIDES, {2: {"dp": 2}, 4: {"dp": 4}}),
    "dense-3b": ("dense", "3b", {}, {1: {}}),  # one H200 (cluster_configs/dense_3b_1gpu.yaml), opt-in
    # shared experts, sigmoid router with the aux-loss-free bias, multi-head latent attention; opt-in
    "moe-deepseek-small-mla": ("moe", "deepseek-small-mla", {}, {1: {}}),
    # CPU-sized: the harness itself under test (tests/benchmarks/test_bench_deepspeed.py)
    "dense-debug-cpu": ("dense", "debug", {}, {1: {}}),
    "moe-debug-cpu": ("moe", "debug", {}, {1: {}}),
}
DEFAULT_WORKLOADS = ("dense-1b", "moe-olmoe-4l", "moe-olmoe-4l-ep1")
ONLY_FOR = {"moe-olmoe-4l-ep1": ("raytron",),  # raytron's own scaling comparison; no mcore_local run of it
            "dense-3b": ("raytron",), "moe-deepseek-small-mla": ("raytron",),
            "dense-debug-cpu": ("deepspeed",), "moe-debug-cpu": ("deepspeed",)}
SEQS_PER_RANK = 32  # sequences per DP rank per optimizer step (131k tokens; 524k on 4 GPUs)
MICRO_BATCH = {("raytron", "dense-1b"): 8, ("raytron", "moe-olmoe-4l"): 4,  # the fastest that fit 80 GB
               ("raytron", "moe-olmoe-4l-ep1"): 4,
               ("mcore_local", "dense-1b"): 1, ("mcore_local", "moe-olmoe-4l"): 1,  # local spec OOMs at 2
               ("mcore_local", "moe-olmoe-4l-ep1"): 1,
               ("raytron", "dense-3b"): 4,  # 141 GB H200 with recompute selective (plan: 107 GiB)
               # 12 layers of hidden 1024 and 352-wide experts: 8 x 4096 tokens hold well inside a 141 GB H200
               ("raytron", "moe-deepseek-small-mla"): 8,
               # the reference model keeps more activations than megatron's layers: raytron's micro-batches,
               # sized for a 141 GB H200 (the comparison runs there)
               ("deepspeed", "dense-1b"): 8, ("deepspeed", "moe-olmoe-4l"): 4,
               ("deepspeed", "dense-debug-cpu"): 2, ("deepspeed", "moe-debug-cpu"): 2}
# EP4 holds a quarter of the experts per GPU: micro-batch 8 fits (32 GiB peak on H200) and is the fastest
# there with train.overlap_moe_comm (4x H200: mb 2 126.4k, mb 4 ~134k, mb 8 139.8k tok/s/GPU;
# mb 8 without the overlap 130.9k); at 1 GPU mb 8 needs ~100 GiB, over 80 GB.
MICRO_BATCH_AT_WORLD = {("raytron", "moe-olmoe-4l", 4): 8}

# Long context on one GPU: dense/1b and the 3:1 hybrids hybrid/1b (Gated DeltaNet) and hybrid/1b-mamba (Mamba2),
# raytron only, workload "<model>-<4k|16k|32k|64k>". Every one trains LONG_STEP_TOKENS tokens per optimizer step
# (65,536: 16 x 4K, 4 x 16K, 2 x 32K, 1 x 64K) in micro-batches of LONG_MICRO_TOKENS tokens (one 64K sequence
# at 64K). The hybrids at 64K recompute their chunked scans in backward (train.recompute=selective): plan's
# estimate (parallelism/memory.py, 32K vocabulary) is 127 GiB with it and 214 GiB without for hybrid/1b, 136 and
# 170 GiB for hybrid/1b-mamba (an upper end: fused kernels keep fewer chunk tensors); dense/1b's 123 GiB without
# recomputation fits, so it runs without. At 4K-32K every model fits without (at most 115 GiB estimated).
LONG_STEP_TOKENS, LONG_MICRO_TOKENS = 65536, 32768
LONG_MODELS = {"dense-1b": ("dense", "1b"), "hybrid-1b": ("hybrid", "1b"), "hybrid-1b-mamba": ("hybrid", "1b-mamba")}
LONG_SEQS = {"4k": 4096, "16k": 16384, "32k": 32768, "64k": 65536}
SEQ_LEN: dict[str, int] = {}  # workload -> tokens per sequence, where not SEQ
RECOMPUTE = {"hybrid-1b-64k": "selective", "hybrid-1b-mamba-64k": "selective"}  # train.recompute by default
for _model, (_family, _flavor) in LONG_MODELS.items():
    for _tag, _seq in LONG_SEQS.items():
        _name = f"{_model}-{_tag}"
        WORKLOADS[_name] = (_family, _flavor, {}, {1: {}})
        SEQ_LEN[_name], ONLY_FOR[_name] = _seq, ("raytron",)
        MICRO_BATCH[("raytron", _name)] = max(1, LONG_MICRO_TOKENS // _seq)


def workload_seq(workload: str) -> tuple[int, int]:
    """(tokens per sequence, sequences per DP rank per optimizer step) of `workload`."""
    seq = SEQ_LEN.get(workload, SEQ)
    return seq, (LONG_STEP_TOKENS // seq if workload in SEQ_LEN else SEQS_PER_RANK)


def micro_batch(impl: str, workload: str, world: int) -> int:
    """The fastest micro-batch that fits an 80 GB GPU (dense-3b: a 141 GB H200) for this implementation,
    workload and world size."""
    return MICRO_BATCH_AT_WORLD.get((impl, workload, world), MICRO_BATCH[(impl, workload)])


STEPS = {"raytron": (2, 5), "mcore_local": (1, 1), "deepspeed": (2, 5)}  # (warm-up, timed) optimizer steps; mcore_local: 32 micro-batches a step, slow


def local_spec_chunks(cfg, tcfg, seq_len):
    """megatron-core's own GPTModel with its local (no Transformer Engine) layer spec."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=cfg.num_experts or None, moe_grouped_gemm=False,
                                    normalization="RMSNorm")
    return [GPTModel(config=tcfg, transformer_layer_spec=spec, vocab_size=cfg.vocab_size, max_sequence_length=seq_len,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=cfg.tie_embeddings, position_embedding_type="rope",
                     rotary_base=int(cfg.rope_theta))]


@contextlib.contextmanager
def megatron_as_shipped():
    """For mcore_local: megatron-core's GPTModel with its local spec as shipped, none of raytron's stand-ins
    for TE/apex kernels (parallelism/megatron/kernels.py; the RoPE, SwiGLU and cross-entropy ones of
    megatron/modules.py): torch's foreach AdamW, the local clipping fallbacks, unfused RoPE and
    weight-gradient accumulation, megatron's native cross-entropy. megatron's own TE-free fusions (its
    compiled SwiGLU and bias-dropout-add) stay on."""
    from megatron.core import utils
    from megatron.core.fusions import fused_bias_swiglu
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.transformer import mlp

    from raytron.parallelism.megatron import engine as megatron_engine

    saved_engine = {n: getattr(megatron_engine, n) for n in ("build_model_chunks", "transformer_config",
                                                             "use_fused_adam", "install_multi_tensor_kernels")}
    saved_kernels = (clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl,
                     mlp.bias_swiglu_impl)

    def shipped_config(*args, **kwargs):
        tcfg = saved_engine["transformer_config"](*args, **kwargs)  # installs raytron's stand-ins: undo them
        tcfg.apply_rope_fusion, tcfg.gradient_accumulation_fusion = False, False
        tcfg.cross_entropy_fusion_impl = "native"
        mlp.bias_swiglu_impl = fused_bias_swiglu.bias_swiglu_impl
        return tcfg

    megatron_engine.build_model_chunks = local_spec_chunks
    megatron_engine.transformer_config = shipped_config
    megatron_engine.use_fused_adam = lambda opt: False
    megatron_engine.install_multi_tensor_kernels = lambda: None
    clip_grads.l2_norm_impl = utils.local_multi_tensor_l2_norm
    clip_grads.multi_tensor_scale_impl = optimizer.multi_tensor_scale_impl = utils.local_multi_tensor_scale
    try:
        yield
    finally:
        for name, value in saved_engine.items():
            setattr(megatron_engine, name, value)
        (clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl,
         mlp.bias_swiglu_impl) = saved_kernels


def make_spec(family, flavor, overrides, gbs, mbs, overlap: bool = False, overlap_moe: bool = False,
              recompute: str = "none", precision: str = "bf16", engine: str = "megatron", zero_stage: int = 1,
              seq: int = SEQ, use_gpu: bool = True):
    """A job spec for the engine without a YAML: the config's defaults, this benchmark's training
    settings (mutable, so fp8_parity.py can change steps and LR)."""
    from raytron.config.spec import LayoutSpec, ResourcesSpec, TrainSpec
    from raytron.typed import field_defaults

    train = SimpleNamespace(**{**field_defaults(TrainSpec), **dict(
        seed=1234, seq_len=seq, lr=3e-4, min_lr=3e-4, warmup_steps=0, steps=10**6, weight_decay=0.1,
        grad_clip=1.0, aux_loss_coef=0.01, global_batch_size=gbs, micro_batch_size=mbs,
        overlap_grad_reduce=overlap, overlap_moe_comm=overlap_moe, recompute=recompute, precision=precision)})
    return SimpleNamespace(model=SimpleNamespace(family=family, flavor=flavor, overrides=overrides), train=train,
                           engine=engine, layout=SimpleNamespace(**{**field_defaults(LayoutSpec),
                                                                    "zero_stage": zero_stage}),
                           resources=SimpleNamespace(**{**field_defaults(ResourcesSpec), "use_gpu": use_gpu}))


def _sync_points(engine, micro) -> dict[str, int]:
    """One step under torch.cuda's sync debug mode: {call stack: count} of every synchronizing op."""
    import collections
    import warnings

    found: collections.Counter = collections.Counter()
    previous = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            found["".join(traceback.format_stack(limit=9)[:-2])] += 1

    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            engine.train_step(micro)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = previous
    return dict(found)


def _profile_step(engine, micro, path: str) -> None:
    """One extra optimizer step under torch.profiler: top CUDA kernels to `path` (diagnosis aid)."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.train_step(micro)
        torch.cuda.synchronize()
    syncs = _sync_points(engine, micro)
    with open(path, "w") as f:
        f.write(f"host-device synchronizations in one step ({sum(syncs.values())}), by call stack:\n")
        for stack, count in sorted(syncs.items(), key=lambda kv: -kv[1]):
            f.write(f"--- {count}x\n{stack}\n")
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
        f.write("\n\nby self CUDA time (kernels):\n")
        f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90))


def build_engine(spec, layout, rank: int):
    """The engine a raytron job with `spec.engine` gets: the deepspeed engine through its EngineSupport (as
    the launcher builds it); the megatron engine with megatron's own random init (no reference load)."""
    if spec.engine == "deepspeed":
        from raytron.parallelism.engines import get_engine

        return get_engine("deepspeed").build(spec, layout, rank, layout.world_size)
    from raytron.parallelism.megatron import engine as megatron_engine

    return megatron_engine.MegatronEngine(spec, layout, rank, layout.world_size, init_from_reference=False)


def bench_tokens(vocab: int, mbs: int, ga: int, seq: int, rank: int) -> list[torch.Tensor]:
    """This rank's micro-batches ([mbs, seq + 1] random tokens each), the same every step."""
    g = torch.Generator().manual_seed(rank)
    return [torch.randint(0, vocab, (mbs, seq + 1), generator=g) for _ in range(ga)]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_mem_gib() -> float:
    """torch.cuda.max_memory_allocated; on CPU the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _train_and_time(spec, layout, rank: int, warmup: int, timed: int, profile_path: str | None) -> dict:
    """Build the engine, train warm-up + timed steps on random tokens (and profile one more step)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    engine = build_engine(spec, layout, rank)
    build_s = time.perf_counter() - t_build
    seq = spec.train.seq_len
    micro = bench_tokens(engine.model_cfg.vocab_size, layout.micro_batch_size, layout.grad_accum, seq, rank)
    times, losses = [], []
    for i in range(warmup + timed):
        _sync()
        t0 = time.perf_counter()
        m = engine.train_step(micro)
        _sync()
        losses.append(m.loss)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    out = dict(step_times_s=times, step_s=step_s, tokens_per_s_per_gpu=layout.global_batch_size * seq / step_s
               / layout.world_size, losses=losses, peak_mem_gib=_peak_mem_gib(), build_s=build_s)
    if profile_path and rank == 0:
        _profile_step(engine, micro, profile_path)
    return out


def base_record(impl: str, workload: str, model: tuple[str, str, dict], world: int, fields: dict, mbs: int,
                seq: int = SEQ, seqs_per_rank: int = SEQS_PER_RANK) -> dict:
    """The fields every record carries (bench_torchtitan.py writes the same): `seqs_per_rank` sequences of `seq`
    tokens per DP rank per step in micro-batches of `mbs`, parameter counts and FLOPs/token of the model
    (family, flavor, overrides) at that sequence length."""
    family, flavor, overrides = model
    ga = max(1, seqs_per_rank // mbs)
    cfg = models.get_config(family, flavor, **overrides)
    total, active = models.param_counts(cfg)
    return {"impl": impl, "workload": workload, "family": family, "flavor": flavor, "overrides": overrides,
            "world": world, "layout": fields, "seq_len": seq, "micro_batch": mbs, "grad_accum": ga,
            "global_batch": mbs * ga * fields["dp"], "params_total": total, "params_active": active,
            "flops_per_token": models.flops_per_token(cfg, seq, "megatron")["total"]}


def write_record(rec: dict, out: str) -> None:
    """Rank 0: append the record to `out` (JSON lines) and print its one-line summary."""
    rec["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    summary = rec.get("error") or (f"{rec['tokens_per_s_per_gpu']:.0f} tok/s/GPU, MFU {rec['mfu']:.1%}, "
                                   f"{rec['step_s']:.3f} s/step, peak {rec['peak_mem_gib']:.1f} GiB")
    precision = f" {rec['precision']}" if rec.get("precision", "bf16") != "bf16" else ""
    print(f"[bench] world {rec['world']} {rec['workload']} {rec['impl']}{precision}: {summary}", flush=True)


DEEPSPEED_ZERO_STAGE = 2  # ZeRO-2: optimizer state and gradients partitioned over DP


def run_config(impl: str, workload: str, rank: int, world: int, warmup: int, timed: int,
               batching: int | None = None, profile_dir: str | None = None, overlap: bool = False,
               overlap_moe: bool = False, recompute: str | None = None, precision: str = "bf16",
               seq: int | None = None, seqs_per_rank: int | None = None) -> dict:
    """One (impl, workload) config trained and timed; `recompute` None: the workload's RECOMPUTE, else none;
    `seq`/`seqs_per_rank` None: the workload's (workload_seq)."""
    from megatron.core import parallel_state

    family, flavor, overrides, by_world = WORKLOADS[workload]
    mbs = batching or micro_batch(impl, workload, world)
    warmup, timed = (warmup, timed) if warmup >= 0 else STEPS[impl]
    engine = "deepspeed" if impl == "deepspeed" else "megatron"
    fields = {"dp": 1, **by_world[world], **({"zero_stage": DEEPSPEED_ZERO_STAGE} if engine == "deepspeed" else {})}
    workload_seq_len, workload_seqs = workload_seq(workload)
    seq, seqs_per_rank = seq or workload_seq_len, seqs_per_rank or workload_seqs
    recompute = recompute or RECOMPUTE.get(workload, "none")
    rec = base_record(impl, workload, (family, flavor, overrides), world, fields, mbs, seq, seqs_per_rank)
    rec["overlap_grad_reduce"], rec["recompute"], rec["precision"] = overlap, recompute, precision
    rec["overlap_moe_comm"] = overlap_moe = overlap_moe and fields.get("ep", 1) > 1  # the engine refuses it at ep 1
    gbs, flops = rec["global_batch"], rec["flops_per_token"]
    try:
        with megatron_as_shipped() if impl == "mcore_local" else contextlib.nullcontext():
            layout = ParallelLayout(world_size=world, micro_batch_size=mbs, global_batch_size=gbs, **fields)
            tag = "" if precision == "bf16" else f"_{precision}"
            path = profile_dir and f"{profile_dir}/profile_{impl}_{workload}_w{world}_mb{mbs}{tag}.txt"
            spec = make_spec(family, flavor, overrides, gbs, mbs, overlap, overlap_moe, recompute, precision,
                             engine, fields.get("zero_stage", 1), seq, torch.cuda.is_available())
            rec.update(_train_and_time(spec, layout, rank, warmup, timed, path))
        rec["mfu"] = rec["tokens_per_s_per_gpu"] * flops / PEAK_FLOPS
    except Exception as exc:  # recorded (e.g. out of memory); the other configs still run
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        rec["traceback"] = traceback.format_exc()[-3000:]
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        torch.cuda.empty_cache()
    return rec


def planned_runs(impls: list[str], workloads: list[str], world: int) -> list[tuple[str, str]]:
    """(workload, impl) in run order: each workload that has a layout at this world size (the EP-1 MoE
    variant has no 1-GPU run of its own: it is moe-olmoe-4l there), for the impls it is meant for."""
    return [(w, impl) for w in workloads if world in WORKLOADS[w][3]
            for impl in impls if impl in ONLY_FOR.get(w, (impl,))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--impls", default="raytron,mcore_local")
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS), help=f"of {', '.join(WORKLOADS)}")
    parser.add_argument("--warmup", type=int, default=-1, help="warm-up steps (default: STEPS per impl)")
    parser.add_argument("--timed", type=int, default=-1, help="timed steps (default: STEPS per impl)")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help=f"override the micro-batch (grad-accum keeps {SEQS_PER_RANK} sequences per DP rank)")
    parser.add_argument("--profile", default="", help="directory for a torch.profiler table per config")
    parser.add_argument("--overlap-grad-reduce", action="store_true",
                        help="train.overlap_grad_reduce for raytron (DP gradient reduction during the last backward)")
    parser.add_argument("--overlap-moe-comm", action="store_true",
                        help="train.overlap_moe_comm for raytron where the layout has ep > 1 (EP all-to-all hidden "
                             "behind another micro-batch's compute; set CUDA_DEVICE_MAX_CONNECTIONS > 1)")
    parser.add_argument("--recompute", default=None, choices=("none", "selective", "full"),
                        help="train.recompute for raytron (activation recomputation; default: the workload's "
                             "RECOMPUTE entry, else none)")
    parser.add_argument("--precisions", default="bf16",
                        help="train.precision values for raytron, each run separately (e.g. bf16,fp8); "
                             "mcore_local and deepspeed always run bf16")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: the workload's; CPU smoke runs: small)")
    parser.add_argument("--seqs-per-rank", type=int, default=None,
                        help="sequences per DP rank per optimizer step (default: the workload's)")
    args = parser.parse_args()
    if set(args.precisions.split(",")) - {"bf16", "fp8"}:
        parser.error(f"--precisions {args.precisions!r}: allowed values bf16, fp8")
    unknown = sorted(set(args.workloads.split(",")) - set(WORKLOADS)) + sorted(set(args.impls.split(",")) - set(STEPS))
    if unknown:
        parser.error(f"unknown --workloads/--impls {unknown}: workloads are {list(WORKLOADS)}, impls {list(STEPS)}")
    batching = args.micro_batch or None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    for workload, impl in planned_runs(args.impls.split(","), args.workloads.split(","), world):
        for precision in args.precisions.split(",") if impl == "raytron" else ["bf16"]:
            rec = run_config(impl, workload, rank, world, args.warmup, args.timed, batching, args.profile or None,
                             args.overlap_grad_reduce and impl == "raytron",
                             overlap_moe=args.overlap_moe_comm and impl == "raytron",
                             recompute=args.recompute if impl == "raytron" else "none", precision=precision,
                             seq=args.seq_len, seqs_per_rank=args.seqs_per_rank)
            if rank == 0:
                write_record(rec, args.out)
            dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
