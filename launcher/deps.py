"""The Python modules a raytron job imports on a cluster, and the check that the cluster's Python has them.

A Ray Job carries raytron's own code (`runtime_env.py_modules`) but not its dependencies, which the
cluster's image or setup commands install. Without this check a cluster that lacks one fails the job
a minute in, deep in an import (`No module named 'fsspec'`); with it the submit is refused in seconds,
naming every missing module and the distribution that provides it.
"""

from __future__ import annotations

import json
import shlex
import time
from typing import Callable

from ..typed import ConfigError

REQUIRED: dict[str, str] = {
    "torch": "torch",
    "megatron.core": "megatron-core",
    "deepspeed": "deepspeed",
    "ray.train": "ray[default,train]",
    "fsspec": "fsspec",
    "tensorboard": "tensorboard",
    "yaml": "pyyaml",
    "numpy": "numpy",
    "safetensors": "safetensors",
    "psutil": "psutil",
    "tokenizers": "tokenizers",
    "sentencepiece": "sentencepiece",
    "tiktoken": "tiktoken",
    "transformers": "transformers",
}
"""Import name -> distribution, one per entry of pyproject.toml's `dependencies` (a test keeps them equal)."""

MARK = "RAYTRON_DEPS "
# Found, not imported: importing torch, deepspeed and transformers takes tens of seconds.
PROBE = ("import importlib.util, json, sys\n"
         "def absent(name):\n"
         "    try:\n"
         "        return importlib.util.find_spec(name) is None\n"
         "    except (ImportError, ValueError):\n"
         "        return True\n"
         f"print({MARK!r} + json.dumps({{'missing': [m for m in sys.argv[1:] if absent(m)], "
         "'python': sys.executable, 'version': sys.version.split()[0]}))\n")

Probe = Callable[[list[str]], dict]
"""modules -> {"missing": [...], "python": executable, "version": "3.11.7"} as seen on the cluster."""


def check_cluster_deps(address: str, probe: Probe) -> None:
    """Refuse (ConfigError on --address) a cluster whose Python lacks any module of REQUIRED."""
    found = probe(sorted(REQUIRED))
    missing = [m for m in sorted(REQUIRED) if m in found.get("missing", [])]
    if missing:
        names = ", ".join(f"{m} (pip: {REQUIRED[m]})" for m in missing)
        raise ConfigError("--address", f"the cluster at {address} runs jobs with a Python that lacks raytron's "
                                       f"dependencies: {names} [{found.get('python', '?')}, Python "
                                       f"{found.get('version', '?')}]; install them in the cluster's image or setup "
                                       "commands (`pip install raytron` from a built wheel installs all of them: "
                                       "Dockerfile, cluster_configs/ray/vm_cluster.yaml)")


def task_probe(timeout_s: float = 120.0) -> Probe:
    """A probe that runs PROBE from a Ray task, in the Python of the cluster's workers (this process is
    connected to the cluster: `raytron submit --address HOST:PORT`)."""

    def probe(modules: list[str]) -> dict:
        import ray

        def run(script: str, names: list[str]) -> str:  # nested: shipped by value, the cluster needs no raytron
            import subprocess
            import sys

            return subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True,
                                  timeout=60).stdout

        try:
            out = ray.get(ray.remote(num_cpus=0)(run).remote(PROBE, modules), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ConnectionError(f"the cluster did not run the dependency check (a Ray task) within "
                                  f"{timeout_s:.0f}s") from None
        return _result(out, "a Ray task")

    return probe


def _result(output: str, where: str) -> dict:
    for line in output.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise ConnectionError(f"the cluster's dependency check ({where}) printed no result: {output[-500:]}")


def job_probe(client, env_vars: dict[str, str], timeout_s: float = 120.0) -> Probe:
    """A probe that runs PROBE as a tiny Ray Job (the job driver's Python is the one raytron's job gets)."""

    def probe(modules: list[str]) -> dict:
        from ray.job_submission import JobStatus

        entrypoint = f"python -c {shlex.quote(PROBE)} {' '.join(modules)}"
        sid = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env_vars},
                                metadata={"raytron_probe": "dependencies"})
        deadline = time.monotonic() + timeout_s
        while not JobStatus(str(client.get_job_status(sid))).is_terminal():
            if time.monotonic() > deadline:
                client.stop_job(sid)
                raise ConnectionError(f"the cluster did not run the dependency check (job {sid}) within "
                                      f"{timeout_s:.0f}s; see `ray job logs {sid}`")
            time.sleep(0.5)
        logs = client.get_job_logs(sid)
        client.delete_job(sid)
        return _result(logs, f"job {sid}")

    return probe

