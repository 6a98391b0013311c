#!/usr/bin/env bash
# Build dist/mirrorha.pyz, the one file copied to both servers. Reads shiv.toml.
# Needs: python3 >= 3.11 with venv, and PyPI (or a pip mirror) for the dependencies' wheels.
#   ./build.sh                        build for this CPU, for every Python in shiv.toml
#   PLATFORM=manylinux2014_aarch64 ./build.sh   build for another CPU (see README)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${BUILD_VENV:-.venv-build}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi
"$VENV/bin/pip" install -q "shiv>=1.0.8"

read -r OUT ENTRY PYLINE COMPRESS PYTHONS < <("$VENV/bin/python" - <<'PYEOF'
import tomllib
b = tomllib.load(open("shiv.toml", "rb"))["build"]
print(b["output"], b["entry_point"], b["python"].replace(" ", "\x1f"),
      "1" if b.get("compressed", True) else "0", ",".join(b.get("pythons", [])))
PYEOF
)
PYLINE=${PYLINE//$'\x1f'/ }
ARCH=$(uname -m)
PLATFORM=${PLATFORM:-manylinux_2_17_${ARCH}}

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
DEPS=$("$VENV/bin/python" -c 'import tomllib;print("\n".join(tomllib.load(open("pyproject.toml","rb"))["project"]["dependencies"]))')
# Pure-Python dependencies and this project, for the build interpreter.
"$VENV/bin/pip" install -q --no-compile --target "$STAGE/site" . $DEPS 2> >(grep -v "^WARNING: Location" >&2)
# Compiled wheels for every other target Python: their .so names carry the version, so they
# sit side by side in the same package folder and each interpreter loads its own.
IFS=, read -ra VERS <<< "$PYTHONS"
for v in "${VERS[@]}"; do
    [ -n "$v" ] || continue
    "$VENV/bin/pip" install -q --no-compile --no-deps --upgrade --target "$STAGE/v$v" \
        --only-binary=:all: --python-version "$v" --platform "$PLATFORM" --implementation cp \
        orjson 2>/dev/null || { echo "build.sh: no orjson wheel for Python $v on $PLATFORM; skipped" >&2; continue; }
    cp -n "$STAGE/v$v"/orjson/*.so "$STAGE/site/orjson/" 2>/dev/null || true
done
rm -rf "$STAGE/site/bin"
mkdir -p "$(dirname "$OUT")"
COMPRESS_FLAG=--compressed
[ "$COMPRESS" = "1" ] || COMPRESS_FLAG=--uncompressed
"$VENV/bin/shiv" --site-packages "$STAGE/site" -e "$ENTRY" -o "$OUT" -p "$PYLINE" \
    $COMPRESS_FLAG --reproducible >/dev/null
chmod +x "$OUT"
SIZE=$(stat -c %s "$OUT")
echo "built $OUT: $SIZE bytes ($(( SIZE / 1024 )) KiB), Pythons ${PYTHONS//,/ } on ${ARCH}"
