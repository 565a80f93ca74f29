"""Running Triton kernels in Triton's interpreter on CPU: the interpreter must be on before Triton is
imported, so a module's cases run in one subprocess (a worker script under tests/ops/) that prints its
results as JSON on its last line."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install -e '.[test]' on x86_64 brings it)")


def run_interpreted(script, *args: str, unset: tuple[str, ...] = (), timeout: int = 600):
    """The parsed last stdout line of `python script *args` with TRITON_INTERPRET=1 and the variables in
    `unset` removed (a kernel choice set outside must not steer the worker)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    for name in unset:
        env.pop(name, None)
    done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
