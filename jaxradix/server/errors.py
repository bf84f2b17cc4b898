"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, for every endpoint."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("jaxradix.server")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
          503: "service_unavailable"}


class APIError(Exception):
    """An error answered to the client; raise it anywhere below a route."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class BodyTooLarge(Exception):
    """Raised from receive() when a request body passes the size limit (the guard answers 413)."""


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, 400, param=param)


def from_value_error(e: Exception, param_names: dict[str, str] | None = None) -> APIError:
    """An engine ValueError names its field ("sampling_params.top_p: ..."); keep that name as param."""
    msg = str(e)
    head = msg.split(":", 1)[0].strip()
    param = head.removeprefix("sampling_params.") if head and " " not in head else None
    if param is not None and param_names:
        param = param_names.get(param, param)
    return APIError(msg, 400, param=param)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        ctx = next((e.get("ctx", {}) for e in errors if e.get("type") == "json_invalid"), {})
        return f"Invalid JSON body: {ctx.get('error', 'malformed JSON')}", None
    parts, param = [], None
    for e in errors[:4]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(message, 400, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(str(exc.detail), exc.status_code).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, BodyTooLarge):
            logger.exception("unhandled error")
        return APIError(f"internal error: {type(exc).__name__}: {exc}", 500).response()
