#!/usr/bin/env bash
# Check that the outputs stored in the notebooks reproduce, with nbval in lax mode: every cell
# runs (except cells marked `# NBVAL_SKIP`), and each cell marked `# NBVAL_CHECK_OUTPUT` must
# print what the notebook stores. CONTRIBUTING.md explains which cells carry which marker.
#
# nbdev-clean blanks execution counts, and nbval takes a cell without one for a cell that was
# never run, so it fails every such cell that has outputs. The check therefore runs on copies of
# nbs/ in a temporary folder whose code cells are numbered; the notebooks themselves stay clean.
#
# Usage: bash scripts/nbval.sh [NOTEBOOK...]   (default: every notebook in nbs/)
# Extra pytest options go in NBVAL_PYTEST_ARGS, e.g. NBVAL_PYTEST_ARGS="--durations=5".
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -x .venv/bin/python ]]; then
  source .venv/bin/activate
fi
# The kernel must draw figures inline, as when the notebooks were saved; scripts/test.sh sets Agg.
export HF_HUB_OFFLINE=1 PYTHONHASHSEED=0 MPLBACKEND=module://matplotlib_inline.backend_inline
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
python - "$workdir" "$@" >"$workdir/notebooks.txt" <<'PY'
import json, shutil, sys
from pathlib import Path

workdir, requested = Path(sys.argv[1]), [Path(p).resolve() for p in sys.argv[2:]]
nbs = Path("nbs").resolve()
# Copy the whole folder, so notebooks find the files next to them; skip nbdev's private folders.
shutil.copytree(nbs, workdir / "nbs", ignore=shutil.ignore_patterns("_*", ".*"))
notebooks = requested or sorted(p for p in nbs.rglob("*.ipynb")
                                if not any(part.startswith(("_", ".")) for part in p.relative_to(nbs).parts))
for source in notebooks:
    if not source.is_relative_to(nbs) or not source.exists():
        sys.exit(f"nbval.sh: {source} is not a notebook in {nbs}")
    copy = workdir / "nbs" / source.relative_to(nbs)
    nb = json.loads(source.read_text(encoding="utf-8"))
    count = 0
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            count += 1
            cell["execution_count"] = count
            for output in cell.get("outputs", []):
                if output["output_type"] == "execute_result":
                    output["execution_count"] = count
    copy.write_text(json.dumps(nb), encoding="utf-8")
    print(copy)
PY
mapfile -t copies <"$workdir/notebooks.txt"

cd "$workdir"
# shellcheck disable=SC2086  # NBVAL_PYTEST_ARGS is a list of options
python -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider -q ${NBVAL_PYTEST_ARGS:-} "${copies[@]}"
