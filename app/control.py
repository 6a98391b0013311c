"""The control socket client: how the command line talks to the node daemon on this host.

The daemon serves the same JSON routes as the API on a Unix socket in its state directory
(`control.sock`, mode 0600: only root, who runs the daemon, may use it). The command line
sends one request per command with httpx over that socket and prints the answer.

Exceptions: ControlError (the daemon is not running, refused the command, or answered
something unexpected); its message says what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson

SOCKET_NAME = "control.sock"


class ControlError(Exception):
    """The daemon could not be asked, or it refused; the message says why."""


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


def request(
    state_dir: Path, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30
) -> dict[str, Any]:
    sock = socket_path(state_dir)
    if not sock.exists():
        raise ControlError(
            f"no daemon on this node ({sock} does not exist): start it with "
            f"`mirrorha run --state-dir {state_dir}` or the systemd unit"
        )
    transport = httpx.HTTPTransport(uds=str(sock))
    try:
        with httpx.Client(transport=transport, base_url="http://mirrorha", timeout=timeout) as c:
            resp = c.request(method, path, content=orjson.dumps(body) if body is not None else None)
    except httpx.TransportError as exc:
        raise ControlError(f"the daemon does not answer on {sock}: {exc}") from exc
    try:
        data = orjson.loads(resp.content) if resp.content else {}
    except orjson.JSONDecodeError as exc:
        raise ControlError(f"the daemon answered something that is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ControlError("the daemon answered JSON that is not an object")
    if resp.status_code >= 400:
        raise ControlError(str(data.get("error") or f"HTTP {resp.status_code}"))
    return data


def render_state(state: dict[str, Any]) -> str:
    """The human-readable `mirrorha state`: one line per node per module, then the reason."""
    lines = []
    node = state.get("node", "?")
    for m in state.get("modules", []):
        local = f"{m.get('state', '?')} ({m.get('substatus', '?')})"
        peer = m.get("peer") or {}
        peer_txt = (
            f"{peer.get('state', '?')} ({peer.get('substatus', '?')})"
            if peer.get("seen")
            else "unreachable"
        )
        lines.append(
            f"module {m.get('name')}: {node} {local}   peer {m.get('peer_name', '?')} {peer_txt}"
        )
        data = m.get("data") or {}
        if data:
            lines.append(
                f"  data: {data.get('freshness', '?')}, generation {data.get('generation', '?')}"
                + (f", {data['mirror']}" if data.get("mirror") else "")
            )
        if data.get("mirror_note"):
            lines.append(f"  mirror: {data['mirror_note']}")
        resync = m.get("resync") or {}
        if resync.get("running"):
            lines.append(
                f"  resync: {resync.get('bytes_done', 0)}/{resync.get('bytes_total', 0)} bytes, "
                f"{resync.get('files_done', 0)}/{resync.get('files_total', 0)} files"
            )
        vip = m.get("vip")
        if vip:
            lines.append(
                f"  vip: {vip.get('address')} {'held here' if vip.get('held') else 'not here'}"
            )
        lines.append(f"  reason: {m.get('reason', '')}")
    return "\n".join(lines) if lines else f"{node}: no module"
