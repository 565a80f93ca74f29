"""The dependency check of a remote submit: what it checks, how it probes, how it refuses."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

import pytest

from raytron.launcher.deps import MARK, PROBE, REQUIRED, check_cluster_deps
from raytron.typed import ConfigError

from tests.launcher.cluster_helpers import REPO


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_required_modules_cover_the_package_dependencies():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(map(_name, deps)) == sorted(_name(d) for d in REQUIRED.values())


def test_probe_finds_modules_without_importing_them():
    out = subprocess.run([sys.executable, "-c", PROBE, "json", "yaml", "no_such_module_rt", "no_such_pkg_rt.sub"],
                         capture_output=True, text=True, timeout=60).stdout
    [line] = [x for x in out.splitlines() if x.startswith(MARK)]
    found = json.loads(line[len(MARK):])
    assert found["missing"] == ["no_such_module_rt", "no_such_pkg_rt.sub"] and found["python"] == sys.executable


def test_missing_modules_are_named_with_their_distribution():
    asked = []

    def probe(modules):
        asked.append(modules)
        return {"missing": ["fsspec", "yaml"], "python": "/usr/bin/python3", "version": "3.11.2"}

    named = (r"--address: the cluster at http://h:8265 .*lacks raytron's dependencies: fsspec \(pip: fsspec\), "
             r"yaml \(pip: pyyaml\) \[/usr/bin/python3, Python 3.11.2\]")
    with pytest.raises(ConfigError, match=named):
        check_cluster_deps("http://h:8265", probe)
    assert asked == [sorted(REQUIRED)]
    check_cluster_deps("http://h:8265", lambda modules: {"missing": []})  # all there: no error
