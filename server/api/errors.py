"""One error envelope everywhere: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.generate import GenerationError
from server.engine import EngineDead, EngineOverloaded

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "overloaded_error",
}


class APIError(Exception):
    """An error answered with the envelope; `headers` e.g. Retry-After."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return envelope(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def envelope(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_exception(exc: BaseException) -> APIError:
    """Map the lower layers' exceptions to what a client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, GenerationError):
        return APIError(400, exc.reason, param=exc.param, code="invalid_value")
    if isinstance(exc, EngineOverloaded):
        return APIError(
            503,
            f"Server is overloaded ({exc.reason}); retry later",
            code="queue_full",
            headers={"Retry-After": str(max(1, round(exc.retry_after)))},
        )
    if isinstance(exc, EngineDead):
        return APIError(
            503,
            "The generation engine is not running",
            code="engine_unavailable",
            headers={"Retry-After": "5"},
        )
    return APIError(500, "Internal server error", code="internal_error")


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or ("body" if loc and loc[0] == "body" else None)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI says 422; clients of OpenAI-style servers expect 400 naming the field.
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = tuple(first.get("loc", ()))
        param = _validation_param(loc)
        if first.get("type") == "json_invalid":
            message, param = "Request body is not valid JSON", "body"
        elif first.get("type") == "missing" and loc == ("body",):
            message, param = "Request body is required (a JSON object)", "body"
        else:
            message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first)
        return APIError(400, message, param=param, code=first.get("type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(
            exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)
        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("sonar_llm.api").exception("unhandled error", exc_info=exc)
        return APIError(500, "Internal server error", code="internal_error").response()

    @app.exception_handler(GenerationError)
    @app.exception_handler(EngineOverloaded)
    @app.exception_handler(EngineDead)
    async def _known(_: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()
