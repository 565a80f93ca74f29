"""`raytron plan CONFIG [--set k=v ...]`: validate a job and explain it, without Ray and without GPUs.

Prints the layout (rank -> coordinates and node), parameter counts, FLOPs per token and a per-GPU memory
estimate with its assumptions. Exit 0 when the job is valid, 2 (error on stderr) when it is not.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from ..config.spec import JobSpec, load_spec
from ..config.strict_yaml import ConfigError
from .exit_codes import EXIT_INVALID


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `plan` on an argparse subparsers object (from `add_subparsers()`)."""
    p = subparsers.add_parser("plan", help="validate a job config and show its layout, size and memory",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="job YAML (local path or fsspec URI)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set layout.tp=2 (repeatable; YAML value syntax)")
    p.add_argument("--name", default=None, help="override the run name")
    p.add_argument("--max-ranks", type=int, default=64,
                   help="print at most this many rows of the rank table (default 64; 0 for all)")
    p.add_argument("--resume-from", default=None, metavar="URI",
                   help="say whether this checkpoint (run dir, checkpoints/, a step dir or one under "
                        "checkpoints/rejected/) loads under the config's layout and what gets resharded; verifies "
                        "it as the resume does (manifest, sizes, SHA-256, tensor names), unpickles nothing")


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Plan the job named by `args`; returns the process exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    if getattr(args, "resume_from", None):
        from .resume_plan import run_resume_plan

        return run_resume_plan(args, out, err)
    try:
        spec = load_spec(args.config, args.overrides, args.name)
        from .validate import check_data_cache, validate_job

        layout = validate_job(spec)
        check_data_cache(spec)
        report = build_report(spec, layout)
    except ConfigError as exc:
        print(f"raytron plan: invalid config {args.config}: {exc}", file=err)
        return EXIT_INVALID
    out.write(format_report(spec, layout, report, getattr(args, "max_ranks", 64)))
    return 0


def build_report(spec: JobSpec, layout: Any) -> dict[str, Any]:
    """Parameter counts, FLOPs and memory of a validated job (imports torch for meta-device counting)."""
    from ..parallelism.estimate import flops_per_token, model_stats
    from ..parallelism.layout import model_config_from_spec
    from ..parallelism.memory import estimate_memory
    from .vocab import vocab_line, with_tokenizer_vocab

    flavor_vocab = model_config_from_spec(spec).vocab_size
    cfg = model_config_from_spec(with_tokenizer_vocab(spec))
    stats = model_stats(cfg)
    seq = spec.train.seq_len
    return {
        "cfg": cfg, "stats": stats,
        "vocab": vocab_line(spec, flavor_vocab, cfg.vocab_size, cfg.dim, stats.tied),
        "flops": flops_per_token(cfg, seq),
        "memory": estimate_memory(cfg, stats, layout, seq_len=seq, use_gpu=spec.resources.use_gpu,
                                  engine=spec.engine, recompute=spec.train.recompute),
    }


def _fmt_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def _fmt_flops(n: float) -> str:
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}FLOP"
    return f"{n:.0f} FLOP"


def _memory_unit(peak: float) -> tuple[str, float]:
    return ("GiB", float(1 << 30)) if peak >= (1 << 30) else ("MiB", float(1 << 20))


def format_report(spec: JobSpec, layout: Any, report: dict[str, Any], max_ranks: int = 64) -> str:
    stats, mem = report["stats"], report["memory"]
    train, tokens_step = spec.train, spec.train.global_batch_size * spec.train.seq_len
    lines = [
        f"job        {spec.name}  engine={spec.engine}  model={spec.model.family}/{spec.model.flavor}"
        + (f" overrides={dict(spec.model.overrides)}" if spec.model.overrides else ""),
        f"layout     {layout.describe()}",
        f"batch      global {train.global_batch_size} = micro {train.micro_batch_size} x grad_accum "
        f"{layout.grad_accum} x dp {layout.dp}; seq_len {train.seq_len}; {_fmt_count(tokens_step)} tokens/step",
        report["vocab"],
        f"params     total {_fmt_count(stats.total_params)}, active {_fmt_count(stats.active_params)} "
        f"(embedding {_fmt_count(stats.embedding_params)}{', tied' if stats.tied else ''})",
        f"FLOPs      {_fmt_flops(report['flops'])}/token train (3 x forward; causal attention halved, "
        f"logits counted, MoE active experts only); {_fmt_flops(report['flops'] * tokens_step)}/step",
    ]
    unit, size = _memory_unit(mem.worst.total)
    lines += [f"memory per GPU ({unit}; per worker process on CPU), by pipeline stage:",
              "  stage   weights     grads optimizer activations     total"]
    for s in mem.stages:
        cols = (s.weights, s.grads, s.optimizer, s.activations, s.total)
        lines.append(f"  {s.stage:5d} " + " ".join(f"{c / size:9.2f}" for c in cols[:3])
                     + f" {cols[3] / size:11.2f} {cols[4] / size:9.2f}")
    lines.append(f"  peak   {mem.worst.total / size:.2f} {unit} on stage {mem.worst.stage}")
    lines += [f"  assumes {a}" for a in mem.assumptions]
    lines += _rank_table(layout, max_ranks)
    lines += _placement_notes(layout) + _engine_notes(spec)
    return "\n".join(lines) + "\n"


def _rank_table(layout: Any, max_ranks: int) -> list[str]:
    keys = ("dp", "pp", "tp", "cp", "ep", "etp", "edp")
    lines = ["ranks (dense mesh tp-cp-dp-pp, expert mesh etp-ep-edp-pp; first = fastest):",
             "  rank node " + " ".join(f"{k:>3}" for k in keys)]
    shown = range(layout.world_size) if max_ranks <= 0 else range(min(max_ranks, layout.world_size))
    for r in shown:
        c = layout.coords(r)
        lines.append(f"  {r:4d} {layout.node_of(r):4d} " + " ".join(f"{c[k]:3d}" for k in keys))
    if len(shown) < layout.world_size:
        lines.append(f"  ... {layout.world_size - len(shown)} more (--max-ranks 0 shows all)")
    return lines


def _engine_notes(spec: JobSpec) -> list[str]:
    """What the chosen engine cannot run yet: the layout is sound, but `submit` will refuse it."""
    from ..parallelism.layout import model_config_from_spec
    from ..parallelism.layout_rules import engine_gaps
    from .vocab import with_tokenizer_vocab

    spec = with_tokenizer_vocab(spec)
    return [f"NOT RUNNABLE YET on engine {spec.engine}: {field}: {reason}"
            for field, reason in engine_gaps(spec, model_config_from_spec(spec))]


def _placement_notes(layout: Any) -> list[str]:
    lines = []
    if layout.tp > 1:
        lines.append(f"node-local TP groups (size {layout.tp}): {layout.groups('tp')[:4]}"
                     + (" ..." if len(layout.groups("tp")) > 4 else ""))
    if layout.ep > 1:
        where = "inside one node each" if layout.ep_node_local else "SPANNING NODES (all-to-all over the network)"
        lines.append(f"EP groups (size {layout.ep}): {where}: {layout.groups('ep')[:2]}"
                     + (" ..." if len(layout.groups("ep")) > 2 else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m raytron.launcher.plan CONFIG`)."""
    parser = argparse.ArgumentParser(prog="raytron plan", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
