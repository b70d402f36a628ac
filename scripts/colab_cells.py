#!/usr/bin/env python
"""Insert or update the "Open in Colab" badge and the Colab setup cell in every notebook of nbs/.

Right after the title cell comes a markdown cell with the badge that opens the notebook in Colab,
then a hidden code cell that, on Google Colab only, installs medseg_nbdev from its repository and
Debian's mricron-data. The title stays the first cell because nbdev and the docs site read the
page title and summary from it. The repository address comes from
`Repository` under `[project.urls]` in pyproject.toml, so a fork changes it there and reruns this
script. A second run changes nothing.

Usage:
    python scripts/colab_cells.py            # update every notebook in nbs/
    python scripts/colab_cells.py --check    # exit 1 and list the notebooks that need an update
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP_MARKER = "# Colab setup"
BADGE_MARKER = "colab-badge.svg"
SETUP_ID = "colab-setup"
BADGE_ID = "colab-badge"


def repository_url(pyproject: Path) -> str:
    "Return `Repository` from the `[project.urls]` table of pyproject.toml."
    text = pyproject.read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10: read the one key without a TOML parser
        table = re.search(r"^\[project\.urls\]\s*$(.*?)(?=^\[|\Z)", text, flags=re.MULTILINE | re.DOTALL)
        match = re.search(r'^Repository\s*=\s*"([^"]+)"', table.group(1), flags=re.MULTILINE) if table else None
        url = match.group(1) if match else None
    else:
        url = tomllib.loads(text).get("project", {}).get("urls", {}).get("Repository")
    if not url:
        raise ValueError(f'{pyproject} has no Repository = "https://github.com/OWNER/NAME" under [project.urls]')
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+/?", url):
        raise ValueError(f"Repository {url!r} in {pyproject} is not a GitHub address, which Colab needs to open "
                         "notebooks")
    return url.rstrip("/")


def setup_source(repository: str) -> str:
    "Return the source of the Colab setup cell."
    return f'''#| hide
{SETUP_MARKER} (written by scripts/colab_cells.py): on Google Colab, install medseg_nbdev from its
# repository and Debian's mricron-data (the Colin27 MRI and AAL atlas); elsewhere, do nothing.
import os, subprocess, sys

if "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                    "medseg-nbdev @ git+{repository}"], check=True)
    if subprocess.run(["apt-get", "install", "-y", "-qq", "mricron-data"]).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True)  # Colab images ship stale package lists
        subprocess.run(["apt-get", "install", "-y", "-qq", "mricron-data"], check=True)'''


def badge_source(repository: str, notebook: str) -> str:
    "Return the markdown of the badge that opens `notebook` (a file in nbs/) in Colab."
    github = repository.removeprefix("https://github.com/")
    url = f"https://colab.research.google.com/github/{github}/blob/main/nbs/{notebook}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/{BADGE_MARKER})]({url})"


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + [lines[-1]]


def _is_setup(cell: dict) -> bool:
    return cell["cell_type"] == "code" and SETUP_MARKER in "".join(cell["source"])


def _is_badge(cell: dict) -> bool:
    return cell["cell_type"] == "markdown" and BADGE_MARKER in "".join(cell["source"])


def updated_cells(cells: list[dict], repository: str, notebook: str) -> list[dict]:
    "Return the notebook's cells with the badge and then the setup cell right after the title cell."
    rest = [cell for cell in cells if not _is_setup(cell) and not _is_badge(cell)]
    setup = {"cell_type": "code", "execution_count": None, "id": SETUP_ID, "metadata": {}, "outputs": [],
             "source": _lines(setup_source(repository))}
    badge = {"cell_type": "markdown", "id": BADGE_ID, "metadata": {},
             "source": _lines(badge_source(repository, notebook))}
    title = next((i for i, cell in enumerate(rest) if cell["cell_type"] == "markdown"), None)
    if title is None:
        raise ValueError(f"{notebook} has no markdown title cell to put the Colab badge under")
    return rest[:title + 1] + [badge, setup] + rest[title + 1:]


def _serialise(notebook: dict) -> str:
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def process(path: Path, repository: str, write: bool) -> bool:
    "Update the Colab cells of one notebook (if `write`); return whether it needed an update."
    text = path.read_text(encoding="utf-8")
    notebook = json.loads(text)
    notebook["cells"] = updated_cells(notebook["cells"], repository, path.name)
    new_text = _serialise(notebook)
    if new_text == text:
        return False
    if write:
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(new_text, encoding="utf-8")
        temporary.replace(path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Insert or update the Open-in-Colab badge and the Colab setup "
                                                 "cell in every notebook of nbs/.")
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to process (default: every .ipynb in nbs/ except _-prefixed folders)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook needs an update")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this script's parent)")
    args = parser.parse_args(argv)
    repository = repository_url(args.root / "pyproject.toml")
    folder = args.root / "nbs"
    paths = args.notebooks or sorted(p for p in folder.rglob("*.ipynb")
                                     if not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts))
    stale = [path for path in paths if process(path, repository, write=not args.check)]
    for path in stale:
        print(f"{'needs an update' if args.check else 'updated'}: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
