"""ASGI middleware for the ingress: the API key and the request body cap; and which binds need a key.

When `PV_RAY_API_KEY` is set in the ingress replica's environment (one key, or several separated
by commas: one per client), every route but the open ones (`/healthz`, and the web page, which
asks for a key itself) needs `Authorization: Bearer <key>` (compared in constant time). A video
job belongs to the key that made it. Bodies over `MAX_BODY_BYTES` are refused with 413, whether or
not they announce their length.

Closed by default: only a loopback bind (`is_loopback`) may serve without a key; `pv-ray serve`
refuses any other address unless a key is set or the operator passes `--insecure-no-api-key`.
"""

import hmac
import ipaddress
import json
import os

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_KEY_ENV = "PV_RAY_API_KEY"
MAX_BODY_BYTES = 16 * 1024  # a generate request is a few hundred bytes; refuse anything near this
# Reachable without the API key: load balancer probes, and the page (no data in it; it asks for a key).
OPEN_PATHS = frozenset({"/healthz", "/", "/page/app.js", "/page/app.css"})


def api_keys(environ: dict[str, str] | None = None) -> list[str]:
    """The keys of PV_RAY_API_KEY (several separated by commas); [] when none is set."""
    value = (os.environ if environ is None else environ).get(API_KEY_ENV, "")
    return [key.strip() for key in value.split(",") if key.strip()]


def is_loopback(host: str) -> bool:
    """Whether a service bound to `host` is reachable from this machine only: `localhost`, 127.0.0.0/8
    or ::1 (IPv4-mapped too). Anything else (0.0.0.0, ::, a LAN address, any other name) counts as
    reachable from elsewhere."""
    name = host.strip().removeprefix("[").removesuffix("]").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name.partition("%")[0])  # without an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def bearer_token(authorization: str) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (None without one)."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI passes it through its body parsing untouched."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is over {limit} bytes")


class RequestGuard:
    """ASGI middleware: the API key (when PV_RAY_API_KEY is set) and the request body cap."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_keys = api_keys()  # read in the replica's process

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if self.api_keys and path not in OPEN_PATHS and not self._authorized(headers.get("authorization", "")):
            await _send_error(
                send,
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                {"www-authenticate": "Bearer"},
            )
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await _send_error(send, 413, BodyTooLarge(self.max_body_bytes).detail)
            return
        received = 0

        async def capped_receive() -> Message:  # a chunked body has no content-length
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        await self.app(scope, capped_receive, send)

    def _authorized(self, authorization: str) -> bool:
        token = (bearer_token(authorization) or "").encode()
        # Every key compared, so the time taken does not tell which one nearly matched.
        return sum(hmac.compare_digest(token, key.encode()) for key in self.api_keys) > 0


async def _send_error(send: Send, status: int, detail: str, extra_headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
