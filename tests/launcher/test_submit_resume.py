"""End to end through the CLI on an embedded Ray: train, checkpoint, resume exactly, TensorBoard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from raytron.launcher.cli import main

pytestmark = pytest.mark.slow

CONFIG = str(Path(__file__).resolve().parents[2] / "cluster_configs" / "local_debug.yaml")
FAST = ["--set", "train.seq_len=64", "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=2",
        "--set", "data.max_documents=120", "--set", "train.eval_every=0", "--set", "train.warmup_steps=2"]


def submit(root: Path, name: str, steps: int, *extra: str) -> int:
    return main(["submit", CONFIG, "--name", name, "--set", f"checkpoint.uri={root}",
                 "--set", f"train.steps={steps}", "--set", "checkpoint.every=2", *FAST, *extra])


def losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


def tb_scalars(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("runs")
    n = 3
    assert submit(root, "straight", 2 * n) == 0
    # every=1: retention deletes step 1 before the resume, a step Ray Train's own record still lists
    # the first half plans the whole run's LR schedule; the resume keeps it from the checkpoint
    assert submit(root, "split", n, "--set", "checkpoint.every=1", "--set", f"train.schedule_steps={2 * n}") == 0
    first_half = losses(root / "split")
    assert submit(root, "split", 2 * n, "--resume") == 0
    return root, n, first_half


def test_resume_is_bitwise_exact(runs):
    root, n, first_half = runs
    straight, split = losses(root / "straight"), losses(root / "split")
    assert sorted(split) == list(range(1, 2 * n + 1)), "every step logged exactly once after the resume"
    assert [split[s] for s in range(1, n + 1)] == [first_half[s] for s in range(1, n + 1)]
    # bit for bit: the same float64 values, not merely close ones
    assert [split[s] for s in range(n + 1, 2 * n + 1)] == [straight[s] for s in range(n + 1, 2 * n + 1)]


def test_checkpoints_committed_and_retained(runs):
    root, n, _ = runs
    ckpts = sorted(p.name for p in (root / "split" / "checkpoints").iterdir())
    assert ckpts == ["step-000000004", "step-000000006"], "keep=2 retains the two newest committed steps"
    for step_dir in (root / "split" / "checkpoints").iterdir():
        assert (step_dir / "COMMITTED").exists() and (step_dir / "manifest.json").exists()
        manifest = json.loads((step_dir / "manifest.json").read_text())
        assert manifest["data_cursor"]["samples_consumed"] == 8 * manifest["step"]
        assert set(manifest["files"]) == {"state-00000.pt", "state-00001.pt", "rng-00000.pt", "rng-00001.pt"}


def test_tensorboard_scalars_match_metrics(runs):
    root, n, _ = runs
    scalars = tb_scalars(root / "straight")
    for tag in ("loss", "lr", "grad_norm", "tokens_per_sec", "val_loss"):
        assert tag in scalars, f"missing TensorBoard scalar {tag}"
    assert sorted(scalars["loss"]) == list(range(1, 2 * n + 1))
    exact = losses(root / "straight")
    for step, value in scalars["loss"].items():
        assert value == pytest.approx(exact[step], rel=1e-6)  # TensorBoard stores float32
    assert all(v > 0 for v in scalars["tokens_per_sec"].values())
    resumed = tb_scalars(root / "split")["loss"]
    assert sorted(resumed) == list(range(1, 2 * n + 1)), "resumed run's TensorBoard steps never repeat"


def test_tensorboard_has_mfu_memory_and_router_scalars(runs):
    """Every logged step carries achieved model FLOP/s, peak memory and the MoE router statistics; on CPU
    MFU itself is absent (no device peak), in TensorBoard and as null in metrics.jsonl."""
    import math

    root, n, _ = runs
    scalars = tb_scalars(root / "straight")
    steps = list(range(1, 2 * n + 1))
    for tag in ("model_tflops_per_device", "memory/rss_peak_gib", "moe/router_entropy", "moe/load_max_over_mean"):
        assert sorted(scalars.get(tag, {})) == steps, f"TensorBoard scalar {tag} not logged at every step"
        assert all(math.isfinite(v) and v > 0 for v in scalars[tag].values()), (tag, scalars[tag])
    assert "mfu" not in scalars
    assert all(0 < v <= math.log(4) + 1e-6 for v in scalars["moe/router_entropy"].values())  # 4 experts
    assert all(1 <= v <= 4 for v in scalars["moe/load_max_over_mean"].values())
    records = [json.loads(line) for line in (root / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] is None and r["memory/rss_peak_gib"] > 0.05 for r in records)
    for r in records:  # the logged balance ratio is the logged expert load's
        assert r["moe/load_max_over_mean"] == pytest.approx(max(r["expert_load"]) * 4 / sum(r["expert_load"]))


def copy_run(root: Path, name: str) -> Path:
    """A copy of the finished 'straight' run (committed steps 4 and 6) under another name."""
    shutil.copytree(root / "straight", root / name)
    return root / name


def test_resume_past_a_corrupted_newest_checkpoint(runs, capsys):
    """Step 6 corrupted: the resume trains on from step 4, sets step 6 aside (kept under rejected/) and
    commits a new step 6 and 8; before, re-committing step 6 failed on every rank (write-once)."""
    root, n, _ = runs
    run = copy_run(root, "damaged")
    shard = run / "checkpoints" / "step-000000006" / "state-00000.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert submit(root, "damaged", 2 * n + 2, "--resume") == 0
    out = capsys.readouterr().out
    assert "fails its SHA-256 check" in out and "set aside step 6" in out and "resumed from step 4" in out
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000000006", "step-000000008"]
    [rejected] = (run / "checkpoints" / "rejected").iterdir()
    assert rejected.name.startswith("step-000000006-") and (rejected / "state-00000.pt").read_bytes() == data


@pytest.mark.parametrize("change, field", [(["--set", "train.seq_len=32"], "--resume"),
                                           (["--set", "train.steps=4"], "train.steps")])
def test_resume_that_cannot_continue_is_refused_before_any_record_changes(runs, capsys, change, field):
    """A changed model/data config, or train.steps below the run's step: exit 2 at once, config.yaml and
    attempts.jsonl untouched (before, the workers failed after Ray started and config.yaml was rewritten)."""
    root, n, _ = runs
    run = copy_run(root, f"refused-{field.strip('-').replace('.', '-')}")
    before = {f: (run / f).read_bytes() for f in ("config.yaml", "attempts.jsonl")}
    assert submit(root, run.name, 2 * n, "--resume", *change) == 2
    err = capsys.readouterr().err
    assert field in err and ("seq_len: 64 -> 32" in err or "below the checkpoint's step 6" in err), err
    assert {f: (run / f).read_bytes() for f in before} == before


def test_existing_run_name_is_refused_without_resume(runs, capsys):
    root, n, _ = runs
    assert submit(root, "straight", 2 * n) == 2
    assert "already exists" in capsys.readouterr().err
