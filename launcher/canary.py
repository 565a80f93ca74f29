"""Canary restore: after loading a checkpoint under another layout, prove the reshard was lossless.

Every rank gathers the engine state again in reference names (the same collective path a save takes),
hashes the tensors it would write, and the digests of all ranks together must equal the digests of
the source checkpoint's tensors, name for name: parameters, both Adam moments and buffers. A tensor
that is missing, extra or different stops the job before training continues, with the tensor named.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from ..parallelism.checkpoint import CheckpointError
from ..parallelism.engine_state import split_experts

SECTIONS = ("params", "exp_avg", "exp_avg_sq", "buffers")


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of dtype, shape and bytes (bitwise: a resharded fp32 master must be an exact copy)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def state_digests(state: dict) -> dict[str, str]:
    """{"<section>/<tensor name>": digest} over the tensor sections of a reference-named state. Experts are
    digested one by one (`name#e`), whether a state holds them stacked or split (as deepspeed's ranks
    gather them), so the states of both engines compare key for key."""
    return {f"{section}/{name}": tensor_digest(t)
            for section in SECTIONS for name, t in split_experts(state.get(section, {})).items()}


def layout_changed(manifest: dict, layout, world: int) -> bool:
    return manifest.get("world_size") != world or manifest.get("layout") != layout.to_dict()


def _describe(layout: dict, world: int) -> str:
    keys = ("tp", "pp", "ep", "dp", "zero_stage")
    return f"world {world} " + " ".join(f"{k}={layout.get(k)}" for k in keys if k in layout)


def canary_restore(engine, tensors: dict, source_state: dict, step: int, manifest: dict, world: int) -> int:
    """Collective. `tensors`: this rank's share of the state `engine` holds after loading. Raises
    CheckpointError naming the first tensor whose digest differs from the source checkpoint's after
    resharding. Returns the number of tensors compared."""
    gathered: list = [None] * world
    dist.all_gather_object(gathered, state_digests(tensors))
    got: dict[str, str] = {}
    for part in gathered:
        got.update(part)
    want = state_digests(source_state)
    moved = (f"{_describe(manifest.get('layout', {}), manifest.get('world_size'))} -> "
             f"{_describe(engine.layout.to_dict(), world)}")
    for key in sorted(set(want) | set(got)):
        if key not in got:
            problem = "is missing from the resharded state"
        elif key not in want:
            problem = "is not in the checkpoint"
        elif got[key] != want[key]:
            problem = f"differs from the checkpoint (sha256 {got[key]} != {want[key]})"
        else:
            continue
        raise CheckpointError(f"canary restore failed for step {step}: tensor {key} {problem} after "
                              f"resharding {moved}; training stopped before it continued")
    if dist.get_rank() == 0:
        print(f"[raytron] canary restore passed for step {step}: {len(want)} tensors bitwise equal "
              f"after resharding {moved}", flush=True)
    return len(want)
