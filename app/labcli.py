"""`lab up|down|status|shell NODE`: the lab of app/lab.py from a shell.

How it works
    ``up`` builds the lab, prints what was built and how to enter a host, then waits until
    SIGINT (Ctrl-C) or SIGTERM and tears it down. ``down`` removes whatever a lab with that
    prefix left (``Lab.cleanup_stale``; refused while a live run owns the prefix). ``status``
    shows which namespaces, mounts and processes of that prefix exist, and the live run that
    owns it. ``shell HOST [CMD...]`` runs a shell (or CMD) inside a host of a lab
    that is up. ``main(argv)`` returns the exit status, so ``mirrorha lab ...`` can call it.

Exit statuses: 0 ok, 1 lab error (message on stderr), 2 usage error.

Known limits
    ``shell`` and ``status`` find the lab by prefix and work dir; pass the same ``--workdir``
    to them as to ``up`` when it was not the default.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from app.lab import HOSTS, NODES, SWITCH, Lab, LabError, mounts_under, ns_inode, pids_in
from app.lablock import PrefixLock

READY_LINE = "lab is up; Ctrl-C tears it down"


class _Stop(Exception):
    """Raised by the CLI's SIGINT/SIGTERM handler to leave the wait of `up`."""


_PROG = ["python -m app.labcli"]


def _prog() -> str:
    """How the user called us (tests/lab/lab sets MIRRORHA_LAB_PROG), for usage and hints."""
    return os.environ.get("MIRRORHA_LAB_PROG") or _PROG[0]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_prog(), description="mirrorha two-node lab")
    parser.add_argument("--prefix", default="mh-", help="namespace name prefix (default mh-)")
    parser.add_argument("--workdir", default=None, help="work dir (default: per prefix, in /tmp)")
    # The same options after the command too (`mirrorha lab status --prefix x-`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prefix", default=argparse.SUPPRESS, help="as above")
    common.add_argument("--workdir", default=argparse.SUPPRESS, help="as above")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", parents=[common], help="build the lab, wait for Ctrl-C, tear down")
    up.add_argument(
        "--shared-path",
        action="append",
        default=None,
        help="path each node sees with its own content (repeatable; default /srv/mirrorha/data)",
    )
    sub.add_parser("down", parents=[common], help="remove what a lab with this prefix left")
    sub.add_parser("status", parents=[common], help="show this prefix's namespaces, mounts, pids")
    shell = sub.add_parser("shell", parents=[common], help="run a shell (or a command) in a host")
    shell.add_argument("host", choices=HOSTS)
    shell.add_argument("argv", nargs=argparse.REMAINDER, help="command (default: $SHELL)")
    return parser


def _existing_namespaces(lab: Lab) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=15)
    existing = set(out.stdout.split())
    return [lab.ns(h) for h in (*HOSTS, SWITCH) if lab.ns(h) in existing]


def _up(lab: Lab) -> int:
    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    # Installed before the lab's own handlers, which tear down and then chain to these.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        lab.up()
        print(lab.describe())
        print(f"enter a host: {_prog()} --prefix {lab.prefix} shell node1")
        print(READY_LINE, flush=True)
        while True:
            time.sleep(3600)
    except _Stop as exc:
        print(f"{exc}: tearing down", flush=True)
    finally:
        lab.down()
    print(f"lab {lab.prefix} torn down", flush=True)
    return 0


def _status(lab: Lab) -> int:
    present = _existing_namespaces(lab)
    if not present:
        print(f"no namespace with prefix {lab.prefix!r}")
    for ns in present:
        out = subprocess.run(
            ["ip", "-n", ns, "-br", "addr"], capture_output=True, text=True, timeout=15
        ).stdout
        addrs = "; ".join(" ".join(line.split()) for line in out.splitlines() if "lo " not in line)
        print(f"{ns}: {addrs or '-'}")
    mounts = mounts_under(lab.workdir)
    print(f"mounts under {lab.workdir}: {', '.join(mounts) if mounts else 'none'}")
    net = {i for ns in present if (i := ns_inode(f"/run/netns/{ns}")) is not None}
    mnt = {
        i
        for node in NODES
        if str(lab.mount_ns_file(node)) in mounts
        and (i := ns_inode(lab.mount_ns_file(node))) is not None
    }
    pids = pids_in(net, mnt)
    print(f"processes in the lab: {' '.join(map(str, pids)) if pids else 'none'}")
    owner = PrefixLock(lab.prefix).owner()
    print(f"owner: {owner or 'none (no live run holds the prefix; down removes leftovers)'}")
    return 0


def _shell(lab: Lab, host: str, argv: Sequence[str]) -> int:
    if lab.ns(host) not in _existing_namespaces(lab):
        print(f"lab {lab.prefix!r} is not up (no namespace {lab.ns(host)})", file=sys.stderr)
        return 1
    if host in NODES and not lab.mount_ns_file(host).exists():
        print(f"no mount namespace file {lab.mount_ns_file(host)}", file=sys.stderr)
        return 1
    command = list(argv[1:] if argv and argv[0] == "--" else argv)
    if not command:
        command = [os.environ.get("SHELL") or "/bin/sh"]
    full = lab.cmd(host, command)
    os.execvp(full[0], full)
    return 1  # not reached


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the lab command with argv (default sys.argv[1:]); prog names it in messages."""
    if prog is not None:
        _PROG[0] = prog
    args = _parser().parse_args(argv)
    try:
        if args.command == "up":
            paths = args.shared_path or ["/srv/mirrorha/data"]
            return _up(Lab(args.prefix, args.workdir, shared_paths=paths))
        lab = Lab(args.prefix, args.workdir)
        if args.command == "down":
            problems = Lab.cleanup_stale(lab.prefix, lab.workdir)
            for problem in problems:
                print(f"left behind: {problem}", file=sys.stderr)
            if not problems:
                print(f"nothing left of lab {lab.prefix!r}")
            return 1 if problems else 0
        if args.command == "status":
            return _status(lab)
        return _shell(lab, args.host, args.argv)
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
