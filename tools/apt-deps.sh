#!/usr/bin/env bash
# Install the Debian packages mirrorha's demo and tests need, only those missing.
#   tools/apt-deps.sh demo     the demo: fuse3 (fusermount3), iproute2, ping, python3
#   tools/apt-deps.sh test     everything the test suite runs against
set -euo pipefail
DEMO=(fuse3 iproute2 iputils-ping procps python3 python3-venv curl)
TEST=("${DEMO[@]}" psmisc rsync keepalived vagrant nftables chromium chromium-driver
      postgresql postgresql-contrib sqlite3)
case "${1:-test}" in
    demo) want=("${DEMO[@]}") ;;
    test) want=("${TEST[@]}") ;;
    *) echo "usage: $0 demo|test" >&2; exit 2 ;;
esac
missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "apt-deps: missing packages ${missing[*]}: run as root, or install them" >&2
    exit 1
fi
echo "apt-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
