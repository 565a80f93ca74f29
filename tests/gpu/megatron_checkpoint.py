"""GPU program: the megatron engine's checkpoint state resumes under another layout (run under torchrun).

For each case of this world size: engine A (layout A) trains K steps on the synthetic batches of
megatron_equivalence.py; its state is gathered in reference names (parallelism/megatron/state.py, the
path `raytron submit` checkpoints take); A trains M more steps (the uninterrupted curve). Engine B
(layout B, fresh process groups) loads that state, gathers it again (every tensor's digest must equal
the saved one: fp32 masters and both Adam moments, bit for bit) and trains the same M steps: its losses
must follow A's (bitwise-close when B's layout is A's, within bf16 reduction-order noise otherwise).
Rank 0 appends one JSON line per case to `--out`.

    torchrun --nproc_per_node=2 tests/gpu/megatron_checkpoint.py --out checkpoint.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run by path (torchrun, python FILE): the repository root holds `tests`
    sys.path.append(str(Path(__file__).resolve().parents[2]))
from tests.gpu.gpu_worlds import shard  # noqa: E402
from tests.gpu.megatron_equivalence import MICRO_BATCH, GLOBAL_BATCH, global_batch, make_spec  # noqa: E402

from raytron.parallelism.layout import ParallelLayout  # noqa: E402

K, M = 6, 6
CASES = {  # name -> (world, family, layout A, layout B)
    "EP2->EP2": (2, "moe", {"dp": 2, "ep": 2}, {"dp": 2, "ep": 2}),
    "TP2->DP2": (2, "dense", {"tp": 2}, {"dp": 2}),
    "PP2->TP2": (2, "dense", {"pp": 2}, {"tp": 2}),
    "EP2->PP2": (2, "moe", {"dp": 2, "ep": 2}, {"pp": 2}),
    "TP2xEP2->PP2xEP2": (4, "moe", {"tp": 2, "dp": 2, "ep": 2}, {"pp": 2, "dp": 2, "ep": 2}),
}


def _layout(world: int, fields: dict) -> ParallelLayout:
    return ParallelLayout(world_size=world, micro_batch_size=MICRO_BATCH, global_batch_size=GLOBAL_BATCH,
                          **{"dp": 1, **fields})


def _train(engine, layout, rank: int, first: int, count: int) -> list[float]:
    dp_rank, ga = layout.coords(rank)["dp"], layout.grad_accum
    losses = []
    for step in range(first, first + count):
        micro = global_batch(step, engine.model_cfg.vocab_size).split(MICRO_BATCH)
        losses.append(engine.train_step(list(micro[dp_rank * ga:(dp_rank + 1) * ga])).loss)
    return losses


def run_case(name: str, rank: int, world: int) -> dict:
    from megatron.core import parallel_state

    from raytron.launcher.canary import state_digests
    from raytron.parallelism.megatron import state as megatron_state
    from raytron.parallelism.megatron.engine import MegatronEngine

    _, family, fields_a, fields_b = CASES[name]
    spec = make_spec(family, K + M)
    rec = {"case": name, "family": family, "world": world, "K": K, "M": M}
    try:
        la, lb = _layout(world, fields_a), _layout(world, fields_b)
        rec["layout_a"], rec["layout_b"] = la.describe(), lb.describe()
        a = MegatronEngine(spec, la, rank, world)
        rec["a_first"] = _train(a, la, rank, 0, K)
        t0 = time.perf_counter()
        state, writes = megatron_state.gather_state(a)
        rec["gather_s"] = time.perf_counter() - t0
        rec["a_cont"] = _train(a, la, rank, K, M)
        del a
        parallel_state.destroy_model_parallel()
        torch.cuda.empty_cache()
        box = [state if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
        b = MegatronEngine(spec, lb, rank, world)
        t0 = time.perf_counter()
        megatron_state.load_state(b, state)
        rec["load_s"] = time.perf_counter() - t0
        again, _ = megatron_state.gather_state(b)
        if rank == 0:
            want, got = state_digests(state), state_digests(again)
            rec["tensors"] = len(want)
            rec["digest_mismatch"] = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        rec["steps_done_b"] = b.steps_done
        rec["b_cont"] = _train(b, lb, rank, K, M)
        rec["max_abs_dloss"] = max(abs(x - y) for x, y in zip(rec["a_cont"], rec["b_cont"]))
        del b
    except Exception as exc:  # recorded; the remaining cases still run
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc()[-4000:]
    parallel_state.destroy_model_parallel()
    torch.cuda.empty_cache()
    return rec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard", default="", help="INDEX/COUNT: this program's share of this world's cases")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    for name in shard([name for name, (size, *_rest) in CASES.items() if size == world], args.shard):
        t0 = time.perf_counter()
        rec = run_case(name, rank, world)
        if rank == 0:
            rec["gpu"] = torch.cuda.get_device_name()
            rec["case_s"] = time.perf_counter() - t0
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"[checkpoint] {name}: {rec.get('error') or rec.get('max_abs_dloss')}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
