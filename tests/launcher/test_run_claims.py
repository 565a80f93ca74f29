"""Run directories belong to one run: names cannot leave the run root, a new run is claimed exclusively by
one submit, and a submit refused before it starts leaves no run behind (so the name stays free)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytron.launcher import driver
from raytron.launcher.cli import main
from raytron.config.spec import load_spec
from raytron.config.strict_yaml import ConfigError

CONFIG = str(Path(__file__).resolve().parents[2] / "cluster_configs" / "local_debug.yaml")


def spec_at(root: Path, name: str = "claimed", *extra: str):
    return load_spec(CONFIG, [f"checkpoint.uri={root}", *extra], name)


def test_second_claim_of_a_new_run_is_refused(tmp_path):
    spec = spec_at(tmp_path)
    driver.claim_run(spec)
    assert driver._run_exists(spec)  # a submit arriving now sees the run as taken
    with pytest.raises(ConfigError, match="another submit is starting run 'claimed'"):
        driver.claim_run(spec)
    with pytest.raises(ConfigError, match=r"being started or resumed by another submit \(host .*, pid \d+.*delete .*\.claim"):
        driver.preflight(spec, resume=False)  # this process is alive: its claim is not stale


def test_claim_of_a_dead_submit_is_cleared(tmp_path):
    """A submit killed between its claim and config.yaml: the next submit of that name takes it over."""
    import json
    import subprocess
    import sys

    spec = spec_at(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "claimed").mkdir()
    (tmp_path / "claimed" / ".claim").write_text(json.dumps(
        {"host": driver.socket.gethostname(), "pid": int(dead.stdout), "create_time": 1.0, "time": 0}))
    driver.clear_stale_claim(spec)
    assert not driver._run_exists(spec)
    driver.claim_run(spec)


def test_claim_from_another_host_is_reported_not_cleared(tmp_path):
    spec = spec_at(tmp_path)
    (tmp_path / "claimed").mkdir()
    (tmp_path / "claimed" / ".claim").write_text('{"host": "node-7", "pid": 4242, "time": 0}')
    with pytest.raises(ConfigError, match="host node-7, pid 4242"):
        driver.preflight(spec, resume=True)
    assert (tmp_path / "claimed" / ".claim").exists()


def test_refused_submit_releases_its_claim_and_the_empty_run_directory(tmp_path, monkeypatch):
    """Data too small to train on is refused after the claim (data preparation comes after it): the name
    must stay free for the next try."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("one short document\n")
    spec = spec_at(tmp_path, "claimed", f"data.sources[0].uri={corpus}")
    claims = []
    monkeypatch.setattr(driver, "claim_run", lambda s, real=driver.claim_run: claims.append(real(s)))
    with pytest.raises((ConfigError, ValueError)):
        driver.run_job(spec)
    assert len(claims) == 1 and not (tmp_path / "claimed").exists()


def test_release_after_start_keeps_the_run(tmp_path):
    spec = spec_at(tmp_path)
    driver.claim_run(spec)
    (tmp_path / "claimed" / "config.yaml").write_text("name: claimed\n")
    driver.release_claim(spec, started=True)
    assert sorted(p.name for p in (tmp_path / "claimed").iterdir()) == ["config.yaml"]


def test_release_never_removes_a_directory_with_other_files(tmp_path):
    spec = spec_at(tmp_path)
    driver.claim_run(spec)
    (tmp_path / "claimed" / "keep.txt").write_text("x")
    driver.release_claim(spec, started=False)
    assert (tmp_path / "claimed" / "keep.txt").exists() and not (tmp_path / "claimed" / ".claim").exists()


@pytest.mark.parametrize("name", ["", "..", ".", "_data_cache", "café", "x" * 101])
def test_submit_refuses_bad_run_names_before_anything_starts(tmp_path, capsys, name):
    assert main(["submit", CONFIG, "--name", name, "--set", f"checkpoint.uri={tmp_path}"]) == 2
    assert "name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["status", "logs"])
@pytest.mark.parametrize("name", ["..", "../runs/x", "_data_cache"])
def test_status_and_logs_stay_inside_the_root(tmp_path, capsys, command, name):
    root = tmp_path / "runs"
    root.mkdir()
    (tmp_path / "config.yaml").write_text("train: {steps: 1}\n")  # what '..' would find
    assert main([command, name, "--root", str(root)]) == 2
    assert "is not a run name" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["status", "logs"])
def test_a_missing_local_run_is_named(tmp_path, capsys, command):
    assert main([command, "nope", "--root", str(tmp_path)]) == 2
    assert f"raytron: error: no run named 'nope' under {tmp_path}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["status", "logs", "stop"])
def test_a_missing_cluster_job_is_named(capsys, monkeypatch, command):
    class NoJobs:  # a Jobs API that knows neither the run name nor the submission id
        def list_jobs(self):
            return []

        def get_job_info(self, ref):
            raise RuntimeError(f"job {ref} does not exist")

    from raytron.launcher import runs

    monkeypatch.setattr(runs, "jobs_client", lambda address: NoJobs())
    assert main([command, "nope", "--address", "http://127.0.0.1:8265"]) == 2
    assert "raytron: error: no job or run named 'nope' on http://127.0.0.1:8265" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["runs"], ["status", "x"], ["logs", "x"], ["stop", "x"]])
def test_malformed_address_is_refused_without_a_traceback(capsys, command):
    assert main([*command, "--address", "notaurl"]) == 2
    assert "http://HOST:8265" in capsys.readouterr().err


def test_seed_and_layer_limits_are_refused_by_plan_too(capsys):
    assert main(["plan", CONFIG, "--set", "train.seed=99999999999999999999999"]) == 2
    assert "train.seed" in capsys.readouterr().err
    assert main(["plan", CONFIG, "--set", "model.overrides.num_layers=0"]) == 2
    assert "num_layers" in capsys.readouterr().err


@pytest.fixture(params=["memory", "s3"])
def remote_root(request) -> str:
    import uuid

    import fsspec

    if request.param == "memory":
        return f"memory://claims-{uuid.uuid4().hex[:8]}/runs"
    request.getfixturevalue("s3_server")
    bucket = f"raytron-claims-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3").mkdir(bucket)
    return f"s3://{bucket}/runs"


def test_claim_on_object_storage(remote_root):
    """Exclusive create where the filesystem has it, check-then-write where not: a second claim is refused
    either way, and a refused submit leaves nothing behind."""
    import dataclasses

    spec = load_spec(CONFIG, [], "claimed")  # memory:// is refused as a run root; the claim itself works on it
    spec = dataclasses.replace(spec, checkpoint=dataclasses.replace(spec.checkpoint, uri=remote_root))
    driver.claim_run(spec)
    with pytest.raises(ConfigError, match="another submit is starting"):
        driver.claim_run(spec)
    driver.release_claim(spec, started=False)
    assert not driver._run_exists(spec)
    driver.claim_run(spec)  # free again


@pytest.mark.parametrize("address, ok", [("notaurl", False), ("http://127.0.0.1:8265", True), ("10.0.0.1:6379", True),
                                         ("ray://head:10001", True), ("auto", True), ("head 6379", False)])
def test_submit_address_forms(address, ok):
    from raytron.launcher.jobs import check_address

    if ok:
        check_address(address)
    else:
        with pytest.raises(ConfigError, match="--address"):
            check_address(address)


def test_submit_with_a_malformed_address_is_refused_before_data_preparation(tmp_path, capsys):
    assert main(["submit", CONFIG, "--address", "notaurl", "--set", f"checkpoint.uri={tmp_path}"]) == 2
    captured = capsys.readouterr()
    assert "--address" in captured.err and "data ready" not in captured.out
    assert list(tmp_path.iterdir()) == []


def test_a_resume_is_refused_while_another_submit_starts_the_run(tmp_path):
    """Two `--resume` of one run a second apart: the second sees the first's claim (before, both trained and
    mixed two histories in one checkpoint folder)."""
    spec = spec_at(tmp_path)
    (tmp_path / "claimed").mkdir()
    (tmp_path / "claimed" / "config.yaml").write_text("name: claimed\n")
    driver.claim_run(spec)  # the first resume, alive (this process)
    with pytest.raises(ConfigError, match="being started or resumed by another submit"):
        driver.preflight(spec, resume=True)
    driver.release_claim(spec, started=True)
    assert sorted(p.name for p in (tmp_path / "claimed").iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("body", ["[1, 2]", "", "not json"])
def test_a_malformed_claim_is_named_not_a_traceback(tmp_path, body):
    spec = spec_at(tmp_path)
    (tmp_path / "claimed").mkdir()
    (tmp_path / "claimed" / ".claim").write_text(body)
    with pytest.raises(ConfigError, match=r"delete .*\.claim"):
        driver.clear_stale_claim(spec)


def test_a_file_where_the_run_directory_would_be_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is a file, not a run directory"):
        driver.claim_run(spec_at(tmp_path, "notes.txt"))
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["123", "2024-01-01", "1e3", "true"])
def test_name_flag_is_text_as_given(tmp_path, name):
    """--name used to go through YAML: 123 became an int and was refused as 'expected a string'."""
    assert spec_at(tmp_path, name).name == name


def test_claim_on_a_filesystem_without_exclusive_create_falls_back_to_check_then_write(tmp_path, monkeypatch):
    """Storage whose open() refuses mode "x": the claim is still written, and a second claim still refused."""
    import fsspec.implementations.local as local

    real_open = local.LocalFileSystem._open

    def no_exclusive(self, path, mode="rb", *args, **kwargs):
        if "x" in mode:
            raise ValueError(f"mode {mode!r} not supported")
        return real_open(self, path, mode, *args, **kwargs)

    monkeypatch.setattr(local.LocalFileSystem, "_open", no_exclusive)
    spec = spec_at(tmp_path)
    driver.claim_run(spec)
    assert (tmp_path / "claimed" / ".claim").exists()
    with pytest.raises(ConfigError, match="another submit is starting run 'claimed'"):
        driver.claim_run(spec)


def test_resume_without_a_committed_checkpoint_is_refused(tmp_path, capsys):
    """--resume of a run that never committed a step would silently train from step 0: refused, and the
    run's records are left as they were."""
    run = tmp_path / "early"
    (run / "checkpoints" / "step-000000002").mkdir(parents=True)  # an interrupted first save
    (run / "config.yaml").write_text("name: early\n")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    argv = ["submit", CONFIG, "--name", "early", "--set", f"checkpoint.uri={tmp_path}", "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no committed checkpoint" in err and "--name" in err, err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert (run / "config.yaml").read_text() == "name: early\n"
    assert main(["plan", CONFIG, "--set", f"checkpoint.uri={tmp_path}", "--resume-from", str(run)]) == 2
    assert "answer: NO" in capsys.readouterr().err
