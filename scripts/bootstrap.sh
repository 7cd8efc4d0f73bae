#!/usr/bin/env bash
# Create .venv and install the project (with the extra named in $1, e.g. "test"). Idempotent:
# installs again only when pyproject.toml changes or a new extra is asked for. PYTHON picks
# the interpreter (3.10+; MindSpore wheels exist for 3.9-3.11).
set -euo pipefail
exec 1>&2   # progress goes to stderr: stdout stays the caller's (demo.sh prints the caption there)
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
# pip shows what it downloads and installs: the first time this is MindSpore (and, for the
# test extra, torch and transformers), a few minutes and a few GB.
echo "bootstrap: installing pllava-serve${extra:+[$extra]} and its dependencies into .venv"
.venv/bin/python -m pip install --upgrade pip
.venv/bin/python -m pip install -e ".${extra:+[$extra]}"
echo "bootstrap: done (.venv is ready)"
find .venv -maxdepth 1 -name '.installed-*' ! -name ".installed-$hash-*" -delete
touch "$stamp"
