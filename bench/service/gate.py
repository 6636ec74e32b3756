"""What every request meets before the app reads its body: the token, the size cap, a read timeout, the access log.

FastAPI parses a form body before it resolves the endpoint's dependencies, so a check made there comes after the
upload has been spooled to disk. This ASGI layer acts on the request line and headers alone: an upload without a
valid token is a 401, one whose Content-Length is over the cap a 413, both before a byte of the body is read.
Without a Content-Length the body is counted as it streams and cut off at the cap; a body that stalls is cut off
after `limits.body_timeout_s`. Tokens are accepted in the Authorization header only: one in the query string is
refused, and the access log written here names the path without its query string.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

import anyio
from fastapi import HTTPException

from bench.service import db
from bench.service.host import Host

access_log = logging.getLogger("bench.service.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UPLOAD_PATH = "/api/submissions"
# The form's other fields and the multipart boundaries around the file.
FORM_OVERHEAD = 64 * 1024
# Any other request with a body: nothing else in the API takes one.
SMALL_BODY = 64 * 1024
TOKEN_PARAMS = {"token", "access_token", "api_key", "apikey", "key", "auth", "authorization", "bearer"}


def bearer_token(headers: dict[bytes, bytes]) -> str | None:
    raw = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = raw.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Gate:
    """ASGI middleware: `app.add_middleware(Gate, host=host)`."""

    def __init__(self, app: ASGIApp, host: Host) -> None:
        self.app, self.host = app, host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = [0]

        async def logged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            refusal = await self._refusal(scope)
            if refusal is not None:
                await _reply(logged_send, *refusal)
                return
            await self.app(scope, self._capped(scope, receive), logged_send)
        finally:
            client = scope.get("client") or ("-", 0)
            # The path only: a query string may hold what should never reach a log.
            access_log.info(
                '%s "%s %s" %d %.3fs',
                client[0],
                scope.get("method", "-"),
                scope.get("path", "-"),
                status[0],
                time.monotonic() - started,
            )

    async def _refusal(self, scope: Scope) -> tuple[int, str, dict[str, str]] | None:
        params = {k.lower() for k, _ in parse_qsl(scope.get("query_string", b"").decode("latin-1"))}
        if params & TOKEN_PARAMS:
            return (
                400,
                "API tokens are accepted only in the Authorization header (Bearer), never in the URL",
                {},
            )
        headers = dict(scope.get("headers") or [])
        cap = self._cap(scope)
        length = headers.get(b"content-length")
        if scope.get("path") == UPLOAD_PATH and scope.get("method") == "POST":
            token = bearer_token(headers)
            if token is None:
                return (
                    401,
                    "missing API token (Authorization: Bearer <token>)",
                    {"WWW-Authenticate": "Bearer"},
                )
            if not await anyio.to_thread.run_sync(self._known, token):
                return 401, "unknown or revoked API token", {"WWW-Authenticate": "Bearer"}
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return 400, "Content-Length is not a number", {}
            if n > cap:
                return 413, f"request body of {n:,} bytes is larger than the limit of {cap:,} bytes", {}
        return None

    def _known(self, token: str) -> bool:
        with self.host.sessions() as s:
            return db.team_for_token(s, token) is not None

    def _cap(self, scope: Scope) -> int:
        if scope.get("path") == UPLOAD_PATH:
            return self.host.settings.limits.max_upload_bytes + FORM_OVERHEAD
        return SMALL_BODY

    def _capped(self, scope: Scope, receive: Receive) -> Receive:
        cap, timeout = self._cap(scope), self.host.settings.limits.body_timeout_s
        seen, done = [0], [False]

        async def wrapped() -> Message:
            if done[0]:  # the body is in: later calls wait for a disconnect, as long as they like
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                raise HTTPException(408, f"no request data for {timeout:g} s: upload cut off") from None
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > cap:
                    raise HTTPException(413, f"request body larger than the limit of {cap:,} bytes")
                done[0] = not message.get("more_body", False)
            else:
                done[0] = True
            return message

        return wrapped


async def _reply(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    body = json.dumps({"detail": detail, "problems": []}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    # The body was not read: the connection cannot carry another request.
    raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
