"""Study configs refused before anything trains (exit 2, the field named), and the width solver."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytron.launcher.cli import main
from raytron.launcher.study_config import FAMILIES, load_study
from raytron.models.flops import param_counts
from raytron.typed import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "cluster_configs" / "study_base_cpu.yaml"
GOOD = f"""base: {BASE}
families: [full_attention, sliding_window, block_sparse, gated_deltanet, mamba2, moe,
           gdn_hybrid, mamba2_hybrid, moe_hybrid]
target_active_params: 240000
layers: 8
contexts: [256, 1024]
max_context: 4096
overrides: {{window: 16, sparse_block: 8}}
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return str(path)


def test_shipped_configs_load():
    for name in ("study_cpu.yaml", "study_h200.yaml"):
        study, _, plans = load_study(str(ROOT / "cluster_configs" / name))
        assert [p.name for p in plans] == list(study.families) == list(FAMILIES)


def test_families_sized_to_equal_active_params(tmp_path):
    study, base, plans = load_study(write(tmp_path, GOOD))
    for plan in plans:
        unit = FAMILIES[plan.name][0]
        assert plan.cfg.layer_pattern() == unit * (8 // len(unit))
        assert plan.active_params == param_counts(plan.cfg)[1]
        assert abs(plan.active_params / 240000 - 1) <= study.tolerance
        assert plan.spec.model.overrides["dim"] == plan.cfg.dim and plan.spec.name == plan.name
    moe = next(p for p in plans if p.name == "moe")
    assert moe.total_params > moe.active_params  # routed experts: same active, more total


@pytest.mark.parametrize("edit, field", [
    (("families: [full_attention", "families: [full_attention, linformer"), "families[1]"),
    (("families: [full_attention", "families: [full_attention, full_attention"), "families[1]"),
    (("target_active_params: 240000", "target_active_params: 1000"), "target_active_params"),
    (("layers: 8", "layers: 6"), "layers"),
    (("contexts: [256, 1024]", "contexts: [256, 8192]"), "contexts[1]"),
    (("contexts: [256, 1024]", "contexts: [1024, 256]"), "contexts"),
    (("window: 16", "window: 64"), "overrides.window"),
    (("sparse_block: 8", "sparse_block: 32"), "overrides.sparse_block"),
    (("window: 16", "dim: 64"), "overrides.dim"),
    (("window: 16", "windw: 16"), "overrides.windw"),
    (("layers: 8", "layers: 8\nlayer: 8"), "layer"),
    (("layers: 8", "layers: '8'"), "layers"),
    (("layers: 8", "layers: 8\nmode: gpu"), "mode"),
    (("layers: 8", "layers: 8\nsweep: {repeats: 0}"), "sweep.repeats"),
])
def test_bad_study_refused_naming_the_field(tmp_path, capsys, edit, field):
    text = GOOD.replace(*edit)
    assert text != GOOD
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_study(path)
    assert err.value.path == field, err.value
    out = tmp_path / "out"
    assert main(["study", path, "--out", str(out)]) == 2
    assert f"raytron: error: {field}" in capsys.readouterr().err
    assert not out.exists(), "a refused study writes nothing"


def test_bad_base_and_cli_hook_refused(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(BASE.read_text().replace("seq_len: 64", "seq_len: 0"))
    with pytest.raises(ConfigError, match=r"base .*train.seq_len"):
        load_study(write(tmp_path, GOOD.replace(str(BASE), str(base))))
    path = write(tmp_path, GOOD)
    assert main(["study", path, "--out", str(tmp_path / "o"), "--interrupt-at", "nope:2"]) == 2
    assert "--interrupt-at" in capsys.readouterr().err
    assert main(["study", path, "--out", "s3://bucket/x"]) == 2
    assert main(["study", path, "--out", str(tmp_path / "t"), "--time-limit", "0"]) == 2
    assert "--time-limit" in capsys.readouterr().err and not (tmp_path / "t").exists()
