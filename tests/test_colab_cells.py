"""Every notebook carries the Open-in-Colab badge and the Colab setup cell, which
scripts/colab_cells.py writes from the repository address in pyproject.toml."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("colab_cells", ROOT / "scripts" / "colab_cells.py")
colab_cells = importlib.util.module_from_spec(spec)
spec.loader.exec_module(colab_cells)


def notebooks(folder):
    return sorted(p for p in folder.rglob("*.ipynb")
                  if not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts))


def test_every_notebook_has_colab_cells():
    repository = colab_cells.repository_url(ROOT / "pyproject.toml")
    stale = [p.name for p in notebooks(ROOT / "nbs") if colab_cells.process(p, repository, write=False)]
    assert not stale, f"These notebooks lack current Colab cells, so run `python scripts/colab_cells.py`: {stale}"


def test_cells_sit_under_the_title():
    for path in notebooks(ROOT / "nbs"):
        cells = json.loads(path.read_text())["cells"]
        assert "".join(cells[0]["source"]).startswith("# "), path.name
        assert colab_cells._is_badge(cells[1]), path.name
        assert f"blob/main/nbs/{path.name})" in "".join(cells[1]["source"])
        assert colab_cells._is_setup(cells[2]), path.name


def test_script_is_idempotent_and_follows_pyproject(tmp_path):
    (tmp_path / "nbs").mkdir()
    shutil.copy(ROOT / "nbs" / "00_core.ipynb", tmp_path / "nbs")
    text = (ROOT / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(text.replace("github.com/medseg-nbdev/medseg_nbdev",
                                                          "github.com/a-fork/medseg_nbdev"))
    assert colab_cells.main(["--root", str(tmp_path), "--check"]) == 1
    assert colab_cells.main(["--root", str(tmp_path)]) == 0
    first = (tmp_path / "nbs" / "00_core.ipynb").read_bytes()
    assert colab_cells.main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / "nbs" / "00_core.ipynb").read_bytes() == first
    assert colab_cells.main(["--root", str(tmp_path), "--check"]) == 0
    cells = json.loads(first)["cells"]
    assert sum(colab_cells._is_setup(c) for c in cells) == 1
    assert "github/a-fork/medseg_nbdev/blob/main/nbs/00_core.ipynb" in "".join(cells[1]["source"])
    assert "git+https://github.com/a-fork/medseg_nbdev" in "".join(cells[2]["source"])


def test_repository_must_be_on_github(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project.urls]\nRepository = "https://gitlab.com/x/y"\n')
    with pytest.raises(ValueError, match="not a GitHub address"):
        colab_cells.repository_url(tmp_path / "pyproject.toml")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    with pytest.raises(ValueError, match="no Repository"):
        colab_cells.repository_url(tmp_path / "pyproject.toml")


def run_setup_cell(monkeypatch, on_colab):
    calls = []

    def fake_run(command, check=False):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1 if command[:2] == ["apt-get", "install"] and len(calls) == 2
                                           else 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    if on_colab:
        monkeypatch.setenv("COLAB_RELEASE_TAG", "release-test")
    else:
        monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    exec(colab_cells.setup_source("https://github.com/medseg-nbdev/medseg_nbdev"), {})
    return calls


def test_setup_cell_does_nothing_outside_colab(monkeypatch):
    assert run_setup_cell(monkeypatch, on_colab=False) == []


def test_setup_cell_installs_package_and_data_on_colab(monkeypatch):
    calls = run_setup_cell(monkeypatch, on_colab=True)
    assert calls[0][-1] == "medseg-nbdev @ git+https://github.com/medseg-nbdev/medseg_nbdev"
    assert calls[1] == ["apt-get", "install", "-y", "-qq", "mricron-data"]
    assert calls[2] == ["apt-get", "update", "-qq"]  # the first install failed: refresh the lists and retry
    assert calls[3] == calls[1]
