"""The demo application: a tiny HTTP service that keeps its data in a replicated directory.

`GET /` answers JSON with the node it runs on, the number of records and the last one, so a
client probing the VIP sees at once which server answers and whether the data followed.
`POST /` (body: any text) appends a numbered record to `records.log` in the data directory
and fsyncs it before answering: an answered POST is an acknowledged write, which the mirror
must never lose. Standard library only; one thread per request.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MAX_BODY = 64 * 1024


class DemoStore:
    """Numbered records in one append-only file, fsynced on every append."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "records.log"
        self.lock = threading.Lock()

    def records(self) -> list[str]:
        try:
            return self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def append(self, text: str) -> str:
        with self.lock:
            n = len(self.records()) + 1
            line = f"{n} {text}".replace("\n", " ")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            return line


def make_handler(store: DemoStore, node: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, obj: dict[str, object]) -> None:
            body = (json.dumps(obj) + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            recs = store.records()
            self._send(
                200, {"node": node, "records": len(recs), "last": recs[-1] if recs else None}
            )

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 <= length <= MAX_BODY:
                self._send(413, {"error": f"body over {MAX_BODY} bytes"})
                return
            text = self.rfile.read(length).decode(errors="replace")
            try:
                line = store.append(text)
            except OSError as exc:
                self._send(503, {"node": node, "error": f"cannot write: {exc.strerror}"})
                return
            self._send(200, {"node": node, "written": line})

        def log_message(self, format: str, *args: object) -> None:
            return

    return Handler


def run_demo_app(args: argparse.Namespace) -> int:
    data_dir = Path(args.dir)
    if not data_dir.is_dir():
        print(f"demo-app: --dir {data_dir} is not a directory")
        return 2
    server = ThreadingHTTPServer(
        (args.bind, args.port), make_handler(DemoStore(data_dir), args.node)
    )
    server.daemon_threads = True
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
