#!/usr/bin/env bash
# Set up medseg_nbdev on a fresh machine: a Python environment, PyTorch (only where none is
# installed), the package with its development extras, the Debian mricron-data package that
# contains the embedded Colin27 MRI and AAL labels, and the npm packages of the documentation site.
#
# Environment: PYTHON (interpreter used to create .venv, default python3), MEDSEG_DATA (data
# folder; when set, mricron-data is unpacked there instead of installed system-wide).
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. Python environment: keep an active virtual environment, conda environment or Colab
#    runtime; otherwise create .venv in the repository.
if [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" || -n "${COLAB_RELEASE_TAG:-}" ]]; then
  py=$(command -v python || command -v python3)
  echo "setup: using the active Python environment ($py)"
else
  if [[ ! -x .venv/bin/python ]]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  py=.venv/bin/python
  echo "setup: using .venv"
fi

# 2. PyTorch: an existing install (Colab, a CUDA workstation) is kept.
if "$py" -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: keeping torch $("$py" -c 'import torch; print(torch.__version__)')"
else
  "$py" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
fi

# 3. The package, editable, with the test and notebook tools.
"$py" -m pip install --quiet -e ".[dev]"

# 4. Data: Debian's mricron-data (Colin27 T1 MRI and the AAL atlas).
bash scripts/install_data.sh

# 5. Documentation: MathJax from npm, shipped with the site that scripts/build_docs.sh builds.
if command -v npm >/dev/null; then
  npm ci --prefix docs_assets --no-audit --no-fund --loglevel=error
else
  echo "setup: npm not found, so scripts/build_docs.sh cannot build the site until it is installed" \
       "(Debian: apt-get install -y npm)"
fi

echo "setup: done. Run the tests with: bash scripts/test.sh"
