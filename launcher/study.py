"""`raytron study CONFIG`: pretrain every efficient-architecture family of a study on the same base job,
measure them, and write results.json, report.md and plots under the study directory.

Each family is a normal run `<out>/<family>/` started through `driver.run_job`, the call `raytron
submit` makes, so it checkpoints and resumes like any run. Running the same study again continues
where it stopped: a completed family is not retrained, a partly trained one is resumed (`--resume`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time

from .. import storage
from ..config.strict_yaml import ConfigError
from .exit_codes import EXIT_FAILED, EXIT_INVALID
from .study_config import FAMILIES, FamilyPlan, load_study, study_fingerprint

RECORD = "study.json"


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser("study", help="train and compare efficient-architecture families",
                              description="Train every family of a study config at equal active parameters "
                                          "on one base job; write results.json, report.md and plots.")
    p.add_argument("config", help="study YAML (e.g. cluster_configs/study_cpu.yaml)")
    p.add_argument("--out", default=None, help="study directory (default: <base checkpoint.uri>/study-<config name>)")
    p.add_argument("--mode", choices=("cpu", "gpu"), default=None, help="override the config's mode")
    p.add_argument("--address", default=None, help="Ray address to train on (default: embedded local Ray)")
    p.add_argument("--interrupt-at", default=None, metavar="FAMILY:STEP",
                   help="TEST HOOK: make FAMILY's run fail at STEP (an injected exception, no restarts); the "
                        "study records it as failed and trains the others; running the study again resumes it")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no family whose training, at the mean time of the families trained so far, would "
                        "end more than SECONDS after the study started; those left are reported as not run "
                        "(running the command again trains them). Leave room for the sweep and report")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    # the command as typed when run as `raytron ...`; otherwise (in-process callers, tests) its equivalent
    typed = sys.argv and os.path.basename(sys.argv[0]) == "raytron" and "study" in sys.argv
    command = shlex.join(["raytron", *sys.argv[1:]]) if typed else shlex.join(["raytron", "study", args.config])
    try:
        study, base, plans = load_study(args.config, args.mode)
        interrupt = _parse_interrupt(args.interrupt_at, plans)
        stem = os.path.splitext(os.path.basename(args.config))[0]
        out = args.out or f"{base.checkpoint.uri.rstrip('/')}/study-{stem}"
        if not storage.is_local_uri(out):
            raise ConfigError("--out", f"got {out!r}; the study directory (report, plots) must be a local path")
        out = storage.absolute_uri(out)
        if args.time_limit is not None and args.time_limit <= 0:
            raise ConfigError("--time-limit", f"got {args.time_limit}; give the seconds the training may take (> 0)")
        deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
        ok = run_study(study, base, plans, out, command, interrupt, args.address, deadline)
        return 0 if ok else EXIT_FAILED
    except (ConfigError, ValueError, FileNotFoundError, PermissionError, ConnectionError) as exc:
        print(f"raytron: error: {exc}", file=sys.stderr)
        return EXIT_INVALID


def _parse_interrupt(text: str | None, plans: list[FamilyPlan]) -> tuple[str, int] | None:
    if text is None:
        return None
    name, _, step = text.partition(":")
    names = [p.name for p in plans]
    if name not in names or not step.isdigit() or not 1 <= int(step) <= plans[names.index(name)].spec.train.steps:
        raise ConfigError("--interrupt-at", f"got {text!r}; expected FAMILY:STEP with FAMILY one of "
                                            f"{', '.join(names)} and STEP within its train.steps")
    return name, int(step)


def _claim_study_dir(out: str, fingerprint: str, command: str) -> dict:
    """The study record: written on the first run; a later run must be the same study."""
    path = storage.join(out, RECORD)
    if storage.exists(path):
        record = json.loads(storage.read_bytes(path))
        if record.get("fingerprint") != fingerprint:
            raise ConfigError("--out", f"{out} holds another study (fingerprint {record.get('fingerprint')}, this one "
                                       f"{fingerprint}): its families would not be comparable; choose another --out")
        return record
    storage.makedirs(out)
    record = {"fingerprint": fingerprint, "created": time.time(), "command": command, "wall_s": {}}
    storage.write_bytes_atomic(path, json.dumps(record, indent=1).encode())
    return record


def _save_record(out: str, record: dict) -> None:
    storage.write_bytes_atomic(storage.join(out, RECORD), json.dumps(record, indent=1).encode())


def _state(spec) -> tuple[str, int | None]:
    """('new' | 'partial' | 'completed', last committed step) of a family's run directory. A run whose
    outcome says it completed at train.steps is completed even when its checkpoints were removed since
    (to free disk, or a study directory carried to another machine without them): what the study
    measures of it (metrics, sweep) is in its small records."""
    from ..parallelism.checkpoint import CheckpointStore

    run = spec.run_dir
    if not storage.exists(run.config):
        return "new", None
    outcome = json.loads(storage.read_bytes(run.outcome)) if storage.exists(run.outcome) else {}
    if outcome.get("status") == "completed" and outcome.get("last_checkpoint") == spec.train.steps:
        return "completed", spec.train.steps
    steps = CheckpointStore(run.checkpoints).committed_steps()
    return "partial", (max(steps) if steps else None)


def _with_interrupt(spec, step: int):
    """The family's spec with the test hook's injected failure at `step` and no restart budget."""
    from ..config.spec import FaultInjectSpec

    fault = dataclasses.replace(spec.fault, max_failures=0,
                                inject=FaultInjectSpec(kind="exception", step=step, rank=0, attempt=0))
    return dataclasses.replace(spec, fault=fault)


def train_families(plans, out: str, record: dict, interrupt, address, deadline: float | None = None
                   ) -> tuple[dict[str, str], bool]:
    """Train every family not yet completed, in order. A family that fails (its run's outcome, or an error
    raised before it trained) is recorded and the next one trains. Returns ({family: error} of the failed
    ones, whether the study was stopped): a preempted run (Ctrl-C, a node's notice) stops the study there,
    as running the same command again resumes it. Past `deadline` (time.monotonic(), as estimated from the
    families trained so far) the families left are recorded as not run."""
    from .driver import run_job

    spent: list[float] = []
    failed: dict[str, str] = {}
    for i, plan in enumerate(plans, 1):
        spec = plan.spec
        state, last = _state(spec)
        unit = FAMILIES[plan.name][0]
        head = (f"[study] ({i}/{len(plans)}) {plan.name}: pattern {unit!r} x {len(plan.cfg.pattern) // len(unit)}, "
                f"dim {plan.cfg.dim}, "
                f"{plan.active_params:,} active / {plan.total_params:,} total params")
        if state == "completed":
            print(f"{head}: completed earlier, not retrained", flush=True)
            continue
        left = len(plans) - i + 1
        mean = sum(spent) / len(spent) if spent else 0.0
        if deadline is not None and time.monotonic() + mean > deadline:
            failed[plan.name] = (f"not run: the study's --time-limit would pass before it ended (a family took "
                                 f"{_fmt(mean)} on average); run the same command again to train it")
            print(f"{head}: {failed[plan.name]}", file=sys.stderr, flush=True)
            continue
        eta = f", study ETA {_fmt(mean * left)}" if spent else ""
        resume = state == "partial"
        print(f"{head}: {'resuming from step ' + str(last or 0) if resume else 'training'} to step "
              f"{spec.train.steps}{eta}", flush=True)
        if interrupt and interrupt[0] == plan.name:
            spec = _with_interrupt(spec, interrupt[1])
        t0 = time.monotonic()
        try:
            outcome = run_job(spec, resume=resume, address=address)
            status, error = outcome.status, f"{outcome.status}: {outcome.error}"
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - one family's error must not cost the others their runs
            outcome, status, error = None, "failed", f"{type(exc).__name__}: {exc}"
        took = time.monotonic() - t0
        spent.append(took)
        record["wall_s"][plan.name] = record["wall_s"].get(plan.name, 0.0) + took
        _save_record(out, record)
        if status == "completed":
            print(f"[study] {plan.name} done in {_fmt(took)}", flush=True)
            continue
        where = f" from its last checkpoint ({outcome.last_checkpoint})" if outcome else ""
        print(f"[study] {plan.name} {error}; run the same `raytron study` command again to resume it{where}",
              file=sys.stderr, flush=True)
        failed[plan.name] = error
        if status == "preempted":
            return failed, True
    return failed, False


def _sweep(plan: FamilyPlan, study, out: str) -> list[dict]:
    """The family's throughput sweep, cached in its run directory with the settings that timed it (a resumed
    study does not redo it; a study whose sweep settings changed does)."""
    from ..typed import to_dict
    from .study_measure import sweep_family

    path = plan.spec.run_dir.study_sweep
    key = {"seqs": sorted({*study.contexts, plan.spec.train.seq_len}), "sweep": to_dict(study.sweep)}
    if storage.exists(path):
        cached = json.loads(storage.read_bytes(path))
        if isinstance(cached, dict) and cached.get("key") == key:
            return cached["rows"]
    print(f"[study] sweep {plan.name}: forward+backward at contexts {key['seqs']}", flush=True)
    rows = sweep_family(plan.cfg, key["seqs"], study.sweep, study.mode, plan.spec.resources.torch_threads,
                        plan.spec.train.seed)
    storage.write_bytes_atomic(path, json.dumps({"key": key, "rows": rows}, indent=1).encode())
    return rows


def machine(mode: str) -> dict:
    import torch

    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "device": "cpu"}
    if mode == "gpu" and torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info


def run_study(study, base, plans: list[FamilyPlan], out: str, command: str, interrupt=None, address=None,
              deadline: float | None = None) -> bool:
    """Train, measure and report; True when every family completed and the report is written. A family
    that failed is listed in the report with its error and the others are measured and judged; a
    preempted family stops the study before any report."""
    from ..typed import to_dict
    from .study_measure import validation_bytes
    from .study_report import write_outputs

    out = storage.absolute_uri(out)
    plans = [dataclasses.replace(p, spec=dataclasses.replace(
        p.spec, checkpoint=dataclasses.replace(p.spec.checkpoint, uri=out))) for p in plans]
    record = _claim_study_dir(out, study_fingerprint(study, base, plans), command)
    t0 = time.monotonic()
    failed, stopped = train_families(plans, out, record, interrupt, address, deadline)
    if stopped:
        return False
    val = validation_bytes(plans[0].spec)
    info = machine(study.mode)
    families = {}
    for plan in plans:
        if plan.name in failed:
            continue
        try:
            families[plan.name] = _measure(plan, study, out, record, val, info)
        except Exception as exc:  # noqa: BLE001 - the others' measurements still make a report
            failed[plan.name] = f"measuring: {type(exc).__name__}: {exc}"
            print(f"[study] {plan.name} could not be measured: {failed[plan.name]}", file=sys.stderr, flush=True)
    results = {"command": record["command"], "resumed_by": command if command != record["command"] else None,
               "machine": info, "study": to_dict(study), "base": base.to_dict(), "out": out,
               "validation": {"tokens": val[0], "bytes": val[1]}, "families": families,
               "failed": {p.name: {"error": failed[p.name], "wall_s": record["wall_s"].get(p.name)}
                          for p in plans if p.name in failed},
               "report_s": time.monotonic() - t0}
    write_outputs(out, results, study)
    print(f"[study] done: {out}/report.md, {out}/results.json, plots {out}/*.png"
          + (f"; failed: {', '.join(results['failed'])}" if failed else ""), flush=True)
    return not failed


def _measure(plan: FamilyPlan, study, out: str, record: dict, val: tuple[int, int], info: dict) -> dict:
    """A trained family's row of results.json: its model, training metrics and throughput sweep."""
    from ..typed import to_dict
    from .study_measure import read_metrics, summarize_run

    metrics = summarize_run(plan.spec, plan.cfg, read_metrics(plan.spec.run_uri), val,
                            info["device"] if study.mode == "gpu" else None)
    sweep = _sweep(plan, study, out)
    at_train = next(r for r in sweep if r["seq"] == plan.spec.train.seq_len)
    return {
        "pattern": plan.cfg.pattern, "registry": [plan.spec.model.family, plan.spec.model.flavor],
        "model": to_dict(plan.cfg), "active_params": plan.active_params, "total_params": plan.total_params,
        "active_gap": plan.active_params / study.target_active_params - 1,
        **metrics, "peak_mem_bytes": at_train.get("peak_mem_bytes"),
        "wall_s": record["wall_s"].get(plan.name),
        "sweep": [r for r in sweep if r["seq"] in study.contexts],
    }


def _fmt(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
