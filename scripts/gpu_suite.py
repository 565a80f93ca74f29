"""Everything GPU-only of the megatron engine in one device call (4 GPUs, under the call's 600 s limit).

Run through scripts/gpu_megatron_all.sh (it installs the wheelhouse and exports the GPU settings first):
    run(command="bash scripts/gpu_megatron_all.sh", carry=[".whl"], kind="nvidia-h100-x4", timeout_s=600)

Two phases, each a set of jobs (one subprocess each; `after` orders them, nothing else links them):
1. benchmark, with the timed GPUs to itself: benchmarks/megatron/bench_throughput.py on all GPUs, then
   TorchTitan's harness on all GPUs, then the three 1-GPU runs side by side on GPUs of their own
   (raytron, megatron-core's local spec, TorchTitan: separate GPUs, one host). Every bench record says
   which jobs ran beside it (`ran_beside`), read from the timeline.
2. tests, all at once on shared GPUs (small debug models; timings not taken): the equivalence and
   checkpoint programs split into shards (`--shard i/n`), `raytron submit` / `--resume`
   (scripts/gpu_megatron_submit.sh), the kernel tests; then pytest judges the programs' records
   (RAYTRON_GPU_RECORDS: tests/gpu/test_megatron_{equivalence,checkpoint,submit}.py read them instead of
   launching) and tests/gpu/summarize_results.py --check writes the verdict table.
Every job has its own time limit and all end by --deadline (seconds from the start); a job cut short
leaves its records missing, which the judge reports as failures. Results under --out (at most 8 files):
suite.log, gpus.csv, bench.jsonl, timeline.json, summary.txt, junit.xml, results.tar.gz. The engine
options with a GPU proof of their own (train.overlap_moe_comm, train.overlap_grad_reduce) are cases of the
equivalence program (its VARIANTS), so they run in its shards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = [sys.executable, "-P"]
JUDGE_S = 20  # kept free at the end for the judge (it took 10-12 s)
TEST_ENV = {"TORCHINDUCTOR_COMPILE_THREADS": "2"}  # ~15 programs compile at once: no worker pool each


@dataclass
class Job:
    name: str
    argv: list[str]
    gpus: tuple[int, ...] = ()
    after: tuple[str, ...] = ()
    timeout: float = 600.0
    env: dict = field(default_factory=dict)
    phase: str = "tests"


def torchrun(world: int, port: int, program: str, *args: str) -> list[str]:
    return PY + ["-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={port}",
                 str(ROOT / program), *args]


def bench_jobs(ngpu: int, res: Path, titan: str, wide_impls: str, wide_args: list[str],
               one_alone: bool = False, one_args: list[str] = ()) -> list[Job]:
    """The exclusive phase: the all-GPU runs one after the other (bench_throughput.py with `wide_impls` in one
    launch, then TorchTitan on its workloads `titan`, none when empty), then the 1-GPU runs side by side (or,
    `one_alone` or on a 1-GPU machine, one after another on GPU 0: every timed run alone on the machine).
    CUDA_DEVICE_MAX_CONNECTIONS=32: train.overlap_moe_comm needs its 2nd stream to run concurrently."""
    world = 4 if ngpu >= 4 else 2
    every = tuple(range(world))
    bench = "benchmarks/megatron/bench_throughput.py"
    jobs = []
    if ngpu > 1:
        jobs.append(Job(f"bench_megatron_w{world}", torchrun(world, 29540, bench, "--impls", wide_impls, "--out",
                                                             str(res / f"bench_megatron_w{world}.jsonl"), *wide_args),
                        every, timeout=240, env={"CUDA_DEVICE_MAX_CONNECTIONS": "32"}, phase="bench"))
    if titan and ngpu > 1:
        jobs.append(Job(f"bench_titan_w{world}", titan_argv(world, 29541, res / f"bench_titan_w{world}.jsonl", titan),
                        every, after=(jobs[-1].name,), timeout=titan_timeout(titan, 150), phase="bench"))
    one_alone = one_alone or ngpu == 1
    last, on_gpu = (jobs[-1].name if jobs else None), {}  # 1-GPU runs: a GPU each while they last, or in turn
    for i, impl in enumerate(["raytron", "mcore_local"] + (["titan"] if titan else [])):
        gpu, out = (0 if one_alone else i % world), res / f"bench_{impl}_w1.jsonl"
        argv = (titan_argv(1, 29550 + i, out, titan) if impl == "titan"
                else torchrun(1, 29550 + i, bench, "--impls", impl, "--out", str(out), *one_args))
        before = on_gpu.get(gpu, last)
        limit = titan_timeout(titan, 170) if impl == "titan" else 170
        jobs.append(Job(f"bench_{impl}_w1", argv, (gpu,), after=(before,) if before else (), timeout=limit,
                        env={"CUDA_DEVICE_MAX_CONNECTIONS": "32"}, phase="bench"))
        on_gpu[gpu] = jobs[-1].name
    return jobs


def default_wide_impls(parts: set[str]) -> str:
    """megatron-core's local spec beside raytron at all GPUs too, unless the tests share the call: its
    all-GPU runs take ~60 s more (153 s instead of ~90 s on 2x H200), which the one-call suite has not got."""
    return "raytron,mcore_local" if parts == {"bench"} else "raytron"


def default_titan_workloads(parts: set[str]) -> str:
    """TorchTitan's MoE (its Qwen3-MoE at moe-olmoe-4l's shape; at 2-4 GPUs under EP where the installed torch
    can, else experts sharded by FSDP: bench_torchtitan.why_not) in benchmark calls only: ~100 s more a call."""
    return "dense-1b,moe-olmoe-4l,moe-olmoe-4l-ep1" if parts == {"bench"} else "dense-1b"


def titan_timeout(workloads: str, dense_s: float) -> float:
    return dense_s + 100 * any(w.startswith("moe-") for w in workloads.split(","))


def titan_argv(world: int, port: int, out: Path, workloads: str) -> list[str]:
    """TorchTitan's harness with its trainer's CUDA-graph capture; the harness itself reruns eagerly a workload
    whose graph run fails (once the whole launch was rerun: a MoE error then repeated every workload)."""
    run = " ".join(torchrun(world, port, "benchmarks/megatron/bench_torchtitan.py", "--workloads", workloads,
                            "--out", str(out)))
    return ["bash", "-c", f"PYTHONPATH=/tmp/site_titan:$PYTHONPATH {run}"]


SUBMIT_RUNS = Path("/tmp/suite_runs")  # the submit part's checkpoint folder, emptied by each call


def _gpu_groups(ngpu: int) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    return ([(0, 1), (2, 3)] if ngpu >= 4 else [(0, 1)]), tuple(range(min(ngpu, 4)))


def test_jobs(ngpu: int, res: Path, after: tuple[str, ...]) -> list[Job]:
    """Every test program at once, in shards spread over the GPUs (pairs for the 2-GPU programs)."""
    pairs, every = _gpu_groups(ngpu)
    eq, ck = "tests/gpu/megatron_equivalence.py", "tests/gpu/megatron_checkpoint.py"
    jobs, port = [], 29600
    # shard counts: the longest shard about as long as the submit part (estimated from the case times of
    # a 4x H200 suite run, the engine-option VARIANTS included)
    plan = [(eq, 1, 2), (eq, 2, 6), (ck, 2, 2)] + ([(eq, 4, 3), (ck, 4, 1)] if ngpu >= 4 else [])
    for program, world, shards in plan:
        kind = "equivalence" if program == eq else "checkpoint"
        for i in range(shards):
            gpus = ((every[-1 - i % len(every)],) if world == 1 else pairs[i % len(pairs)] if world == 2 else every)
            out = res / f"megatron_{kind}_w{world}_s{i}.jsonl"
            jobs.append(Job(f"{kind}_w{world}_s{i}", torchrun(world, port, program, "--out", str(out),
                                                                "--shard", f"{i}/{shards}"),
                            gpus, after, timeout=420, env=TEST_ENV))
            port += 1
    submit_env = {"SUBMIT_GPUS": ",".join(map(str, pairs[0])), "SUBMIT_GPUS_B": ",".join(map(str, pairs[-1])),
                  "OUT": str(res / "submit"), "RUNS": str(SUBMIT_RUNS)}
    jobs.append(Job("submit", ["bash", str(ROOT / "scripts/gpu_megatron_submit.sh")], pairs[0] + pairs[-1],
                    after, timeout=420, env=submit_env))
    kernels = ["-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rA",
               "--log-level=WARNING",  # -rA would print every captured DEBUG line of torch's compile tracing
               f"--junitxml={res / 'junit_kernels.xml'}", "tests/gpu/test_megatron_kernels.py",
               "tests/ops/test_gpu_kernels.py", "tests/ops/test_fp8_gpu.py"]
    jobs.append(Job("kernels", PY + kernels, (every[min(1, len(every) - 1)],), after, timeout=300))
    return jobs


def judge_job(res: Path, after: tuple[str, ...], ngpu: int) -> Job:
    """pytest over the programs' records (RAYTRON_GPU_RECORDS: the modules read them, launch nothing), then
    summarize_results.py --check (summary.txt); exit status 1 if pytest failed."""
    py = " ".join(PY)
    modules = " ".join(f"tests/gpu/test_megatron_{m}.py" for m in ("equivalence", "checkpoint", "submit"))
    argv = ["bash", "-c", f"{py} -m pytest -m gpu -p no:cacheprovider -q -rA --junitxml={res}/junit.xml {modules}; "
                          f"rc=$?; {py} tests/gpu/summarize_results.py {res} --check > /dev/null; exit $rc"]
    env = {"RAYTRON_GPU_RECORDS": str(res), "RAYTRON_GPU_RECORDS_GPUS": str(ngpu)}
    return Job("judge", argv, (), after, timeout=JUDGE_S, env=env, phase="judge")


def fresh_records(res: Path, gpus_csv: Path) -> Path:
    """The records folder, emptied first: a warm device machine keeps /tmp between calls, and a record an
    earlier call left there would be judged and benchmarked as this call's. It gets the GPU list
    (summarize_results.py names the GPUs from it)."""
    shutil.rmtree(res, ignore_errors=True)
    (res / "logs").mkdir(parents=True)
    if gpus_csv.exists():
        (res / "gpus.csv").write_bytes(gpus_csv.read_bytes())
    return res


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_jobs(jobs: list[Job], deadline: float, logs: Path, t0: float, reserve: dict[str, float]) -> list[dict]:
    """Start each job once its `after` jobs have ended; stop it at its own limit or at the deadline
    (minus `reserve[phase]`, time held back for later phases). Returns the timeline."""
    pending, running, timeline = list(jobs), {}, []
    ended: set[str] = set()
    while pending or running:
        now = time.monotonic() - t0
        for job in [j for j in pending if set(j.after) <= ended]:
            pending.remove(job)
            env = dict(os.environ, **job.env)
            if job.gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, job.gpus))
            log = open(logs / f"{job.name}.log", "w")
            proc = subprocess.Popen(job.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            limit = min(now + job.timeout, deadline - reserve.get(job.phase, 0.0))
            running[job.name] = (job, proc, log, now, limit)
            print(f"[suite] {now:6.1f}s start {job.name} on GPUs {job.gpus or '-'}", flush=True)
        time.sleep(0.5)
        now = time.monotonic() - t0
        for name, (job, proc, log, start, limit) in list(running.items()):
            rc, why = proc.poll(), "exit"
            if rc is None and now >= limit:
                _stop(proc)
                rc, why = 124, "time limit"
            if rc is None:
                continue
            log.close()
            del running[name]
            ended.add(name)
            timeline.append({"job": name, "phase": job.phase, "gpus": list(job.gpus), "start_s": round(start, 1),
                             "end_s": round(now, 1), "rc": rc, "ended_by": why, "argv": job.argv})
            print(f"[suite] {now:6.1f}s {name} rc={rc} ({why}) after {now - start:.0f}s", flush=True)
    return timeline


def merge_bench(res: Path, timeline: list[dict], out: Path) -> None:
    """bench.jsonl: every bench record, with the jobs that ran at the same time (on other GPUs)."""
    spans = {t["job"]: t for t in timeline}
    with open(out, "w") as f:
        for path in sorted(res.glob("bench_*.jsonl")):
            job = spans.get(path.stem)
            beside = [t["job"] for t in timeline if job and t["job"] != job["job"]
                      and t["start_s"] < job["end_s"] and t["end_s"] > job["start_s"]]
            for line in path.read_text().splitlines():
                if line.strip():
                    f.write(json.dumps({**json.loads(line), "ran_beside": beside}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", default="bench,tests", help="comma-separated: bench, tests")
    parser.add_argument("--deadline", type=float, default=570.0, help="seconds from the start")
    parser.add_argument("--wide-impls", default="",
                        help="bench_throughput.py --impls of the all-GPU run (default: raytron,mcore_local with "
                             "--parts bench; raytron alone when the tests share the call: the local spec's all-GPU "
                             "runs take ~60 s more, past the call's 600 s)")
    parser.add_argument("--wide-args", default="--overlap-moe-comm", help="its extra bench_throughput.py flags")
    parser.add_argument("--titan-workloads", default="",
                        help="bench_torchtitan.py --workloads (default: dense-1b,moe-olmoe-4l,moe-olmoe-4l-ep1 with "
                             "--parts bench, ~100 s more than dense-1b alone, which is the default beside the tests)")
    parser.add_argument("--one-gpu-args", default="",
                        help="extra bench_throughput.py flags of the 1-GPU runs, e.g. "
                             "'--workloads dense-3b --recompute selective' (dense/3b on one H200)")
    parser.add_argument("--one-gpu-alone", action="store_true",
                        help="the 1-GPU bench runs one after another, each alone on the machine (not side by side)")
    args = parser.parse_args()
    t0, out = time.monotonic(), Path(args.out)
    res = fresh_records(Path("/tmp/gpu_suite"), out / "gpus.csv")
    shutil.rmtree(SUBMIT_RUNS, ignore_errors=True)  # the submit part starts its runs fresh (it resumes them itself)
    ngpu = len(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.splitlines())
    parts = set(args.parts.split(","))
    known = {"bench", "tests"}
    if not parts <= known or ngpu < (1 if parts == {"bench"} else 2):
        sys.exit(f"gpu_suite: needs 2 or 4 GPUs (1 for --parts bench; found {ngpu}) and --parts from "
                 f"{', '.join(sorted(known))} (got {args.parts})")
    titan = (args.titan_workloads or default_titan_workloads(parts)) if Path("/tmp/site_titan/torchtitan").exists() else ""
    if not titan:
        print("[suite] TorchTitan not installed in /tmp/site_titan (wheels in .whl/titan/): not benchmarked")
    wide_impls = args.wide_impls or default_wide_impls(parts)
    jobs = (bench_jobs(ngpu, res, titan, wide_impls, args.wide_args.split(), args.one_gpu_alone,
                       args.one_gpu_args.split())
            if "bench" in parts else [])
    bench = tuple(j.name for j in jobs)
    jobs += test_jobs(ngpu, res, bench) if "tests" in parts else []
    if "tests" in parts:
        jobs.append(judge_job(res, tuple(j.name for j in jobs), ngpu))
    timeline = run_jobs(jobs, args.deadline, res / "logs", t0, {"bench": 0.0, "tests": JUDGE_S})
    (out / "timeline.json").write_text(json.dumps(timeline, indent=1))
    merge_bench(res, timeline, out / "bench.jsonl")
    for name in ("summary.txt", "junit.xml"):
        if (res / name).exists():
            (out / name).write_bytes((res / name).read_bytes())
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        tar.add(res, arcname="gpu_suite")
    print(f"[suite] done at {time.monotonic() - t0:.0f}s: " + ", ".join(f"{t['job']} rc={t['rc']}" for t in timeline))


if __name__ == "__main__":
    main()
