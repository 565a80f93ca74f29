"""The support matrix: engine x debug flavor x option, enumerated from the engines' support tables
(`EngineSupport.options`, parallelism/engines.py), each combination judged by `plan`'s own validation.

A combination is the engine's base job (BASES) with one model flavor and at most one option changed (an
option that needs a partner, such as vpp > 1 needing pp > 1, brings it: PARTNERS). `judge` answers what
`plan`/`submit` answer: accepted, or refused with the field and the reason. Accepted combinations of an engine
that runs on CPU are trained (two steps, a checkpoint, a resume) by `train_and_resume`; those of a GPU-only
engine must be among the proofs the test suites run (`gpu_proofs`: the GPU suite's equivalence cases, and
the megatron engine's CPU schedule cases, which run megatron-core's real schedules over gloo).
Used by tests/parallelism/test_support_matrix.py (all judgements, a sample of runs) and
scripts/support_matrix.py (every run).
"""

from __future__ import annotations

import functools
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "cluster_configs" / "local_debug.yaml")
SMALL = {"train.seq_len": 64, "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.eval_every": 0,
         "data.max_documents": 120}
BASES = {  # engine -> the job every combination starts from (local_debug.yaml, shrunk)
    "deepspeed": {"engine": "deepspeed", "resources.workers": 2, "layout.ep": 1, "layout.zero_stage": 1, **SMALL},
    "megatron": {"engine": "megatron", "resources.use_gpu": True, "resources.workers": 4, "layout.dp": None,
                 "layout.ep": 1, "layout.zero_stage": 1, **SMALL},
}
PARTNERS = {("layout.vpp", 2): {"layout.pp": 2}, ("layout.etp", 2): {"layout.ep": 2},
            ("train.overlap_moe_comm", True): {"layout.ep": 2}}
MOE_FIELDS = {f"model.overrides.{k}" for k in ("router", "top_k", "norm_topk", "capacity_factor", "bias_update_rate")}
"""Options that mean nothing to a model without MoE layers (not tried on one)."""


@dataclass(frozen=True)
class Combo:
    engine: str
    family: str
    flavor: str
    field: str | None = None  # None: the base job of this flavor
    value: object = None

    @property
    def name(self) -> str:
        option = "base" if self.field is None else f"{self.field}={self.value}"
        return f"{self.engine}/{self.family}/{self.flavor}/{option}"

    def settings(self) -> dict:
        out = {**BASES[self.engine], "model.family": self.family, "model.flavor": self.flavor}
        if self.field is not None:
            out.update(PARTNERS.get((self.field, self.value), {}))
            out[self.field] = self.value
        return out

    def overrides(self) -> list[str]:
        return [f"{k}={_yaml(v)}" for k, v in self.settings().items()]


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    field: str = ""
    reason: str = ""


def _yaml(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def debug_flavors() -> list[tuple[str, str]]:
    from raytron import models

    return [(fam, fl) for fam, fl in models.list_flavors() if fl.startswith("debug")]


def combos() -> list[Combo]:
    from raytron.parallelism.engines import engine_names, get_engine

    from raytron import models

    out = []
    for engine in engine_names():
        for family, flavor in debug_flavors():
            cfg, base = models.get_config(family, flavor), Combo(engine, family, flavor)
            out.append(base)
            out += [Combo(engine, family, flavor, field, value)
                    for field, values in get_engine(engine).options.items() for value in values
                    if (cfg.num_experts or field not in MOE_FIELDS) and value != base_value(base, cfg, field)]
    return out


def base_value(base: Combo, cfg, field: str):
    """The value `field` has in the base job of this flavor (an option set to it is the base job again)."""
    if field.startswith("model.overrides."):
        return getattr(cfg, field.removeprefix("model.overrides."))
    if field in BASES[base.engine]:
        return BASES[base.engine][field]
    node = _base_spec(base.engine)
    for part in field.split("."):
        node = getattr(node, part)
    return node


@functools.cache
def _base_spec(engine: str):
    from raytron.config.spec import load_spec

    return load_spec(CONFIG, Combo(engine, "dense", "debug").overrides())


def judge(combo: Combo) -> Verdict:
    """What `plan` (layout rules: exit 2) and `submit` (engine gaps too) say of the combination."""
    from raytron.config.spec import load_spec
    from raytron.launcher.validate import validate_job
    from raytron.typed import ConfigError

    try:
        validate_job(load_spec(CONFIG, combo.overrides()), runnable=True)
    except ConfigError as exc:
        return Verdict(False, exc.path, str(exc))
    return Verdict(True)


def sample(items: list, count: int) -> list:
    """`count` items picked by a stable hash of their names (the same pick on every machine and run)."""
    return sorted(items, key=lambda c: hashlib.sha256(c.name.encode()).hexdigest())[:count]


# ---- CPU: two steps, a checkpoint after each, and a resume from the first -------------------------------------
def train_and_resume(combo: Combo, root: Path) -> tuple[str, dict, dict]:
    """Train two steps (checkpoint after each; the engine's export_reference saved to <run>/exported.pt), then
    train again from the step-1 checkpoint alone. Returns (run name, straight losses, resumed losses) by step;
    the resumed run's step 2 must equal the straight one's."""
    return train_and_resume_all([combo], root)[0]


def train_and_resume_all(combos: list[Combo], root: Path) -> list[tuple[str, dict, dict]]:
    """`train_and_resume` of each combination, in order. The straight runs of one world size share one group
    of rank processes and the resumes another (one interpreter start per group, not per run); every resume
    starts in other processes than its straight run, from its step-1 checkpoint on disk."""
    from tests.checkpoint.ckpt_helpers import losses, spawn_ranks
    from tests.checkpoint.ckpt_ranks import train_ranks_in_turn

    runs, worlds = [], {}
    for combo in combos:
        name = combo.name.replace("/", "-").replace("=", "-").replace("+", "p").replace(".", "_")
        settings = {k: v for k, v in combo.settings().items() if k != "resources.workers"}
        runs.append((name, {"steps": 2, "every": 1, "ep": settings.pop("layout.ep"), **settings}))
        worlds.setdefault(BASES[combo.engine]["resources.workers"], []).append(runs[-1])
    for world, group in worlds.items():
        straight = [(name, job, {"export_out": str(root / f"{name}-exported.pt")}) for name, job in group]
        spawn_ranks(train_ranks_in_turn, world, str(root), straight, timeout=240.0 * len(group))
        for name, _ in group:
            shutil.copytree(root / name, root / f"{name}-resumed")
            shutil.rmtree(root / f"{name}-resumed" / "checkpoints" / f"step-{2:09d}")
        resumed = [(f"{name}-resumed", job, {}) for name, job in group]
        spawn_ranks(train_ranks_in_turn, world, str(root), resumed, timeout=240.0 * len(group))
    return [(name, losses(root / name), losses(root / f"{name}-resumed")) for name, _ in runs]


# ---- GPU-only engines: the cases the suites run ------------------------------------------------------------
def gpu_proofs() -> list[tuple[str, dict]]:
    """(case, the job fields it sets) for every megatron-engine case the suites run: the GPU suite's
    equivalence program (tests/gpu/megatron_equivalence.py: layouts, their option variants and families), the
    megatron CPU schedule cases (tests/parallelism/test_megatron_step.py: megatron-core's real schedules over
    gloo, recompute modes included) and the FP8 submit/resume runs: scripts/gpu_precision.sh (moe/debug) and
    scripts/gpu_one_gpu.sh (moe/debug-sigmoid)."""
    from tests.gpu import megatron_equivalence as eq
    from tests.parallelism import test_megatron_step as st

    proofs = []
    for name, (_, fields, families) in eq.LAYOUTS.items():
        options = eq.VARIANTS[name][1] if name in eq.VARIANTS else ()
        for fam in families:
            family, flavor, overrides = eq.FAMILIES[fam]
            flags = {f"train.{o}": True for o in options}
            proofs.append((f"gpu equivalence {name}/{fam}",
                           {"model": _config(family, flavor, overrides), **_layout(fields), **flags}))
    cpu_cases = [(f"megatron CPU step {n}", c, "none")
                 for n, c in {**st.CASES, **st.CASES_4, **st.ROUTER_CASES}.items()]
    cpu_cases += [(f"megatron CPU recompute {n} {m}", c, m) for n, c in st.RECOMPUTE_CASES.items()
                  for m in ("selective", "full") if not (m == "full" and c[2].get("overlap_moe"))]
    for name, (family, overrides, fields), recompute in cpu_cases:
        fields = dict(fields)
        fields.pop("z_loss", None)  # train.router_z_loss_coef, not a layout size
        flags = {"train.overlap_grad_reduce": fields.pop("overlap", None) == "wired",
                 "train.overlap_moe_comm": bool(fields.pop("overlap_moe", False))}
        proofs.append((name, {"model": _config(family, "debug", overrides), **_layout(fields), **flags,
                              "train.recompute": recompute}))
    for name, flavor, needs in (("gpu_precision.sh", "debug", "train.precision=fp8"),
                                ("gpu_one_gpu.sh", "debug-sigmoid", "model.flavor=debug-sigmoid --set train.precision=fp8")):
        script = (ROOT / "scripts" / name).read_text()
        if needs in script and "gpu_megatron_2gpu.yaml" in script:
            proofs.append((f"{name} fp8 submit/resume", {"model": _config("moe", flavor, {}), "train.precision": "fp8"}))
    return proofs


AWAITING_GPU_SUITE: frozenset[str] = frozenset()
"""Accepted megatron combinations no suite runs at exactly this model yet. The test fails on any other unproven
combination, and on a listed one that a suite now runs (drop it here)."""


def suite_verdict(combo: Combo, proofs: list[tuple[str, dict]]) -> tuple[bool, str]:
    """(passes, what runs it) for an accepted combination of a GPU-only engine: it passes when a suite case runs
    it, or when no case does and it is listed in AWAITING_GPU_SUITE; a listed one that a case now runs fails
    (drop it from the list)."""
    proof, listed = covering_proof(combo, proofs), combo.name in AWAITING_GPU_SUITE
    if proof is None:
        return listed, "awaiting a suite case (AWAITING_GPU_SUITE)" if listed else "accepted, run by no suite"
    return not listed, f"{proof}; now run by a suite, drop it from AWAITING_GPU_SUITE" if listed else proof


def _config(family: str, flavor: str, overrides: dict):
    from raytron import models

    return models.get_config(family, flavor, **overrides)


def _layout(fields: dict) -> dict:
    return {f"layout.{k}": v for k, v in fields.items() if k != "dp"}


_PROOF_DEFAULTS = {"train.precision": "bf16", "train.recompute": "none", "train.overlap_grad_reduce": False,
                   "train.overlap_moe_comm": False, "layout.offload": "none", "layout.zero_stage": 1}


def covering_proof(combo: Combo, proofs: list[tuple[str, dict]]) -> str | None:
    """The first proof that runs this combination's model (the flavor's config with the option applied) with its
    option (and partners) set as it is."""
    wanted, model = {}, {}
    if combo.field is not None:
        wanted.update(PARTNERS.get((combo.field, combo.value), {}))
        wanted[combo.field] = "bf16" if (combo.field, combo.value) == ("train.precision", "auto") else combo.value
        if combo.field.startswith("model.overrides."):
            model[combo.field.removeprefix("model.overrides.")] = wanted.pop(combo.field)
    wanted["model"] = _config(combo.family, combo.flavor, model)
    for name, fields in proofs:
        if all(fields.get(k, _PROOF_DEFAULTS.get(k, 1)) == v for k, v in wanted.items()):  # 1: layout sizes
            return name
    return None
