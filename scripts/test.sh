#!/usr/bin/env bash
# Sets up everything the tests need (Debian packages, .venv) and runs them all: lint, type check, unit,
# integration, and the booted-systemd system tests (those need root; they are skipped otherwise).
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --system-test
echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
typed=(agent)
[[ -d devkit ]] && typed+=(devkit)
.venv/bin/mypy "${typed[@]}"
echo "== pytest"
.venv/bin/python -m pytest "$@"
