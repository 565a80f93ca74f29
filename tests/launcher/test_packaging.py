"""raytron's wheel, built offline from this checkout, holds the package and every subpackage; the Dockerfile
and the VM recipe install exactly that wheel, and the KubeRay example runs the Dockerfile's image."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.launcher.cluster_helpers import PACKAGE_DIRS, REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
WHEEL = f"raytron-{PROJECT['version']}-py3-none-any.whl"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of a copy of the checkout (the build writes build/ and egg-info next to its sources)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("raytron", *PACKAGE_DIRS):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--wheel-dir", str(src / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    built = sorted((src / "dist").glob("*.whl"))
    assert [w.name for w in built] == [WHEEL]
    return built[0]


def test_wheel_holds_every_module_and_the_cli(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"raytron/{p.relative_to(REPO / 'raytron')}" for p in (REPO / "raytron").rglob("*.py")}
    for sub in PACKAGE_DIRS:
        expected |= {f"raytron/{sub}/{p.relative_to(REPO / sub)}" for p in (REPO / sub).rglob("*.py")}
    assert expected - names == set(), "modules missing from the wheel"
    assert all(f"raytron/{sub}/__init__.py" in names for sub in PACKAGE_DIRS)
    entry = zipfile.ZipFile(wheel).read(f"raytron-{PROJECT['version']}.dist-info/entry_points.txt").decode()
    assert "raytron = raytron.launcher.cli:main" in entry


def test_vm_recipe_installs_the_built_wheel():
    cfg = yaml.safe_load((REPO / "cluster_configs" / "ray" / "vm_cluster.yaml").read_text())
    [target] = [t for t, source in cfg["file_mounts"].items() if source == f"dist/{WHEEL}"]
    assert Path(target).name == WHEEL, "pip needs the wheel's own file name"
    installs = [c for c in cfg["setup_commands"] if "pip install" in c]
    assert installs and all(target in c for c in installs)
    assert not re.search(r"raytron==", " ".join(cfg["setup_commands"])), "raytron is not on the package index"


def test_dockerfile_installs_the_wheel_and_kuberay_runs_its_image():
    docker = (REPO / "Dockerfile").read_text()
    assert re.search(r"pip wheel --no-deps .*\s\.\n", docker), "the wheel is built from the checkout"
    assert re.search(r"pip install .*/raytron-\*\.whl", docker)
    for sub in ("raytron", *PACKAGE_DIRS):
        assert re.search(rf"^COPY .*\b{sub} {sub}$", docker, re.M), f"{sub}/ is not copied into the build"
    [tag] = re.findall(r"docker build -t (\S+) \.", docker)
    assert tag == f"raytron:{PROJECT['version']}"
    cluster = yaml.safe_load((REPO / "cluster_configs" / "ray" / "kuberay_raycluster.yaml").read_text())
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {tag}
    base = set(re.findall(r"^FROM (rayproject/ray:(\S+?)-\S+)", docker, re.M))
    assert {v for _, v in base} == {cluster["spec"]["rayVersion"]}, "the image's Ray is the cluster's"
