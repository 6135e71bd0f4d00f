#!/usr/bin/env bash
# README command 2. Installs what is needed (as scripts/setup.sh does), then runs
# lint (ruff), types (mypy --strict on fltfuse/) and the whole test suite:
# unit, mounted integration and conformance tiers.
#   sudo scripts/test.sh [PYTEST ARGS...]
# FLTFUSE_RANDOM_OPS=N sets the length of the randomized differential run.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$here/scripts/install.sh"
cd "$here"
echo "== ruff"
.venv/bin/ruff check fltfuse filters tests scripts
echo "== mypy"
.venv/bin/mypy
if [ $# -eq 0 ]; then
  echo "== pytest: the unit tier as an unprivileged user (no root, no kernel, no mount)"
  unprivileged=(setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=/tmp PYTHONDONTWRITEBYTECODE=1)
  if "${unprivileged[@]}" test -r tests/unit/conftest.py -a -x .venv/bin/python; then
    "${unprivileged[@]}" .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit
  else
    echo "not run: user 65534 cannot read $here or run .venv/bin/python (a parent directory is private)"
  fi
fi
echo "== pytest"
exec .venv/bin/pytest "$@"
