#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this), on a fresh machine as root:
# installs the system packages and the project's venv it needs, then ruff, mypy and pytest.
# Exits non-zero on any failure, including a pytest run that collected no test.
#   ./test.sh                  everything
#   ./test.sh tests/unit -k x  only what you name (arguments go to pytest)
set -euo pipefail
cd "$(dirname "$0")"

tools/apt-deps.sh test

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip 2> >(grep -v "^WARNING: Location" >&2)
fi
.venv/bin/pip install -q -e ".[test]" 2> >(grep -v -e "^WARNING: Location" -e "BuildBackendWarning" >&2) >/dev/null

echo "== ruff"
.venv/bin/ruff check app tests bench
.venv/bin/ruff format --check app tests bench
echo "== mypy"
.venv/bin/mypy app
echo "== pytest"
set +e
.venv/bin/python -m pytest -q -ra "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
    echo "test.sh: pytest collected no test: that is a failure" >&2
    exit 1
fi
exit $rc
