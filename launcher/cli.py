"""`raytron` command line: submit, plan, data prepare, runs/status/logs/stop, cluster, export, study.

Exit codes: 0 success; 1 the job ran and failed; 2 the config, data or command line was refused
before anything started; 3 the job was preempted more often than fault.max_preemptions, or the driver
got Ctrl-C / SIGTERM and the workers committed a checkpoint (resumable); 130 a second Ctrl-C aborted it.
"""

from __future__ import annotations

import argparse
import sys

from ..run_dir import RunDir
from .exit_codes import EXIT_ABORTED, EXIT_FAILED, EXIT_INVALID, EXIT_PREEMPTED


def _add_submit(subparsers) -> None:
    p = subparsers.add_parser("submit", help="run a pretraining job to completion",
                              description="Run a job: embedded Ray in this process when no --address is "
                                          "given, else on the Ray cluster at that address.")
    p.add_argument("config", help="job YAML (local path or fsspec URI)")
    p.add_argument("--name", default=None, help="run name (default: the config's `name`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=40 (repeatable)")
    p.add_argument("--address", default=None,
                   help="http://HOST:8265: submit a Ray Job to that cluster's Jobs API; ray://... or HOST:PORT: "
                        "drive the cluster from this process (default: embedded local Ray)")
    p.add_argument("--resume", action="store_true",
                   help="continue the named run from its newest committed checkpoint")
    p.add_argument("--detach", action="store_true",
                   help="with an http:// address: print the job id and return instead of following its logs")
    p.set_defaults(func=_run_submit)


def _run_submit(args: argparse.Namespace) -> int:
    from ..config.spec import ConfigError, load_spec

    try:
        spec = load_spec(args.config, args.overrides, args.name)
        from .jobs import check_address, check_reachable, is_jobs_address

        check_address(args.address)
        check_reachable(args.address)

        if is_jobs_address(args.address):
            from .jobs import submit_remote

            return submit_remote(spec, args.address, resume=args.resume, detach=args.detach)
        from .driver import run_job

        outcome = run_job(spec, resume=args.resume, address=args.address)
    except (ConfigError, ValueError, FileNotFoundError, PermissionError, ConnectionError) as exc:
        print(f"raytron: error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt as exc:
        print(f"raytron: {exc or 'interrupted'}; the run keeps its last committed checkpoint "
              f"(`raytron submit CONFIG --name NAME --resume` continues)", file=sys.stderr)
        return EXIT_ABORTED
    print(f"\n[raytron] job {outcome.status}: {spec.name}")
    run = RunDir(outcome.run_uri)
    print(f"[raytron]   run directory:  {run.uri}")
    print(f"[raytron]   checkpoints:    {run.checkpoints} (last committed step: {outcome.last_checkpoint})")
    print(f"[raytron]   tensorboard:    {run.tensorboard}  (tensorboard --logdir {run.tensorboard})")
    if hasattr(outcome, "budget_line"):
        print(f"[raytron]   faults:         {outcome.budget_line()} ({run.outcome})")
    if outcome.status != "completed":
        print(f"raytron: job {outcome.status}: {outcome.error}", file=sys.stderr)
        return EXIT_PREEMPTED if outcome.status == "preempted" else EXIT_FAILED
    m = outcome.metrics
    if "loss" in m:
        print(f"[raytron]   final loss {m['loss']:.4f}" + (f", val_loss {m['val_loss']:.4f}"
                                                            if m.get("val_loss") is not None else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ..data_pipeline import cli as data_cli
    from . import cluster, export, plan, runs, study

    parser = argparse.ArgumentParser(prog="raytron", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_submit(sub)
    plan.add_subparser(sub)
    data_cli.add_subparser(sub)
    data_cli.add_tokenizer_subparser(sub)
    runs.add_subparsers(sub)
    cluster.add_subparser(sub)
    export.add_subparser(sub)
    study.add_subparser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
