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
# the dashboard's browser tests need Chromium + chromedriver (Debian's packages); installed here,
# before the wrapper, which may have no network. Without them those tests skip.
if ! { command -v chromium && command -v chromedriver; } >/dev/null && [ "$(id -u)" = 0 ] \
  && command -v apt-get >/dev/null; then
  apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
fi
exec ${GREENMIM_TEST_WRAPPER:-} .venv/bin/python -m pytest -q "$@"
