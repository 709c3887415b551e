#!/usr/bin/env bash
# The device check in one unattended call: bench/gpu_check.sh OUTDIR [--device cpu] [...]
# Installs the project with its own install command only when there is no .venv yet, uses no
# network itself, and writes everything (results.md, results.json, log.txt) under OUTDIR.
# GREENMIM_PYTHON overrides the interpreter (default .venv/bin/python).
set -euo pipefail
out=${1:?usage: bench/gpu_check.sh OUTDIR [--device cpu] [--job-seconds S]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${GREENMIM_PYTHON:-.venv/bin/python}
if [ -z "${GREENMIM_PYTHON:-}" ] && [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[dev,spconv]'
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# 8 minutes in all; the python part stops itself well before (a Ray head is cleaned up there)
timeout --kill-after=20 450 "$py" bench/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
