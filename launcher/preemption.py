"""Preemption: SIGTERM to a worker means "commit a checkpoint and leave", not "crash".

How it works, end to end:
1. The driver's TorchConfig is `PreemptibleTorchConfig`; its backend runs `install_sigterm_handler`
   on every worker actor when the group starts. That runs in the actor's main thread (a plain Ray
   actor executes its tasks there), the only thread Python lets set signal handlers; the training
   function itself runs in a side thread.
2. On SIGTERM the handler only sets a process-wide flag (a signal is process-wide by nature) and arms
   a deadline: if the worker is still alive `grace_s` later, it exits hard. Outside training (no loop
   registered) Ray's own SIGTERM behaviour is kept.
3. At every step boundary the loop calls `PreemptionSignal.agreed()`: one tiny all-reduce(MAX) so all
   ranks stop at the same step even though the signal hit one of them. The loop then commits a
   checkpoint (blocking) and returns normally: Ray Train sees a *successful* worker group, so the
   failure budget is untouched; the rank-0 record says `preempted`, and the driver relaunches
   `trainer.fit()` against the preemption budget (launcher/driver.py).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass

import torch
from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

_flag = threading.Event()  # set by the SIGTERM handler; the process's only piece of signal state
_state: dict = {"training": False, "grace_s": 60.0, "received": None, "previous": None}


def _handler(signum, frame) -> None:
    if not _state["training"]:
        previous = _state["previous"]
        if callable(previous):
            previous(signum, frame)
        else:
            sys.exit(128 + signum)
        return
    if _flag.is_set():
        return
    _state["received"] = time.time()
    _flag.set()
    grace = _state["grace_s"]
    print(f"[raytron] pid {os.getpid()}: SIGTERM received; committing a checkpoint at the next step "
          f"boundary (grace {grace:.0f}s)", flush=True)

    def _deadline() -> None:
        time.sleep(grace)
        print(f"[raytron] pid {os.getpid()}: preemption grace of {grace:.0f}s ran out; exiting", flush=True)
        os._exit(143)

    threading.Thread(target=_deadline, name="raytron-preemption-deadline", daemon=True).start()


def install_sigterm_handler(grace_s: float) -> bool:
    """Install the preemption handler (must run on the process's main thread). True if installed."""
    _state["grace_s"] = grace_s
    if threading.current_thread() is not threading.main_thread():
        print("[raytron] warning: SIGTERM preemption handler not installed (not on the main thread)",
              flush=True)
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not _handler:
        _state["previous"] = previous
    signal.signal(signal.SIGTERM, _handler)
    return True


@dataclass
class PreemptionSignal:
    """The training loop's view of the SIGTERM flag (a context manager around the loop)."""

    grace_s: float

    def __enter__(self) -> "PreemptionSignal":
        _flag.clear()
        _state["received"] = None
        _state["grace_s"] = self.grace_s
        _state["training"] = True
        return self

    def __exit__(self, *exc) -> None:
        _state["training"] = False

    @property
    def local(self) -> bool:
        """This process got SIGTERM (no collective)."""
        return _flag.is_set()

    @property
    def received_at(self) -> float | None:
        return _state["received"]

    def agreed(self, device: torch.device | None = None) -> bool:
        """Collective: True on every rank if any rank got SIGTERM."""
        import torch.distributed as dist

        flag = torch.tensor([1.0 if _flag.is_set() else 0.0], device=device or torch.device("cpu"))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


class _PreemptibleTorchBackend(_TorchBackend):
    """Ray Train's torch backend, plus the SIGTERM handler on every worker of the group."""

    def on_start(self, worker_group, backend_config) -> None:
        if not backend_config.local_rendezvous:
            return super().on_start(worker_group, backend_config)
        import ray
        from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group

        # Ray's on_start with a FileStore: a fresh file per group start (a relaunch never meets a stale one).
        url = f"file://{tempfile.gettempdir()}/raytron-rendezvous-{uuid.uuid4().hex}"
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend_config.backend,
                                                   world_rank=i, world_size=len(worker_group), init_method=url,
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])

    def on_training_start(self, worker_group, backend_config) -> None:
        super().on_training_start(worker_group, backend_config)
        worker_group.execute(install_sigterm_handler, backend_config.preemption_grace_s)


@dataclass
class PreemptibleTorchConfig(TorchConfig):
    """TorchConfig(backend, timeout_s) whose workers treat SIGTERM as a preemption."""

    preemption_grace_s: float = 60.0
    local_rendezvous: bool = False
    """All workers on this machine (the embedded Ray): the process group meets in a file under the temp
    dir instead of Ray's TCP rendezvous, whose store (torch's TCPStore) listens on every interface."""

    @property
    def backend_cls(self):
        return _PreemptibleTorchBackend


class DriverInterrupt:
    """SIGINT (Ctrl-C) or SIGTERM to the `raytron submit` driver: a preemption of the whole run.

    The first signal forwards SIGTERM to every running rank of the current worker group on this host
    (the workers' own preemption path above: they agree on a step boundary and commit a checkpoint
    within `grace_s`); `supervise` then ends the job as `preempted` instead of relaunching it. If the
    workers have not ended `grace_s` + `SLACK_S` later, or on a second signal, the driver aborts at once
    (KeyboardInterrupt). Used as a context manager around `supervise` on the driver's main thread."""

    SLACK_S = 60.0
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, run_uri: str, grace_s: float):
        self.run_uri, self.grace_s = run_uri, grace_s
        self.received: str | None = None  # the signal's name once one arrived
        self.not_signalled: list[str] = []  # ranks the driver could not reach, and why
        self._previous: dict = {}
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "DriverInterrupt":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"\n[raytron] {name} again: aborting now, without waiting for the checkpoint", flush=True)
            raise KeyboardInterrupt(f"aborted by a second {name}")
        self.received = name
        print(f"\n[raytron] {name}: preempting the run; the workers commit a checkpoint at the next step boundary "
              f"(grace {self.grace_s:.0f}s). Press Ctrl-C again to abort at once.", flush=True)
        threading.Thread(target=self._forward, name="raytron-driver-preempt", daemon=True).start()
        self._timer = threading.Timer(self.grace_s + self.SLACK_S, self._give_up)
        self._timer.daemon = True
        self._timer.start()

    def _forward(self) -> None:
        """SIGTERM to each running rank of the newest worker group that runs on this host."""
        import socket

        from .attempts import read_attempts

        attempts = read_attempts(self.run_uri)
        ranks = attempts[max(attempts)] if attempts else {}
        here = socket.gethostname()
        for rank, rec in sorted(ranks.items()):
            if rec.get("status") != "running":
                continue
            if rec.get("hostname") != here:
                self.not_signalled.append(f"rank {rank} runs on host {rec.get('hostname')}, not this one")
                continue
            try:
                os.kill(int(rec["pid"]), signal.SIGTERM)
            except (ProcessLookupError, PermissionError, KeyError, TypeError, ValueError) as exc:
                self.not_signalled.append(f"rank {rank} (pid {rec.get('pid')}): {type(exc).__name__}")
        for line in self.not_signalled:
            print(f"[raytron] not signalled: {line}", flush=True)

    def _give_up(self) -> None:
        print(f"[raytron] the workers did not end within the preemption grace of {self.grace_s:.0f}s "
              f"(+{self.SLACK_S:.0f}s): aborting", flush=True)
        os.kill(os.getpid(), signal.SIGINT)
