"""`raytron export RUN_URI [--step N] --out FILE.safetensors`: a checkpoint as reference-model weights.

`--format hf --out DIR [--dtype bfloat16|float16|float32] [--max-shard-size 5GB]` writes a Hugging Face
transformers directory instead (launcher/export_hf.py; the same path checks, DIR in place of FILE).

The file holds exactly the reference model's `state_dict()` (raytron.models.build(family, flavor,
**overrides)), so `model.load_state_dict(safetensors.torch.load_file(FILE))` works with no raytron
engine installed. From a deepspeed checkpoint: experts saved one by one as `<layer>.mixer.w_gate#<e>`
are stacked back to [experts, ffn, dim] (w_down to [experts, dim, ffn]); DeepSpeed's gate is already
saved as `<layer>.mixer.router.weight`; the router's `expert_bias` comes from the checkpoint's buffers
(both engines save sigmoid routers' bias under its reference name), or zeros where a checkpoint has none
(softmax routers in the megatron engine). Only verified, committed steps are
read, and only with `weights_only` loading. Exit 0 on success, 2 when the checkpoint cannot be exported.

Paths are checked before the checkpoint is read: RUN_URI must be a directory; --out must name a file
(not a directory) in an existing directory, must not exist unless --force is given, and never lies
inside the run's checkpoints/ (not even with --force). The file is written under a temporary name
beside --out and then renamed, so an interrupted export never leaves a truncated file under that name.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import sys
from typing import Any

import torch

from .. import storage
from ..parallelism.checkpoint import CheckpointError, CheckpointStore
from ..run_dir import STEP_PATTERN, RunDir
from .exit_codes import EXIT_INVALID
from ..parallelism.engines import engine_names


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
    p.add_argument("--out", required=True,
                   help="output .safetensors file (local path or fsspec URI; its directory must exist; "
                        "never inside the run's checkpoints/)")
    p.add_argument("--force", action="store_true", help="replace --out if it already exists")
    p.add_argument("--format", choices=("raytron", "hf"), default="raytron",
                   help="raytron: one .safetensors file of the reference model's state dict (default); "
                        "hf: a Hugging Face transformers directory (Llama/Mistral/Mixtral, docs/huggingface.md)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="--format hf: tensor dtype of the shards (default float32)")
    p.add_argument("--max-shard-size", default=None, help="--format hf: largest shard, e.g. 5GB (default)")


def checkpoints_uri(run_uri: str) -> str:
    return RunDir.given(run_uri).checkpoints


def run(args: argparse.Namespace) -> int:
    try:
        if args.format == "hf":
            step, count = export_hf_checkpoint(args.run_uri, args.step, args.out, force=args.force,
                                               dtype=args.dtype or "float32",
                                               max_shard_size=args.max_shard_size or "5GB")
            print(f"[raytron] exported step {step} of {args.run_uri}: {count} shard(s) -> {args.out}")
            return 0
        for flag in ("dtype", "max_shard_size"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} applies to --format hf only (--format raytron "
                                 f"writes the checkpoint's fp32 tensors in one file)")
        step, count = export_checkpoint(args.run_uri, args.step, args.out, force=args.force)
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"raytron export: error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError (e.g. --out under /proc)
        if type(exc).__name__ != "SafetensorError":
            raise
        print(f"raytron export: error: cannot write --out {args.out}: {exc}; choose a writable location",
              file=sys.stderr)
        return EXIT_INVALID
    print(f"[raytron] exported step {step} of {args.run_uri}: {count} tensors -> {args.out}")
    return 0


def export_checkpoint(run_uri: str, step: int | None, out: str, force: bool = False) -> tuple[int, int]:
    """Write the reference state dict of `step` (newest verified if None) to `out`; (step, tensors).
    `out` is refused (ValueError, before anything is read) if it exists and not `force`, and always if
    it lies inside the run's checkpoints/."""
    check_paths(run_uri, out, force)
    store = CheckpointStore(checkpoints_uri(run_uri))
    step, manifest = choose_step(store, step)
    state = reference_state(store, step, manifest)
    write_atomic(out, {k: v.contiguous() for k, v in state.items()},
                 {"step": str(step), "engine": manifest.get("engine", ""), "source": store.uri}, force)
    return step, len(state)


def export_hf_checkpoint(run_uri: str, step: int | None, out: str, force: bool = False, dtype: str = "float32",
                         max_shard_size: str = "5GB") -> tuple[int, int]:
    """Write `step` (newest verified if None) as a Hugging Face model directory `out`; (step, shards).
    Paths, sizes and the model's exportability are checked before the checkpoint is read."""
    import shutil

    from . import export_hf
    from .. import models
    from ..models.hf_format import HFFormatError, hf_model_type

    max_bytes = export_hf.parse_size(max_shard_size)
    out = check_paths(run_uri, out, force, directory=True)
    spec = export_hf.run_spec(run_uri)
    export_hf.check_exportable(spec)
    store = CheckpointStore(checkpoints_uri(run_uri))
    step, manifest = choose_step(store, step)
    model_cfg = models.ModelConfig(**manifest["model"])
    try:
        hf_model_type(model_cfg)
    except HFFormatError as exc:
        raise ValueError(f"step {step} cannot be exported as a Hugging Face model: {exc}") from None
    ref = reference_state(store, step, manifest)
    tmp = export_hf.local_tmp_dir(out)
    try:
        count = export_hf.build_directory(tmp, spec, model_cfg, ref, dtype, max_bytes)
        export_hf.place(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return step, count


def choose_step(store: CheckpointStore, step: int | None) -> tuple[int, dict]:
    """(step, verified manifest): `step`, or the newest committed step that verifies when None."""
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
    return step, manifest


def check_paths(run_uri: str, out: str, force: bool, directory: bool = False) -> str:
    """Refuse (ValueError) a RUN_URI that is a file and an --out that cannot or must not be written,
    before any checkpoint is read; returns --out. `directory`: --out is a directory to create (returned
    without a trailing `/`)."""
    if storage.isfile(run_uri):
        raise ValueError(f"RUN_URI {run_uri} is a file, not a run directory: pass the run directory "
                         f"<checkpoint.uri>/<name> (the folder that holds checkpoints/)")
    out_path, target = storage.store_path(out), out.rstrip("/") if directory else out
    if storage.is_inside(out, checkpoints_uri(run_uri)):
        raise ValueError(f"--out {out} is inside the run's checkpoints directory {checkpoints_uri(run_uri)}; "
                         f"it would damage committed checkpoints (refused even with --force): "
                         f"choose an --out outside it")
    if any(STEP_PATTERN.fullmatch(part) for part in out_path.replace(os.sep, "/").split("/")[:-1]):
        raise ValueError(f"--out {out} is inside a checkpoint step folder; it would damage a committed "
                         f"checkpoint (refused even with --force): choose an --out outside it")
    if directory:
        if storage.isfile(target):
            raise ValueError(f"--out {out} is a file; --format hf writes a directory: choose a directory name")
    elif out.endswith("/") or storage.isdir(out):
        raise ValueError(f"--out {out} is a directory: give a file name, e.g. "
                         f"{out.rstrip('/')}/weights.safetensors")
    if storage.exists(target) and not force:
        raise ValueError(f"--out {out} already exists: pass --force to replace it, or choose another --out")
    parent = posixpath.dirname(out_path.rstrip("/"))
    if storage.local_path(out) is not None and parent:
        if os.path.isfile(parent):
            raise ValueError(f"--out {out}: {parent} is a file, not a directory: choose an --out in a directory")
        if not os.path.isdir(parent):
            raise ValueError(f"--out {out}: directory {parent} does not exist: create it first "
                             f"(mkdir -p {parent}) or choose an --out in an existing directory")
        if not os.access(parent, os.W_OK):
            raise PermissionError(f"--out {out}: directory {parent} is not writable: choose another --out")
    return target


def write_atomic(out: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], force: bool) -> None:
    """Write safetensors to `out` through a temporary file that becomes `out` only when complete
    (storage.staged_file: a rename beside it locally, one upload to object storage), so an interrupted
    export leaves no truncated file under that name; without `force`, a file that appeared at `out`
    while this export ran is kept."""
    import safetensors.torch

    try:
        with storage.staged_file(out, replace=force) as tmp:
            safetensors.torch.save_file(tensors, tmp, metadata=metadata)
    except FileExistsError:
        raise ValueError(f"--out {out} appeared while exporting: pass --force to replace it") from None


def reference_state(store: CheckpointStore, step: int, manifest: dict) -> dict[str, torch.Tensor]:
    """The reference model's state dict from a committed step of either engine, read as the canonical engine
    state (parallelism/engine_state.py: experts stacked, routing biases among the buffers)."""
    from .. import models
    from ..parallelism.engine_state import merge_state

    engine = manifest.get("engine")
    if engine not in engine_names():
        raise CheckpointError(f"step {step}: export of {engine!r} checkpoints is not supported")
    shards = [store.read_shard(step, name, manifest) for name in sorted(manifest["files"]) if name.startswith("state-")]
    try:
        state = merge_state(shards, models.ModelConfig(**manifest["model"]))
    except ValueError as exc:
        raise CheckpointError(f"step {step}: {exc}") from None
    return to_reference({**state.get("params", {}), **state["buffers"]}, manifest["model"], step)


def to_reference(params: dict[str, torch.Tensor], model_cfg: dict, step: int) -> dict[str, torch.Tensor]:
    """Reference-named engine tensors (experts stacked) -> the reference model's full state dict, checked
    name by name and shape by shape against the model the manifest describes."""
    from .. import models

    with torch.device("meta"):
        reference = models.Transformer(models.ModelConfig(**model_cfg)).state_dict(keep_vars=False)
    out = {name: value.float() for name, value in params.items()}
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
