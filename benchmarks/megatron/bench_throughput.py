"""Training throughput of the megatron engine vs megatron-core's own GPTModel + local spec (run under torchrun).

Both sides share everything but the layer spec: megatron-core GPTModel, its DistributedDataParallel and
DistributedOptimizer (bf16, fp32 masters, Adam), its 1F1B `get_forward_backward_func`, the same
TransformerConfig and parallel layout. `raytron` = parallelism/megatron_spec.py (SDPA core attention,
fp32-statistics RMSNorm, reference router); `mcore_local` = `get_gpt_layer_local_spec` (megatron's
unfused softmax attention, torch norms, TopKRouter), i.e. megatron-core used directly without
Transformer Engine. Weights are megatron's own random init (no reference load), tokens are random.

Reported per config: seconds per optimizer step (median of the timed steps, after warm-up),
tokens/s/GPU = global tokens per step / step time / world, and MFU = tokens/s/GPU x FLOPs/token / 989e12,
with FLOPs/token from models/flops.py in the Megatron convention (matmuls only, fwd + bwd = 3 x fwd,
causal attention counts S/2 keys per query, logits counted, MoE counts the router plus top_k active
experts). Peak GPU memory is torch.cuda.max_memory_allocated on rank 0.

    torchrun --nproc_per_node=4 benchmarks/megatron/bench_throughput.py --world-configs 4 --out bench.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from types import SimpleNamespace

import torch
import torch.distributed as dist

from raytron import models
from raytron.parallelism.layout import ParallelLayout

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16
SEQ = 4096
MOE_OVERRIDES = {"num_layers": 4}  # moe/olmoe at 1/4 depth: 64 experts top-8, hidden 2048 (fits one GPU)

# name -> (family, flavor, overrides, layout fields by world size, micro-batch, grad-accum)
WORKLOADS = {
    "dense-1b": ("dense", "1b", {}, {1: {}, 2: {"dp": 2}, 4: {"dp": 4}}),
    "moe-olmoe-4l": ("moe", "olmoe", MOE_OVERRIDES, {1: {}, 2: {"dp": 2, "ep": 2}, 4: {"dp": 4, "ep": 4}}),
}
BATCHING = {  # (impl, workload) -> (micro-batch, grad-accum per DP rank)
    ("raytron", "dense-1b"): (2, 4), ("mcore_local", "dense-1b"): (1, 8),
    ("raytron", "moe-olmoe-4l"): (1, 4), ("mcore_local", "moe-olmoe-4l"): (1, 4),
}


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


def make_spec(family, flavor, overrides, gbs, mbs):
    train = SimpleNamespace(seed=1234, seq_len=SEQ, lr=3e-4, min_lr=3e-4, warmup_steps=0, steps=10**6,
                            weight_decay=0.1, grad_clip=1.0, aux_loss_coef=0.01, global_batch_size=gbs,
                            micro_batch_size=mbs)
    return SimpleNamespace(model=SimpleNamespace(family=family, flavor=flavor, overrides=overrides), train=train,
                           resources=SimpleNamespace(use_gpu=True))


def _profile_step(engine, micro, path: str) -> None:
    """One extra optimizer step under torch.profiler: top CUDA kernels to `path` (diagnosis aid)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.train_step(micro)
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))


def run_config(impl: str, workload: str, rank: int, world: int, warmup: int, timed: int,
               batching: tuple[int, int] | None = None, profile_dir: str | None = None) -> dict:
    from megatron.core import parallel_state

    from raytron.parallelism import megatron_engine

    family, flavor, overrides, by_world = WORKLOADS[workload]
    mbs, ga = batching or BATCHING[(impl, workload)]
    fields = {"dp": 1, **by_world[world]}
    gbs = mbs * ga * fields["dp"]
    cfg = models.get_config(family, flavor, **overrides)
    total, active = models.param_counts(cfg)
    flops = models.flops_per_token(cfg, SEQ, "megatron")["total"]
    rec = {"impl": impl, "workload": workload, "family": family, "flavor": flavor, "overrides": overrides,
           "world": world, "layout": fields, "seq_len": SEQ, "micro_batch": mbs, "grad_accum": ga,
           "global_batch": gbs, "params_total": total, "params_active": active, "flops_per_token": flops}
    original = megatron_engine.build_model_chunks
    try:
        if impl == "mcore_local":
            megatron_engine.build_model_chunks = local_spec_chunks
        layout = ParallelLayout(world_size=world, micro_batch_size=mbs, global_batch_size=gbs, **fields)
        spec = make_spec(family, flavor, overrides, gbs, mbs)
        torch.cuda.reset_peak_memory_stats()
        engine = megatron_engine.MegatronEngine(spec, layout, rank, world, init_from_reference=False)
        g = torch.Generator().manual_seed(rank)
        micro = [torch.randint(0, cfg.vocab_size, (mbs, SEQ + 1), generator=g) for _ in range(ga)]
        times, losses = [], []
        for i in range(warmup + timed):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            m = engine.train_step(micro)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            losses.append(m.loss)
            if i >= warmup:
                times.append(dt)
        step_s = statistics.median(times)
        tps = gbs * SEQ / step_s / world
        rec.update(step_times_s=times, step_s=step_s, tokens_per_s_per_gpu=tps, mfu=tps * flops / PEAK_FLOPS,
                   losses=losses, peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
        if profile_dir and rank == 0:
            os.makedirs(profile_dir, exist_ok=True)
            _profile_step(engine, micro, f"{profile_dir}/profile_{impl}_{workload}_w{world}_mb{mbs}.txt")
        del engine
    except Exception as exc:  # recorded (e.g. out of memory); the other configs still run
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        rec["traceback"] = traceback.format_exc()[-3000:]
    finally:
        megatron_engine.build_model_chunks = original
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        torch.cuda.empty_cache()
    return rec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--impls", default="raytron,mcore_local")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="override the micro-batch (grad-accum scaled to keep 8 sequences per DP rank)")
    parser.add_argument("--profile", default="", help="directory for a torch.profiler table per config")
    args = parser.parse_args()
    batching = (args.micro_batch, max(1, 8 // args.micro_batch)) if args.micro_batch else None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    for workload in args.workloads.split(","):
        for impl in args.impls.split(","):
            rec = run_config(impl, workload, rank, world, args.warmup, args.timed, batching, args.profile or None)
            if rank == 0:
                rec["gpu"] = torch.cuda.get_device_name()
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                summary = rec.get("error") or (f"{rec['tokens_per_s_per_gpu']:.0f} tok/s/GPU, MFU {rec['mfu']:.1%}, "
                                               f"{rec['step_s']:.3f} s/step, peak {rec['peak_mem_gib']:.1f} GiB")
                print(f"[bench] world {world} {workload} {impl}: {summary}", flush=True)
            dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
