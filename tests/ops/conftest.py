"""Tools for the deploy/ and k8s/ checks: the CLIs CI runs, located once."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PROMETHEUS_BIN = REPO / ".cache" / "tools" / "prometheus" / "usr" / "bin"
OVERLAYS = ("cpu-demo", "gpu")


def tool(name: str, *extra_dirs: Path) -> str:
    """A CLI from the test environment, the unpacked tools, or PATH. Missing: a skip on a developer's
    machine, a failure in CI (where `make test` installs everything)."""
    for directory in (VENV_BIN, *extra_dirs):
        if (directory / name).is_file():
            return str(directory / name)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} not found (run `make tools`; kubectl comes with the machine)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def load_script(path: Path):
    """A script of the repository (not a package module) imported by path, e.g. a generator."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="session")
def promtool() -> str:
    return tool("promtool", PROMETHEUS_BIN)


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """Each overlay rendered by `kubectl kustomize`: the file and its documents."""
    kubectl = tool("kubectl")
    out = {}
    directory = tmp_path_factory.mktemp("kustomize")
    for overlay in OVERLAYS:
        result = run(kubectl, "kustomize", f"k8s/overlays/{overlay}")
        assert result.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay}:\n{result.stderr}"
        path = directory / f"{overlay}.yaml"
        path.write_text(result.stdout)
        out[overlay] = (path, [doc for doc in yaml.safe_load_all(result.stdout) if doc])
    return out
