#!/usr/bin/env bash
# Build dist/mirrorha.pyz and start the two-node demo on this machine (root: it builds network
# and mount namespaces). Installs the Debian packages it needs first. Ctrl-C tears it all down.
#   ./demo.sh            default timing (pulse 300 ms, timeout 1.5 s)
#   ./demo.sh --fast     the fastest supported timing (pulse 50 ms, timeout 300 ms)
set -euo pipefail
cd "$(dirname "$0")"
tools/apt-deps.sh demo
./build.sh
exec python3 dist/mirrorha.pyz demo "$@"
