#!/usr/bin/env bash
# Refresh constraints.txt: resolve the project's dependencies (every extra) afresh in a
# throw-away virtual environment and pin exactly what was installed.
#   bash scripts/lock.sh        # then review `git diff constraints.txt`, run the tests, commit
# Every install (README, scripts/test.sh, .ci/run, the Dockerfile) uses `pip install -c constraints.txt`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" build' EXIT
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q '.[dev,spconv,postgres]'
{
  echo "# Pinned versions of every dependency (all extras), for reproducible installs."
  echo "# Used as: pip install -c constraints.txt -e '.[dev,spconv]'. Refresh: bash scripts/lock.sh"
  "$tmp/venv/bin/python" -m pip freeze --exclude greenmim | LC_ALL=C sort -f
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pinned packages"
