"""Checkpoint verification that a damaged or doctored step folder cannot fool: a manifest of the wrong
shape, another step's manifest, a symlinked step folder and a shard gone together with its manifest entry
are each refused with the step named, and resume falls back to the previous good step."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

from tests.checkpoint.ckpt_helpers import CONFIG, job_overrides, load_job
from raytron import storage
from raytron.data_pipeline import DataCursor
from raytron.launcher.checkpointing import build_manifest
from raytron.launcher.cli import main
from raytron.launcher.resume_plan import format_plan, plan_resume
from raytron.launcher.validate import validate_job
from raytron.models import ModelConfig, Transformer, get_config
from raytron.parallelism.checkpoint import MANIFEST, CheckpointError, CheckpointStore

MODEL = get_config("moe", "debug", vocab_size=264)


def _reference_names() -> list[str]:
    with torch.device("meta"):
        return sorted(Transformer(ModelConfig(**MODEL.__dict__)).state_dict())


def real_run(root, steps=(2, 4)) -> tuple[str, CheckpointStore]:
    """Committed steps of a 2-rank job whose state shards hold every reference tensor name (rank 0 the
    first block and embeddings, rank 1 the rest; placeholder values, real names)."""
    spec = load_job(root, "src", 2, 2, steps=10)
    store = CheckpointStore(f"{spec.run_uri}/checkpoints", keep=10)
    names = _reference_names()
    half = [n for n in names if n.startswith("layers.1.")]
    parts = {"state-00000.pt": [n for n in names if n not in half], "state-00001.pt": half}
    for step in steps:
        records = [store.write_shard(step, f, {"params": {n: torch.zeros(1) for n in ns}}) for f, ns in parts.items()]
        manifest = build_manifest(spec, validate_job(spec), 2, MODEL, DataCursor(8 * step), {})
        store.commit(step, records, manifest)
    return spec.run_uri, store


def _rewrite(store, step, edit) -> None:
    path = f"{store.step_path(step)}/{MANIFEST}"
    manifest = json.loads(storage.read_bytes(path))
    storage.write_bytes(path, json.dumps(edit(manifest)).encode())


def test_a_complete_checkpoint_verifies(tmp_path):
    run, store = real_run(tmp_path)
    assert store.verify(4)["files"]["state-00001.pt"]["tensors"]
    assert plan_resume(load_job(tmp_path, "src", 2, 2, 10), run).ok


def _drop_size(m):
    del m["files"]["state-00000.pt"]["size"]
    return m


@pytest.mark.parametrize("edit, words", [
    (lambda m: [], "malformed: a JSON list"),
    (_drop_size, "malformed: file state-00000.pt has no size"),
    (lambda m: {**m, "files": ["state-00000.pt"]}, "malformed: 'files' is list"),
    (lambda m: {**m, "layout": {}}, "malformed: 'layout.world_size'"),
    (lambda m: {**m, "files": {"../../escape.pt": m["files"]["state-00000.pt"]}}, "not a plain file name"),
    (lambda m: {**m, "step": 2}, "the manifest of step 2, not of this folder's step"),
])
def test_malformed_manifest_is_refused_and_the_previous_step_used(tmp_path, edit, words):
    run, store = real_run(tmp_path)
    _rewrite(store, 4, edit)
    with pytest.raises(CheckpointError, match="step 4: ") as exc:
        store.verify(4, deep=False)
    assert words in str(exc.value)
    chosen, skipped = store.latest()
    assert chosen.step == 2 and words in skipped[0]
    plan = plan_resume(load_job(tmp_path, "src", 2, 2, 10), run)
    assert plan.ok and plan.step == 2 and any(words in n for n in plan.notes), format_plan(plan)


def test_symlinked_step_folder_is_refused(tmp_path):
    run, store = real_run(tmp_path)
    _, other = real_run(tmp_path / "elsewhere", steps=(6,))
    os.symlink(other.step_path(6), store.step_path(6))
    assert store.committed_steps() == [2, 4, 6]
    chosen, skipped = store.latest()
    assert chosen.step == 4 and "is a symbolic link" in skipped[0]


def test_shard_missing_with_its_manifest_entry_is_refused_at_plan_time(tmp_path, capsys):
    """Before, the manifest listed only what was left, verification passed, and every worker failed
    in load_state after Ray had started."""
    run, store = real_run(tmp_path, steps=(4,))
    os.remove(f"{store.step_path(4)}/state-00001.pt")
    _rewrite(store, 4, lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k != "state-00001.pt"}})
    with pytest.raises(CheckpointError, match=r"step 4: the checkpoint lacks \d+ tensors .*layers\.1\."):
        store.verify(4, deep=True)
    sets = [a for kv in job_overrides(tmp_path, 2, 2, 10, 1) for a in ("--set", kv)]
    assert main(["plan", CONFIG, *sets, "--name", "src", "--resume-from", run]) == 2
    err = capsys.readouterr().err
    assert "answer: NO" in err and "lacks" in err, err


def test_export_of_a_shard_that_is_not_a_tensor_file(tmp_path, capsys):
    from raytron.launcher.export import main as export_main

    run, store = real_run(tmp_path, steps=(4,))
    garbage = b"this is not a torch file" * 10
    shutil.rmtree(store.step_path(4))
    storage.makedirs(store.step_path(4))
    storage.write_bytes(f"{store.step_path(4)}/state-00000.pt", garbage)
    record = {"name": "state-00000.pt", "size": len(garbage), "sha256": hashlib.sha256(garbage).hexdigest()}
    spec = load_job(tmp_path, "src", 2, 2, steps=10)
    store.commit(4, [record], build_manifest(spec, validate_job(spec), 2, MODEL, DataCursor(32), {}))
    assert export_main([run, "--out", str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "step 4: shard state-00000.pt is not a tensor file" in err, err
    assert not (tmp_path / "w.safetensors").exists()
