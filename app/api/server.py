"""The node's HTTP surface, as Starlette apps served by hypercorn inside the daemon's loop.

Two listeners:
- the control socket (`control.sock` in the state directory, mode 0600): every JSON route,
  for the command line and local tools; the Unix socket's permissions are the access control;
- the admin address (`cluster.api_port`): the health probes only (`/health`,
  `/v1/health/{module}`), which cloud load balancers poll: 200 on the Ready primary, 503
  elsewhere. Remote control routes, TLS and tokens come with the API and console work.

Domain errors are mapped to HTTP statuses in one table (`STATUS_OF`); every error body is
`{"error": "<what was wrong and what to do>"}`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import orjson
from hypercorn.asyncio import serve
from hypercorn.config import Config as HyperConfig
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


class ApiError(Exception):
    """Base of the errors a controller raises for the API to translate."""


class BadRequest(ApiError):
    """The request itself is malformed (not JSON, unknown field, wrong type)."""


class NotFound(ApiError):
    """No such module or command."""


class Refused(ApiError):
    """The command is illegal in the current state; nothing changed."""


STATUS_OF: dict[type[ApiError], int] = {BadRequest: 400, NotFound: 404, Refused: 409}


class Controller(Protocol):
    """What the daemon offers the API."""

    def state(self) -> dict[str, Any]: ...

    async def command(self, name: str, module: str | None, fullsync: bool) -> str: ...

    def healthy(self, module: str | None) -> tuple[bool, str]: ...

    async def verify_start(self, module: str | None, rate_mbps: float) -> str: ...

    def verify_status(self, module: str | None) -> dict[str, Any]: ...


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def _guard(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return json_response({"error": str(exc)}, STATUS_OF.get(type(exc), 400))

    return wrapped


def control_app(ctl: Controller) -> Starlette:
    async def get_state(request: Request) -> Response:
        return json_response(ctl.state())

    async def post_command(request: Request) -> Response:
        name = request.path_params["name"]
        raw = await request.body()
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        unknown = set(body) - {"module", "fullsync"}
        if unknown:
            raise BadRequest(f"unknown field(s) {', '.join(sorted(unknown))}: use module, fullsync")
        module = body.get("module")
        fullsync = body.get("fullsync", False)
        if module is not None and not isinstance(module, str):
            raise BadRequest("module must be a string")
        if not isinstance(fullsync, bool):
            raise BadRequest("fullsync must be true or false")
        message = await ctl.command(name, module, fullsync)
        return json_response({"message": message})

    return Starlette(
        routes=[
            Route("/v1/state", _guard(get_state), methods=["GET"]),
            Route("/v1/commands/{name}", _guard(post_command), methods=["POST"]),
            *verify_routes(ctl),
            *health_routes(ctl),
        ]
    )


DEFAULT_VERIFY_MBPS = 100.0


def verify_routes(ctl: Controller) -> list[Route]:
    """POST /v1/verify {"module", "rate_mbps"} starts a verify; GET /v1/verify?module= shows it."""

    async def post_verify(request: Request) -> Response:
        raw = await request.body()
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        unknown = set(body) - {"module", "rate_mbps"}
        if unknown:
            raise BadRequest(
                f"unknown field(s) {', '.join(sorted(unknown))}: use module, rate_mbps"
            )
        module = body.get("module")
        rate = body.get("rate_mbps", DEFAULT_VERIFY_MBPS)
        if module is not None and not isinstance(module, str):
            raise BadRequest("module must be a string")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < 1e6:
            raise BadRequest("rate_mbps must be a number of Mbit/s from 0 (no limit) to 1e6")
        message = await ctl.verify_start(module, float(rate))
        return json_response({"message": message, "verify": ctl.verify_status(module)})

    async def get_verify(request: Request) -> Response:
        return json_response(ctl.verify_status(request.query_params.get("module")))

    return [
        Route("/v1/verify", _guard(post_verify), methods=["POST"]),
        Route("/v1/verify", _guard(get_verify), methods=["GET"]),
    ]


def health_routes(ctl: Controller) -> list[Route]:
    async def health(request: Request) -> Response:
        ok, why = ctl.healthy(request.path_params.get("module"))
        return json_response({"ok": ok, "reason": why}, 200 if ok else 503)

    return [
        Route("/health", _guard(health), methods=["GET", "HEAD"]),
        Route("/v1/health/{module}", _guard(health), methods=["GET", "HEAD"]),
    ]


def health_app(ctl: Controller) -> Starlette:
    return Starlette(routes=health_routes(ctl))


async def serve_api(
    ctl: Controller,
    socket_path: Path,
    admin_bind: str | None,
    shutdown: asyncio.Event,
) -> None:
    """Serve the control socket (and the health probes on the admin address) until shutdown."""
    socket_path.unlink(missing_ok=True)
    cfg = HyperConfig()
    cfg.bind = [f"unix:{socket_path}"]
    cfg.accesslog = None
    cfg.errorlog = None
    cfg.graceful_timeout = 1
    tasks = [serve(control_app(ctl), cfg, shutdown_trigger=shutdown.wait)]  # type: ignore[arg-type]
    if admin_bind:
        hcfg = HyperConfig()
        hcfg.bind = [admin_bind]
        hcfg.accesslog = None
        hcfg.errorlog = None
        hcfg.graceful_timeout = 1
        tasks.append(serve(health_app(ctl), hcfg, shutdown_trigger=shutdown.wait))  # type: ignore[arg-type]

    async def chmod_when_ready() -> None:
        for _ in range(200):
            if socket_path.exists():
                os.chmod(socket_path, 0o600)
                return
            await asyncio.sleep(0.01)

    await asyncio.gather(*tasks, chmod_when_ready())
