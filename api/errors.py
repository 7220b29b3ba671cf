"""The one table from engine errors to HTTP status codes, and the one JSON error shape every route answers with."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.protocol import ErrorResponse
from inference.errors import (
    EngineError,
    GenerationError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
    QueueFullError,
    RequestTimeoutError,
    UnknownModelError,
)
from inference.text import printable, text_problem

logger = logging.getLogger("api")

STATUS_BY_ERROR: dict[type[EngineError], int] = {
    UnknownModelError: 404,
    InvalidRequestError: 422,
    QueueFullError: 429,
    NotReadyError: 503,
    ModelNotFoundError: 503,
    RequestTimeoutError: 504,
    GenerationError: 500,
}

# What each route may answer besides 200, for the OpenAPI spec.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        404: "The `model` asked for is not the one this server serves.",
        413: "The request body is larger than MAX_BODY_BYTES.",
        422: "A parameter is invalid or out of range, or the prompt is too long.",
        429: "The queue is full; retry after the Retry-After header's seconds.",
        503: "The model is not loaded yet, failed to load, or the server is shutting down.",
        504: "The request did not finish within REQUEST_TIMEOUT_S.",
    }.items()
}


def status_for(error: EngineError) -> int:
    for error_type in type(error).__mro__:
        if error_type in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[error_type]
    return 500


def error_response(
    status: int, message: str, error_type: str, param: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, error_type, param), status_code=status, headers=headers)


def error_body(status: int, message: str, error_type: str, param: str | None = None) -> dict[str, Any]:
    # a message may quote what the client sent (an unknown parameter's name), lone surrogates included, which
    # UTF-8 can't encode: escaped, the answer is still the 4xx it should be instead of a 500
    message, param = printable(message), None if param is None else printable(param)
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def engine_error_response(error: EngineError) -> JSONResponse:
    status = status_for(error)
    headers = {"Retry-After": str(error.retry_after_s)} if isinstance(error, QueueFullError) else None
    return error_response(status, error.message, error.type, error.param, headers)


# How pydantic names the member of a union it tried ("str", "function-after[_text(), str]", "list[TextPart]"): part of
# an error's location, yet no place in the request.
_UNION_MEMBERS = {"str", "int", "float", "bool", "dict", "list", "none"}
_TEXT_ERRORS = ("string_unicode", "invalid_text")


def _is_a_place(part: object) -> bool:
    return isinstance(part, int) or (isinstance(part, str) and "[" not in part and part not in _UNION_MEMBERS)


def most_telling(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The error to report: a union's members each add one, and text that is not text says the most."""
    return next((error for error in errors if error.get("type") in _TEXT_ERRORS), errors[0] if errors else {})


def _describe_validation_error(error: dict[str, Any]) -> tuple[str, str | None]:
    location = [
        str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path") and _is_a_place(part)
    ]
    param = location[0] if location else None
    if error.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if error.get("type") == "missing":
        if not location:  # no body at all, not a field missing from one
            return "The request body is empty: send a JSON object with the parameters.", None
        return f"`{param}` is required", param
    if error.get("type") == "extra_forbidden":
        # named by its whole path, so an unknown key inside an object is not blamed on the object
        path = ".".join(location)
        return f"`{path}` is not a known parameter", path
    if error.get("type") in _TEXT_ERRORS:
        # strict models refuse a lone surrogate before api.protocol.Text sees it ("string_unicode")
        if not location:
            return "A parameter's name is not valid Unicode text: it holds a lone surrogate.", None
        problem = text_problem(error.get("input")) or str(error.get("msg"))
        return f"`{'.'.join(location)}` {problem}", param
    if error.get("type") == "model_attributes_type" or not location:
        return "The request body must be a JSON object.", param
    message = str(error.get("msg", "Invalid value"))
    return f"`{'.'.join(location)}`: {message}", param


def log_refusal(request: Request, status: int, message: str) -> None:
    """The one log line of a request refused before (or by) the engine; accepted ones are logged by the engine."""
    request_id = getattr(request.state, "request_id", "-")
    logger.info("request id=%s route=%s status=%d error=%r", request_id, request.url.path, status, message[:200])


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EngineError)
    async def on_engine_error(request: Request, error: EngineError) -> JSONResponse:
        response = engine_error_response(error)
        if not error.logged:
            log_refusal(request, response.status_code, error.message)
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation_error(most_telling(list(error.errors())))
        log_refusal(request, 422, message)
        return error_response(422, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        log_refusal(request, error.status_code, str(error.detail))
        return error_response(error.status_code, str(error.detail), "invalid_request_error", headers=error.headers)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, error: Exception) -> JSONResponse:
        logger.exception("Unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "Internal server error.", "server_error")


def _printable_json(value: Any) -> Any:
    """`value` with every string printable (lone surrogates escaped), so that it can be sent back as JSON."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list | tuple):
        return [_printable_json(item) for item in value]
    if isinstance(value, dict):
        return {printable(str(key)): _printable_json(item) for key, item in value.items()}
    return value if value is None or isinstance(value, bool | int | float) else printable(str(value))


def gradio_error_handlers() -> dict[Any, Any]:
    """Exception handlers for Gradio's own app (`mount_gradio_app(app_kwargs=...)`): its HTTP errors keep the
    `detail` gradio_client reads (validation verdicts on a 422, a message otherwise) and gain the one error shape
    beside it, and never echo what was sent (a lone surrogate in it made the answer itself fail: a 500)."""

    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = error.detail
        verdicts: list[Any] = detail if isinstance(detail, list) else []
        failed = [verdict for verdict in verdicts if isinstance(verdict, dict) and verdict.get("is_valid") is False]
        param: str | None
        if failed:  # /generate's validator: one verdict per parameter
            message = "; ".join(f"`{verdict.get('parameter_name')}`: {verdict.get('message')}" for verdict in failed)
            param = str(failed[0].get("parameter_name"))
        else:
            message, param = str(detail), getattr(error, "param", None)
        log_refusal(request, error.status_code, message)
        body = error_body(error.status_code, message, "invalid_request_error", param)
        body["detail"] = _printable_json(detail)
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = list(error.errors())
        message, param = _describe_validation_error(most_telling(errors))
        log_refusal(request, 422, message)
        body = error_body(422, message, "invalid_request_error", param)
        body["detail"] = _printable_json([{key: e.get(key) for key in ("type", "loc", "msg")} for e in errors])
        return JSONResponse(body, status_code=422)

    return {StarletteHTTPException: on_http_error, RequestValidationError: on_validation_error}
