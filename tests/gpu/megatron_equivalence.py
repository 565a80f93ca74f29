"""GPU equivalence program for the megatron engine (run under torchrun; see tests/gpu/README.md).

For each case of this world size (family x layout): the single-device reference model (fp32, same
seed, same batches, AdamW, grad clipping) and the megatron engine (bf16, fp32 masters, distributed
optimizer) train `--steps` steps on the same synthetic global batches. Rank 0 appends one JSON line per
case to `--out`: per-step loss, aux loss and grad norm of both, plus the mapping check (megatron weights
exported back to reference names equal the reference weights rounded to bf16).

    torchrun --nproc_per_node=2 tests/gpu/megatron_equivalence.py --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raytron import models
from raytron.parallelism.layout import ParallelLayout

if __package__ in (None, ""):  # run by path (torchrun, python FILE): the repository root holds `tests`
    sys.path.append(str(Path(__file__).resolve().parents[2]))
from tests.gpu.gpu_worlds import shard  # noqa: E402

GLOBAL_BATCH, MICRO_BATCH, SEQ = 8, 2, 64
LAYOUTS = {  # name -> (world, layout fields, families)
    "single": (1, {}, ("dense", "moe", "hybrid", "hybrid-moe", "dense-4l", "moe-4l", "moe-shared", "moe-sigmoid",
                       "moe-sigmoid-no-bias", "moe-sigmoid-slow-bias", "moe-mla", "moe-mla-sigmoid", "moe-mla-no-norm",
                       "moe-softmax-to-sigmoid")),
    "TP2": (2, {"tp": 2}, ("dense", "moe", "hybrid", "moe-sigmoid")),  # moe: experts replicated over TP (ep=etp=1)
    "PP2": (2, {"pp": 2}, ("dense", "moe", "hybrid", "hybrid-moe", "moe-sigmoid", "moe-mla")),
    "EP2": (2, {"dp": 2, "ep": 2}, ("moe", "hybrid-moe", "moe-shared", "moe-sigmoid", "moe-mla")),
    # hybrids: linear mixers pass halos and states between CP ranks, attention heads go by all-to-all
    "CP2": (2, {"cp": 2}, ("dense", "moe", "hybrid", "hybrid-moe", "moe-sigmoid")),
    "DP2": (2, {"dp": 2}, ("dense", "moe", "hybrid")),
    "TP2xEP2": (4, {"tp": 2, "dp": 2, "ep": 2}, ("moe", "hybrid-moe")),
    "PP2xEP2": (4, {"pp": 2, "dp": 2, "ep": 2}, ("moe",)),
    "TP2xPP2": (4, {"tp": 2, "pp": 2}, ("dense", "moe", "hybrid")),
    "PP2v2": (2, {"pp": 2, "vpp": 2}, ("dense-4l", "moe-4l")),  # interleaved, 4 micro-batches
    # expert-TP: each expert's FFN split over 2 ranks
    "ETP2xEP2": (4, {"dp": 4, "ep": 2, "etp": 2}, ("moe", "moe-sigmoid", "moe-mla")),
}
# Engine options on GPU: a layout run again with a train option on, as cases of their own (each record says
# which options ran): "<layout>+<option>" -> (layout, train options, families)
VARIANTS = {
    "EP2+moe-comm": ("EP2", ("overlap_moe_comm",), ("moe", "hybrid-moe", "moe-shared", "moe-sigmoid", "moe-mla")),
    "TP2xEP2+moe-comm": ("TP2xEP2", ("overlap_moe_comm",), ("moe", "hybrid-moe")),
    "DP2+grad-overlap": ("DP2", ("overlap_grad_reduce",), ("dense", "moe", "hybrid")),
    "EP2+grad-overlap": ("EP2", ("overlap_grad_reduce",), ("moe", "hybrid-moe", "moe-sigmoid", "moe-mla")),
    "TP2xEP2+grad-overlap": ("TP2xEP2", ("overlap_grad_reduce",), ("moe",)),
}
LAYOUTS.update({name: (*LAYOUTS[base][:2], families) for name, (base, _, families) in VARIANTS.items()})
FAMILIES = {"dense": ("dense", "debug", {}), "moe": ("moe", "debug", {}),
            "hybrid": ("hybrid", "debug", {}),  # "G-*-M-W-": Gated DeltaNet, attention, Mamba2, sliding window
            "hybrid-moe": ("hybrid", "debug-moe", {}),  # "GEBE|GE*E": + block-sparse attention, MoE, '|' stages
            "dense-4l": ("dense", "debug", {"num_layers": 4}),  # 4 blocks: pp * vpp = 4 stages
            "moe-4l": ("moe", "debug", {"num_layers": 4}),
            "moe-shared": ("moe", "debug", {"shared_experts": 1}),  # megatron's SharedExpertMLP beside the experts
            # DeepSeek-V3 routing: sigmoid scores, normalised top-k, aux-loss-free bias (updated after every step
            # by megatron-core and by the reference), a shared expert; and the bias rate at its edges
            "moe-sigmoid": ("moe", "debug-sigmoid", {}),
            "moe-sigmoid-no-bias": ("moe", "debug-sigmoid", {"bias_update_rate": 0.0}),
            "moe-sigmoid-slow-bias": ("moe", "debug-sigmoid", {"bias_update_rate": 0.001}),
            "moe-softmax-to-sigmoid": ("moe", "debug", {"router": "sigmoid"}),
            # multi-head latent attention (parallelism/megatron/mla.py), with either router and no top-k renorm
            "moe-mla": ("moe", "debug-mla", {}),
            "moe-mla-sigmoid": ("moe", "debug-mla", {"router": "sigmoid"}),
            "moe-mla-no-norm": ("moe", "debug-mla", {"norm_topk": False})}


def make_spec(family: str, steps: int) -> SimpleNamespace:
    from raytron.config.spec import ResourcesSpec, TrainSpec
    from raytron.typed import field_defaults

    fam, flavor, overrides = FAMILIES[family]
    train = SimpleNamespace(**{**field_defaults(TrainSpec), **dict(
        seed=1234, seq_len=SEQ, lr=3e-3, min_lr=3e-3, warmup_steps=0, steps=steps, weight_decay=0.1, grad_clip=1.0,
        aux_loss_coef=0.01, global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH)})
    return SimpleNamespace(model=SimpleNamespace(family=fam, flavor=flavor, overrides=overrides), train=train,
                           resources=SimpleNamespace(**{**field_defaults(ResourcesSpec), "use_gpu": True}))


def global_batch(step: int, vocab: int) -> torch.Tensor:
    """[GLOBAL_BATCH, SEQ+1] learnable synthetic sequences: arithmetic progressions mod vocab, 5% noise."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, vocab, (GLOBAL_BATCH, 1), generator=g)
    stride = torch.randint(1, 8, (GLOBAL_BATCH, 1), generator=g)
    seq = (start + stride * torch.arange(SEQ + 1)) % vocab
    noise = torch.rand(seq.shape, generator=g) < 0.05
    return torch.where(noise, torch.randint(0, vocab, seq.shape, generator=g), seq)


def reference_run(spec, steps: int, device) -> dict:
    torch.manual_seed(spec.train.seed)
    model = models.build(spec.model.family, spec.model.flavor, **spec.model.overrides).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.train.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=spec.train.lr, betas=(0.9, 0.95), eps=1e-8)
    out = {"loss": [], "aux_loss": [], "grad_norm": []}
    for step in range(steps):
        opt.zero_grad()
        micro = global_batch(step, model.cfg.vocab_size).to(device).split(MICRO_BATCH)
        lm_sum = aux_sum = 0.0
        for mb in micro:
            logits = model(mb[:, :-1])
            lm = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), mb[:, 1:].reshape(-1))
            aux = torch.stack(model.aux_losses()).sum() if model.aux_losses() else torch.zeros((), device=device)
            ((lm + spec.train.aux_loss_coef * aux) / len(micro)).backward()
            lm_sum, aux_sum = lm_sum + lm.item(), aux_sum + aux.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.grad_clip)
        opt.step()
        for moe in model.moe_layers():  # the aux-loss-free bias step, as the engines take it after each step
            moe.update_bias()
        out["loss"].append(lm_sum / len(micro))
        out["aux_loss"].append(aux_sum / len(micro))
        out["grad_norm"].append(float(norm))
    return out


def mapping_error(engine, spec) -> float:
    """Max |exported megatron weight - reference weight rounded to bf16| (0 when the mapping is exact)."""
    torch.manual_seed(spec.train.seed)
    ref = models.build(spec.model.family, spec.model.flavor, **spec.model.overrides).state_dict()
    exported = engine.export_reference()
    return max(float((exported[k] - v.to(torch.bfloat16).float()).abs().max()) for k, v in ref.items())


def megatron_run(spec, layout: ParallelLayout, rank: int, world: int, steps: int) -> dict:
    from raytron.parallelism.megatron.engine import MegatronEngine

    t0 = time.perf_counter()
    engine = MegatronEngine(spec, layout, rank, world)
    build_s = time.perf_counter() - t0
    out = {"loss": [], "aux_loss": [], "grad_norm": [], "mapping_max_abs_err": mapping_error(engine, spec),
           "build_s": build_s}
    dp_rank, ga = layout.coords(rank)["dp"], layout.grad_accum
    t0 = time.perf_counter()
    for step in range(steps):
        micro = global_batch(step, engine.model_cfg.vocab_size).split(MICRO_BATCH)
        m = engine.train_step(list(micro[dp_rank * ga:(dp_rank + 1) * ga]))
        out["loss"].append(m.loss)
        out["aux_loss"].append(m.aux_loss)
        out["grad_norm"].append(m.grad_norm)
        if step == 0:
            torch.cuda.synchronize()
            out["first_step_s"] = time.perf_counter() - t0  # compilation and communicator set-up land here
    torch.cuda.synchronize()
    out["seconds"] = time.perf_counter() - t0
    out["eval_loss"] = engine.eval_loss(list(global_batch(10_000, engine.model_cfg.vocab_size)
                                             .split(MICRO_BATCH)[dp_rank * ga:(dp_rank + 1) * ga]))
    del engine
    return out


def case_weight(case: tuple[str, str]) -> float:
    """Relative cost of a (layout, family) case for sharding: the hybrids compile FlexAttention and the
    state-space kernels (~3x a dense case's time on GPU)."""
    return 3.0 if case[1].startswith("hybrid") else 1.0


_REFERENCES: dict[tuple[str, int], dict] = {}


def run_case(name: str, family: str, fields: dict, steps: int, rank: int, world: int) -> dict:
    spec = make_spec(family, steps)
    options = VARIANTS[name][1] if name in VARIANTS else ()  # a variant's train options, on
    spec.train.overlap_grad_reduce = "overlap_grad_reduce" in options
    spec.train.overlap_moe_comm = "overlap_moe_comm" in options
    layout = ParallelLayout(world_size=world, micro_batch_size=MICRO_BATCH, global_batch_size=GLOBAL_BATCH,
                            **{"dp": 1, **fields})
    record = {"layout": name, "family": family, "world": world, "layout_fields": layout.describe(),
              "overlap_grad_reduce": spec.train.overlap_grad_reduce, "overlap_moe_comm": spec.train.overlap_moe_comm}
    try:
        record["megatron"] = megatron_run(spec, layout, rank, world, steps)
        if rank == 0:  # the reference depends on the family only: trained once per program and family
            key = (family, steps)
            if key not in _REFERENCES:
                t0 = time.perf_counter()
                _REFERENCES[key] = reference_run(spec, steps, torch.device("cuda"))
                _REFERENCES[key]["seconds"] = time.perf_counter() - t0
            record["reference"] = _REFERENCES[key]
    except Exception as exc:  # recorded, and the remaining cases still run
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()[-4000:]
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    torch.cuda.empty_cache()
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", default="", help="comma-separated layout names")
    parser.add_argument("--families", default="", help="comma-separated families (FAMILIES keys)")
    parser.add_argument("--shard", default="", help="INDEX/COUNT: this program's share of the selected cases "
                        "(weighted split, hybrids count 3), so several programs can run side by side")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    wanted = set(filter(None, args.only.split(",")))
    families_wanted = set(filter(None, args.families.split(",")))
    cases = [(name, family) for name, (size, _, families) in LAYOUTS.items() for family in families
             if size == world and (not wanted or name in wanted) and (not families_wanted or family in families_wanted)]
    for name, family in shard(cases, args.shard, weight=case_weight):
        t0 = time.perf_counter()
        record = run_case(name, family, LAYOUTS[name][1], args.steps, rank, world)
        if rank == 0:
            record["gpu"] = torch.cuda.get_device_name()
            record["case_s"] = time.perf_counter() - t0
            record["shard"] = args.shard or "0/1"
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
            status = record.get("error") or (f"loss0 {record['megatron']['loss'][0]:.5f} "
                                             f"vs ref {record['reference']['loss'][0]:.5f}")
            print(f"[equivalence] {name} {family}: {status} ({record['case_s']:.1f} s)", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
