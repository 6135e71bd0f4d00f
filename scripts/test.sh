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
echo "== pytest"
exec .venv/bin/pytest "$@"
