#!/usr/bin/env bash
# Run every test of medseg_nbdev: the library and documentation-site tests in tests/ (pytest;
# the browser tests skip without Chromium unless MEDSEG_REQUIRE_BROWSER=1), the notebooks in
# nbs/ (nbdev-test, fast path; add `--flags slow` through NBDEV_TEST_FLAGS for the full runs),
# and the stored notebook outputs (nbval, see scripts/nbval.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -x .venv/bin/python ]]; then
  source .venv/bin/activate
fi
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONHASHSEED=0

echo "== pytest tests/"
python -m pytest -q tests "$@"

echo "== nbdev-test nbs/"
nbdev-test --n-workers "${NBDEV_TEST_WORKERS:-2}" --timing ${NBDEV_TEST_FLAGS:+--flags "$NBDEV_TEST_FLAGS"}

echo "== nbval nbs/ (stored outputs reproduce)"
bash scripts/nbval.sh
