"""Who may reach the routes from a browser: the Host allow-list (against DNS rebinding) and the Origin check
(against a web page POSTing to a laptop's 127.0.0.1), on every route, before the app.

    Host header in serve.allowed_hosts (default: loopback names on a loopback bind)?   else 400 host_not_allowed
    Origin header, if any, the server's own origin or in serve.allowed_origins?         else 403 origin_not_allowed

A browser sends Origin on every cross-site request, and may send one it cannot be made to fake; clients that
are not browsers send none and pass. With allowed_origins, Starlette's CORSMiddleware answers preflights for
them, so an allowed web app can read its answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from raylm import errors

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def host_allow_list(bind_host: str, loopback: bool, configured: Iterable[str] | None) -> tuple[str, ...]:
    if configured is not None:
        return tuple(h.lower() for h in configured)
    if loopback:
        return tuple(dict.fromkeys((*LOOPBACK_NAMES, bind_host.lower())))
    return ("*",)


def _name(host: str) -> str:
    """A Host header's name, without its port (IPv6 in brackets)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    name = _name(host)
    return any(a == "*" or a == name or (a.startswith("*.") and name.endswith(a[1:])) for a in allowed)


def origin_allowed(origin: str, host: str, allowed_origins: tuple[str, ...]) -> bool:
    """The server's own origin (the page it served: its Origin's host is the Host asked for), or a listed one."""
    if origin.rstrip("/") in allowed_origins:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.netloc.lower() == host.strip().lower()


class BrowserPolicy:
    """ASGI middleware: Host and Origin checks on every HTTP request."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...]) -> None:
        self.app, self.allowed_hosts, self.allowed_origins = app, allowed_hosts, allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in (b"host", b"origin")}
        host, origin = headers.get("host", ""), headers.get("origin")
        refusal: errors.APIError | None = None
        if not host_allowed(host, self.allowed_hosts):
            refusal = errors.InvalidRequestError(
                "this server does not answer to that Host name (serve.allowed_hosts)", code="host_not_allowed")
        elif origin is not None and not origin_allowed(origin, host, self.allowed_origins):
            refusal = errors.PermissionDeniedError(
                "requests from this web origin are not allowed (serve.allowed_origins)", code="origin_not_allowed")
        if refusal is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps(refusal.body()).encode()
        await send({"type": "http.response.start", "status": refusal.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
