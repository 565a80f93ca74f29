"""`FaultGuard`: everything one rank does about faults during one attempt, in one object the training
loop calls at a few fixed points (begin_step, end_step, preempt_agreed, roll_back).

It owns the rank's attempt record (launcher/attempts.py), the SIGTERM flag (launcher/preemption.py),
the step watchdog and numerics checks (launcher/health.py), the skipped-data log and the test-only
fault injector (launcher/fault_inject.py). All its collectives are called by every rank at the same
point, so all ranks take the same decision (roll back, stop, preempt) at the same step.
"""

from __future__ import annotations

import time

import torch

from .attempts import RankRecord, next_attempt
from .fault_inject import FaultInjector
from .health import (LossSpikeError, NonFiniteError, NumericsError, NumericsGuard, SkipLog, StepWatchdog,
                     StopTraining)
from .preemption import PreemptionSignal


class FaultGuard:
    def __init__(self, spec, rank: int, world: int, attempt: int, node_id: str | None = None):
        self.spec, self.rank, self.world, self.attempt = spec, rank, world, attempt
        self.record = RankRecord(spec.run_uri, attempt, rank, world, node_id)
        self.preemption = PreemptionSignal(spec.fault.preemption_grace_s)
        self.watchdog = StepWatchdog(spec.fault.step_timeout_s, rank, self.record)
        self.numerics = NumericsGuard(spec.fault, rank, world)
        self.inject = FaultInjector(spec, rank, attempt, self.preemption)
        self.skips = SkipLog(spec.run_uri)
        self.device = torch.device("cpu")
        self.rollbacks = 0
        self.step: int | None = None
        self.status = "running"
        self._hooked = False

    @classmethod
    def start(cls, spec, rank: int, world: int, node_id: str | None = None) -> "FaultGuard":
        """Collective: rank 0 numbers the new attempt, every rank writes its start record."""
        import torch.distributed as dist

        choice = [next_attempt(spec.run_uri) if rank == 0 else None]
        dist.broadcast_object_list(choice, src=0)
        guard = cls(spec, rank, world, int(choice[0]), node_id)
        guard.record.update()
        return guard

    def attach(self, engine) -> None:
        """Install the GA-boundary hook on engines that offer it (see DeepSpeedEngine)."""
        self.device = getattr(engine, "device", self.device)
        self.numerics.device = self.device
        if hasattr(engine, "before_optimizer_step"):
            def hook(local_loss: torch.Tensor) -> None:
                self.inject.mid_step(self.step)
                self.numerics.before_optimizer_step(local_loss)

            engine.before_optimizer_step = hook
            self._hooked = True

    def resumed(self, step: int) -> None:
        self.step = step
        self.record.update(resumed_from=step or None, step=step)

    def __enter__(self) -> "FaultGuard":
        self.preemption.__enter__()
        self.watchdog.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.watchdog.__exit__(*exc)
        self.preemption.__exit__(*exc)

    def begin_step(self, step: int, engine) -> None:
        self.step = self.numerics.step = step
        self.watchdog.beat(step)
        self.inject.before_step(step, engine)
        if not self._hooked:
            self.inject.mid_step(step)

    def end_step(self, step: int, metrics) -> None:
        """Raises NumericsError (every rank together) when this step must not be kept."""
        self.numerics.after_step(step, metrics.loss, metrics.grad_norm)
        self.watchdog.beat(step)

    def preempt_agreed(self) -> bool:
        """Collective at a step boundary: did any rank get SIGTERM?"""
        if not self.preemption.agreed(self.device):
            return False
        received = self.preemption.received_at
        self.record.event("preemption", step=self.step, sigterm_here=self.preemption.local,
                          sigterm_time=received)
        return True

    def preempted(self, step: int) -> None:
        self.status = "preempted"
        received = self.preemption.received_at
        self.record.update(status="preempted", step=step, committed=time.time(),
                           sigterm_time=received)

    def finished(self, step: int | None) -> None:
        """The loop returned: the job's steps are done, or it left after a preemption commit."""
        if self.status != "preempted":
            self.status = "completed"
        self.record.update(status=self.status, step=step)

    def roll_back(self, err: NumericsError, cursor_at_step, restore) -> tuple[int, object]:
        """Apply the policy for a bad step: raise StopTraining, or restore the last committed
        checkpoint, log the skipped data window and return (restored step, restored cursor)."""
        fault = self.spec.fault
        policy = fault.nan_policy if isinstance(err, NonFiniteError) else fault.spike_policy
        kind = "non_finite" if isinstance(err, NonFiniteError) else "loss_spike"
        self.record.event(kind, step=err.step, what=err.what, ranks=err.ranks, value=str(err.value),
                          policy=policy)
        if policy == "stop":
            raise StopTraining(f"{err} (fault.{'nan' if kind == 'non_finite' else 'spike'}_policy=stop)", err)
        self.rollbacks += 1
        if self.rollbacks > fault.max_rollbacks:
            raise StopTraining(f"{err}; fault.max_rollbacks={fault.max_rollbacks} rollbacks already done", err)
        gbs = self.spec.train.global_batch_size
        start = cursor_at_step.samples_consumed
        end = start + fault.skip_batches * gbs
        step, cursor = restore()
        if step == 0:
            raise StopTraining(f"{err}; no committed checkpoint to roll back to", err)
        entry = {"time": time.time(), "step": err.step, "reason": str(err), "ranks": err.ranks,
                 "start_sample": start, "end_sample": end, "rolled_back_to": step, "attempt": self.attempt}
        self.skips.add(entry, write=self.rank == 0)
        self.numerics.reset()
        self.record.event("rollback", step=err.step, rolled_back_to=step, start_sample=start, end_sample=end)
        if self.rank == 0:
            print(f"[raytron] {kind} at step {err.step} ({err}); rolled back to step {step} and skipping "
                  f"samples [{start}, {end}) (logged in {self.skips.uri})", flush=True)
        self.step = step
        return step, cursor


__all__ = ["FaultGuard", "LossSpikeError", "NonFiniteError", "NumericsError", "StopTraining"]
