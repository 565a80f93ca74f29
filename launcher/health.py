"""Health checks inside the training loop: a step watchdog (hangs) and numerics (NaN/Inf, spikes).

Hangs: a rank that stops calling collectives leaves the others blocked inside one. Two bounds catch it:
the process group's own timeout (`fault.collective_timeout_s`, given to Ray Train's TorchConfig), and
`StepWatchdog`, a thread on every rank that fires when the step counter has not moved for
`fault.step_timeout_s` (checkpoint saves included). When it fires it writes where the training thread
is (and whether that is inside a collective, i.e. a victim, or outside one, i.e. the culprit) into the
rank's attempt record, then exits the process hard: Ray Train sees a dead worker and restarts the group.

Numerics: `NumericsGuard.before_optimizer_step` is the engine's GA-boundary hook. Every rank reports
whether its own loss is finite (one all-gather), so the offending ranks are named; DeepSpeed's own
pre-update overflow check skips a non-finite gradient, and `after_step` raises the typed error so the
loop can stop or roll back before anything from that step is kept (no checkpoint, no next step).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import traceback

import torch

from .. import storage
from ..run_dir import RunDir

HANG_EXIT_CODE = 70


class NumericsError(RuntimeError):
    """A step whose numbers must not be kept (all ranks raise it together)."""

    def __init__(self, step: int, what: str, ranks: list[int], value: float):
        self.step, self.what, self.ranks, self.value = step, what, ranks, value
        who = f"on rank(s) {ranks}" if ranks else "(rank unknown: gradients are already reduced)"
        super().__init__(f"{what} = {value} at step {step} {who}")


class NonFiniteError(NumericsError):
    """NaN/Inf in the loss or the gradients, caught before the optimizer update was kept."""


class LossSpikeError(NumericsError):
    """Loss far above its running mean."""


class StopTraining(Exception):
    """Raised on every rank together when the job must end without a Ray Train restart (a NaN under
    the `stop` policy, rollbacks exhausted): the loop returns normally and the driver reports failed."""

    def __init__(self, reason: str, cause: BaseException | None = None):
        super().__init__(reason)
        self.cause = cause


class NumericsGuard:
    def __init__(self, fault, rank: int, world: int):
        self.fault, self.rank, self.world = fault, rank, world
        self.step = 0
        self.device = torch.device("cpu")
        self._pending: NonFiniteError | None = None
        self._ema: float | None = None
        self._seen = 0

    def before_optimizer_step(self, local_loss: torch.Tensor) -> None:
        """Collective (all-gather of one flag per rank), at the GA boundary before the update."""
        import torch.distributed as dist

        mine = local_loss.detach().reshape(1).to(self.device, torch.float64)
        values = [torch.zeros(1, dtype=torch.float64, device=self.device) for _ in range(self.world)]
        dist.all_gather(values, mine)
        ranks = [r for r, v in enumerate(values) if not math.isfinite(v.item())]
        if ranks:
            self._pending = NonFiniteError(self.step, "loss", ranks, values[ranks[0]].item())
            if self.rank == ranks[0]:
                print(f"[raytron] rank {self.rank}: non-finite loss {float(local_loss)} at step {self.step}, "
                      "caught before the optimizer update", flush=True)

    def after_step(self, step: int, loss: float, grad_norm: float) -> None:
        """Raise the pending non-finite error, a non-finite gradient norm (DeepSpeed skipped that
        update), or a loss spike. Every input is identical on all ranks, so all ranks raise together."""
        pending, self._pending = self._pending, None
        if pending is not None:
            raise pending
        if not math.isfinite(loss):
            raise NonFiniteError(step, "loss", [], loss)
        if not math.isfinite(grad_norm):
            raise NonFiniteError(step, "grad_norm", [], grad_norm)
        f = self.fault
        if f.spike_factor > 0:
            if self._seen >= f.spike_warmup_steps and loss > f.spike_factor * self._ema:
                spike = LossSpikeError(step, f"loss spike (running mean {self._ema:.4f})", [], loss)
                if f.spike_policy != "warn":
                    raise spike
                if self.rank == 0:
                    print(f"[raytron] warning: {spike}", flush=True)
                return  # a spike does not enter the running mean
            self._seen += 1
            beta = 1.0 - 1.0 / min(self._seen, f.spike_warmup_steps)
            self._ema = loss if self._ema is None else beta * self._ema + (1 - beta) * loss

    def reset(self) -> None:
        self._pending, self._ema, self._seen = None, None, 0


class StepWatchdog:
    """Exits this process when no `beat` came for `timeout_s` (see the module docstring)."""

    def __init__(self, timeout_s: float, rank: int, record=None):
        self.timeout_s, self.rank, self.record = timeout_s, rank, record
        self._last = time.monotonic()
        self._step: int | None = None
        self._stop = threading.Event()
        self._watched = threading.current_thread()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "StepWatchdog":
        if self.timeout_s > 0:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="raytron-step-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def beat(self, step: int) -> None:
        self._step, self._last = step, time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 10)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        frame = sys._current_frames().get(self._watched.ident)
        stack = traceback.format_stack(frame) if frame is not None else []
        files = "".join(stack)
        in_collective = any(s in files for s in ("torch/distributed", "deepspeed/comm"))
        where = stack[-1].strip().splitlines()[0] if stack else "unknown"
        message = (f"rank {self.rank}: no progress for {idle:.0f}s (step_timeout_s={self.timeout_s:g}) "
                   f"at step {self._step}; training thread "
                   f"{'waiting in a collective' if in_collective else 'stalled outside collectives'} "
                   f"at {where}")
        print(f"[raytron] watchdog: {message}", file=sys.stderr, flush=True)
        try:
            if self.record is not None:
                self.record.update(status="hung", step=self._step, exception="StepTimeout", message=message,
                                   in_collective=in_collective, traceback="".join(stack)[-6000:])
        finally:
            os._exit(HANG_EXIT_CODE)


class SkipLog:
    """Data windows skipped after rollbacks: `<run>/skipped_samples.jsonl`, one line per window
    {step, reason, ranks, start_sample, end_sample}. Read at every (re)start, so a later Ray Train
    restart from an older checkpoint skips the same samples again."""

    def __init__(self, run_uri: str):
        self.uri = RunDir(run_uri).skipped_samples
        self.windows: dict[int, int] = {}  # start sample -> end sample
        if storage.exists(self.uri):
            import json

            for line in storage.read_bytes(self.uri).decode().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.windows[rec["start_sample"]] = rec["end_sample"]

    def add(self, entry: dict, write: bool) -> None:
        import json

        self.windows[entry["start_sample"]] = entry["end_sample"]
        if write:
            storage.append_bytes(self.uri, (json.dumps(entry) + "\n").encode())

    def apply(self, cursor):
        """Advance `cursor` past any skipped window that starts where it stands."""
        while cursor.samples_consumed in self.windows:
            cursor = cursor.advance(self.windows[cursor.samples_consumed] - cursor.samples_consumed)
        return cursor
