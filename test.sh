#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this), on a fresh machine as root:
# installs the system packages and the project's venv it needs, then ruff, mypy and pytest.
# Exits non-zero on any failure, including a pytest run that collected no test.
#   ./test.sh                  everything
#   ./test.sh tests/unit -k x  only what you name (arguments go to pytest)
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(fuse3 libfuse3-3 iproute2 iputils-ping procps psmisc rsync keepalived vagrant nftables
              chromium chromium-driver postgresql postgresql-contrib sqlite3 python3 python3-venv)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "test.sh: missing packages ${missing[*]}; run as root or install them" >&2
        exit 1
    fi
    echo "test.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

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
