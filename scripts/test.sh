#!/usr/bin/env bash
# The whole test suite, then the static checks: lint, format, types, import contracts.
# Exits non-zero if any fails; extra arguments go to pytest (e.g. `./scripts/test.sh -m "not root"`).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

"$PYTHON" -m pytest -q "$@"
tests=$?

failed=()
[ "$tests" -eq 0 ] || failed+=(pytest)
"$PYTHON" -m ruff check . || failed+=("ruff check")
"$PYTHON" -m ruff format --check . || failed+=("ruff format")
"$PYTHON" -m mypy || failed+=(mypy)
"$PYTHON" -c "from importlinter.cli import lint_imports_command; lint_imports_command()" \
    || failed+=(lint-imports)

if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all passed: pytest, ruff check, ruff format, mypy, lint-imports"
