"""The exported library must match the notebooks, and the notebooks must be clean."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def copy_project(tmp_path):
    for name in ("pyproject.toml", "nbs", "medseg_nbdev"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "_proc"))
        else:
            shutil.copy(source, tmp_path / name)
    return tmp_path


def tree(folder, pattern):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob(pattern))
            if "__pycache__" not in p.parts and "_proc" not in p.parts}


def run_tool(tool, cwd):
    binary = Path(sys.executable).with_name(tool)
    if not binary.exists():
        pytest.skip(f"{tool} is not installed next to {sys.executable}")
    result = subprocess.run([str(binary)], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_library_matches_notebooks(tmp_path):
    project = copy_project(tmp_path)
    before = tree(project / "medseg_nbdev", "*.py")
    run_tool("nbdev-export", project)
    after = tree(project / "medseg_nbdev", "*.py")
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"Run nbdev-export and commit: these modules differ from the notebooks: {changed}"


def test_notebooks_are_clean(tmp_path):
    project = copy_project(tmp_path)
    before = tree(project / "nbs", "*.ipynb")
    run_tool("nbdev-clean", project)
    after = tree(project / "nbs", "*.ipynb")
    changed = sorted(name for name in before if before[name] != after.get(name))
    assert not changed, f"Run nbdev-clean and commit: these notebooks are not clean: {changed}"
