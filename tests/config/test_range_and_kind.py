"""Values each of the right type that no job can run with: absurd timeouts and counts, storage that
workers cannot share, a fault injected on a rank that does not exist, megatron without GPUs. Refused
by plan and submit alike, naming the field (never an OverflowError from deep inside Ray or torch)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.config.config_helpers import DEEPSPEED_JOB, MEGATRON_JOB, job, validate_raw

from raytron.launcher.cli import main
from raytron.config.strict_yaml import ConfigError

DS = DEEPSPEED_JOB
CONFIG = str(Path(__file__).resolve().parents[2] / "cluster_configs" / "local_debug.yaml")


@pytest.mark.parametrize("raw, path, words", [
    (job(DS, fault__collective_timeout_s=10**20), "fault.collective_timeout_s", "at most 2**53"),
    (job(DS, fault__collective_timeout_s=1e20), "fault.collective_timeout_s", "expected an integer"),
    (job(DS, fault__collective_timeout_s=10**9), "fault.collective_timeout_s", "at most 604800 seconds"),
    (job(DS, fault__preemption_grace_s=1e20), "fault.preemption_grace_s", "at most 604800 seconds"),
    (job(DS, fault__step_timeout_s=1e20), "fault.step_timeout_s", "at most 604800 seconds"),
    (job(DS, fault__inject={"kind": "pause", "step": 1, "seconds": 1e20}), "fault.inject.seconds", "at most"),
    (job(DS, fault__max_failures=10**15), "fault.max_failures", "at most 1000000"),
    (job(DS, resources__torch_threads=10**12), "resources.torch_threads", "at most 1000000"),
    (job(DS, checkpoint__keep=10**16), "checkpoint.keep", "at most 2**53"),
    (job(DS, checkpoint__uri="memory://runs"), "checkpoint.uri", "use a local directory or shared storage"),
    (job(DS, data__cache_uri="memory://cache"), "data.cache_uri", "use a local directory or shared storage"),
    (job(DS, fault__inject={"kind": "exception", "step": 1, "rank": 4}), "fault.inject.rank", "4 ranks (0..3)"),
    (job(MEGATRON_JOB, resources__use_gpu=False), "engine", "set resources.use_gpu: true"),
])
def test_refused_with_the_field(raw, path, words):
    with pytest.raises(ConfigError) as exc:
        validate_raw(raw)
    assert exc.value.path == path and words in exc.value.message, str(exc.value)


def test_in_range_values_still_pass():
    validate_raw(job(DS, fault__collective_timeout_s=7200, fault__preemption_grace_s=604800.0,
                     fault__inject={"kind": "exception", "step": 1, "rank": 3}))


@pytest.mark.parametrize("sets", [["fault.collective_timeout_s=100000000000000000000"],
                                  ["engine=megatron", "layout.zero_stage=1"],
                                  ["checkpoint.uri=memory://runs"]])
def test_plan_and_submit_exit_2(tmp_path, capsys, sets):
    argv = [a for kv in sets for a in ("--set", kv)]
    if "checkpoint.uri=memory://runs" not in sets:
        argv += ["--set", f"checkpoint.uri={tmp_path}/runs"]
    assert main(["plan", CONFIG, *argv]) == 2
    field = sets[0].split("=")[0] if "engine" not in sets[0] else "engine"
    assert field in capsys.readouterr().err
    assert main(["submit", CONFIG, *argv]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_submit_refuses_a_cache_uri_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "cache.bin"
    blocker.write_bytes(b"x")
    assert main(["submit", CONFIG, "--set", f"checkpoint.uri={tmp_path}/runs", "--set",
                 f"data.cache_uri={blocker}"]) == 2
    err = capsys.readouterr().err
    assert "data.cache_uri" in err and "an existing file" in err, err
    assert blocker.read_bytes() == b"x"


def test_local_gpu_run_needs_gpus(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["submit", CONFIG, "--set", f"checkpoint.uri={tmp_path}/runs", "--set", "resources.use_gpu=true"]) == 2
    err = capsys.readouterr().err
    assert "resources.use_gpu" in err and "0 GPUs" in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("sets, field, words", [
    (["train.micro_batch_size=1000000000000", "train.global_batch_size=2000000000000"], "train.micro_batch_size",
     "micro_batch_size 1000000000000 x seq_len 128"),
    (["train.seq_len=1048576"], "train.micro_batch_size", "seq_len 1048576"),
])
def test_plan_refuses_cpu_jobs_past_host_memory(capsys, sets, field, words):
    argv = [a for kv in sets for a in ("--set", kv)]
    assert main(["plan", CONFIG, *argv]) == 2
    err = capsys.readouterr().err
    assert f"{field}: the memory estimate is" in err and words in err and "GiB of RAM" in err, err
    assert "resources.allow_oversubscribe: true" in err
    assert main(["plan", CONFIG, *argv[-2:], "--set", "resources.allow_oversubscribe=true"]) == 0


def test_host_memory_is_the_estimate_times_workers_per_node(monkeypatch):
    """Held against psutil's total RAM: the same job fits a machine with room for both workers and is
    refused on one with room for a single worker, naming the numbers."""
    from types import SimpleNamespace

    import psutil

    from raytron.launcher.validate import host_memory

    spec, layout = validate_raw(DS)
    need, _, memory = host_memory(spec, layout)
    assert need == 4 * memory.worst.total  # 4 workers on 1 node
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=need))
    validate_raw(DS)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=need * 0.3))
    with pytest.raises(ConfigError, match=r"4 workers per node need .* of RAM") as exc:
        validate_raw(DS)
    assert exc.value.path in ("model", "train.micro_batch_size")
    validate_raw(job(DS, resources__allow_oversubscribe=True))


def test_submit_refuses_eval_batches_past_the_validation_split(tmp_path, capsys):
    argv = ["submit", CONFIG, "--name", "evalsplit", "--set", f"checkpoint.uri={tmp_path}/runs",
            "--set", f"data.cache_uri={tmp_path}/cache", "--set", "data.max_documents=40",
            "--set", "train.eval_batches=100000"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "data ready" in captured.out  # refused once the data is prepared, before Ray and the workers
    err = captured.err
    assert "train.eval_batches: got 100000 global batches" in err and "validation split has" in err, err
    assert "set train.eval_batches to at most" in err
    assert not (tmp_path / "runs" / "evalsplit").exists()
