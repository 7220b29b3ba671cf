"""The one table from engine errors to HTTP status codes, and the one JSON error shape every route answers with."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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
from inference.schemas import ErrorResponse

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
    status: int, message: str, error_type: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def engine_error_response(error: EngineError) -> JSONResponse:
    status = status_for(error)
    headers = {"Retry-After": str(error.retry_after_s)} if isinstance(error, QueueFullError) else None
    return error_response(status, error.message, error.type, error.param, headers)


def _describe_validation_error(error: dict[str, Any]) -> tuple[str, str | None]:
    location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    param = location[0] if location else None
    if error.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if error.get("type") == "missing":
        return f"`{param}` is required", param
    if error.get("type") == "extra_forbidden":
        return f"`{param}` is not a known parameter", param
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
        message, param = _describe_validation_error(error.errors()[0] if error.errors() else {})
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
