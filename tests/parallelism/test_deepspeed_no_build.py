"""The CPU deepspeed engine starts and trains without building any DeepSpeed extension: on a fresh
machine a build is a minute of C++ compilation (the shared-memory communication kernels) and needs a
compiler. Every op builder's load is replaced by one that records the op and raises."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.checkpoint.ckpt_helpers import spawn_ranks
from tests.parallelism import ds_equivalence_ranks as ranks

pytestmark = pytest.mark.slow


def _refuse_builds(record: Path) -> None:
    import importlib

    def refuse(self, *args, **kwargs):
        with open(record, "a") as f:
            f.write(json.dumps(self.name) + "\n")
        raise RuntimeError(f"DeepSpeed op {self.name} would be built or loaded")

    for module in ("deepspeed.ops.op_builder.builder", "op_builder.builder"):
        try:
            builder = importlib.import_module(module)
        except ImportError:
            continue
        builder.OpBuilder.load = refuse
        builder.OpBuilder.jit_load = refuse


def engine_without_builds(rank: int, world: int, record: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch

    torch.set_num_threads(1)
    _refuse_builds(Path(record))
    from raytron.launcher.validate import validate_job
    from raytron.parallelism.deepspeed.engine import DeepSpeedEngine

    spec = ranks.job_spec(ep=2, zero_stage=2, workers=world)  # the demo's layout: ZeRO-2, EP=2 over gloo
    engine = DeepSpeedEngine(spec, validate_job(spec), rank, world)
    per_rank = ranks.GBS // world
    mine = ranks.batch()[rank * per_rank:(rank + 1) * per_rank]
    assert engine.train_step(list(mine.split(ranks.MBS))).loss > 0


def test_cpu_engine_builds_no_extension(tmp_path):
    record = tmp_path / "builds.jsonl"
    try:
        spawn_ranks(engine_without_builds, 2, str(record), timeout=300)
    finally:
        built = record.read_text().split() if record.exists() else []
        assert not built, f"the CPU engine asked DeepSpeed to build/load {sorted(set(built))}"
