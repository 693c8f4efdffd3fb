#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Slow reproductions are skipped unless STRUCTSPARSE_SLOW=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${STRUCTSPARSE_VENV:-.venv}/bin/python" -m pytest -q "$@"
