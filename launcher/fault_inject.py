"""TEST HOOK: `fault.inject` makes one rank misbehave once, so tests drive every recovery path for real.

Never set in real runs (the field is null by default). It fires on rank `inject.rank` at step
`inject.step` of attempt `inject.attempt` (-1: every attempt), at most once per process:
- `nan`: before the step, one weight of this rank's model copy becomes NaN, so its loss is NaN;
- `exception` / `hang` / `pause`: mid-step, after the last backward and before the optimizer update
  (the engine's GA-boundary hook), so the other ranks are inside the step too.
"""

from __future__ import annotations

import json
import os
import time

import torch

from .. import storage
from .attempts import marker_uri


class InjectedFault(RuntimeError):
    """The exception the `exception` fault raises."""


class FaultInjector:
    def __init__(self, spec, rank: int, attempt: int, preemption=None):
        inj = spec.fault.inject
        self.inj = inj if inj is not None and inj.rank == rank and inj.attempt in (-1, attempt) else None
        self.run_uri, self.rank, self.attempt, self.preemption = spec.run_uri, rank, attempt, preemption
        self.fired = False

    def _due(self, step: int, kinds: tuple[str, ...]) -> bool:
        return self.inj is not None and not self.fired and self.inj.kind in kinds and step == self.inj.step

    def before_step(self, step: int, engine) -> None:
        if not self._due(step, ("nan",)):
            return
        self.fired = True
        with torch.no_grad():
            # a dense linear layer that every token passes through (an embedding row might go unused)
            linear = next(m for n, m in engine.module.named_modules()
                          if isinstance(m, torch.nn.Linear) and "expert" not in n)
            linear.weight.view(-1)[0] = float("nan")
        print(f"[raytron] fault.inject: rank {self.rank} weight poisoned with NaN at step {step}", flush=True)

    def mid_step(self, step: int) -> None:
        if not self._due(step, ("exception", "hang", "pause")):
            return
        self.fired = True
        kind = self.inj.kind
        print(f"[raytron] fault.inject: rank {self.rank} {kind} at step {step} (pid {os.getpid()})", flush=True)
        if kind == "exception":
            raise InjectedFault(f"injected exception on rank {self.rank} at step {step}")
        self._marker(kind, step)
        deadline = time.monotonic() + (float("inf") if kind == "hang" else self.inj.seconds)
        while time.monotonic() < deadline:  # a hang stops calling collectives: sleep until killed
            if kind == "pause" and self.preemption is not None and self.preemption.local:
                return
            time.sleep(0.1)

    def _marker(self, kind: str, step: int) -> None:
        uri = marker_uri(self.run_uri, self.attempt, f"{kind}-rank-{self.rank:05d}.json")
        storage.makedirs(uri.rsplit("/", 1)[0])
        storage.write_bytes_atomic(uri, json.dumps({"pid": os.getpid(), "rank": self.rank, "step": step,
                                                    "attempt": self.attempt, "time": time.time()}).encode())
