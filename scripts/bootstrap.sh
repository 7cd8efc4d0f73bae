#!/usr/bin/env bash
# Create .venv and install the project (with the extra named in $1, e.g. "test"). Idempotent:
# installs again only when pyproject.toml changes or a new extra is asked for. PYTHON picks
# the interpreter (3.10+; MindSpore wheels exist for 3.9-3.11).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extra=${1:-}
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
hash=$(sha256sum pyproject.toml | cut -c1-16)
stamp=".venv/.installed-$hash-${extra:-base}"
# an install with the test extra covers the runtime needs too
if [ -f "$stamp" ] || { [ -z "$extra" ] && ls .venv/.installed-"$hash"-* >/dev/null 2>&1; }; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extra:+[$extra]}"
find .venv -maxdepth 1 -name '.installed-*' ! -name ".installed-$hash-*" -delete
touch "$stamp"
