"""Helpers for tests that run the `raytron` CLI and Ray nodes as separate processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("launcher", "parallelism", "models", "data_pipeline", "ops")


def source_path(tmp: Path) -> str:
    """A `raytron` package tree of links into this checkout, for PYTHONPATH: subprocesses then import
    the working tree under test whatever an editable install elsewhere maps the package to."""
    pkg = tmp / "src" / "raytron"
    if not pkg.exists():
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").symlink_to(REPO / "raytron" / "__init__.py")
        for name in PACKAGE_DIRS:
            (pkg / name).symlink_to(REPO / name, target_is_directory=True)
    return str(pkg.parent)


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["PYTHONPATH"] = source_path(tmp) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def raytron(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run `raytron ARGS` (python -m raytron.launcher.cli) outside the repository root."""
    return subprocess.run([sys.executable, "-m", "raytron.launcher.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def listening_sockets(pid: int) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of process `pid` and its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for proc in procs:
        try:
            name = proc.name()
            found |= {(name, c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # ended meanwhile
            continue
    return found
