"""The GPU study config (cluster_configs/study_h200.yaml) checked on CPU before its one device call: every
family is sized to the same active parameters on tensor-core-friendly widths, every family's run passes the
megatron engine's submit checks, its model shapes run forward+backward (shrunken), and the study fits three
device calls (each continuing from the last one's records) by an estimate whose assumptions, measured on
one H200, are written out here."""

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
# install and the packing of $OUT), and how many calls the study may take.
BUDGET_S, CALLS = 480, 3
# Assumptions of the estimate. H200 bf16 dense GEMMs: ~790 TFLOP/s measured on these machines. Training MFU
# floors at ~125M parameters and 16K tokens per step: 10% for attention and linear-sequence families; 5% for
# the MoE ones (measured at this config: 12-25% and 12%). Per family: 55 s of Ray worker start, imports,
# megatron init, compiles, eval and final checkpoint (measured: 44-76 s per family with training included),
# plus 12 s of FlexAttention compiles for window / block-sparse layers. Each call: 40 s of Ray start and data
# prepare. Sweep: 15% MFU (measured at 8K-64K: 9-44%, median 16%, counting window / block-sparse attention as
# dense), plus 15 s per family of model build, compiles and the summary of its run (measured: 75 s for six
# families besides 17 s of timed passes).
PEAK, MFU, MFU_MOE, SWEEP_MFU = 790e12, 0.10, 0.05, 0.15
FIXED_S, FAMILY_S, FLEX_COMPILE_S, SWEEP_FAMILY_S = 40, 55, 12, 15


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
        sweep += SWEEP_FAMILY_S
        for seq in sorted({*study.contexts, base.train.seq_len}):
            tok = seq * study.sweep.batch(seq, max(study.contexts))
            sweep += passes * tok * flops_per_token(plan.cfg, seq)["total"] / (PEAK * SWEEP_MFU)
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


def test_study_fits_three_device_calls(gpu_study):
    """Each call trains what its --time-limit lets start, the last call also sweeps and reports: the
    families' training spread over the calls' training windows, and the sweep within the reserve."""
    study, base, plans = gpu_study
    phases = estimate_seconds(study, base, plans)
    script = (ROOT / "scripts" / "gpu_study.sh").read_text()
    assert "study cluster_configs/study_h200.yaml" in script and "STUDY_SEED" in script
    reserve = int(re.search(r"--time-limit \$\(\(limit - (\d+)\)\)", script).group(1))
    assert reserve >= phases["sweep"] + 5, (reserve, phases)
    window = BUDGET_S - reserve - FIXED_S  # training time a call may start families in
    assert phases["train"] <= CALLS * window, (phases, window)


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
