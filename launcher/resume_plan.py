"""`raytron plan CONFIG --resume-from URI`: will that checkpoint load under this config's layout?

Offline (no Ray, no tensor unpickled). The answer mirrors what `restore_checkpoint` will do, with the same
verification: the newest committed step whose manifest has the right shape and step, whose files are all
there with their recorded sizes and SHA-256 (every file of the step it picks is read once) and cover every
tensor of the model, the same model/data/sample fields (the resume hash), an engine that can run the job
(either engine loads the other's state: parallelism/engine_state.py), and a layout the job validates with.
When it loads, the plan says what gets resharded. `submit --resume` runs the same check before Ray starts,
so a run whose every checkpoint is corrupt is refused there, not in the workers.
URI: a run directory, its `checkpoints/` folder, one `step-NNNNNNNNN/` directory, or a step a resume set
aside (`checkpoints/rejected/step-NNNNNNNNN-<time>/`: the plan says why it fails verification).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .. import storage
from ..parallelism.checkpoint import CheckpointError, CheckpointStore
from ..config.strict_yaml import ConfigError
from ..run_dir import REJECTED, STEP_PATTERN, RunDir

_STEP_DIR = re.compile(rf"^(.*)/{STEP_PATTERN.pattern}$")
_REJECTED_DIR = re.compile(rf"^(.*/{REJECTED})/(step-(\d{{9}})-[^/]+)$")


@dataclass
class ResumePlan:
    ok: bool
    source: str  # the checkpoint considered (or the URI when none was found)
    step: int | None = None
    reasons: list[str] = field(default_factory=list)  # why not (empty when ok)
    reshard: list[str] = field(default_factory=list)  # what changes on load
    notes: list[str] = field(default_factory=list)  # skipped steps, caveats
    spec: object = None  # the job as the resume trains it (train.schedule_steps from the checkpoint)


class _SetAsideStep(CheckpointStore):
    """One step folder that a resume set aside under `rejected/`, read through the store's own checks."""

    def __init__(self, rejected_uri: str, folder: str, step: int):
        super().__init__(rejected_uri)
        self.folder, self.step = folder, step

    def step_path(self, step: int) -> str:
        return f"{self.uri}/{self.folder}" if step == self.step else super().step_path(step)

    def listed_steps(self) -> list[int]:
        return [self.step] if storage.isdir(self.step_path(self.step)) else []


def locate(uri: str) -> tuple[CheckpointStore, int | None]:
    uri = uri.rstrip("/")
    m = _REJECTED_DIR.match(uri)
    if m:
        return _SetAsideStep(m.group(1), m.group(2), int(m.group(3))), int(m.group(3))
    m = _STEP_DIR.match(uri)
    if m:
        return CheckpointStore(m.group(1)), int(m.group(2))
    return CheckpointStore(RunDir.given(uri).checkpoints), None


def _pick(store: CheckpointStore, step: int | None, plan: ResumePlan) -> dict | None:
    """The manifest resume would use (verified as the resume verifies it), or None with reasons."""
    if step is not None:
        if step not in store.committed_steps():
            plan.reasons.append(f"step {step} has no COMMITTED marker under {store.uri} (an interrupted save)")
            return None
        try:
            manifest = store.verify(step)
        except CheckpointError as exc:
            plan.reasons.append(str(exc))
            return None
        if isinstance(store, _SetAsideStep):
            plan.notes.append(f"this step was set aside by a resume; to resume from it, move "
                              f"{store.step_path(step)} back to {store.uri.rsplit('/', 1)[0]}/step-{step:09d}")
        return manifest
    chosen, skipped = store.latest()
    plan.notes += [f"skipped {s}" for s in skipped]
    if chosen is None:
        plan.reasons.append(f"no committed checkpoint with all its files under {store.uri}"
                            + (f" ({'; '.join(skipped)})" if skipped else ""))
        return None
    plan.step, plan.source = chosen.step, chosen.path
    committed = store.committed_steps()
    plan.notes += [f"step {s} has no COMMITTED marker (an interrupted save): not used"
                   for s in store.listed_steps() if s > chosen.step and s not in committed]
    if skipped:
        plan.notes.append("the resume skips the same steps and sets aside those newer than the step it uses")
    return chosen.manifest


def _diff(old, new, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def _compatibility(manifest: dict, spec, plan: ResumePlan) -> None:
    from ..parallelism.engines import engine_names
    from .checkpointing import resume_fields, resume_hash, same_config

    old = manifest.get("engine")
    if old not in engine_names():
        plan.reasons.append(f"the checkpoint's engine {old!r} is not an engine of this build "
                            f"({', '.join(engine_names())}): its state has no known conversion")
        return
    if not same_config(manifest, spec):
        changed = _diff(manifest.get("resume_fields"), resume_fields(spec, old)) if "resume_fields" in manifest else []
        plan.reasons.append("different model/data config (resume hash "
                            f"{manifest.get('config_hash')} != {resume_hash(spec, old)})"
                            + (": " + "; ".join(changed) if changed else ""))
    elif old != spec.engine:
        _engine_change(old, spec, plan)


def _engine_change(old: str, spec, plan: ResumePlan) -> None:
    """Refuse an engine change to an engine that cannot run the job (the state itself converts)."""
    from ..parallelism.layout import model_config_from_spec
    from ..parallelism.layout_rules import engine_gaps

    gaps = engine_gaps(spec, model_config_from_spec(spec))
    if gaps:
        field, reason = gaps[0]
        plan.reasons.append(f"engine change {old} -> {spec.engine}: engine {spec.engine} cannot run this job "
                            f"({field}: {reason})")


def _reshard(manifest: dict, layout, num_experts: int, engine: str) -> list[str]:
    from ..parallelism.engines import get_engine

    old, new = manifest["layout"], layout.to_dict()
    out = []
    if manifest.get("engine") != engine:
        out.append(f"engine {manifest.get('engine')} -> {engine}: the same reference-named fp32 weights, Adam "
                   "moments, routing biases and step count, converted (parallelism/engine_state.py)")
    out += get_engine(engine).reshard_notes(old, new)  # tensor, pipeline, context parallel cuts
    if old["world_size"] != new["world_size"]:
        out.append(f"workers {old['world_size']} -> {new['world_size']}: per-rank RNG streams are reseeded")
    if num_experts and old["ep"] != new["ep"]:
        out.append(f"experts: ep {old['ep']} -> {new['ep']}, {num_experts // old['ep']} -> "
                   f"{num_experts // new['ep']} experts per rank (expert e moves to EP rank e // "
                   f"{num_experts // new['ep']}), with their Adam moments")
    if (old["dp"], old["zero_stage"]) != (new["dp"], new["zero_stage"]):
        out.append(f"ZeRO-{new['zero_stage']} partitions rebuilt: dp {old['dp']} (ZeRO-{old['zero_stage']}) -> "
                   f"dp {new['dp']} (ZeRO-{new['zero_stage']}) from full fp32 weights and moments")
    if old["global_batch_size"] != new["global_batch_size"]:
        out.append(f"global batch {old['global_batch_size']} -> {new['global_batch_size']}: the data cursor "
                   "(samples consumed) carries over; later steps read larger/smaller batches")
    if out:
        out.append("canary restore: tensor digests compared with the checkpoint before training continues")
    return out


def resumed_spec(spec, manifest: dict):
    """`spec` with `train.schedule_steps` taken from the checkpoint when the config leaves it null, so
    training on with more `train.steps` keeps the LR schedule the run started with."""
    recorded = manifest.get("schedule")
    if spec.train.schedule_steps is not None or not recorded:
        return spec
    from ..config.spec import replace

    return replace(spec, train=replace(spec.train, schedule_steps=recorded["total_steps"]))


def _lr_notes(manifest: dict, spec, step: int) -> list[str]:
    """The LR of the first resumed step under the run's schedule and under the resumed one."""
    from ..parallelism.schedule import lr_at, schedule_of

    recorded, now = manifest.get("schedule"), schedule_of(spec.train)
    if not recorded:
        return [f"learning rate after the resume: {lr_at(step, **now):.4g} at step {step + 1} (the checkpoint "
                f"does not record its schedule; cosine over {now['total_steps']} steps)"]
    before, after = lr_at(step, **recorded), lr_at(step, **now)
    line = (f"learning rate at step {step + 1}: {before:.4g} before the resume (cosine over "
            f"{recorded['total_steps']} steps, warm-up {recorded['warmup_steps']}), {after:.4g} after (over "
            f"{now['total_steps']}, warm-up {now['warmup_steps']})")
    if recorded != now:
        line += ("; the schedule changes here (train.schedule_steps, lr, min_lr or warmup_steps differ from the "
                 "checkpoint's)")
    return [line]


def plan_resume(spec, uri: str) -> ResumePlan:
    """Decide, without loading tensors, whether `uri` resumes under `spec` (its layout validated here)."""
    from .validate import validate_job

    try:
        store, step = locate(uri)
        store.committed_steps()
    except (ValueError, ImportError, OSError) as exc:  # an unknown scheme, a file, /proc...
        return ResumePlan(ok=False, source=uri, reasons=[f"cannot read {uri} as a run or checkpoint folder: {exc}"])
    plan = ResumePlan(ok=False, source=store.step_path(step) if step is not None else store.uri, step=step)
    manifest = _pick(store, step, plan)
    try:
        layout = validate_job(spec)
    except ConfigError as exc:
        plan.reasons.append(f"the new layout is invalid: {exc}")
        layout = None
    if manifest is None:
        return plan
    spec = plan.spec = resumed_spec(spec, manifest)
    _compatibility(manifest, spec, plan)
    if spec.train.steps < plan.step:
        plan.reasons.append(f"train.steps={spec.train.steps} is below the checkpoint's step {plan.step}: set "
                            f"train.steps above {plan.step} to train on")
    if layout is not None and not plan.reasons:
        plan.reshard = _reshard(manifest, layout, manifest.get("model", {}).get("num_experts", 0), spec.engine)
        cursor = manifest.get("data_cursor", {}).get("samples_consumed")
        plan.notes.append(f"data cursor: continues after {cursor} samples; training resumes at step {plan.step + 1}")
        plan.notes += _lr_notes(manifest, spec, plan.step)
    plan.ok = not plan.reasons
    return plan


def format_plan(plan: ResumePlan, layout_desc: str = "") -> str:
    lines = [f"resume from {plan.source}" + (f" (step {plan.step})" if plan.step is not None else "")]
    if layout_desc:
        lines.append(f"  into layout {layout_desc}")
    if plan.ok:
        lines.append("answer: YES, it loads" + (" with resharding:" if plan.reshard else " as saved (same layout)"))
        lines += [f"  reshard: {r}" for r in plan.reshard]
    else:
        lines.append("answer: NO")
        lines += [f"  why: {r}" for r in plan.reasons]
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines) + "\n"


def run_resume_plan(args, out, err) -> int:
    """`plan --resume-from`: exit 0 when the checkpoint loads under the config, 2 when it does not."""
    from ..config.spec import load_spec

    try:
        spec = load_spec(args.config, args.overrides, args.name)
    except ConfigError as exc:
        print(f"raytron plan: invalid config {args.config}: {exc}", file=err)
        return 2
    plan = plan_resume(spec, args.resume_from)
    layout_desc = ""
    if plan.ok:
        from .validate import validate_job

        layout_desc = validate_job(spec).describe()
    (out if plan.ok else err).write(format_plan(plan, layout_desc))
    return 0 if plan.ok else 2
