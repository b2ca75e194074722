"""The HTTP layer of `synthpert serve`: the error body every failure answers with, the request id, and the
ASGI middleware that guards the app (Envelope: id, headers, in-flight bound, timeout, last-resort 500; Gate:
declared length and API key; BodyLimit: streamed length; JsonBody: a POST body is JSON whatever its declared
content type)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import uuid

from fastapi import HTTPException as FastAPIHTTPException
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from ..errors import scrub

log = logging.getLogger("synthpert.serve")


# A client's own request id is echoed only when it cannot smuggle anything into a header or a log line.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
)
_ENVELOPE_HEADERS = {name for name, _ in SECURITY_HEADERS} | {b"x-request-id"}


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None,
                request_id: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code, "request_id": request_id}}


def request_id_of(scope) -> str | None:
    return (scope.get("state") or {}).get("request_id")


def error_response(scope, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None):
    return JSONResponse(_error_body(message, kind, param, code, request_id_of(scope)), status_code=status,
                        headers=headers)


class BodyTooLarge(FastAPIHTTPException):
    """Raised while the body streams in, as soon as it passes the cap (chunked bodies have no length). An
    HTTPException, because FastAPI turns any other exception raised while reading a body into a 400."""

    def __init__(self):
        super().__init__(status_code=413, detail="request body too large")


class BodyLimit:
    """ASGI middleware: count request-body bytes as they arrive and stop reading past ``max_bytes``, so a
    ``Transfer-Encoding: chunked`` body cannot exhaust memory (the Content-Length check cannot see it)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return message

        await self.app(scope, limited, send)


class JsonBody:
    """ASGI middleware: read every POST body as JSON, whatever Content-Type the client declared. Every route
    of this API takes JSON, and `curl -d '{...}'` (README's example) declares a form: without this FastAPI
    hands the route raw bytes and answers 422 "Input should be a valid dictionary"."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            declared = Headers(scope=scope).get("content-type", "").split(";")[0].strip().lower()
            if not (declared == "application/json" or declared.endswith("+json")):
                kept = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                scope = {**scope, "headers": [*kept, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def too_large(scope, max_bytes: int):
    return error_response(scope, 413, f"request body larger than {max_bytes} bytes", code="request_too_large",
                          headers={"connection": "close"})


class Gate:
    """ASGI middleware: refuse a declared oversize body and a missing or wrong API key before any body is read."""

    def __init__(self, app, max_bytes: int, api_key: str | None):
        self.app, self.max_bytes, self.api_key = app, max_bytes, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_large(scope, self.max_bytes)(scope, receive, send)
        if self.api_key is not None and scope["path"] != "/health":
            auth = headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            # compare_digest: the time taken does not tell how much of a guessed key was right
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return await error_response(scope, 401, "missing or invalid API key (Authorization: Bearer ...)",
                                            "authentication_error", code="invalid_api_key")(scope, receive, send)
        await self.app(scope, receive, send)


class Envelope:
    """Outermost ASGI middleware: give each request an id, add the id and the security headers to every
    response, bound the requests in flight and the time each may take, and answer any exception that got
    this far with a 500 in the error shape (never a traceback, never the text of the exception)."""

    def __init__(self, app, max_in_flight: int, timeout_s: float, secret: str | None = None):
        self.app, self.max_in_flight, self.timeout_s, self.secret = app, max_in_flight, timeout_s, secret
        self.in_flight = 0  # one event loop: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = Headers(scope=scope).get("x-request-id", "")
        rid = sent if REQUEST_ID_PATTERN.fullmatch(sent) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_enveloped(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _ENVELOPE_HEADERS]
                message = {**message, "headers": [*kept, *SECURITY_HEADERS, (b"x-request-id", rid.encode())]}
            await send(message)

        def answer(status, text, kind, code, headers=None):
            return error_response(scope, status, text, kind, code=code, headers=headers)(scope, receive,
                                                                                         send_enveloped)

        # Health probes must get through a full server: they are instant and never reach the model.
        bounded = scope["path"] != "/health"
        if bounded and self.in_flight >= self.max_in_flight:
            return await answer(503, f"server busy: {self.max_in_flight} requests in flight; retry shortly",
                                "overloaded_error", "overloaded", {"retry-after": "1"})
        self.in_flight += bounded
        try:
            await asyncio.wait_for(self._inner(scope, receive, send_enveloped), self.timeout_s)
        except asyncio.TimeoutError:
            log.warning("request %s on %r passed the %ss timeout", rid, scope["path"], self.timeout_s)
            if not started:
                await answer(504, f"request took longer than request_timeout_s={self.timeout_s:g}s",
                             "timeout_error", "timeout")
        except Exception as exc:
            log.error("internal error on %r (request %s): %s", scope["path"], rid, scrub(repr(exc), self.secret),
                      exc_info=exc)
            if not started:
                await answer(500, f"internal server error (request id {rid})", "server_error", "internal_error")
        finally:
            self.in_flight -= bounded

    async def _inner(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        except asyncio.TimeoutError as e:
            # the app's own timeout is an internal error, not this request's deadline
            raise RuntimeError(f"timeout inside the app: {e!r}") from e
