"""The whole support matrix (tests/parallelism/support_matrix.py): judge every combination of engine x debug
flavor x option, train every accepted CPU combination two steps, checkpoint and resume it, and find a suite
case for every accepted GPU-only one. CI runs a sample (tests/parallelism/test_support_matrix.py); this runs all
(about 10 s per CPU combination on 2 cores).

    DS_ACCELERATOR=cpu python scripts/support_matrix.py [--only SUBSTRING] [--judge-only]

Prints one line per combination (accepted / refused field / run result) and exits 1 when an accepted
combination fails to resume exactly or has no suite case (tests.parallelism.support_matrix.suite_verdict).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests` is a package of the repository root

from tests.parallelism.support_matrix import combos, gpu_proofs, judge, suite_verdict, train_and_resume  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="combinations whose name contains this")
    parser.add_argument("--judge-only", action="store_true", help="validate only: train nothing")
    args = parser.parse_args()
    from raytron.data_pipeline import prepare_for_job
    from raytron.parallelism.engines import get_engine
    from tests.checkpoint.ckpt_helpers import load_job

    root = Path(tempfile.mkdtemp(prefix="support_matrix_"))
    spec = load_job(root, "warm", 2, 1, 2)
    prepare_for_job(spec.data, seq_len=spec.train.seq_len, seed=spec.train.seed, cache_uri=str(root / "_data_cache"))
    proofs, failed = gpu_proofs(), 0
    for combo in (c for c in combos() if args.only in c.name):
        verdict = judge(combo)
        if not verdict.accepted:
            print(f"refused   {combo.name}: {verdict.reason[:160]}", flush=True)
            continue
        if get_engine(combo.engine).needs_gpu:
            ok, why = suite_verdict(combo, proofs)
            failed += not ok
            print(f"{'suite' if ok else 'NO CASE'}     {combo.name}: {why}")
            continue
        if args.judge_only:
            print(f"accepted  {combo.name}")
            continue
        try:
            _, straight, resumed = train_and_resume(combo, root)
            ok = sorted(straight) == [1, 2] and resumed.get(2) == straight[2]
            result = f"step 2 loss {straight[2]!r}, resumed {resumed.get(2)!r}"
        except Exception as exc:  # noqa: BLE001 - reported per combination; the sweep goes on
            ok, result = False, f"{type(exc).__name__}: {exc}"
        failed += not ok
        print(f"{'resumed' if ok else 'FAILED '}   {combo.name}: {result}", flush=True)
    print(f"{failed} failure(s); runs under {root}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
