"""RunDir: where each record of a run lives. The one place that spells a run directory's layout.

    <checkpoint.uri>/<name>/                   the run (RunDir.uri)
        .claim                                 held by the submit that is starting the run
        config.yaml, attempts.jsonl            resolved config; one line per submit
        driver.json                            the driver's PID and the processes it started
        worker_groups/<attempt>/rank-<r>.json  what each rank of each attempt did
        metrics.jsonl, tensorboard/            metrics of every logged step
        skipped_samples.jsonl                  data windows skipped after rollbacks
        outcome.json                           the typed outcome of the last submit
        checkpoints/step-<N>/                  committed checkpoints (parallelism/checkpoint.py)
        checkpoints/rejected/step-<N>-<time>/  committed steps a resume set aside
    <checkpoint.uri>/_data_cache/              prepared data shared by the runs of one root
"""

from __future__ import annotations

import re
from dataclasses import dataclass

STEP_PATTERN = re.compile(r"step-(\d{9})")
"""A checkpoint step folder's name (the whole name; group 1 is the step)."""
REJECTED = "rejected"
"""Folder (inside checkpoints/) of committed steps that failed verification, never deleted."""
DATA_CACHE = "_data_cache"
"""Folder of the prepared-data cache under the root of all runs (names starting with `_` are no runs)."""


def data_cache_under(root: str) -> str:
    """The default prepared-data cache of the runs under `root` (a job's checkpoint.uri)."""
    return f"{root.rstrip('/')}/{DATA_CACHE}"


def step_folder(step: int) -> str:
    """The name of step `step`'s folder inside checkpoints/."""
    return f"step-{step:09d}"


@dataclass(frozen=True)
class RunDir:
    """The paths (URIs) of one run's records; nothing is read or written here (raytron/storage.py does)."""

    uri: str
    """The run directory, `<checkpoint.uri>/<name>` (a local path or fsspec URI)."""

    def __post_init__(self):
        object.__setattr__(self, "uri", self.uri.rstrip("/"))

    @classmethod
    def under(cls, root: str, name: str) -> "RunDir":
        """Run `name` under `root`, the root of all runs (a job's checkpoint.uri)."""
        return cls(f"{root.rstrip('/')}/{name}")

    @classmethod
    def given(cls, uri: str) -> "RunDir":
        """The run named by a run directory or by its checkpoints/ folder (what export and
        `plan --resume-from` accept)."""
        uri = uri.rstrip("/")
        return cls(uri[: -len("/checkpoints")] if uri.endswith("/checkpoints") else uri)

    def _join(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def claim(self) -> str:
        return self._join(".claim")

    @property
    def config(self) -> str:
        return self._join("config.yaml")

    @property
    def attempts_log(self) -> str:
        return self._join("attempts.jsonl")

    @property
    def driver_record(self) -> str:
        return self._join("driver.json")

    @property
    def worker_groups(self) -> str:
        return self._join("worker_groups")

    def attempt_dir(self, attempt: int) -> str:
        return self._join("worker_groups", f"{attempt:04d}")

    def rank_record(self, attempt: int, rank: int) -> str:
        return self._join("worker_groups", f"{attempt:04d}", f"rank-{rank:05d}.json")

    @property
    def metrics(self) -> str:
        return self._join("metrics.jsonl")

    @property
    def tensorboard(self) -> str:
        return self._join("tensorboard")

    @property
    def skipped_samples(self) -> str:
        return self._join("skipped_samples.jsonl")

    @property
    def outcome(self) -> str:
        return self._join("outcome.json")

    @property
    def checkpoints(self) -> str:
        return self._join("checkpoints")

    def step_dir(self, step: int) -> str:
        return self._join("checkpoints", step_folder(step))

    @property
    def rejected(self) -> str:
        return self._join("checkpoints", REJECTED)

    @property
    def ray_snapshot(self) -> str:
        """Ray Train's bookkeeping of reported checkpoints (the run directory is its experiment folder)."""
        return self._join("checkpoint_manager_snapshot.json")

    @property
    def study_sweep(self) -> str:
        """`raytron study`: the family's cached throughput sweep."""
        return self._join("study_sweep.json")
