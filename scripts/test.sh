#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test
exec .venv/bin/python -m pytest -q "$@"
