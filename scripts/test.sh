#!/usr/bin/env bash
# The whole test suite, then the linter. Exits non-zero if either fails; extra arguments go
# to pytest (e.g. `./scripts/test.sh -m "not root"`).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

"$PYTHON" -m pytest -q "$@"
tests=$?
"$PYTHON" -m ruff check .
lint=$?

echo "pytest exit ${tests}, ruff exit ${lint}"
[ "$tests" -eq 0 ] && [ "$lint" -eq 0 ]
