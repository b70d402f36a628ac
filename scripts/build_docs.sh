#!/usr/bin/env bash
# Build the documentation site from the notebooks in nbs/ into docs/ without Quarto, and offline
# once npm has installed MathJax into docs_assets/node_modules (scripts/setup.sh does):
#   1. nbdev's notebook processing (as in `nbdev-proc-nbs`) writes the notebooks with show_doc
#      output added and hidden and export-only cells removed into _proc/;
#   2. scripts/docs_prepare.py applies the Quarto cell options that nbdev writes and stages the
#      pages in reading order into _mkdocs/;
#   3. MkDocs (Material theme, mkdocs-jupyter) renders the stored outputs into static HTML with
#      search. MathJax comes from npm (docs_assets/package.json) and is shipped with the site.
# No notebook is run: nbdev executes only the imports and definitions that show_doc needs, and
# the pages show the outputs stored in the notebooks.
#
# Options: --site-dir DIR (default: docs). Environment: NPM (npm binary, default npm), used
# only when docs_assets/node_modules is missing. Needs the `dev` extras of pyproject.toml.
# Where Quarto is installed, `nbdev-docs` builds nbdev's own site from nbs/_quarto.yml instead.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -x .venv/bin/python ]]; then
  source .venv/bin/activate
fi

site_dir=docs
while [[ $# -gt 0 ]]; do
  case "$1" in
    --site-dir) site_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "build_docs: unknown option '$1'; the only option is --site-dir DIR" >&2; exit 2 ;;
  esac
done

if ! command -v mkdocs >/dev/null || ! python -c "import nbdev, mkdocs_jupyter" 2>/dev/null; then
  echo "build_docs: nbdev, mkdocs or mkdocs-jupyter not found; install the development extras with: bash scripts/setup.sh" >&2
  exit 1
fi

if [[ ! -f docs_assets/node_modules/mathjax/package.json ]]; then
  if ! command -v "${NPM:-npm}" >/dev/null; then
    echo "build_docs: npm not found; install Node.js and npm (Debian: apt-get install -y npm), then rerun" >&2
    exit 1
  fi
  "${NPM:-npm}" ci --prefix docs_assets --no-audit --no-fund --loglevel=error
fi

# nbdev's processing (what `nbdev-proc-nbs` runs), into a fresh _proc/. The command itself
# would first try to download and install Quarto with sudo, which this build does not need.
python -c "from nbdev.serve import proc_nbs; proc_nbs(force=True)"
python scripts/docs_prepare.py _proc nbs _mkdocs

# The Material theme prints a notice about MkDocs 2 on every build; it is not about this site.
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir "$site_dir"
echo "build_docs: site written to $site_dir/; view it with: python -m http.server --directory $site_dir --bind 127.0.0.1 8000"
