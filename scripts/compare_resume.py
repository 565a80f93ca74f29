"""Compare a resumed run's loss curve with an uninterrupted run of the same config (JSON to stdout).

    python scripts/compare_resume.py RUN_DIR STRAIGHT_RUN_DIR RESUME_STEP

Reads each run's metrics.jsonl (launcher/metrics.py) and the committed checkpoints' manifests. Reports the
loss around the resume point, the max |resumed - uninterrupted| over the steps after it, and whether any
step index repeats or is missing.
"""

from __future__ import annotations

import glob
import json
import os
import sys


def losses(run_dir: str) -> tuple[dict[int, float], list[int]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}, []
    steps, out = [], {}
    for line in open(path):
        if line.strip():
            rec = json.loads(line)
            if rec.get("loss") is not None:
                steps.append(rec["step"])
                out[rec["step"]] = rec["loss"]
    return out, steps


def main() -> None:
    run, straight, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    a, a_steps = losses(run)
    b, _ = losses(straight)
    after = [s for s in sorted(a) if s > at and s in b]
    committed = sorted(os.path.basename(os.path.dirname(p))
                       for p in glob.glob(os.path.join(run, "checkpoints", "step-*", "COMMITTED")))
    diffs = {s: abs(a[s] - b[s]) for s in after}
    result = {
        "run": run, "straight": straight, "resume_step": at,
        "steps_logged": len(a_steps), "repeated_steps": sorted({s for s in a_steps if a_steps.count(s) > 1}),
        "missing_steps": sorted(set(range(1, max(a_steps, default=0) + 1)) - set(a_steps)),
        "loss_at": {s: a.get(s) for s in (at - 1, at, at + 1, at + 2)},
        "straight_loss_at": {s: b.get(s) for s in (at - 1, at, at + 1, at + 2)},
        "max_abs_dloss_before_resume": max((abs(a[s] - b[s]) for s in a if s <= at and s in b), default=None),
        "max_abs_dloss_after_resume": max(diffs.values(), default=None),
        "steps_compared_after_resume": len(after),
        "committed_checkpoints": committed,
        "resumed_loss": [a[s] for s in sorted(a)], "straight_loss": [b[s] for s in sorted(b)],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
