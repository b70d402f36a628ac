"""The nbval markers in the notebooks follow the convention in CONTRIBUTING.md.

scripts/nbval.sh runs every cell that is not marked `# NBVAL_SKIP`, so a cell that nbdev-test
leaves out (`#| slow`, `#| notest`, `#| eval: false`) must carry that marker, or nbval would run the full
experiment or a cell that is not meant to run. Cells marked `# NBVAL_CHECK_OUTPUT` are the ones
whose stored output nbval compares.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_re_directive = re.compile(r"^\s*#\|\s*([\w-]+)\s*(?::\s*(.*?))?\s*$")
_re_marker = re.compile(r"^\s*#\s*(NBVAL_[A-Z_]+)\s*$", re.MULTILINE)


def notebooks():
    found = [path for path in (ROOT / "nbs").rglob("*.ipynb")
             if not any(part.startswith(("_", ".")) for part in path.relative_to(ROOT / "nbs").parts)]
    return sorted(path.relative_to(ROOT).as_posix() for path in found)


def directives(source):
    "Return the nbdev directives at the top of a cell as {name: value}."
    found = {}
    for line in source.splitlines():
        match = _re_directive.match(line)
        if not match:
            break
        found[match.group(1)] = (match.group(2) or "").strip().lower()
    return found


def code_cells(path):
    nb = json.loads((ROOT / path).read_text(encoding="utf-8"))
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            yield index, source, cell.get("outputs", [])


def test_directives_parsed():
    assert directives("#| slow\n# NBVAL_SKIP\nsteps = 1000") == {"slow": ""}
    assert directives("#| eval: false\nx = 1") == {"eval": "false"}
    assert directives("x = 1\n#| slow") == {}


@pytest.mark.parametrize("notebook", notebooks())
def test_skipped_cells_marked(notebook):
    unmarked = []
    for index, source, _ in code_cells(notebook):
        found = directives(source)
        if "slow" in found or "notest" in found or found.get("eval") == "false":
            if "NBVAL_SKIP" not in _re_marker.findall(source):
                unmarked.append(f"cell {index}: {source.splitlines()[0]}")
    assert not unmarked, (
        f"{notebook}: add a '# NBVAL_SKIP' line under the '#|' directives of these cells, "
        f"which nbdev-test does not run by default: {unmarked}")


@pytest.mark.parametrize("notebook", notebooks())
def test_markers_consistent(notebook):
    for index, source, outputs in code_cells(notebook):
        markers = _re_marker.findall(source)
        unknown = set(markers) - {"NBVAL_SKIP", "NBVAL_CHECK_OUTPUT", "NBVAL_IGNORE_OUTPUT", "NBVAL_RAISES_EXCEPTION"}
        assert not unknown, f"{notebook} cell {index}: unknown nbval markers {sorted(unknown)}"
        assert not {"NBVAL_SKIP", "NBVAL_CHECK_OUTPUT"} <= set(markers), (
            f"{notebook} cell {index}: a skipped cell cannot have its output checked")
        if "NBVAL_CHECK_OUTPUT" in markers:
            assert outputs, f"{notebook} cell {index} is marked NBVAL_CHECK_OUTPUT but stores no output; run the notebook and save it"
