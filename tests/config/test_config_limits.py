"""Hostile config documents are refused up front: sizes are limited before anything is expanded, and
error messages quote a bounded excerpt of the bad value, never its whole repr."""

from __future__ import annotations

import time

import pytest
from tests.config.config_helpers import DEEPSPEED_JOB, DEEPSPEED_YAML, validate_raw

from raytron.launcher.cli import main
from raytron.config.spec import load_spec
from raytron.config.strict_yaml import MAX_DEPTH, ConfigError
from raytron.typed import EXCERPT_MAX, excerpt


def _laughs(levels: int) -> str:
    """`train.steps` as a list whose nested aliases expand to 9**levels strings."""
    items = ['&a0 "lol"'] + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return DEEPSPEED_YAML.replace("  steps: 2\n", "  steps: [" + ", ".join(items) + "]\n")


@pytest.mark.parametrize("levels, limit", [(12, "MAX_EXPANDED_NODES"), (40, "aliases")])
def test_billion_laughs_refused_at_once(tmp_path, levels, limit):
    f = tmp_path / "job.yaml"
    f.write_text(_laughs(levels))
    start = time.perf_counter()
    with pytest.raises(ConfigError) as exc:
        load_spec(str(f))
    assert time.perf_counter() - start < 0.5
    assert limit in str(exc.value) and len(str(exc.value)) < 400, str(exc.value)
    if limit == "MAX_EXPANDED_NODES":
        assert exc.value.path.startswith("train.steps"), str(exc.value)


def test_deep_nesting_is_a_config_error(tmp_path):
    deep = "[" * 800 + "]" * 800
    f = tmp_path / "job.yaml"
    f.write_text(DEEPSPEED_YAML.replace("  steps: 2\n", f"  steps: {deep}\n"))
    with pytest.raises(ConfigError, match=f"deeper than {MAX_DEPTH} levels"):
        load_spec(str(f))
    with pytest.raises(ConfigError, match=f"deeper than {MAX_DEPTH} levels") as exc:
        validate_raw(DEEPSPEED_JOB, [f"train.steps={deep}"])
    assert exc.value.path == "train.steps"
    with pytest.raises(ConfigError, match=f"more than {MAX_DEPTH} levels"):
        validate_raw(DEEPSPEED_JOB, ["model.overrides" + ".a" * 800 + "=1"])
    nested_ok = "[" * 10 + "1" + "]" * 10  # within the limit: refused for its type, as before
    with pytest.raises(ConfigError, match="expected an integer"):
        validate_raw(DEEPSPEED_JOB, [f"train.steps={nested_ok}"])


def test_document_size_limited(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text(DEEPSPEED_YAML + "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="MAX_DOCUMENT_BYTES"):
        load_spec(str(f))


def test_errors_quote_a_bounded_excerpt():
    big = list(range(50_000))
    with pytest.raises(ConfigError) as exc:
        validate_raw(DEEPSPEED_JOB, [f"train.steps=[{', '.join(map(str, big))}]"])
    assert f"... ({len(repr(big))} chars)" in exc.value.message
    assert len(exc.value.message) < EXCERPT_MAX + 100, exc.value.message
    with pytest.raises(ConfigError) as exc:
        validate_raw({**DEEPSPEED_JOB, "name": "x" * 1_000_000})
    assert len(str(exc.value)) <= 1100 and "(1000" in str(exc.value)
    assert excerpt([1, "a", {"k": (2,)}]) == repr([1, "a", {"k": (2,)}])
    shared = ["lol"] * 9
    for _ in range(12):  # 9**12 items through shared references: measured without expanding
        shared = [shared] * 9
    start = time.perf_counter()
    text = excerpt(shared)
    assert time.perf_counter() - start < 0.5 and text.endswith(" chars)") and len(text) < EXCERPT_MAX + 40


def test_cli_exits_2(tmp_path, capsys):
    f = tmp_path / "job.yaml"
    f.write_text(_laughs(12))
    for command in (["plan", str(f)], ["submit", str(f)]):
        assert main(command) == 2
        assert "MAX_EXPANDED_NODES" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
