#!/usr/bin/env bash
# Distribution packages for a lab VM. Usage: packages.sh node|client
#   node:   python3 (runs the built file), fuse3 (fusermount3, the unmount fallback), curl
#   client: curl (the scenarios reach the VIP from here); it is also the witness, which only
#           has to answer ping
set -euo pipefail
role=${1:?usage: packages.sh node|client}
case "$role" in
    node) pkgs=(python3 fuse3 curl) ;;
    client) pkgs=(curl) ;;
    *) echo "packages.sh: unknown role '$role' (node or client)" >&2; exit 2 ;;
esac
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${pkgs[@]}"
