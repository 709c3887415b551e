#!/usr/bin/env bash
# Set up everything from nothing (virtual environment included) and run the test suite.
# Extra arguments go to pytest. GREENMIM_TEST_WRAPPER, if set, prefixes the pytest command
# (CI uses it to run the suite inside a loopback-only network namespace, which has no network:
# everything is installed before it). Two tiers need Debian packages, installed here when
# missing (as root, with apt-get): the service tests also run on a real PostgreSQL server
# (`postgresql`), the dashboard's browser tests drive Chromium (`chromium`, `chromium-driver`).
# Without them those tests skip, or fail with GREENMIM_REQUIRE_POSTGRES=1 /
# GREENMIM_REQUIRE_BROWSER=1 (as in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null \
  || missing+=(postgresql)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  else
    echo "scripts/test.sh: missing ${missing[*]} (Debian packages); those tests skip" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev,spconv,postgres]'
exec ${GREENMIM_TEST_WRAPPER:-} .venv/bin/python -m pytest -q "$@"
