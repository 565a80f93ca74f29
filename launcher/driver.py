"""The driver: validate, prepare, then run the job's worker group under Ray Train.

Same code for local and cluster runs: with no address Ray starts in-process (embedded), otherwise the
driver connects to the given cluster. Everything that can be refused is refused here, before Ray
starts and before any worker takes a resource.
"""

from __future__ import annotations

import json
import os
import socket
import time

from .. import storage
from ..data_pipeline import prepare_for_job
from ..parallelism.checkpoint import CheckpointStore
from .deps import check_cluster_deps, task_probe
from .leftovers import live_process, reap_dead_driver, record_driver
from .outcome import JobOutcome, supervise
from .preemption import DriverInterrupt, PreemptibleTorchConfig
from .ray_console import WarningCollapser, print_summary
from .ray_console import install as install_console
from .ray_loopback import check_token_auth, init_embedded, join
from ..config.spec import JobSpec, resolve_local_paths, spec_to_yaml
from ..config.strict_yaml import ConfigError
from .validate import check_eval_split, check_local_gpus, validate_job
from .worker import train_worker


def _run_exists(spec: JobSpec) -> bool:
    run = spec.run_dir
    return any(storage.exists(uri) for uri in (run.config, run.checkpoints, run.claim))


def claim_run(spec: JobSpec) -> None:
    """Create `<run>/.claim` exclusively, so that of two submits starting the same run (new, or resumed),
    one is refused; held until the driver's record (driver.json, which later resumes check) is written.
    (Exclusive create is atomic on local and shared filesystems; an object store without conditional
    writes falls back to check-then-write.)"""
    run = spec.run_dir
    try:
        storage.makedirs(run.uri)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError("name", f"{spec.run_uri} is a file, not a run directory; choose another --name") from None
    import psutil

    body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "create_time": psutil.Process().create_time(),
                       "time": time.time()}).encode()
    taken = ConfigError("name", f"another submit is starting run {spec.name!r} at {spec.run_uri}; wait for it "
                                "to start, or choose another --name")
    try:
        storage.create_exclusive(run.claim, body)
    except FileExistsError:
        raise taken from None


def clear_stale_claim(spec: JobSpec) -> None:
    """A claim left by a submit that died on this host (its process is gone) is removed: a killed submit
    must not keep the run. A live claimant, or one on another host, is named with the file to delete."""
    claim = spec.run_dir.claim
    if not storage.exists(claim):
        return
    try:
        rec = json.loads(storage.read_bytes(claim))
    except (ValueError, FileNotFoundError):
        rec = {}
    rec = rec if isinstance(rec, dict) else {}
    here = rec.get("host") == socket.gethostname()
    if here and isinstance(rec.get("pid"), int) and live_process(rec["pid"], rec.get("create_time")) is None:
        storage.remove(claim)
        print(f"[raytron] removed the claim on run {spec.name!r} left by a submit that died (pid {rec['pid']})")
        return
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec["time"])) if "time" in rec else "?"
    raise ConfigError("name", f"run {spec.name!r} is being started or resumed by another submit (host "
                              f"{rec.get('host', '?')}, pid {rec.get('pid', '?')}, since {since}); if that submit "
                              f"is gone, delete {claim} and submit again")


def release_claim(spec: JobSpec, started: bool) -> None:
    """Drop the claim: once the run's records are written (`started`: config.yaml exists), or, when the
    submit was refused before that, together with the run directory if nothing else is in it."""
    run = spec.run_dir
    storage.remove(run.claim)
    if not started and storage.exists(run.uri) and not storage.list_names(run.uri):
        storage.rmdir(run.uri)


def check_resumable(spec: JobSpec) -> JobSpec:
    """--resume: the run's newest usable checkpoint loads under this config and leaves steps to train;
    refused here, before any record is rewritten, instead of in every worker (`raytron plan CONFIG
    --resume-from RUN` gives the same answer). Returns the job as the resume trains it (the LR schedule
    the checkpoint records, unless train.schedule_steps is set)."""
    from .resume_plan import plan_resume

    if not CheckpointStore(spec.run_dir.checkpoints).committed_steps():
        raise ConfigError("--resume", f"run {spec.name!r} has no committed checkpoint under {spec.run_dir.checkpoints} "
                          "(it stopped before its first save), so --resume would start it at step 0: start it "
                          f"anew under another --name, or delete {spec.run_uri} and submit it without --resume")
    plan = plan_resume(spec, spec.run_uri)
    if not plan.ok:
        raise ConfigError("--resume", f"run {spec.name!r} cannot resume under this config: {'; '.join(plan.reasons)}; "
                                      f"resume with the run's own config ({spec.run_dir.config}) and train.steps "
                                      "above its step, or start a new run under another --name")
    return plan.spec


def preflight(spec: JobSpec, resume: bool):
    """The checks that need neither Ray nor data: config and layout, paths, run-name policy, resumability.
    Returns the layout and the job as it will train (a resume keeps the checkpoint's LR schedule)."""
    layout = validate_job(spec, check_paths=True, runnable=True)
    clear_stale_claim(spec)
    exists = _run_exists(spec)
    if exists and not resume:
        raise ConfigError("name", f"a run named {spec.name!r} already exists at {spec.run_uri}; pass --resume "
                          "to continue it, or choose another --name")
    if resume and not exists:
        raise ConfigError("name", f"--resume: no run named {spec.name!r} at {spec.run_uri} to resume")
    if resume:
        spec = check_resumable(spec)
    return layout, spec


def prepare_data(spec: JobSpec) -> str:
    """Build or load the job's data cache, verified (token ids included), before Ray starts; returns the
    cache directory the workers load, so that they read what was verified here."""
    t0 = time.monotonic()
    data = prepare_for_job(spec.data, seq_len=spec.train.seq_len, seed=spec.train.seed,
                           cache_uri=spec.data_cache_uri, verify_ids=True)
    print(f"[raytron] data ready in {time.monotonic() - t0:.1f}s: {len(data.train)} train / "
          f"{len(data.valid)} valid samples of {spec.train.seq_len} tokens at {data.cache_uri}", flush=True)
    for line in data.skip_reports():
        print(f"[raytron] {line}", flush=True)
    check_eval_split(spec, len(data.valid))  # refused here, before any worker starts
    return data.cache_uri


def _started(spec: JobSpec) -> bool:
    return storage.exists(spec.run_dir.config)


def write_run_record(spec: JobSpec, layout, resume: bool) -> None:
    """The resolved config (config.yaml) and an append-only attempt log (attempts.jsonl)."""
    run = spec.run_dir
    storage.makedirs(run.uri)
    storage.write_bytes_atomic(run.config, spec_to_yaml(spec).encode())
    entry = {"time": time.time(), "resume": resume, "layout": layout.to_dict(), "steps": spec.train.steps}
    storage.append_bytes(run.attempts_log, (json.dumps(entry) + "\n").encode())


def _init_ray(spec: JobSpec, address: str | None, console: WarningCollapser) -> None:
    import ray

    # Ray Train would re-route worker print() through its logger, which doubles every console line.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return
    # Inside a Ray Job (`raytron submit --address http://...`) the job manager sets RAY_ADDRESS: the
    # driver joins that cluster rather than starting an embedded Ray next to it.
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        join(address, log_to_driver=True)
        install_console(console)
        check_cluster_deps(address, task_probe())  # the workers' Python has raytron's dependencies
        return
    need = spec.resources.workers * spec.resources.cpus_per_worker + 1
    # The dashboard serves Ray's state API, which Ray Train's controller watchdog polls. A minimal Ray
    # (the GPU machines' wheelhouse lacks opencensus/opentelemetry) runs without it: the watchdog then
    # only warns that the state API is unavailable (collapsed on the console: launcher/ray_console.py).
    from ray._private.utils import get_dashboard_dependency_error

    missing = get_dashboard_dependency_error()
    if missing is not None:
        print(f"[raytron] Ray dashboard off ({missing}); Ray Train's state-API watchdog will warn", flush=True)
    init_embedded(num_cpus=max(need, os.cpu_count() or 1), include_dashboard=missing is None)
    install_console(console)


def _place(spec: JobSpec, layout):
    """Rank -> node plan on the connected cluster (launcher/placement.py)."""
    from .placement import cluster_nodes, plan_placement, worker_resources

    plan = plan_placement(layout, cluster_nodes(), worker_resources(spec))
    if layout.num_nodes > 1:
        print(f"[raytron] {plan.describe()}", flush=True)
    return plan


def _storage(spec: JobSpec):
    """Ray Train's experiment directory is the run directory (storage = checkpoint.uri, name = run
    name), on the run's own filesystem, so our committed checkpoints are Ray-managed in place."""
    return storage.pyarrow_filesystem(spec.checkpoint.uri)


def _drop_ray_checkpoint_snapshot(spec: JobSpec) -> None:
    """Forget Ray Train's record of earlier checkpoints before each `fit()`.

    raytron finds checkpoints by listing committed steps; Ray's snapshot is only bookkeeping, and it
    goes stale once retention deletes a step it lists (Ray then refuses to start the run). Ray
    rebuilds its record from the checkpoints reported after the relaunch."""
    storage.remove(spec.run_dir.ray_snapshot)


def run_job(spec: JobSpec, resume: bool = False, address: str | None = None) -> JobOutcome:
    """Run `spec` to completion under Ray Train; returns the outcome (never hangs on a failed group)."""
    spec = resolve_local_paths(spec)
    check_local_gpus(spec, address)
    if not (address or os.environ.get("RAY_ADDRESS")):
        check_token_auth()  # the embedded Ray's auth, refused before any data is prepared
    layout, spec = preflight(spec, resume)
    claim_run(spec)  # held until this driver's record is written; dropped (with an empty new run) if refused first
    console = WarningCollapser()
    try:
        data_dir = prepare_data(spec)
        if resume:
            reap_dead_driver(spec.run_uri)  # what a crashed driver of this run left here (launcher/leftovers.py)
        _init_ray(spec, address, console)
        placement = _place(spec, layout)  # refuses a layout the cluster cannot place, before any record or worker
        write_run_record(spec, layout, resume)
        embedded = not (address or os.environ.get("RAY_ADDRESS"))
        record_driver(spec.run_uri, embedded=embedded)
    except BaseException:
        release_claim(spec, started=_started(spec))
        raise
    release_claim(spec, started=True)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = _storage(spec)

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller) -> None:
            """Ray Train's fit() would take SIGINT over to abort the run outright; the driver keeps its
            own (DriverInterrupt below): Ctrl-C preempts the run with a committed checkpoint."""

    def make_trainer(max_failures: int, max_preemptions: int) -> TorchTrainer:
        _drop_ray_checkpoint_snapshot(spec)
        return Trainer(
            train_worker,
            train_loop_config={"spec": spec.to_dict(), "layout": layout.to_dict(), "data_dir": data_dir},
            torch_config=PreemptibleTorchConfig(backend="nccl" if spec.resources.use_gpu else "gloo",
                                                timeout_s=spec.fault.collective_timeout_s,
                                                preemption_grace_s=spec.fault.preemption_grace_s,
                                                local_rendezvous=embedded),
            scaling_config=ScalingConfig(num_workers=spec.resources.workers, use_gpu=spec.resources.use_gpu,
                                         resources_per_worker={"CPU": spec.resources.cpus_per_worker},
                                         **placement.scaling_options()),
            run_config=RunConfig(name=spec.name, storage_path=storage_path, storage_filesystem=storage_fs,
                                 failure_config=FailureConfig(max_failures=max_failures,
                                                               max_preemption_failures=max_preemptions)),
        )

    store = CheckpointStore(spec.run_dir.checkpoints, keep=spec.checkpoint.keep)
    # Failure and preemption budgets, the relaunch after a preemption, outcome.json: launcher/outcome.py.
    # Ctrl-C / SIGTERM to this process preempts the whole run (launcher/preemption.py DriverInterrupt).
    try:
        with DriverInterrupt(spec.run_uri, spec.fault.preemption_grace_s) as interrupt:
            return supervise(spec, make_trainer, store, interrupt)
    finally:
        print_summary(console)
