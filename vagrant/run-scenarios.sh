#!/usr/bin/env bash
# Plays the lab scenarios on the Vagrant VMs, through `vagrant ssh -c`, in order (each one starts
# from where the previous one left the cluster):
#   first-start  fresh state on both nodes, both WAIT, `mirrorha prim` on node1: node1 PRIM,
#                node2 SECOND with node1's data, VIP on node1 only, the app answers on the VIP
#   failover     kill -9 of node1's daemon and app: node2 ALONE, VIP on node2 only, the app
#                answers from the client, the last acknowledged write on node1 is on node2
#   rejoin       node1's daemon back: node1 SECOND, node2 PRIM, node2's writes copied back
#   swap         `mirrorha swap`: node1 PRIM, node2 SECOND, VIP and app follow
#   clean-stop   `mirrorha stop` on both, then the daemons: no VIP, no app, no mount left
#
# Prints PASS/FAIL per scenario (SKIP for those after a failure) and exits non-zero on any
# failure. Every wait is bounded in attempts and in seconds; every ssh call in seconds.
# Traffic: the only addresses targeted are the lab's (198.18.1.0/24), from inside the VMs.
#
# Usage: cd vagrant && vagrant up && ./run-scenarios.sh
#   MIRRORHA_CLI_OPTS  options given after every `mirrorha <command>` (default below)
#   KEEP_GOING=1       run every scenario even after a failure
#   SSH_TIMEOUT_S, POLL_S, START_WAIT_S, FAILOVER_WAIT_S, SYNC_WAIT_S: the bounds (see below)
set -uo pipefail
cd "$(dirname "$0")"

VIP=198.18.1.100
APP_URL="http://$VIP:8080/"
DATA=/srv/mirrorha/data
CLI_OPTS=${MIRRORHA_CLI_OPTS:---state-dir /var/lib/mirrorha}
# Bounds, in seconds; each can be overridden from the environment.
SSH_TIMEOUT_S=${SSH_TIMEOUT_S:-60}       # one `vagrant ssh -c` call
POLL_S=${POLL_S:-2}                      # between two attempts of a wait
START_WAIT_S=${START_WAIT_S:-60}         # daemon up and answering `state`
FAILOVER_WAIT_S=${FAILOVER_WAIT_S:-60}   # modules.timeout_ms is 3 s, plus the app's start
SYNC_WAIT_S=${SYNC_WAIT_S:-180}          # first full sync / reintegration of the lab data
RUN_ID="run-$(date +%Y%m%dT%H%M%S)-$$"
LOG=$(mktemp "${TMPDIR:-/tmp}/mirrorha-scenarios.XXXXXX.log")

log() { printf '%s\n' "$*" >>"$LOG"; }
say() { printf '%s\n' "$*"; log "$*"; }

# on VM COMMAND: run COMMAND in VM (as the vagrant user; use sudo inside), stdout to stdout.
on() {
    local vm=$1 cmd=$2
    log "[$vm] \$ $cmd"
    timeout "$SSH_TIMEOUT_S" vagrant ssh "$vm" -c "$cmd" -- -o LogLevel=ERROR 2>>"$LOG"
}

# mh NODE COMMAND...: a mirrorha command on NODE.
mh() {
    local node=$1
    shift
    on "$node" "sudo mirrorha $* $CLI_OPTS"
}

# state_of NODE: the node's own state word, or nothing if the daemon does not answer.
# `mirrorha state` prints this node's state first (the peer's, if shown, comes after).
state_of() {
    mh "$1" state | tr -d '\r' | grep -oE '\b(STOP|WAIT|ALONE|PRIM|SECOND)\b' | head -n 1
}

# wait_until DESCRIPTION SECONDS COMMAND...: retry COMMAND every POLL_S, at most SECONDS
# (and SECONDS/POLL_S+1 attempts). Each attempt is itself bounded by SSH_TIMEOUT_S.
wait_until() {
    local desc=$1 limit=$2
    shift 2
    local deadline=$((SECONDS + limit)) max=$((limit / POLL_S + 1)) tries=0
    while ((tries < max && SECONDS < deadline)); do
        tries=$((tries + 1))
        if "$@"; then
            log "ok after $tries attempt(s): $desc"
            return 0
        fi
        sleep "$POLL_S"
    done
    WHY="timed out after ${limit}s ($tries attempts): $desc"
    return 1
}

# check DESCRIPTION COMMAND...: COMMAND must succeed now.
check() {
    local desc=$1
    shift
    if "$@"; then
        log "ok: $desc"
        return 0
    fi
    WHY="failed: $desc"
    return 1
}

in_state() { [ "$(state_of "$1")" = "$2" ]; }
in_state_one_of() { local s; s=$(state_of "$1"); [ -n "$s" ] && [[ " $2 " == *" $s "* ]]; }
states_are() { in_state node1 "$1" && in_state node2 "$2"; }

# Each probe prints a word, so a failed ssh call is never mistaken for "no VIP" or "no app".
vip_here() {
    on "$1" "ip -o -4 addr show to $VIP/32 | grep -q . && echo yes || echo no" | tr -d '\r'
}
# vip_only_on NODE: NODE holds the VIP and the other node does not (one primary).
vip_only_on() {
    local other=node1
    [ "$1" = node1 ] && other=node2
    [ "$(vip_here "$1")" = yes ] && [ "$(vip_here "$other")" = no ]
}
vip_on_none() { [ "$(vip_here node1)" = no ] && [ "$(vip_here node2)" = no ]; }

app_probe() {
    on client "curl -fsS -o /dev/null --max-time 5 $APP_URL && echo up || echo down" | tr -d '\r'
}
app_answers() { [ "$(app_probe)" = up ]; }
app_silent() { [ "$(app_probe)" = down ]; }
no_mount_on() {
    [ "$(on "$1" "findmnt -n $DATA >/dev/null && echo mounted || echo none" | tr -d '\r')" = none ]
}

# write_file NODE NAME TEXT: a write through the application's path on NODE (the FUSE mount on a
# primary); it is acknowledged once `tee` returns.
write_file() { on "$1" "printf '%s\n' '$3' | sudo tee $DATA/$2 >/dev/null"; }
# has_file NODE NAME TEXT: the file holds exactly TEXT on NODE.
has_file() { [ "$(on "$1" "sudo cat $DATA/$2 2>/dev/null" | tr -d '\r')" = "$3" ]; }

# start_node NODE: start the daemon; if it comes up in STOP (no autostart), `mirrorha start`.
start_node() {
    on "$1" "sudo systemctl start mirrorha" >>"$LOG" || {
        WHY="systemctl start failed on $1"
        return 1
    }
    wait_until "$1 daemon answers state" "$START_WAIT_S" \
        in_state_one_of "$1" "STOP WAIT ALONE PRIM SECOND" || return 1
    if in_state "$1" STOP; then
        mh "$1" start >>"$LOG" || { WHY="mirrorha start failed on $1"; return 1; }
    fi
}

# reset_node NODE: daemon stopped, state directory emptied, replicated directory emptied.
reset_node() {
    on "$1" "sudo systemctl stop mirrorha; sudo systemctl reset-failed mirrorha 2>/dev/null;
             sudo find /var/lib/mirrorha $DATA -mindepth 1 -delete" >>"$LOG"
}

scenario_first_start() {
    reset_node node1 && reset_node node2 || { WHY="could not reset the nodes"; return 1; }
    write_file node1 seed.txt "seed $RUN_ID" || { WHY="could not seed node1's data"; return 1; }
    start_node node1 && start_node node2 || return 1
    wait_until "both nodes WAIT (first start: nobody knows whose data is good)" \
        "$START_WAIT_S" states_are WAIT WAIT || return 1
    mh node1 prim >>"$LOG" || { WHY="mirrorha prim failed on node1"; return 1; }
    wait_until "node1 PRIM, node2 SECOND" "$SYNC_WAIT_S" states_are PRIM SECOND || return 1
    wait_until "node1's seed copied to node2" "$SYNC_WAIT_S" \
        has_file node2 seed.txt "seed $RUN_ID" || return 1
    check "VIP on node1 only" vip_only_on node1 || return 1
    wait_until "client reaches the app on the VIP" "$FAILOVER_WAIT_S" app_answers
}

scenario_failover() {
    write_file node1 acked.txt "acked $RUN_ID" || { WHY="write on node1 failed"; return 1; }
    local pids
    local query='echo $(systemctl show -p MainPID --value mirrorha)'
    query+=' $(cat /run/mirrorha/demo-app.pid)'
    pids=$(on node1 "$query" | tr -d '\r')
    log "node1 daemon and app pids: $pids"
    # shellcheck disable=SC2086 # two pids, split on purpose
    set -- $pids
    if [ $# -ne 2 ] || [ "$1" = 0 ]; then
        WHY="node1 daemon or app not running (pids: '$pids')"
        return 1
    fi
    on node1 "sudo kill -9 $1 $2" >>"$LOG" || { WHY="kill -9 $1 $2 failed on node1"; return 1; }
    wait_until "node2 ALONE" "$FAILOVER_WAIT_S" in_state node2 ALONE || return 1
    wait_until "VIP on node2 only" "$FAILOVER_WAIT_S" vip_only_on node2 || return 1
    wait_until "client reaches the app on the VIP" "$FAILOVER_WAIT_S" app_answers || return 1
    check "node1's acknowledged write is on node2" has_file node2 acked.txt "acked $RUN_ID"
}

scenario_rejoin() {
    write_file node2 alone.txt "alone $RUN_ID" || { WHY="write on node2 failed"; return 1; }
    start_node node1 || return 1
    wait_until "node1 SECOND, node2 PRIM" "$SYNC_WAIT_S" states_are SECOND PRIM || return 1
    wait_until "node2's write while ALONE copied to node1" "$SYNC_WAIT_S" \
        has_file node1 alone.txt "alone $RUN_ID" || return 1
    check "VIP on node2 only" vip_only_on node2 || return 1
    check "client reaches the app on the VIP" app_answers
}

scenario_swap() {
    mh node2 swap >>"$LOG" || { WHY="mirrorha swap failed on node2"; return 1; }
    wait_until "node1 PRIM, node2 SECOND" "$SYNC_WAIT_S" states_are PRIM SECOND || return 1
    wait_until "VIP on node1 only" "$FAILOVER_WAIT_S" vip_only_on node1 || return 1
    wait_until "client reaches the app on the VIP" "$FAILOVER_WAIT_S" app_answers || return 1
    write_file node1 swapped.txt "swapped $RUN_ID" || { WHY="write on node1 failed"; return 1; }
    check "node1's write is on node2" has_file node2 swapped.txt "swapped $RUN_ID"
}

scenario_clean_stop() {
    # The secondary first, so stopping it is not a failover.
    mh node2 stop >>"$LOG" || { WHY="mirrorha stop failed on node2"; return 1; }
    wait_until "node2 STOP, node1 ALONE" "$FAILOVER_WAIT_S" states_are ALONE STOP || return 1
    mh node1 stop >>"$LOG" || { WHY="mirrorha stop failed on node1"; return 1; }
    wait_until "node1 STOP" "$FAILOVER_WAIT_S" in_state node1 STOP || return 1
    check "no node holds the VIP" vip_on_none || return 1
    check "the app no longer answers on the VIP" app_silent || return 1
    local node result
    for node in node1 node2; do
        on "$node" "sudo systemctl stop mirrorha" >>"$LOG" || {
            WHY="systemctl stop failed on $node"
            return 1
        }
        result=$(on "$node" "systemctl show -p Result --value mirrorha" | tr -d '\r')
        if [ "$result" != success ]; then
            WHY="$node's daemon did not exit cleanly (Result=$result)"
            return 1
        fi
        check "no mount left on $DATA on $node" no_mount_on "$node" || return 1
    done
}

preflight() {
    local status vm
    status=$(timeout "$SSH_TIMEOUT_S" vagrant status --machine-readable 2>>"$LOG") || {
        say "FAIL preflight: vagrant status failed (details in $LOG)"
        return 1
    }
    for vm in node1 node2 client; do
        if ! grep -q "^[0-9]*,$vm,state,running$" <<<"$status"; then
            say "FAIL preflight: VM $vm is not running (run: vagrant up)"
            return 1
        fi
    done
    for vm in node1 node2; do
        if ! on "$vm" "test -x /usr/local/bin/mirrorha.pyz" >/dev/null; then
            say "FAIL preflight: mirrorha is not installed on $vm (./build.sh; vagrant provision)"
            return 1
        fi
    done
}

main() {
    say "mirrorha Vagrant scenarios ($RUN_ID), log: $LOG"
    preflight || exit 2
    local name failed=0 passed=0 skipped=0
    for name in first_start failover rejoin swap clean_stop; do
        if ((failed > 0)) && [ "${KEEP_GOING:-0}" != 1 ]; then
            say "SKIP ${name//_/-} (an earlier scenario failed; KEEP_GOING=1 runs it anyway)"
            skipped=$((skipped + 1))
            continue
        fi
        WHY="no reason recorded"
        log "=== ${name//_/-}"
        if "scenario_$name"; then
            say "PASS ${name//_/-}"
            passed=$((passed + 1))
        else
            say "FAIL ${name//_/-}: $WHY"
            failed=$((failed + 1))
        fi
    done
    say "$passed passed, $failed failed, $skipped skipped (log: $LOG)"
    if ((failed > 0)); then
        say "The VMs are left as they are; e.g. vagrant ssh node1 -c 'sudo journalctl -u mirrorha'"
        exit 1
    fi
}

main "$@"
