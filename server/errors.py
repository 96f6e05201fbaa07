"""Typed gateway errors and their one mapping to OpenAI-shaped HTTP error bodies."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready (counted as 499, never sent)."""


class GatewayError(Exception):
    """Base of every error the gateway answers with; subclasses fix status and type."""

    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class PayloadTooLarge(InvalidRequest):
    status_code = 413
    default_code = "payload_too_large"


class UnsupportedMediaType(InvalidRequest):
    status_code = 415
    default_code = "unsupported_media_type"


class AuthenticationFailed(GatewayError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ModelNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class VariantNotServed(GatewayError):
    """A pinned variant that is never served here: rejected by its gate, failed, or unsupported on this host.
    A 404, not a 503: retrying cannot help until it is registered again (issue 29)."""

    status_code = 404
    error_type = "invalid_request_error"
    default_code = "variant_not_served"


class EngineUnavailable(GatewayError):
    status_code = 503
    error_type = "service_unavailable_error"
    default_code = "engine_unavailable"


class ShuttingDown(GatewayError):
    """The gateway is draining before it exits (server/drain.py): another replica, or this one
    restarted, will serve a retry."""

    status_code = 503
    error_type = "service_unavailable_error"
    default_code = "shutting_down"

    def __init__(self) -> None:
        super().__init__("the gateway is shutting down; retry (another replica, or this one once restarted)",
                         headers={"Retry-After": "1"})


class EnginesAtCapacity(GatewayError):
    """Every engine that could serve the request already has as many requests in flight as the
    gateway admits to it: overload is answered here, before an engine or a pool has to queue it."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "engines_at_capacity"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class NoVariantWithinBudget(GatewayError):
    """No variant is predicted to meet the budget and the policy is `reject`."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "latency_budget_unmet"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class UpstreamError(GatewayError):
    """The engine answered with an error the gateway has no better name for."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param, code="upstream_error")
        self.status_code = status_code
        self.error_type = "invalid_request_error" if status_code < 500 else "server_error"


def error_body(message: str, error_type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """The field's path: names and list indices, without "body" and without the union member pydantic
    tried ("prompt.constrained-str", "prompt.list[int]" name the field `prompt`)."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (
        p in _TYPE_TAGS or "[" in p or "-" in p))]  # fmt: skip
    return ".".join(parts) or None


def validation_error_to_invalid_request(errors: list[dict[str, Any]]) -> InvalidRequest:
    first = errors[0]
    param = _param_from_loc(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return InvalidRequest(message, param=param)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    from optimizers.base import InvalidConfig
    from server.registry.store import AlreadyExists, IllegalTransition, NotFound, NotReady, RegistryError

    registry_status = {NotFound: 404, AlreadyExists: 409, IllegalTransition: 409, NotReady: 409}

    @app.exception_handler(RegistryError)
    async def _registry_error(_: Request, exc: RegistryError) -> JSONResponse:
        status = registry_status.get(type(exc), 400)
        code = {404: "not_found", 409: "conflict"}.get(status, "invalid_model")
        return JSONResponse(error_body(str(exc), "invalid_request_error", None, code), status_code=status)

    @app.exception_handler(InvalidConfig)
    async def _invalid_config(_: Request, exc: InvalidConfig) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "invalid_request_error", "variants", "invalid_config"),
                            status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error_to_invalid_request(list(exc.errors()))
        return JSONResponse(err.body(), status_code=err.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = error_body(str(exc.detail), error_type, None, exc.status_code)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path only (GET /admin/models/{name}
            # said "Allow: GET", leaving out DELETE): every route on the path counts.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return JSONResponse(body, status_code=exc.status_code, headers=headers or None)

    app.add_middleware(UnexpectedErrors)


class UnexpectedErrors:
    """Any other exception is an OpenAI-shaped 500 on a connection that stays open. An exception handler for
    Exception runs in Starlette's ServerErrorMiddleware, which sends its response and then re-raises, and
    uvicorn closes the connection of an app that raised: the client's next request on that keep-alive
    connection failed too (issue 15). This middleware sits just inside ServerErrorMiddleware: every route,
    exception handler and other middleware runs within it.
    An exception after the response started (a stream) is re-raised: the answer is already cut."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:
                raise
            logger.exception("unhandled error", exc_info=exc)
            response = JSONResponse(error_body("internal error", "server_error"), status_code=500)
            await response(scope, receive, send)
