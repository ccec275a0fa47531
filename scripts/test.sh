#!/usr/bin/env bash
# README command 2 (and what CI runs): set up maelab with its test extras in a virtual environment and run
# the default test suite (slow tests are excluded; add `-m slow` to run them).
# --no-cache-dir: where torch is downloaded (a CUDA build of several GB) it is not kept a second time in
# pip's cache, so the install fits on a small disk.
# VENV=... picks the environment folder; FRESH=1 recreates it from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ "${FRESH:-0}" = 1 ]; then rm -rf "$VENV"; fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir -e '.[test]'
exec "$VENV/bin/python" -m pytest "$@"
