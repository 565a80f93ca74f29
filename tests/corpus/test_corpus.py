"""Every case of the corpus (cases.yaml: bad configs, data and checkpoints) through the commands a user runs,
in this process through the CLI's main: the exit code and the words each case expects, and never a
traceback (an exception escaping main is one). No Ray: submit stops where Ray would start."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from raytron import storage
from raytron.launcher.cli import main
from raytron.config.strict_yaml import ConfigError
from tests.checkpoint.ckpt_helpers import CONFIG as CKPT_CONFIG, job_overrides, load_job

CORPUS = Path(__file__).resolve().parent
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())
RAY_REACHED = "corpus test: every check before Ray passed"


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    from raytron.launcher import driver

    def stop(*args, **kwargs):
        raise ConfigError("ray", RAY_REACHED)

    monkeypatch.setattr(driver, "_init_ray", stop)


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    except BaseException as exc:  # noqa: BLE001 - escaping main is a traceback on the console
        pytest.fail(f"raytron {' '.join(argv[:2])} raised {type(exc).__name__}: {str(exc)[:300]}")
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _check(case: dict, command: str, code: int, text: str) -> None:
    want, words = case["expect"][command]
    assert "Traceback" not in text, text
    if want == "ray":
        assert code == 2 and RAY_REACHED in text, f"{command}: exit {code}, expected to reach Ray:\n{text}"
    else:
        assert code == want, f"{command}: exit {code}, expected {want}:\n{text}"
    missing = [w for w in words if w not in text]
    assert not missing, f"{command}: {missing} not in:\n{text}"


# ---- the run's own data cache, built once, copied and damaged per case
def _flip(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes([value]))


def _put_token(path: Path, index: int, value: int) -> None:
    with open(path, "r+b") as f:  # the byte tokenizer's cache holds uint16 ids
        f.seek(2 * index)
        f.write(int(value).to_bytes(2, "little"))


def _truncate(path: Path, by: int) -> None:
    os.truncate(path, path.stat().st_size - by)


CACHE_DAMAGE = {
    "cache_truncate_bin": lambda d: _truncate(d / "source-0.bin", 2),
    "cache_truncate_idx": lambda d: _truncate(d / "source-0.idx", 8),
    "cache_bad_dtype": lambda d: _flip(d / "source-0.idx", 17, 99),
    "cache_oov_id": lambda d: _put_token(d / "source-0.bin", 5, 999),
    "cache_manifest_garbage": lambda d: (d / "manifest.json").write_text("{not json"),
}


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    from raytron.data_pipeline import prepare_for_job
    from raytron.config.spec import load_spec

    root = tmp_path_factory.mktemp("cache")
    spec = load_spec(str(CORPUS / "configs" / "base.yaml"))
    prepare_for_job(spec.data, spec.train.seq_len, spec.train.seed, cache_uri=str(root / "cache"))
    return root / "cache"


# ---- checkpoints: real manifests over placeholder shards (tests/checkpoint/test_manifest_checks.py)
def _manifest(store, step: int) -> dict:
    return json.loads(storage.read_bytes(f"{store.step_path(step)}/manifest.json"))


def _put_manifest(store, step: int, manifest) -> None:
    storage.write_bytes(f"{store.step_path(step)}/manifest.json", json.dumps(manifest).encode())


def _drop_size(store, _):
    m = _manifest(store, 4)
    del m["files"]["state-00000.pt"]["size"]
    _put_manifest(store, 4, m)


def _symlinked_step(store, _):
    from tests.checkpoint.test_manifest_checks import real_run

    _, other = real_run(Path(store.uri).parents[1] / "elsewhere", steps=(6,))
    os.symlink(other.step_path(6), store.step_path(6))


def _drop_shard_and_entry(store, _):
    for step in store.committed_steps():
        os.remove(f"{store.step_path(step)}/state-00001.pt")
        m = _manifest(store, step)
        del m["files"]["state-00001.pt"]
        _put_manifest(store, step, m)


def _replace_shard(store, src: Path):
    from raytron.data_pipeline import DataCursor
    from raytron.launcher.checkpointing import build_manifest
    from raytron.launcher.validate import validate_job
    from tests.checkpoint.test_manifest_checks import MODEL

    garbage = src.read_bytes()
    shutil.rmtree(store.step_path(4))
    storage.makedirs(store.step_path(4))
    storage.write_bytes(f"{store.step_path(4)}/state-00000.pt", garbage)
    record = {"name": "state-00000.pt", "size": len(garbage), "sha256": hashlib.sha256(garbage).hexdigest()}
    spec = load_job(Path(store.uri).parents[1], "src", 2, 2, steps=10)
    store.commit(4, [record], build_manifest(spec, validate_job(spec), 2, MODEL, DataCursor(32), {}))


def _corrupt_every_step(store, _):
    for step in store.committed_steps():
        path = Path(store.step_path(step)) / "state-00000.pt"
        _flip(path, path.stat().st_size - 1, path.read_bytes()[-1] ^ 0xFF)


def _uncommit_every_step(store, _):
    for step in store.committed_steps():
        os.remove(f"{store.step_path(step)}/COMMITTED")


CKPT_DAMAGE = {
    "newest_manifest": lambda store, src: storage.write_bytes(f"{store.step_path(4)}/manifest.json", src.read_bytes()),
    "manifest_drop_size": _drop_size,
    "manifest_other_step": lambda store, _: _put_manifest(store, 4, _manifest(store, 2)),
    "symlinked_step": _symlinked_step,
    "drop_shard_and_entry": _drop_shard_and_entry,
    "only_step_shard_replaced": _replace_shard,
    "corrupt_every_step": _corrupt_every_step,
    "uncommit_every_step": _uncommit_every_step,
}


def _base_sets(tmp_path: Path, case: dict) -> list[str]:
    sets = [f"checkpoint.uri={tmp_path}/runs", f"data.cache_uri={tmp_path}/cache"] if case.get("paths", True) else []
    sets += [s.format(corpus=CORPUS) for s in case.get("sets", [])]
    return [a for kv in sets for a in ("--set", kv)]


def _argv(case: dict, command: str, tmp_path: Path, built_cache: Path) -> list[str]:
    """The command line of `command` for `case`, after preparing what the case damages."""
    damage, src = case.get("damage"), CORPUS / case["input"] if "input" in case else None
    if damage in CKPT_DAMAGE:
        from tests.checkpoint.test_manifest_checks import real_run

        run, store = real_run(tmp_path)
        CKPT_DAMAGE[damage](store, src)
        sets = [a for kv in job_overrides(tmp_path, 2, 2, 10, 1) for a in ("--set", kv)]
        return {"plan": ["plan", CKPT_CONFIG, *sets, "--name", "src", "--resume-from", run],
                "submit": ["submit", CKPT_CONFIG, *sets, "--name", "src", "--resume"],
                "export": ["export", run, "--out", str(tmp_path / "w.safetensors")]}[command]
    sets = _base_sets(tmp_path, case)
    config = str(CORPUS / "configs" / "base.yaml")
    if damage in CACHE_DAMAGE:
        shutil.copytree(built_cache, tmp_path / "cache")
        (key,) = os.listdir(tmp_path / "cache")
        CACHE_DAMAGE[damage](tmp_path / "cache" / key)
    elif case["input"].startswith("configs/"):
        config = str(src)
    elif command != "prepare":  # a data file or a prepared prefix as the job's only source
        sets += ["--set", f"data.sources=[{{uri: '{src}'}}]"]
    if command == "prepare":
        return ["data", "prepare", str(src), "--out", str(tmp_path / "out" / "p"), "--no-progress"]
    return [command, config, *sets]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_corpus_case(case, tmp_path, capsys, built_cache):
    for command in case["expect"]:
        where = tmp_path / command
        where.mkdir()
        code, text = _run(_argv(case, command, where, built_cache), capsys)
        _check(case, command, code, text)
        if code == 2 and command in ("plan", "submit") and "damage" not in case:
            assert not (where / "runs" / "corpus").exists(), f"{command} left a run folder for a refused job"


def test_every_case_file_is_in_the_table():
    named = {c["input"] for c in CASES if "input" in c} | {"configs/base.yaml"}
    on_disk = {str(p.relative_to(CORPUS)) for d in ("configs", "data", "checkpoints") for p in (CORPUS / d).iterdir()}
    on_disk |= {str(p.relative_to(CORPUS)) + "/p" for p in (CORPUS / "prefixes").iterdir()}
    assert on_disk <= named, f"case files without an entry in cases.yaml: {sorted(on_disk - named)}"
    assert all(c.get("damage") in (None, *CACHE_DAMAGE, *CKPT_DAMAGE) for c in CASES)
    assert len({c["id"] for c in CASES}) == len(CASES)


def test_console_of_a_fresh_process(tmp_path):
    """The console itself (where logging or an uncaught exception would print) of `data prepare` on records no
    tokenizer can encode: before, a UnicodeEncodeError traceback. (A fresh-process submit: tests/launcher.)"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "raytron.data_pipeline.cli", "data", "prepare",
                           str(CORPUS / "data" / "only_surrogates.jsonl"), "--out", str(tmp_path / "p"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert "only_surrogates.jsonl:1 (lone surrogate '\\udc80'" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())
