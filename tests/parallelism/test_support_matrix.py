"""The support matrix (tests/parallelism/support_matrix.py): every combination of engine x debug flavor x option
from the engines' support tables is either refused by `plan`'s validation with the field and a reason, or
accepted and then runs: on CPU it trains two steps, checkpoints and resumes bit for bit (a stable sample here,
every one in scripts/support_matrix.py), and a GPU-only engine's combination is a case of a test suite."""

from __future__ import annotations

import typing

import pytest

from raytron.config.spec import JobSpec
from raytron.parallelism.engines import engine_names, get_engine
from tests.parallelism.support_matrix import (AWAITING_GPU_SUITE, MOE_FIELDS, Combo, base_value, combos, debug_flavors,
                                              gpu_proofs, judge, sample, suite_verdict)

SAMPLE = 1  # CPU runs picked by a stable hash, beside the named ones below (about 25 s of CPU each)
NAMED_RUNS = [Combo("deepspeed", "moe", "debug-capacity"),  # the reference's token dropping
              Combo("deepspeed", "moe", "debug", "layout.ep", 2)]  # experts over ranks: export joins them


@pytest.fixture(scope="module")
def verdicts() -> dict:
    return {c: judge(c) for c in combos()}


def _cpu_accepted(verdicts) -> list[Combo]:
    return [c for c, v in verdicts.items() if v.accepted and not get_engine(c.engine).needs_gpu]


def test_spec_offers_exactly_the_registered_engines():
    assert typing.get_args(typing.get_type_hints(JobSpec)["engine"]) == engine_names()


def test_matrix_covers_every_table_row_of_every_engine(verdicts):
    """Every row of a table is tried, or is the base job's own value (for every flavor: the base is tried)."""
    from raytron import models

    for engine in engine_names():
        seen = {(c.field, c.value) for c in verdicts if c.engine == engine}
        table = {(f, v) for f, values in get_engine(engine).options.items() for v in values}
        flavors = [(Combo(engine, fam, fl), models.get_config(fam, fl)) for fam, fl in debug_flavors()]
        untried = [(f, v) for f, v in table - seen if any(v != base_value(base, cfg, f) for base, cfg in flavors
                                                          if cfg.num_experts or f not in MOE_FIELDS)]
        assert not untried, f"{engine}: table rows never tried: {sorted(untried, key=str)}"
        mine = [v.accepted for c, v in verdicts.items() if c.engine == engine]
        assert any(mine) and not all(mine), f"{engine}: the matrix should hold accepted and refused combinations"


def test_every_refusal_names_the_field_and_why(verdicts):
    for combo, v in verdicts.items():
        if not v.accepted:
            assert v.field and v.reason.startswith(v.field) and len(v.reason) > len(v.field) + 20, (combo.name, v)


def test_plan_exits_2_or_lists_the_gap_for_a_refused_combination(capsys):
    """`judge` is plan's validation: a layout refusal makes plan exit 2, an engine gap is listed as NOT RUNNABLE."""
    from raytron.launcher.plan import main as plan_main
    from tests.parallelism.support_matrix import CONFIG

    for combo, listed in ((Combo("megatron", "moe", "debug", "layout.zero_stage", 0), None),
                          (Combo("megatron", "moe", "debug-capacity"),
                           "NOT RUNNABLE YET on engine megatron: model.overrides.capacity_factor")):
        argv = [CONFIG] + [a for o in combo.overrides() for a in ("--set", o)]
        assert plan_main(argv) == (2 if listed is None else 0)
        out = capsys.readouterr()
        assert (judge(combo).field in out.err) if listed is None else (listed in out.out), (combo.name, out)


@pytest.mark.parametrize("combo, field, reason", [
    (Combo("deepspeed", "moe", "debug", "layout.zero_stage", 3), "layout.zero_stage", "ZeRO-3"),
    # megatron always runs its distributed optimizer: zero_stage 0 was silently run as 1
    (Combo("megatron", "dense", "debug", "layout.zero_stage", 0), "layout.zero_stage", "distributed optimizer"),
    (Combo("megatron", "moe", "debug-capacity"), "model.overrides.capacity_factor", "drops tokens per rank"),
])
def test_broken_cases_are_refused(verdicts, combo, field, reason):
    v = verdicts[combo]
    assert not v.accepted and v.field == field and reason in v.reason, v


@pytest.mark.parametrize("combo", [
    Combo("deepspeed", "moe", "debug", "layout.zero_stage", 0),  # runs: tests/checkpoint/test_zero_resume.py
    Combo("deepspeed", "dense", "debug", "layout.zero_stage", 3),
    Combo("deepspeed", "moe", "debug-capacity"),  # capacity_factor > 0: the reference's drops
    # norm_topk false: the gate is the reference's routing (was accepted by plan, then every worker raised)
    Combo("deepspeed", "moe", "debug", "model.overrides.norm_topk", False),
])
def test_fixed_cases_are_accepted(verdicts, combo):
    assert verdicts[combo].accepted, verdicts[combo]


def test_accepted_gpu_only_combinations_are_suite_cases(verdicts):
    proofs = gpu_proofs()
    gpu = [c for c, v in verdicts.items() if v.accepted and get_engine(c.engine).needs_gpu]
    assert gpu, "no GPU-only combination accepted: the matrix lost its megatron rows"
    bad = [f"{c.name}: {why}" for c in gpu for ok, why in [suite_verdict(c, proofs)] if not ok]
    assert not bad, "add a suite case, refuse them in the engine's support.py, or fix AWAITING_GPU_SUITE:\n" + "\n".join(bad)
    stale = AWAITING_GPU_SUITE - {c.name for c in gpu}
    assert not stale, f"AWAITING_GPU_SUITE names no accepted GPU-only combination (drop them): {sorted(stale)}"


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    from raytron.data_pipeline import prepare_for_job
    from tests.checkpoint.ckpt_helpers import load_job

    root = tmp_path_factory.mktemp("matrix")
    spec = load_job(root, "warm", 2, 1, 2)  # the data every run shares, prepared once
    prepare_for_job(spec.data, seq_len=spec.train.seq_len, seed=spec.train.seed, cache_uri=str(root / "_data_cache"))
    return root


PICKS = [f"sample-{i}" for i in range(SAMPLE)] + [c.name for c in NAMED_RUNS]


def _picked(verdicts, pick: str) -> Combo:
    named = {c.name: c for c in NAMED_RUNS}
    return named[pick] if pick in named else sample(
        [c for c in _cpu_accepted(verdicts) if c not in NAMED_RUNS], SAMPLE)[int(pick.split("-")[1])]


@pytest.fixture(scope="module")
def trained(verdicts, runs_root) -> dict:
    """{pick: (run, straight losses, resumed losses)} of every accepted pick, trained in one pass (one group of
    rank processes for the straight runs, one for the resumes: train_and_resume_all)."""
    from tests.parallelism.support_matrix import train_and_resume_all

    picks = [p for p in PICKS if verdicts[_picked(verdicts, p)].accepted]
    return dict(zip(picks, train_and_resume_all([_picked(verdicts, p) for p in picks], runs_root)))


@pytest.mark.slow
@pytest.mark.parametrize("pick", PICKS)
def test_accepted_cpu_combination_trains_checkpoints_and_resumes(verdicts, runs_root, trained, pick):
    from tests.checkpoint.ckpt_helpers import metrics

    combo = _picked(verdicts, pick)
    assert verdicts[combo].accepted, (combo.name, verdicts[combo])
    run, straight, resumed = trained[pick]
    assert sorted(straight) == [1, 2], f"{combo.name}: every step logged (NaN guard passed): {straight}"
    # a fresh start would re-log step 1 with its own timing; a resume keeps the line it resumed after
    assert metrics(runs_root / run)[1] == metrics(runs_root / f"{run}-resumed")[1], f"{combo.name}: not resumed"
    assert resumed[2] == straight[2], f"{combo.name}: step 2 after resuming: {resumed[2]!r} vs {straight[2]!r}"
    _exported_equals_checkpoint(runs_root, run, combo.name)


def _exported_equals_checkpoint(root, run: str, name: str) -> None:
    """Engine.export_reference after step 2 == the step-2 checkpoint read back by `raytron export`'s reader."""
    import torch

    from raytron.launcher.export import reference_state
    from raytron.parallelism.checkpoint import CheckpointStore

    store = CheckpointStore(str(root / run / "checkpoints"))
    want = reference_state(store, 2, store.verify(2))
    got = torch.load(root / f"{run}-exported.pt")
    assert sorted(got) == sorted(want), f"{name}: exported names differ: {sorted(set(got) ^ set(want))}"
    bad = [k for k in want if not torch.equal(got[k].float(), want[k])]
    assert not bad, f"{name}: exported tensors differ from the checkpoint's: {bad[:5]}"
