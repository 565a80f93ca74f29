"""`raytron plan CONFIG --resume-from URI`: the right yes/no for a table of layout and config changes,
decided from manifests alone (checkpoints here are real manifests over placeholder shard files)."""

from __future__ import annotations

import pytest
import torch

from raytron import storage
from tests.checkpoint.ckpt_helpers import CONFIG, job_overrides, load_job
from raytron.data_pipeline import DataCursor
from raytron.launcher.checkpointing import build_manifest
from raytron.launcher.cli import main
from raytron.launcher.resume_plan import format_plan, plan_resume
from raytron.launcher.validate import validate_job
from raytron.models import get_config
from raytron.parallelism.checkpoint import CheckpointStore

STEP = 6


def fake_checkpoint(root, name: str, workers: int, ep: int, step: int = STEP, **extra) -> str:
    """A committed step as a `workers`-rank, EP=`ep` job (deepspeed unless `extra` says otherwise) would write
    it (tiny placeholders)."""
    spec = load_job(root, name, workers, ep, steps=10, **extra)
    store = CheckpointStore(f"{spec.run_uri}/checkpoints")
    names = [f"state-{r:05d}.pt" for r in range(ep)] + [f"rng-{r:05d}.pt" for r in range(workers)]
    records = [store.write_shard(step, n, {"placeholder": torch.zeros(1)}) for n in names]
    manifest = build_manifest(spec, validate_job(spec), workers, get_config("moe", "debug", vocab_size=264),
                              DataCursor(8 * step), {"loss": 1.0})
    store.commit(step, records, manifest)
    return spec.run_uri


# (new config changes, loads?, words that must appear in the answer)
TABLE = [
    ({}, True, ["as saved"]),
    ({"resources.workers": 4, "layout.ep": 4}, True, ["ep 2 -> 4, 2 -> 1 experts per rank", "workers 2 -> 4"]),
    ({"resources.workers": 4}, True, ["dp 2 (ZeRO-2) -> dp 4 (ZeRO-2)", "canary restore"]),
    ({"layout.ep": 1}, True, ["ep 2 -> 1, 2 -> 4 experts per rank"]),
    ({"layout.zero_stage": 1}, True, ["dp 2 (ZeRO-2) -> dp 2 (ZeRO-1)"]),
    ({"train.lr": 1e-3, "train.steps": 100}, True, ["as saved"]),
    ({"train.global_batch_size": 16}, True, ["global batch 8 -> 16"]),
    ({"resources.workers": 3, "layout.ep": 3, "train.global_batch_size": 12}, False, ["layout.ep", "experts"]),
    ({"resources.workers": 8, "layout.ep": 8, "train.micro_batch_size": 1}, False, ["layout.ep", "experts"]),
    ({"engine": "megatron", "layout.zero_stage": 1}, False, ["megatron engine runs on GPUs only"]),
    ({"engine": "megatron", "resources.use_gpu": True, "layout.zero_stage": 1}, True,
     ["engine deepspeed -> megatron: the same reference-named fp32 weights", "canary restore"]),
    ({"engine": "megatron", "resources.use_gpu": True, "layout.zero_stage": 1, "model.overrides": "{num_layers: 4}"},
     False, ["model.overrides.num_layers: None -> 4"]),
    ({"model.overrides": "{num_layers: 4}"}, False, ["model.overrides.num_layers: None -> 4"]),
    ({"train.seq_len": 128}, False, ["seq_len: 64 -> 128"]),
    ({"data.max_documents": 200}, False, ["data.max_documents: 120 -> 200"]),
    ({"model.flavor": "debug-capacity"}, False, ["model.flavor: 'debug' -> 'debug-capacity'"]),
]


@pytest.mark.parametrize("changes, loads, words", TABLE, ids=[str(c) or "same" for c, _, _ in TABLE])
def test_resume_plan_table(tmp_path, changes, loads, words):
    run = fake_checkpoint(tmp_path, "src", workers=2, ep=2)
    spec = load_job(tmp_path, "new", 2, 2, 10, **changes)
    plan = plan_resume(spec, run)
    text = format_plan(plan)
    assert plan.ok is loads, text
    assert plan.step == STEP and f"step {STEP}" in text, text
    for w in words:
        assert w in text, f"expected {w!r} in:\n{text}"


MEGATRON = {"engine": "megatron", "resources.use_gpu": True, "layout.zero_stage": 1, "layout.dp": "null"}


def test_megatron_tp_to_pp_change_is_a_reshard_not_as_saved(tmp_path):
    """Same world, dp, ep and batch, but TP2 -> PP2: every megatron shard is cut anew (was answered \"as saved\")."""
    run = fake_checkpoint(tmp_path, "tp2", workers=2, ep=1, **MEGATRON, **{"layout.tp": 2})
    plan = plan_resume(load_job(tmp_path, "pp2", 2, 1, 10, **MEGATRON, **{"layout.pp": 2}), run)
    text = format_plan(plan)
    assert plan.ok and "as saved" not in text, text
    assert "tp 2 -> 1, pp 1 -> 2: every shard is cut anew" in text and "canary restore" in text, text


def test_engine_change_back_and_refusals(tmp_path):
    """megatron -> deepspeed loads (the state converts); an engine change to an engine that cannot run the
    job is refused naming the field, in both directions."""
    run = fake_checkpoint(tmp_path, "tp2", workers=2, ep=1, **MEGATRON, **{"layout.tp": 2})
    plan = plan_resume(load_job(tmp_path, "ds", 2, 1, 10), run)
    text = format_plan(plan)
    assert plan.ok and "engine megatron -> deepspeed" in text and "tp 2 -> 1" in text, text
    plan = plan_resume(load_job(tmp_path, "ds", 2, 1, 10, **{"train.precision": "fp8"}), run)
    assert not plan.ok and "engine deepspeed cannot run this job (train.precision" in format_plan(plan)
    bias = {"model.overrides": "{bias_update_rate: 0.001}"}  # softmax scores with a routing bias
    run = fake_checkpoint(tmp_path, "biased", workers=2, ep=2, **bias)
    plan = plan_resume(load_job(tmp_path, "m", 2, 2, 10, **MEGATRON, **bias), run)
    assert not plan.ok and "engine megatron cannot run this job (model.overrides.bias_update_rate" in format_plan(plan)


def test_back_from_ep4_to_ep2(tmp_path):
    run = fake_checkpoint(tmp_path, "wide", workers=4, ep=4)
    plan = plan_resume(load_job(tmp_path, "narrow", 2, 2, 10), run)
    assert plan.ok and any("ep 4 -> 2, 1 -> 2 experts per rank" in r for r in plan.reshard), format_plan(plan)


def test_missing_shard_and_uncommitted_step_are_refused(tmp_path):
    run = fake_checkpoint(tmp_path, "src", workers=2, ep=2)
    store = CheckpointStore(f"{run}/checkpoints")
    storage.remove(f"{store.step_path(STEP)}/state-00001.pt", missing_ok=False)
    spec = load_job(tmp_path, "src", 2, 2, 10)
    plan = plan_resume(spec, run)
    assert not plan.ok and f"step {STEP}: shard state-00001.pt is missing" in format_plan(plan)
    store.write_shard(STEP + 2, "state-00000.pt", {"x": torch.zeros(1)})  # never committed
    plan = plan_resume(spec, store.step_path(STEP + 2))
    assert not plan.ok and f"step {STEP + 2} has no COMMITTED marker" in plan.reasons[0]


def test_plan_cli_flag(tmp_path, capsys):
    run = fake_checkpoint(tmp_path, "src", workers=2, ep=2)
    base = job_overrides(tmp_path, workers=4, ep=4, steps=10, every=1)
    sets = [a for kv in base for a in ("--set", kv)]
    assert main(["plan", CONFIG, "--name", "new", "--resume-from", f"{run}/checkpoints", *sets]) == 0
    out = capsys.readouterr().out
    assert "answer: YES" in out and "ep 2 -> 4" in out and "into layout" in out
    sets[sets.index("layout.ep=4")] = "layout.ep=3"
    sets[sets.index("resources.workers=4")] = "resources.workers=3"
    sets[sets.index("train.global_batch_size=8")] = "train.global_batch_size=12"
    assert main(["plan", CONFIG, "--name", "new", "--resume-from", run, *sets]) == 2
    assert "answer: NO" in capsys.readouterr().err


def test_plan_names_a_newer_uncommitted_step_it_passes_over(tmp_path):
    run = fake_checkpoint(tmp_path, "src", workers=2, ep=2)
    store = CheckpointStore(f"{run}/checkpoints")
    store.write_shard(STEP + 2, "state-00000.pt", {"x": torch.zeros(1)})  # an interrupted save
    plan = plan_resume(load_job(tmp_path, "src", 2, 2, 10), run)
    assert plan.ok and plan.step == STEP
    text = format_plan(plan)
    assert f"note: step {STEP + 2} has no COMMITTED marker (an interrupted save): not used" in text


def test_plan_refuses_train_steps_below_the_checkpoint_as_submit_does(tmp_path):
    run = fake_checkpoint(tmp_path, "src", workers=2, ep=2)
    plan = plan_resume(load_job(tmp_path, "src", 2, 2, STEP - 1), run)
    assert not plan.ok and f"train.steps={STEP - 1} is below the checkpoint's step {STEP}" in plan.reasons[0]


@pytest.mark.parametrize("where", ["file", "foo://x"])
def test_plan_of_something_that_is_no_folder_is_a_reason_not_a_traceback(tmp_path, where):
    target = tmp_path / "config.yaml"
    target.write_text("x: 1\n")
    uri = str(target) if where == "file" else where
    plan = plan_resume(load_job(tmp_path, "src", 2, 2, 10), uri)
    assert not plan.ok and ("cannot read" in plan.reasons[0] or "no committed checkpoint" in plan.reasons[0])


def test_resume_with_more_steps_keeps_the_lr_schedule(tmp_path, capsys):
    """A 10-step run resumed at step 6 with train.steps=100: the LR goes on along the 10-step cosine
    (before, the schedule was recomputed over 100 steps and the LR jumped back up at step 7)."""
    from raytron.launcher.driver import check_resumable
    from raytron.parallelism.schedule import lr_multiplier

    run = fake_checkpoint(tmp_path, "src", workers=2, ep=2)
    original = load_job(tmp_path, "src", 2, 2, 10).train
    longer = load_job(tmp_path, "src", 2, 2, 100)
    resumed = check_resumable(longer)  # the driver's decision for `submit --resume`
    assert resumed.train.schedule_steps == 10 and resumed.train.steps == 100
    before, after = lr_multiplier(original), lr_multiplier(resumed.train)
    assert [after(s) for s in range(STEP, 10)] == [before(s) for s in range(STEP, 10)]
    assert lr_multiplier(longer.train)(STEP) > 1.5 * before(STEP)  # what the recomputed schedule did
    assert main(["plan", CONFIG, *[a for kv in job_overrides(tmp_path, 2, 2, 100, 1) for a in ("--set", kv)],
                 "--name", "src", "--resume-from", run]) == 0
    lr = original.lr * before(STEP)
    assert f"learning rate at step {STEP + 1}: {lr:.4g} before the resume (cosine over 10 steps, warm-up 2), " \
           f"{lr:.4g} after (over 10, warm-up 2)" in capsys.readouterr().out
    # asked for: a new span re-plans the decay, and the plan says the LR changes at the resumed step
    replanned = plan_resume(load_job(tmp_path, "src", 2, 2, 100, **{"train.schedule_steps": 100}), run)
    assert replanned.spec.train.schedule_steps == 100
    assert any("the schedule changes here" in n for n in replanned.notes), format_plan(replanned)


def _flip_last_byte(path: str) -> None:
    """Same size, other bytes: only the SHA-256 tells (flipping again restores the file)."""
    with open(path, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)[0]
        f.seek(-1, 2)
        f.write(bytes([last ^ 0xFF]))


def _corrupt(store: CheckpointStore, step: int, name: str) -> None:
    _flip_last_byte(f"{store.step_path(step)}/{name}")


def test_checkpoints_corrupt_by_hash_only_are_refused_before_ray(tmp_path, capsys):
    """Every committed step has the right sizes but a corrupted shard: plan answers NO and submit --resume is
    refused in the driver (before, both passed the size check and every worker failed at load)."""
    from raytron.launcher.driver import check_resumable
    from raytron.config.strict_yaml import ConfigError

    run = fake_checkpoint(tmp_path, "src", workers=2, ep=2)
    fake_checkpoint(tmp_path, "src", workers=2, ep=2, step=STEP + 2)
    store = CheckpointStore(f"{run}/checkpoints", keep=5)
    _corrupt(store, STEP + 2, "state-00001.pt")
    plan = plan_resume(load_job(tmp_path, "src", 2, 2, 10), run)
    assert plan.ok and plan.step == STEP, format_plan(plan)  # falls back, as the resume does
    assert any(f"step {STEP + 2}: shard state-00001.pt fails its SHA-256 check" in n for n in plan.notes)
    _corrupt(store, STEP, "rng-00000.pt")
    plan = plan_resume(load_job(tmp_path, "src", 2, 2, 10), run)
    assert not plan.ok and "no committed checkpoint with all its files" in format_plan(plan)
    with pytest.raises(ConfigError, match="cannot resume under this config: no committed checkpoint") as exc:
        check_resumable(load_job(tmp_path, "src", 2, 2, 10))
    assert exc.value.path == "--resume" and f"step {STEP}: shard rng-00000.pt fails its SHA-256 check" in str(exc.value)
    sets = [a for kv in job_overrides(tmp_path, 2, 2, 10, 1) for a in ("--set", kv)]
    assert main(["plan", CONFIG, *sets, "--name", "src", "--resume-from", run]) == 2
    err = capsys.readouterr().err
    assert "answer: NO" in err and "fails its SHA-256 check" in err, err


def test_plan_reads_a_step_a_resume_set_aside(tmp_path, capsys):
    run = fake_checkpoint(tmp_path, "src", workers=2, ep=2)
    store = CheckpointStore(f"{run}/checkpoints")
    _corrupt(store, STEP, "state-00000.pt")
    folder = store.set_aside(STEP)
    assert "/rejected/step-" in folder
    uri = storage.full_uri(folder)
    plan = plan_resume(load_job(tmp_path, "src", 2, 2, 10), uri)
    assert not plan.ok and plan.step == STEP, format_plan(plan)
    assert f"step {STEP}: shard state-00000.pt fails its SHA-256 check" in plan.reasons[0]
    _flip_last_byte(f"{folder}/state-00000.pt")  # repaired: it loads, and the plan says how to use it
    plan = plan_resume(load_job(tmp_path, "src", 2, 2, 10), folder)
    assert plan.ok and plan.step == STEP, format_plan(plan)
    assert any(f"move {folder} back to" in n and f"step-{STEP:09d}" in n for n in plan.notes), format_plan(plan)
    sets = [a for kv in job_overrides(tmp_path, 2, 2, 10, 1) for a in ("--set", kv)]
    assert main(["plan", CONFIG, *sets, "--name", "src", "--resume-from", folder + "/"]) == 0
    assert "answer: YES" in capsys.readouterr().out
