"""The dependency rules, checked with import-linter (contracts in pyproject.toml, ``[tool.importlinter]``).

shared/ never imports services/, and services never import each other (so the gateway reaches the
model services only through their gRPC stubs). import-linter's graph builder (grimp) wants a
top-level package on disk, while ``dramaturg`` is mapped over three folders (setup.py): the check
runs on a copy of the tree laid out as one package, in a Python that skips the editable install's
import hook (``-S``) so ``dramaturg`` resolves to that copy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _one_package_tree(dest: Path) -> Path:
    package = dest / "dramaturg"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "proto" / "dramaturg", package, ignore=ignore)
    for folder in ("shared", "services"):
        shutil.copytree(ROOT / folder, package / folder, ignore=ignore)
    return package


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    site = sysconfig.get_paths()["purelib"]
    code = (
        "import sys; from importlinter.cli import lint_imports_command; "
        f"sys.argv = ['lint-imports', '--no-cache', '--no-logo', {str(ROOT / 'pyproject.toml')!r}]; "
        "lint_imports_command()"
    )
    return subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=tree,
        env={"PYTHONPATH": f"{tree}:{site}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_dependency_contracts_hold(tmp_path: Path) -> None:
    _one_package_tree(tmp_path)
    result = lint_imports(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout, result.stdout


def test_a_service_importing_another_breaks_a_contract(tmp_path: Path) -> None:
    """The check can fail: one cross-service import (the kind diarization once had) is caught."""
    package = _one_package_tree(tmp_path)
    offender = package / "services" / "diarization" / "offender.py"
    offender.write_text("from dramaturg.services.speaker import config  # noqa: F401\n")
    shared_offender = package / "shared" / "offender.py"
    shared_offender.write_text("import dramaturg.services.gateway.auth  # noqa: F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "services never import each other BROKEN" in result.stdout, result.stdout
    assert "shared/ never imports services/ BROKEN" in result.stdout, result.stdout
