"""The command line: `python -m app` and the built file `mirrorha.pyz` both start here.

Every command lives in this one table (`COMMANDS`), so `--help` lists them all and each later
feature adds a line here, not a new entry point. Commands that act on a running node talk to
its daemon over the control socket in the state directory (HTTP over a Unix socket, the same
routes as the JSON API); commands that read files (`config check`) need no daemon.

Exit status: 0 success, 1 the command ran and failed (the daemon refused, a node is not
reachable), 2 bad usage or bad input (a configuration error, an unknown command). `state -q`
exits with the state code the reference cluster uses: STOP 0, WAIT 1, ALONE 2, PRIM 3, SECOND 4.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from app import __version__

DEFAULT_STATE_DIR = "/var/lib/mirrorha"
DEFAULT_CONFIG = "/etc/mirrorha/mirrorha.toml"
STATE_CODES = {"STOP": 0, "WAIT": 1, "ALONE": 2, "PRIM": 3, "SECOND": 4}

# Commands sent to the node daemon, with the help line each one shows.
NODE_COMMANDS: dict[str, str] = {
    "start": "start the module: WAIT, then PRIM, SECOND or ALONE",
    "stop": "stop the module on this node (the peer takes over if it can)",
    "forcestop": "stop at once: stop scripts with force, no failover handshake",
    "restart": "restart the application on this node (no failover)",
    "stopstart": "stop then start the module (on the primary this fails over)",
    "swap": "exchange PRIM and SECOND (stop_prim completes before start_prim)",
    "prim": "force this node primary (refused when the peer is primary)",
    "second": "force this node secondary (refused when the peer is not primary)",
    "primforce": "force primary even when a resync into this node was interrupted",
}


def _err(msg: str) -> None:
    print(f"mirrorha: {msg}", file=sys.stderr)


def cmd_version(args: argparse.Namespace) -> int:
    print(f"mirrorha {__version__} (Python {sys.version.split()[0]}, {sys.platform})")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from app.config import ConfigError, load

    try:
        cfg = load(args.file)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    c = cfg.cluster
    print(f"{args.file}: OK")
    print(
        f"  cluster {c.name}: nodes {c.nodes[0].name} ({c.nodes[0].admin}), "
        f"{c.nodes[1].name} ({c.nodes[1].admin})"
    )
    for net in c.networks:
        role = " + replication" if net is c.replication_network else ""
        print(f"  network {net.name}: heartbeat{role}")
    for m in cfg.modules:
        vip = f"{m.vip.address}/{m.vip.prefix} on {m.vip.interface}" if m.vip else "no VIP"
        dirs = ", ".join(str(r.path) for r in m.replicated) or "no replicated directory"
        print(f"  module {m.name}: {vip}; {dirs}; pulse {m.pulse_ms} ms, timeout {m.timeout_ms} ms")
    if c.key_file is not None and not c.key_file.exists():
        print(
            f"  note: key_file {c.key_file} does not exist yet; "
            "create it on both nodes with `mirrorha keygen > FILE`"
        )
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    print(secrets.token_hex(32))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from app.config import ConfigError, load, load_key

    try:
        cfg = load(args.config)
        load_key(cfg.cluster)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    from app.node import run_node

    return run_node(cfg, Path(args.state_dir), node_name=args.node, start=args.start)


def cmd_state(args: argparse.Namespace) -> int:
    from app.control import ControlError, render_state, request

    try:
        state = request(Path(args.state_dir), "GET", "/v1/state")
    except ControlError as exc:
        if args.quiet:
            return 0
        if args.json:
            import orjson

            sys.stdout.write(
                orjson.dumps({"daemon": "not running", "error": str(exc)}).decode() + "\n"
            )
        else:
            print(f"STOP (daemon not running: {exc})")
        return 0
    if args.json:
        import orjson

        sys.stdout.write(orjson.dumps(state, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif not args.quiet:
        print(render_state(state))
    mods = state.get("modules", [])
    if not mods:
        return 0
    return STATE_CODES.get(mods[0].get("state", "STOP"), 1) if args.quiet else 0


def make_node_command(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from app.control import ControlError, request

        body: dict[str, object] = {"module": args.module}
        if name == "second":
            body["fullsync"] = bool(args.fullsync)
        try:
            reply = request(Path(args.state_dir), "POST", f"/v1/commands/{name}", body)
        except ControlError as exc:
            _err(str(exc))
            return 1
        print(reply.get("message", "ok"))
        return 0

    return run


def render_verify(v: dict[str, Any]) -> str:
    """A verify status as text: progress, then one line per difference."""
    done = "running" if v.get("running") else "finished" if v.get("finished") else "never run"
    lines = [
        f"verify of {v.get('module')} on {v.get('node')}: {done}, "
        f"{v.get('files_done', 0)}/{v.get('files_total', 0)} files, "
        f"{v.get('bytes_done', 0)}/{v.get('bytes_total', 0)} bytes"
    ]
    diffs = list(v.get("differences") or [])
    dropped = int(v.get("differences_dropped") or 0)
    for d in diffs:
        ranges = " ".join(f"{o}+{n}" for o, n in d.get("ranges") or [])
        where = f" [bytes {ranges}]" if ranges else ""
        lines.append(f"  {d['kind']:<16} {d['path']}: {d['detail']}{where}")
    if dropped:
        lines.append(f"  ... and {dropped} more")
    if v.get("last_error"):
        lines.append(f"  error: {v['last_error']}")
    elif v.get("finished") and not v.get("running"):
        lines.append(f"  {len(diffs) + dropped} difference(s)")
    return "\n".join(lines)


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 identical, 1 differences found, 2 error (not the primary, no daemon, failed)."""
    import time

    from app.control import ControlError, request

    state_dir = Path(args.state_dir)
    query = f"/v1/verify?module={args.module}" if args.module else "/v1/verify"
    try:
        if not args.status:
            body: dict[str, object] = {"module": args.module, "rate_mbps": args.rate}
            print(request(state_dir, "POST", "/v1/verify", body).get("message", "verify started"))
            if not args.wait:
                return 0
        v = request(state_dir, "GET", query)
        for _ in range(int(args.timeout) if args.wait else 0):
            if not v.get("running"):
                break
            time.sleep(1.0)
            v = request(state_dir, "GET", query)
    except ControlError as exc:
        _err(str(exc))
        return 2
    print(render_verify(v))
    if v.get("running") or v.get("last_error") or not v.get("finished"):
        return 2
    return 1 if v.get("differences") or v.get("differences_dropped") else 0


def cmd_lab(args: argparse.Namespace) -> int:
    from app.lab import main as lab_main

    return int(lab_main(args.lab_args))


def run_guardian(argv: Sequence[str]) -> int:
    """The self-fencing guardian the daemon starts (internal: `mirrorha guardian ...`)."""
    from app.cluster.guardian import guardian_main

    return int(guardian_main(list(argv)))


def cmd_demo(args: argparse.Namespace) -> int:
    from app.demo import run_demo

    return int(run_demo(args))


def cmd_demo_app(args: argparse.Namespace) -> int:
    from app.demoapp import run_demo_app

    return int(run_demo_app(args))


def cmd_demo_app_ready(args: argparse.Namespace) -> int:
    import socket

    try:
        socket.create_connection(("127.0.0.1", args.port), timeout=0.5).close()
    except OSError:
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mirrorha",
        description=(
            "mirrorha keeps one application running on two Linux servers with no shared disk: "
            "its directories are mirrored synchronously, byte by byte; the secondary takes the "
            "virtual IP and restarts the application when the primary fails."
        ),
        epilog=(
            "Typical first start: copy mirrorha.pyz and the same configuration to both servers, "
            "`mirrorha config check FILE`, `mirrorha run --config FILE` on both (or the systemd "
            "unit), then `mirrorha prim` on the server whose data is good."
        ),
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(
        name: str, help: str, func: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    def state_dir(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--state-dir",
            default=os.environ.get("MIRRORHA_STATE_DIR", DEFAULT_STATE_DIR),
            help=f"the node's state directory (default {DEFAULT_STATE_DIR})",
        )

    sp = add("run", "run the node daemon (foreground)", cmd_run)
    sp.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"configuration file (default {DEFAULT_CONFIG})"
    )
    state_dir(sp)
    sp.add_argument(
        "--node", help="this node's name (default: the node whose admin address is local)"
    )
    sp.add_argument("--start", action="store_true", help="start the module(s) at once (as `start`)")

    sp = add("state", "show the state of this node and its peer", cmd_state)
    state_dir(sp)
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print the full state as JSON")
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print nothing; exit STOP 0, WAIT 1, ALONE 2, PRIM 3, SECOND 4",
    )

    for name, help in NODE_COMMANDS.items():
        sp = add(name, help, make_node_command(name))
        state_dir(sp)
        sp.add_argument("-m", "--module", help="module name (default: the first module)")
        if name == "second":
            sp.add_argument(
                "--fullsync",
                action="store_true",
                help="compare every block instead of trusting the change record",
            )

    sp = add(
        "verify",
        "compare both copies by checksums (on the primary); exit 0 identical, 1 differences, "
        "2 error",
        cmd_verify,
    )
    state_dir(sp)
    sp.add_argument("-m", "--module", help="module name (default: the first module)")
    sp.add_argument(
        "--rate",
        type=float,
        default=100.0,
        metavar="MBPS",
        help="hash at most MBPS Mbit/s (default 100; 0: no limit)",
    )
    sp.add_argument(
        "--wait", action="store_true", help="wait for the end and print the differences"
    )
    sp.add_argument(
        "--status", action="store_true", help="print the last verify's result (start nothing)"
    )
    sp.add_argument(
        "--timeout", type=float, default=86400, help="give up waiting after this many seconds"
    )

    def config_help(args: argparse.Namespace) -> int:
        config_parser.print_help()
        return 2

    config_parser = add("config", "work with configuration files", config_help)
    csub = config_parser.add_subparsers(dest="config_command", metavar="ACTION")
    cp = csub.add_parser("check", help="validate a configuration file; exit 2 naming each problem")
    cp.add_argument("file")
    cp.set_defaults(func=cmd_config_check)

    add("keygen", "print a new random cluster key (for cluster.key_file)", cmd_keygen)
    add("version", "print the version", cmd_version)

    sp = add("lab", "build the two-node lab of network namespaces on this host (root)", cmd_lab)
    sp.add_argument("lab_args", nargs=argparse.REMAINDER, help="up | down | status | shell NODE")

    sp = add("demo", "build the lab, start two nodes and the demo application (root)", cmd_demo)
    sp.add_argument("--fast", action="store_true", help="use the fastest supported timing")
    sp.add_argument("--minutes", type=float, default=480, help="tear down after this long (480)")
    sp.add_argument("--prefix", default="mh-", help="name prefix of the lab's namespaces")

    sp = add(
        "demo-app", "the demo application: a tiny HTTP service over a data directory", cmd_demo_app
    )
    sp.add_argument(
        "--dir", "--data", dest="dir", required=True, help="data directory (a replicated directory)"
    )
    sp.add_argument("--port", type=int, default=8080)
    sp.add_argument("--bind", default="0.0.0.0")
    sp.add_argument("--node", default=os.uname().nodename)

    sp = add(
        "demo-app-ready", "exit 0 when the demo application answers on its port", cmd_demo_app_ready
    )
    sp.add_argument("--port", type=int, default=8080)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["guardian"]:
        return run_guardian(argv[1:])
    if argv[:1] == ["lab"] and not {"-h", "--help"} & set(argv[1:2]):
        from app.lab import main as lab_main

        return int(lab_main(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return 130
