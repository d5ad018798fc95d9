"""The one place where errors become HTTP responses in Anthropic's envelope:
{"type": "error", "error": {"type": ..., "message": ...}}."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from semantic_core.api.middleware import error_response
from semantic_core.api.schemas import InvalidText
from semantic_core.errors import (
    AgentBusy,
    AgentDamaged,
    ModelMismatch,
    PoolExhausted,
    SemanticError,
)
from semantic_core.observability import get_logger

log = get_logger("semantic.api")

_STATUS_BY_KIND = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


def status_and_kind(exc: SemanticError) -> tuple[int, str]:
    if isinstance(exc, PoolExhausted) and exc.never_fits:
        return 400, "invalid_request_error"  # no retry will help: the request itself is too big
    if isinstance(exc, ModelMismatch):
        return 409, "invalid_request_error"  # the agent is another model's: a conflict, not a bad request
    if isinstance(exc, AgentBusy):
        return 400, "invalid_request_error"
    if isinstance(exc, AgentDamaged):
        return 500, "api_error"
    return _STATUS_BY_KIND.get(exc.kind, 500), exc.kind


def semantic_error_response(exc: SemanticError) -> JSONResponse:
    status, kind = status_and_kind(exc)
    headers = {"retry-after": "1"} if status == 529 else None
    return error_response(status, kind, exc.message, headers)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return f"the request body is not valid JSON{': ' + str(detail) if detail else ''}"
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidText):
            return str(cause)  # it names the field itself
    messages = []
    for err in errors[:3]:
        loc = _field(tuple(err.get("loc", ())))
        msg = err.get("msg", "invalid value")
        if err.get("type") == "missing":
            msg = "field required"
        messages.append(f"{loc}: {msg}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(messages) + more


def install(app: FastAPI) -> None:
    @app.exception_handler(SemanticError)
    async def _semantic(request: Request, exc: SemanticError) -> JSONResponse:
        return semantic_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid_request_error", validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(404, "not_found_error", f"no such endpoint: {request.method} {request.url.path}")
        if exc.status_code == 405:
            return error_response(
                405, "invalid_request_error", f"method {request.method} is not allowed on {request.url.path}"
            )
        if exc.status_code == 400:
            return error_response(400, "invalid_request_error", str(exc.detail))
        kind = {
            401: "authentication_error",
            403: "permission_error",
            413: "request_too_large",
            429: "rate_limit_error",
        }.get(exc.status_code, "api_error")
        return error_response(exc.status_code, kind, str(exc.detail))

    # Unexpected exceptions are answered (and logged, once) by UnhandledErrorMiddleware: a handler
    # for Exception here would make Starlette re-raise it to the server, which logs it again.
