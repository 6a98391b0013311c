"""`mirrorha demo`: the two-node lab, a node daemon in node1 and node2, the demo application.

Builds the lab (app/lab.py), starts both daemons from this very program (the built file or
`python -m app`), makes node1 primary as an admin would on a first start, and prints where to
look. Ctrl-C (or the --minutes limit) stops both nodes cleanly and tears everything down.
Needs root (network and mount namespaces) and /dev/fuse for the replicated directory.
"""

from __future__ import annotations

import argparse
import os
import time

from app.lab import VIP, Lab, LabError, unavailable_reason
from app.labcluster import DATA_DIR, DEMO_PORT, NODES, LabCluster, LabClusterError
from app.node import self_command


def run_demo(args: argparse.Namespace) -> int:
    why = unavailable_reason()
    if why:
        print(f"mirrorha demo: {why}")
        return 2
    pulse, timeout = (50, 300) if args.fast else (300, 1500)
    lab = Lab(prefix=args.prefix)
    cluster: LabCluster | None = None
    try:
        lab.up()
        print(lab.describe())
        cluster = LabCluster(lab, self_command(), pulse_ms=pulse, timeout_ms=timeout)
        print(f"\nstarting node1 and node2 (pulse {pulse} ms, timeout {timeout} ms) ...")
        cluster.first_start()
        sd = {n: cluster.state_dir(n) for n in NODES}
        me = " ".join(self_command())
        print(f"""
The cluster is up: node1 PRIM with the VIP {VIP}, node2 SECOND.
  state:          {me} state --state-dir {sd["node1"]}
                  {me} state --state-dir {sd["node2"]}
  the demo app:   ip netns exec {lab.ns("client")} curl http://{VIP}:{DEMO_PORT}/
  write a record: ip netns exec {lab.ns("client")} curl -d hello http://{VIP}:{DEMO_PORT}/
  replicated dir: {DATA_DIR}, seen from the host at
                  {lab.host_path("node1", DATA_DIR)} and {lab.host_path("node2", DATA_DIR)}
  swap:           {me} swap --state-dir {sd["node1"]}
  fail node1:     kill -9 {cluster.daemon_pid("node1")}   (its daemon; the guardian fences the app)
  logs:           {cluster.log_path("node1")}  {cluster.log_path("node2")}
Ctrl-C stops both nodes and removes the lab.""")
        last = ""
        end = time.monotonic() + args.minutes * 60
        while time.monotonic() < end:
            now = "   ".join(f"{n} {cluster.state_word(n)}" for n in NODES)
            if now != last:
                print(time.strftime("%H:%M:%S"), now, flush=True)
                last = now
            time.sleep(1)
        print(f"mirrorha demo: {args.minutes} minutes are up")
    except KeyboardInterrupt:
        print("\nstopping ...")
    except (LabError, LabClusterError, OSError) as exc:
        print(f"mirrorha demo: {exc}")
        return 1
    finally:
        if cluster is not None:
            cluster.stop_all()
        lab.down()
        print("lab removed")
    return 0


def demo_available() -> bool:
    return os.geteuid() == 0
