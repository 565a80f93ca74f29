"""`raytron export RUN_URI [--step N] --out FILE.safetensors`: a checkpoint as reference-model weights.

The file holds exactly the reference model's `state_dict()` (raytron.models.build(family, flavor,
**overrides)), so `model.load_state_dict(safetensors.torch.load_file(FILE))` works with no raytron
engine installed. From a deepspeed checkpoint: experts saved one by one as `<layer>.mixer.w_gate#<e>`
are stacked back to [experts, ffn, dim] (w_down to [experts, dim, ffn]); DeepSpeed's gate is already
saved as `<layer>.mixer.router.weight`; the router's `expert_bias` buffer, which DeepSpeed-MoE lacks
(the engine refuses aux-loss-free balancing), is exported as zeros. Only verified, committed steps are
read, and only with `weights_only` loading. Exit 0 on success, 2 when the checkpoint cannot be exported.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import torch

from ..parallelism.checkpoint import CheckpointError, CheckpointStore

EXIT_INVALID = 2
_EXPERT_KEY = re.compile(r"^(.*)#(\d+)$")


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `export` on an argparse subparsers object (from `add_subparsers()`)."""
    p = subparsers.add_parser("export", help="write a checkpoint's weights as reference-model safetensors",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_uri", help="run directory <checkpoint.uri>/<name> (or its checkpoints/ folder)")
    p.add_argument("--step", type=int, default=None, help="step to export (default: newest that verifies)")
    p.add_argument("--out", required=True, help="output .safetensors path")


def checkpoints_uri(run_uri: str) -> str:
    run_uri = run_uri.rstrip("/")
    return run_uri if run_uri.endswith("/checkpoints") else f"{run_uri}/checkpoints"


def run(args: argparse.Namespace) -> int:
    try:
        step, count = export_checkpoint(args.run_uri, args.step, args.out)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"raytron export: error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(f"[raytron] exported step {step} of {args.run_uri}: {count} tensors -> {args.out}")
    return 0


def export_checkpoint(run_uri: str, step: int | None, out: str) -> tuple[int, int]:
    """Write the reference state dict of `step` (newest verified if None) to `out`; (step, tensors)."""
    from safetensors.torch import save_file

    store = CheckpointStore(checkpoints_uri(run_uri))
    if step is None:
        chosen, skipped = store.latest(deep=True)
        if chosen is None:
            raise CheckpointError(f"no committed checkpoint verifies under {store.uri}: {skipped or 'none saved'}")
        step, manifest = chosen.step, chosen.manifest
    else:
        if step not in store.committed_steps():
            raise CheckpointError(f"step {step} is not committed under {store.uri} "
                                  f"(committed: {store.committed_steps()})")
        manifest = store.verify(step, deep=True)
    state = reference_state(store, step, manifest)
    save_file({k: v.contiguous() for k, v in state.items()}, out,
              metadata={"step": str(step), "engine": manifest.get("engine", ""), "source": store.uri})
    return step, len(state)


def reference_state(store: CheckpointStore, step: int, manifest: dict) -> dict[str, torch.Tensor]:
    # Both engines store full tensors in reference names (parallelism/ds_state.py, megatron_state.py);
    # DeepSpeed's experts come one by one (`name#e`), megatron's already stacked.
    engine = manifest.get("engine")
    if engine not in ("deepspeed", "megatron"):
        raise CheckpointError(f"step {step}: export of {engine!r} checkpoints is not supported")
    params: dict[str, torch.Tensor] = {}
    for name in sorted(n for n in manifest["files"] if n.startswith("state-")):
        params.update(store.read_shard(step, name, manifest).get("params", {}))
    return to_reference(params, manifest["model"], step)


def to_reference(params: dict[str, torch.Tensor], model_cfg: dict, step: int) -> dict[str, torch.Tensor]:
    """Reference-named engine tensors (experts one by one) -> the reference model's full state dict,
    checked name by name and shape by shape against the model the manifest describes."""
    from .. import models

    with torch.device("meta"):
        reference = models.Transformer(models.ModelConfig(**model_cfg)).state_dict(keep_vars=False)
    experts: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in params.items():
        m = _EXPERT_KEY.match(key)
        if m:
            experts.setdefault(m.group(1), {})[int(m.group(2))] = value
        else:
            out[key] = value.float()
    for name, per_expert in experts.items():
        count = reference[name].shape[0] if name in reference else len(per_expert)
        missing = sorted(set(range(count)) - set(per_expert))
        if missing:
            raise CheckpointError(f"step {step}: {name} lacks experts {missing} (a shard is missing?)")
        out[name] = torch.stack([per_expert[e].float() for e in range(count)])
    for name, ref in reference.items():
        if name not in out and name.endswith("router.expert_bias"):
            out[name] = torch.zeros(ref.shape, dtype=ref.dtype)
        elif name not in out and model_cfg.get("tie_embeddings") and name == "output.weight":
            out[name] = out["embed.weight"].clone()
    missing = sorted(set(reference) - set(out))
    extra = sorted(set(out) - set(reference))
    if missing or extra:
        raise CheckpointError(f"step {step}: checkpoint does not match the reference model: missing "
                              f"{missing[:5]}, unexpected {extra[:5]}")
    for name, ref in reference.items():
        if tuple(out[name].shape) != tuple(ref.shape):
            raise CheckpointError(f"step {step}: tensor {name} has shape {tuple(out[name].shape)}, "
                                  f"reference model has {tuple(ref.shape)}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m raytron.launcher.export RUN_URI --out FILE`)."""
    parser = argparse.ArgumentParser(prog="raytron export", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
