#!/usr/bin/env bash
# Installs mirrorha on a lab node from what the file provisioners staged in $STAGE:
#   /usr/local/bin/mirrorha.pyz (the built file) and /usr/local/bin/mirrorha (wrapper)
#   /etc/mirrorha/mirrorha.toml, cluster.key, scripts/{start_prim,stop_prim}
#   /etc/systemd/system/mirrorha.service (enabled; restarted only if it was running)
#   /var/lib/mirrorha (state), /srv/mirrorha/data (the replicated directory)
# Idempotent: `vagrant provision node1 node2` after ./build.sh installs the new file.
set -euo pipefail
: "${STAGE:?}" "${NODE_NAME:?}" "${PUB_IP:?}" "${CLUSTER_KEY:?}"
P=$STAGE/provision

install -d -m 0755 /etc/mirrorha /etc/mirrorha/scripts /usr/local/lib/mirrorha /srv/mirrorha/data
install -d -m 0700 /var/lib/mirrorha
install -m 0755 "$STAGE/mirrorha.pyz" /usr/local/bin/mirrorha.pyz
install -m 0755 "$P/mirrorha" /usr/local/bin/mirrorha
install -m 0755 "$P/release-after-stop" /usr/local/lib/mirrorha/release-after-stop
install -m 0755 "$P/scripts/start_prim" "$P/scripts/stop_prim" /etc/mirrorha/scripts/
install -m 0644 "$P/mirrorha.service" /etc/systemd/system/mirrorha.service

# The VIP goes on the NIC that holds this node's pub address; its name depends on the box.
pub_if=$(ip -o -4 addr show to "$PUB_IP/32" | awk '{print $2; exit}')
if [ -z "$pub_if" ]; then
    echo "node.sh: no interface holds $PUB_IP (is the pub private network up?)" >&2
    exit 1
fi
sed "s/@PUB_IF@/$pub_if/g" "$STAGE/mirrorha.toml" > /etc/mirrorha/mirrorha.toml.new
mv /etc/mirrorha/mirrorha.toml.new /etc/mirrorha/mirrorha.toml
(umask 077 && printf '%s\n' "$CLUSTER_KEY" > /etc/mirrorha/cluster.key)

systemctl daemon-reload
systemctl enable mirrorha.service
systemctl try-restart mirrorha.service
echo "$NODE_NAME: mirrorha installed (VIP interface $pub_if); start: systemctl start mirrorha"
