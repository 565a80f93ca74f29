"""The GPU study config (cluster_configs/study_h200.yaml) checked on CPU before its one device call: every
family is sized to the same active parameters on tensor-core-friendly widths, every family's run passes the
megatron engine's submit checks, its model shapes run forward+backward (shrunken), and the whole call fits
the device budget by an estimate whose assumptions are written out here."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from raytron.launcher.study_config import FAMILIES, SweepSpec, load_study
from raytron.launcher.study_measure import sweep_family
from raytron.models.flops import flops_per_token, param_counts

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "cluster_configs" / "study_h200.yaml"

# What one device call of scripts/gpu_study.sh may spend on the study (540 s call, less the wheelhouse
# install and the packing of $OUT).
BUDGET_S = 480
# Assumptions of the estimate. H200 bf16 dense GEMMs: ~790 TFLOP/s measured on these machines. Training MFU
# floors at ~125M parameters and 16K tokens per step: 15% for attention and linear-sequence families; 5% for
# the MoE ones (expert dispatch dominates at this size: the one-GPU megatron MoE run with 64 experts and 4K
# tokens per step measured 1.5%; 8 experts and 16K tokens give each expert 16x the rows). Per family: 20 s
# of Ray worker start, imports, megatron init and final checkpoint, plus 12 s of FlexAttention compiles for
# window / block-sparse layers. Sweep: the same MFU floors, plus one FlexAttention compile per context.
PEAK, MFU, MFU_MOE = 790e12, 0.15, 0.05
FIXED_S, FAMILY_S, FLEX_COMPILE_S = 45, 20, 12


def estimate_seconds(study, base, plans) -> dict[str, float]:
    """Seconds per phase of the study on one H200 under the assumptions above."""
    train, sweep = 0.0, 0.0
    tokens = base.train.steps * base.train.global_batch_size * base.train.seq_len
    for plan in plans:
        mfu = MFU_MOE if plan.cfg.num_experts and "E" in plan.cfg.layer_pattern() else MFU
        flex = bool(set(plan.cfg.layer_pattern()) & set("WB"))
        train += FAMILY_S + (FLEX_COMPILE_S if flex else 0) + tokens * flops_per_token(plan.cfg, base.train.seq_len)[
            "total"] / (PEAK * mfu)
        passes = study.sweep.warmup + study.sweep.repeats
        for seq in sorted({*study.contexts, base.train.seq_len}):
            tok = seq * study.sweep.batch
            sweep += passes * tok * flops_per_token(plan.cfg, seq)["total"] / (PEAK * mfu)
            sweep += FLEX_COMPILE_S if flex else 0
    return {"fixed": FIXED_S, "train": train, "sweep": sweep}


@pytest.fixture(scope="module")
def gpu_study():
    return load_study(str(CONFIG))


def test_families_equal_active_params_on_tensor_core_widths(gpu_study):
    study, base, plans = gpu_study
    assert study.mode == "gpu" and base.resources.use_gpu and base.engine == "megatron"
    assert [p.name for p in plans] == list(FAMILIES)
    actives = [p.active_params for p in plans]
    assert 100e6 <= min(actives) and max(actives) <= 150e6
    assert max(actives) / min(actives) - 1 <= 2 * study.tolerance
    for plan in plans:
        assert plan.active_params == param_counts(plan.cfg)[1]
        assert plan.cfg.dim % 32 == 0 and plan.cfg.attn_head_dim == 64 and len(plan.cfg.layer_pattern()) == study.layers
        assert plan.spec.model.overrides["dim"] == plan.cfg.dim


def test_whole_call_fits_the_device_budget(gpu_study):
    study, base, plans = gpu_study
    phases = estimate_seconds(study, base, plans)
    assert sum(phases.values()) <= BUDGET_S, phases
    # the script's --time-limit leaves the sweep and report at least their estimated share of the study's limit
    script = (ROOT / "scripts" / "gpu_study.sh").read_text()
    assert "study cluster_configs/study_h200.yaml" in script
    reserve = int(re.search(r"--time-limit \$\(\(limit - (\d+)\)\)", script).group(1))
    assert reserve >= phases["sweep"] + 5, (reserve, phases)


def test_shrunken_shapes_run_forward_backward(tmp_path):
    """The GPU families' head, linear-head, state and mask shapes at a width small enough for CPU: every
    family's model runs the sweep's forward+backward and gives finite numbers."""
    text = CONFIG.read_text().replace("base: study_base_h200.yaml", f"base: {CONFIG.parent / 'study_base_h200.yaml'}")
    text = text.replace("target_active_params: 125000000", "target_active_params: 4000000")
    text = text.replace("layers: 16", "layers: 8").replace("tolerance: 0.05", "tolerance: 0.15")
    path = tmp_path / "shrunk.yaml"
    path.write_text(text)
    study, base, plans = load_study(str(path))
    for plan in plans:
        rows = sweep_family(plan.cfg, [256], SweepSpec(warmup=0, repeats=1), "cpu", 1, 0)
        assert "error" not in rows[0], (plan.name, rows)
        assert math.isfinite(rows[0]["tokens_per_s"]) and rows[0]["peak_mem_bytes"] > 0
