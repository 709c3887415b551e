#!/usr/bin/env bash
# Set up everything from nothing (virtual environment included) and run the test suite.
# Extra arguments go to pytest. GREENMIM_TEST_WRAPPER, if set, prefixes the pytest command
# (CI uses it to run the suite inside a loopback-only network namespace).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev,spconv]'
exec ${GREENMIM_TEST_WRAPPER:-} .venv/bin/python -m pytest -q "$@"
