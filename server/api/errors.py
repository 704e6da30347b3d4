"""One error envelope everywhere: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
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


class ClientGone(Exception):
    """The client disconnected before its answer was ready (the request was cancelled)."""


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


def _is_tag(part: Any) -> bool:
    # Union branches add their type to the path ("prompt.str", "prompt.list[str]"): not a field.
    return str(part) in _TYPE_TAGS or "[" in str(part)


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header") and not _is_tag(p)]
    return ".".join(parts) or ("body" if loc and loc[0] == "body" else None)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _mismatch(error: dict[str, Any]) -> bool:
    """A union branch the input was not meant for (wrong JSON type), not what is wrong with it."""
    return str(error.get("type", "")).endswith("_type")


def _primary(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The error to report: the first, or, in a union, the branch the input was meant for.

    `{"prompt": ["a\\udc80"]}` fails the str branch as "should be a string" and the list branch
    at `prompt.0`; the client wants to hear about `prompt.0`.
    """
    first = errors[0] if errors else {}
    loc = tuple(first.get("loc", ()))
    tags = [i for i, p in enumerate(loc) if _is_tag(p)]
    if not tags:
        return first
    union = loc[: tags[0]]
    meant = [
        e for e in errors if tuple(e.get("loc", ()))[: len(union)] == union and not _mismatch(e)
    ]
    return meant[0] if meant and _mismatch(first) else first


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A body that failed its schema (pydantic's errors, located under "body"): 400 naming the
    field (FastAPI says 422; clients of OpenAI-style servers expect 400)."""
    first = _primary(errors)
    loc = tuple(first.get("loc", ()))
    param = _validation_param(loc)
    if first.get("type") == "json_invalid":
        message, param = "Request body is not valid JSON", "body"
    elif first.get("type") == "missing" and loc == ("body",):
        message, param = "Request body is required (a JSON object)", "body"
    else:
        # A union field fails once per branch: say what each branch wanted, unless the input
        # was meant for one: then only that.
        same = [e for e in errors if _validation_param(tuple(e.get("loc", ()))) == param]
        specific = [e for e in same if not _mismatch(e)]
        shown = specific or same
        reasons = " or ".join(dict.fromkeys(str(e.get("msg", "invalid value")) for e in shown))
        message = f"{param}: {reasons}" if param else str(first)
        first = shown[0] if shown else first
    return APIError(400, message, param=param, code=first.get("type"))


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientGone)
    async def _gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            # FastAPI's answer to a body it cannot decode (e.g. not UTF-8): name the body.
            return APIError(
                400, "Request body is not valid JSON", param="body", code="json_invalid"
            ).response()
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
