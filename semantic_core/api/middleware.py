"""The HTTP middleware stack, as plain ASGI (no per-request task or body buffering, so SSE streams
pass straight through). Outermost first:

RequestID -> unhandled errors -> access log -> metrics -> host check -> CORS -> cross-site guard ->
auth -> rate limit -> body size -> handler.
"""

from __future__ import annotations

import hmac
import json
import math
import re
import secrets
import threading
import time
from collections.abc import Iterable
from typing import Any

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from semantic_core.api.schemas import error_body
from semantic_core.observability import Metrics, get_logger

log = get_logger("semantic.http")

OPEN_PATHS = ("/health/", "/metrics")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(kind, message), status_code=status, headers=headers)


def _is_open(path: str) -> bool:
    return path.startswith(OPEN_PATHS[0]) or path in (OPEN_PATHS[1], "/")


class RequestIDMiddleware:
    """Takes X-Request-ID from the client (if sane) or makes one; binds it to the log context and
    returns it as `request-id` and `x-request-id`, with `x-response-time` (ms to the first byte).
    In a cluster, `x-semantic-instance` names the instance that answered."""

    def __init__(self, app: ASGIApp, instance: str | None = None) -> None:
        self.app = app
        self.instance = instance

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if _REQUEST_ID_RE.match(given) else f"req_{secrets.token_hex(12)}"
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["request-id"] = request_id
                headers["x-request-id"] = request_id
                headers["x-response-time"] = f"{(time.perf_counter() - start) * 1000:.2f}ms"
                if self.instance:
                    headers["x-semantic-instance"] = self.instance
            await send(message)

        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            structlog.contextvars.clear_contextvars()


class UnhandledErrorMiddleware:
    """The one place an unexpected exception is logged: once, with its request id and a plain
    traceback (no local variables, so no headers, keys or prompt text), then answered with a 500
    in Anthropic's envelope if the response has not started. Nothing propagates to the server,
    which would log it a second time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            request_id = scope.get("state", {}).get("request_id", "-")
            log.error(
                "unhandled error",
                method=scope["method"],
                path=scope["path"],
                error_type=type(exc).__name__,
                exc_info=exc,
            )
            if not started:
                response = error_response(500, "api_error", f"internal error (request id {request_id})")
                await response(scope, receive, send)


class HostCheckMiddleware:
    """Answers only requests whose Host header names this server (loopback names and the bind
    address by default; SEMANTIC_SERVER_ALLOWED_HOSTS adds more, '*' any). A web page that rebinds
    its own domain name to 127.0.0.1 sends its own name as Host, so it cannot read agents through
    the browser. Health probes are exempt (orchestrators probe by address)."""

    def __init__(self, app: ASGIApp, allowed: set[str]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed}
        self.any = "*" in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any or scope["path"].startswith(OPEN_PATHS[0]):
            await self.app(scope, receive, send)
            return
        host = host_name(Headers(scope=scope).get("host", ""))
        if host in self.allowed:
            await self.app(scope, receive, send)
            return
        response = error_response(
            403,
            "permission_error",
            f"this server does not answer for the host {host[:100]!r}; add it to SEMANTIC_SERVER_ALLOWED_HOSTS",
        )
        await response(scope, receive, send)


def host_name(value: str) -> str:
    """The host of a Host header or an origin's authority, lower-cased, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


_CUSTOM_HEADER_PREFIXES = ("x-", "anthropic-", "openai-")


class CrossSiteGuardMiddleware:
    """No state change from a request a browser page on another site could send.

    A cross-site page can send a "simple" POST (form or text/plain body, no custom header) without
    a CORS preflight, and the server would act on it (evict, pin, save, fork, even chat). So: an
    unsafe method with an Origin that is not this server's (loopback or allowed host) or a CORS
    origin is refused, and every POST/PUT/PATCH must carry a JSON content type or a custom header
    (X-API-Key, anthropic-version, X-Agent-ID, ...), which a cross-site page cannot send without a
    preflight that CORS refuses. Every SDK sends both."""

    def __init__(self, app: ASGIApp, allowed_hosts: set[str], cors_origins: Iterable[str]) -> None:
        self.app = app
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.cors_origins = {o.rstrip("/").lower() for o in cors_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET") if scope["type"] == "http" else "GET"
        if method in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin):
            response = error_response(
                403,
                "permission_error",
                "cross-site requests may not change anything here (the Origin is not this server's); "
                "allow a web app's origin with SEMANTIC_SERVER_CORS_ORIGINS",
            )
            await response(scope, receive, send)
            return
        if method in ("POST", "PUT", "PATCH") and not self._non_simple(headers):
            response = error_response(
                415,
                "invalid_request_error",
                f"{method} requests must send Content-Type: application/json (or an X-API-Key or "
                "anthropic-version header)",
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _origin_allowed(self, origin: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in self.cors_origins or "*" in self.cors_origins:
            return True
        if origin == "null":
            return False
        authority = origin.split("://", 1)[-1]
        host = host_name(authority)
        return host in self.allowed_hosts or "*" in self.allowed_hosts

    @staticmethod
    def _non_simple(headers: Headers) -> bool:
        ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype == "application/json" or ctype.endswith("+json"):
            return True
        return any(name.startswith(_CUSTOM_HEADER_PREFIXES) or name == "authorization" for name in headers)


class AccessLogMiddleware:
    """One structured line per request (probes and metric scrapes excepted): method, path, status,
    duration, agent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        agent = None
        error_body = b""
        extra: dict[str, str] = {}

        async def capture(message: Message) -> None:
            nonlocal status, agent, error_body
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = Headers(raw=message.get("headers", []))
                agent = headers.get("x-agent-id")
                for name in ("x-semantic-cache-miss", "x-semantic-max-tokens", "x-semantic-warning"):
                    if headers.get(name):
                        extra[name.removeprefix("x-semantic-").replace("-", "_")] = headers[name]
            elif message["type"] == "http.response.body" and status >= 400 and len(error_body) < 4096:
                error_body += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            fields: dict[str, Any] = {
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                "client": (scope.get("client") or ("?",))[0],
            }
            if agent:
                fields["agent"] = agent
            fields.update(extra)
            if status >= 400:
                fields.update(_error_fields(error_body))
            log.info("request", **fields)


def _error_fields(body: bytes) -> dict[str, str]:
    """The error's type and message, for the access log (our own wording: no prompt text)."""
    try:
        err = json.loads(body).get("error") or {}
        return {"error_type": str(err.get("type", "")), "error": str(err.get("message", ""))[:300]}
    except (ValueError, AttributeError):
        return {}


class OpenAIErrorMiddleware:
    """Errors on the OpenAI-shaped routes in OpenAI's envelope ({"error": {"message", "type",
    "param", "code"}}), whichever layer raised them (auth, rate limit, validation, the engine)."""

    def __init__(self, app: ASGIApp, prefixes: tuple[str, ...] = ("/v1/chat/completions",)) -> None:
        self.app = app
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        body = b""

        async def reshape(message: Message) -> None:
            nonlocal held, body
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is None:
                await send(message)
                return
            body += message.get("body", b"")
            if message.get("more_body"):
                return
            new = _openai_error(body)
            headers = MutableHeaders(scope=held)
            headers["content-length"] = str(len(new))
            await send(held)
            await send({"type": "http.response.body", "body": new})

        await self.app(scope, receive, reshape)


def _openai_error(body: bytes) -> bytes:
    try:
        err = json.loads(body)["error"]
        kind, message = str(err["type"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        return body
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": kind}}).encode()


class MetricsMiddleware:
    """semantic_request_total and semantic_request_duration_seconds, labelled by route template,
    counted in the metrics of the engine this app serves."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.requests_in_flight.inc()
        try:
            await self.app(scope, receive, capture)
        finally:
            self.metrics.requests_in_flight.dec()
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(method, path, str(status)).inc()
            self.metrics.request_duration.labels(method, path).observe(time.perf_counter() - start)


class AuthMiddleware:
    """API keys from ANTHROPIC_API_KEY (comma-separated), sent as `x-api-key` or
    `Authorization: Bearer`. Probes and /metrics stay open. Compared in constant time."""

    def __init__(self, app: ASGIApp, keys: Iterable[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or _is_open(scope["path"]) or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-api-key")
        if given is None:
            auth = headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
        if not given:
            response = error_response(401, "authentication_error", "missing API key: send it in the x-api-key header")
        elif not self._valid(given.encode()):
            response = error_response(401, "authentication_error", "invalid API key")
        else:
            scope.setdefault("state", {})["api_key_id"] = self._key_id(given)
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)

    def _valid(self, given: bytes) -> bool:
        ok = False
        for key in self.keys:  # no early exit: the time taken does not tell which key is close
            ok |= hmac.compare_digest(given, key)
        return ok

    @staticmethod
    def _key_id(key: str) -> str:
        import hashlib

        return hashlib.sha256(key.encode()).hexdigest()[:8]


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class TokenBuckets:
    """Requests per minute as token buckets (bursts up to the per-minute limit)."""

    def __init__(self, per_minute: int, max_keys: int = 10_000) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str, now: float | None = None) -> float:
        """0 if allowed, else seconds until a request would be."""
        now = time.monotonic() if now is None else now
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self.max_keys:
                    self._buckets.clear()  # a flood of distinct keys must not grow memory without bound
                bucket = self._buckets[key] = _Bucket(self.capacity, now)
            bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate


class RateLimitMiddleware:
    """Requests per minute per client and in all; 429 rate_limit_error with retry-after; 0 disables.

    A client is its API key when keys are set, else its address. Never the X-Agent-ID header: the
    client chooses it, so a limit keyed on it is dodged by renaming agents."""

    def __init__(self, app: ASGIApp, per_client: int, global_: int, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.per_client = TokenBuckets(per_client) if per_client > 0 else None
        self.global_ = TokenBuckets(global_) if global_ > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/") or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        state = scope.get("state", {})
        key_id = state.get("api_key_id")
        client = f"key:{key_id}" if key_id else f"addr:{(scope.get('client') or ('?',))[0]}"
        wait, scope_name = 0.0, ""
        if self.global_ is not None:
            wait, scope_name = self.global_.take("global"), "global"
        if not wait and self.per_client is not None:
            wait, scope_name = self.per_client.take(client), "key" if key_id else "client"
        if wait:
            self.metrics.rate_limited.labels(scope_name).inc()
            retry = max(1, math.ceil(wait))
            what = {"global": "the server's", "key": "this API key's", "client": "this client's"}[scope_name]
            response = error_response(
                429,
                "rate_limit_error",
                f"rate limit exceeded ({what} requests per minute); retry after {retry} s",
                headers={"retry-after": str(retry)},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """413 request_too_large for bodies over the limit, by Content-Length or as they stream in.

    Request bodies here are JSON of a few KB to MB, so the body is read up front (bounded by the
    limit) and replayed to the handler: the check then cannot be swallowed by body parsing."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        mb = self.max_bytes / (1024 * 1024)
        response = error_response(
            413, "request_too_large", f"request body is larger than {mb:g} MB (SEMANTIC_SERVER_MAX_BODY_MB)"
        )
        await response(scope, receive, send)
