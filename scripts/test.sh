#!/usr/bin/env bash
# Set up everything from nothing (virtual environment included) and run the test suite.
# Extra arguments go to pytest. GREENMIM_TEST_WRAPPER, if set, prefixes the pytest command
# (CI uses it to run the suite inside a loopback-only network namespace). The service tests
# also run on a real PostgreSQL server: Debian's `postgresql` package is installed here when
# missing (as root, with apt-get; otherwise those cases skip, or fail with
# GREENMIM_REQUIRE_POSTGRES=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql
  else
    echo "scripts/test.sh: no PostgreSQL server; install Debian's postgresql for those tests" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev,spconv,postgres]'
exec ${GREENMIM_TEST_WRAPPER:-} .venv/bin/python -m pytest -q "$@"
