"""`raytron submit` validates everything before Ray starts: a bad config never reaches ray.init."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from raytron.launcher.cli import main

CONFIG = str(Path(__file__).resolve().parents[2] / "cluster_configs" / "local_debug.yaml")


@pytest.fixture
def no_ray(monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called for a config that should have been refused")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.mark.parametrize("override, field", [
    ("layout.ep=3", "layout.ep"),                       # 4 experts not divisible by 3
    ("train.global_batch_size=10", "train.global_batch_size"),  # not micro * accum * dp
    ("train.lr='3e-4'", "train.lr"),                    # a string, not a number
    ("layout.zero_stage=3", "layout.zero_stage"),       # ZeRO-3 refuses DeepSpeed-MoE
    ("resources.workers=3", "layout"),                  # world size no longer matches
    ("data.sources[0].uri=/nonexistent/corpus/*.txt", "data.sources[0].uri"),
    ("model.flavor=huge", "model.flavor"),
])
def test_bad_config_refused_before_ray(no_ray, tmp_path, capsys, override, field):
    code = main(["submit", CONFIG, "--set", f"checkpoint.uri={tmp_path}", "--set", override])
    err = capsys.readouterr().err
    assert code == 2, err
    assert field in err, f"error does not name {field}: {err}"
    assert not (tmp_path / "local-debug").exists(), "nothing may be written for a refused job"


def test_cli_exit_code_in_a_fresh_process(tmp_path):
    """The console script's own exit status (no Ray started: finishes in seconds)."""
    proc = subprocess.run([sys.executable, "-m", "raytron.launcher.cli", "submit", CONFIG,
                           "--set", f"checkpoint.uri={tmp_path}", "--set", "layout.ep=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "layout.ep" in proc.stderr and "Traceback" not in proc.stderr
