"""`raytron export` refuses bad output and run paths before reading the checkpoint, never overwrites
a file without --force, never writes into the run's checkpoints/ (even with --force), and writes
its output atomically (temporary name beside it, then rename)."""

from __future__ import annotations

import dataclasses
import os
import shutil

import fsspec
import pytest
import torch
from safetensors.torch import load_file

from raytron import models
from raytron.launcher.cli import main as cli_main
from raytron.launcher.export import main
from raytron.parallelism.checkpoint import CheckpointStore

SHARD = "checkpoints/step-000000002/state-00000.pt"


def _commit(run_uri: str, step: int = 2) -> None:
    torch.manual_seed(0)
    model = models.build("moe", "debug")
    store = CheckpointStore(f"{run_uri}/checkpoints")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    meta = {"engine": "megatron", "optimizer_step": step, "has_moments": False, "steps_done": step}
    state = {"params": params, "buffers": {}, "meta": meta}
    rec = store.write_shard(step, "state-00000.pt", state)
    store.commit(step, [rec], {"engine": "megatron", "model": dataclasses.asdict(model.cfg)})


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    _commit(str(run))
    return run


@pytest.fixture
def run(committed, tmp_path):
    """A private copy of the committed run (tests may try to damage it)."""
    dst = tmp_path / "run"
    shutil.copytree(committed, dst)
    return dst


@pytest.fixture
def no_read(monkeypatch):
    """Fail the test if the checkpoint is read or verified (the path checks must come first)."""
    def refuse(*_a, **_k):
        raise AssertionError("checkpoint was read before the paths were checked")
    for name in ("latest", "verify", "read_shard"):
        monkeypatch.setattr(CheckpointStore, name, refuse)


def _err(capsys) -> str:
    return capsys.readouterr().err


# ---- 1. no silent overwrite; never into checkpoints/ ---------------------------------------------

def test_existing_out_is_refused_without_force(run, tmp_path, capsys, no_read):
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"keep me")
    assert main([str(run), "--out", str(out)]) == 2
    err = _err(capsys)
    assert str(out) in err and "already exists" in err and "--force" in err, err
    assert out.read_bytes() == b"keep me"


def test_existing_out_is_replaced_with_force(run, tmp_path):
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"old")
    assert cli_main(["export", str(run), "--out", str(out), "--force"]) == 0
    assert "layers.1.mixer.w_gate" in load_file(str(out))


@pytest.mark.parametrize("force", [False, True])
def test_out_inside_checkpoints_is_always_refused(run, capsys, no_read, force):
    shard = run / SHARD
    before = shard.read_bytes()
    argv = [str(run), "--out", str(shard)] + (["--force"] if force else [])
    assert main(argv) == 2
    err = _err(capsys)
    assert "inside the run's checkpoints" in err and "outside" in err, err
    assert shard.read_bytes() == before


def test_out_inside_checkpoints_is_refused_via_dotdot_symlink_and_new_name(run, tmp_path, capsys, no_read,
                                                                            monkeypatch):
    link = tmp_path / "link"
    link.symlink_to(run / "checkpoints" / "step-000000002")
    monkeypatch.chdir(run)
    cases = [  # a relative path with `..`, a symlinked folder, a new file name inside checkpoints/
        "tensorboard/../checkpoints/step-000000002/state-00000.pt",
        str(link / "state-00000.pt"),
        str(run / "checkpoints" / "new.safetensors"),
    ]
    for out in cases:
        assert main([str(run), "--out", out, "--force"]) == 2, out
        assert "inside the run's checkpoints" in _err(capsys), out
    assert not (run / "checkpoints" / "new.safetensors").exists()
    # RUN_URI given as the checkpoints/ folder itself is protected the same way
    assert main([str(run / "checkpoints"), "--out", str(run / SHARD), "--force"]) == 2


def test_remote_out_inside_checkpoints_is_refused():
    run_uri = "memory://export-test/run"
    _commit(run_uri)
    fs = fsspec.filesystem("memory")
    before = fs.cat_file(f"/export-test/run/{SHARD}")
    for out in (f"{run_uri}/{SHARD}", f"memory:///export-test/run/{SHARD}",
                "memory://export-test/run/x/../checkpoints/w.safetensors"):
        assert main([run_uri, "--out", out, "--force"]) == 2, out
    assert fs.cat_file(f"/export-test/run/{SHARD}") == before
    assert main([run_uri, "--out", "memory://export-test/out/w.safetensors"]) == 0
    assert fs.cat_file("/export-test/out/w.safetensors")[:8]  # written, via a temporary name
    assert fs.ls("/export-test/out", detail=False) == ["/export-test/out/w.safetensors"]
    assert main([run_uri, "--out", "memory://export-test/out/w.safetensors"]) == 2  # exists now


# ---- 2. bad paths: exit 2 with a message, before the checkpoint is read -------------------------------

def test_missing_out_directory(run, tmp_path, capsys, no_read):
    out = tmp_path / "no" / "such" / "dir" / "w.safetensors"
    assert main([str(run), "--out", str(out)]) == 2
    err = _err(capsys)
    assert str(tmp_path / "no" / "such" / "dir") in err and "does not exist" in err and "mkdir" in err, err


def test_out_parent_is_a_file(run, tmp_path, capsys, no_read):
    (tmp_path / "notes.txt").write_text("x")
    assert main([str(run), "--out", str(tmp_path / "notes.txt" / "w.safetensors")]) == 2
    assert "not a directory" in _err(capsys)


def test_out_is_a_directory(run, tmp_path, capsys, no_read):
    (tmp_path / "weights").mkdir()
    for out in (str(tmp_path / "weights"), str(tmp_path / "new") + "/"):
        assert main([str(run), "--out", out, "--force"]) == 2, out
        err = _err(capsys)
        assert "directory" in err and "file name" in err, err


def test_run_uri_is_a_file(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("name: x\n")
    assert cli_main(["export", str(config), "--out", str(tmp_path / "w.safetensors")]) == 2
    err = _err(capsys)
    assert str(config) in err and "is a file" in err and "run directory" in err, err
    assert not (tmp_path / "w.safetensors").exists()


# ---- 3. atomic write ------------------------------------------------------------------------------

def test_interrupted_export_leaves_no_partial_file(run, tmp_path, monkeypatch):
    import safetensors.torch

    def torn_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)  # a truncated header, then the process is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", torn_save)
    out = tmp_path / "out" / "w.safetensors"
    out.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        main([str(run), "--out", str(out)])
    assert os.listdir(out.parent) == [], "nothing under the final name, no temporary left behind"
    out.write_bytes(b"previous export")
    with pytest.raises(KeyboardInterrupt):
        main([str(run), "--out", str(out), "--force"])
    assert out.read_bytes() == b"previous export", "an interrupted --force export keeps the old file"
    assert os.listdir(out.parent) == ["w.safetensors"]


def test_out_inside_another_runs_step_folder_is_refused_even_with_force(tmp_path):
    """The inside-checkpoints guard covered only the exported run: any step folder is refused now."""
    from raytron.launcher.export import check_paths

    victim = tmp_path / "victim" / "checkpoints" / "step-000000004"
    victim.mkdir(parents=True)
    (victim / "state-00000.pt").write_bytes(b"shard")
    (tmp_path / "base").mkdir()
    for force in (False, True):
        with pytest.raises(ValueError, match="inside a checkpoint step folder"):
            check_paths(str(tmp_path / "base"), str(victim / "state-00000.pt"), force)
    assert (victim / "state-00000.pt").read_bytes() == b"shard"


def test_atomic_write_keeps_the_usual_file_mode(tmp_path):
    """safetensors' own writer leaves 0600: a weights file meant to be shared kept only its owner."""
    import os
    import stat

    import torch

    from raytron.launcher.export import write_atomic

    new = tmp_path / "new.safetensors"
    write_atomic(str(new), {"w": torch.zeros(2)}, {}, force=False)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask
    new.chmod(0o640)
    write_atomic(str(new), {"w": torch.ones(2)}, {}, force=True)
    assert stat.S_IMODE(new.stat().st_mode) == 0o640
