"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the matching status."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.router.json_response import JSONBytes

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONBytes:
        headers = None if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}
        return JSONBytes(self.body(), status_code=self.status, headers=headers)


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    error_type = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    # the top-level field: pydantic's deeper locations name union members ("list[int]"), not fields
    return str(loc[1]) if len(loc) >= 2 and loc[0] == "body" else None


def validation_error(errors: Sequence[Any]) -> APIError:
    """The 400 for a body that failed validation; ``errors`` as FastAPI reports them (locations
    starting with "body")."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    param = _loc_to_param(tuple(first.get("loc", ())))
    if first.get("type") in ("json_invalid", "model_attributes_type") or param is None:
        message = f"the request body is not a valid JSON object: {first.get('msg', '')}"
        return APIError(400, message, None, "invalid_json")
    return APIError(400, f"{param}: {first.get('msg', 'invalid value')}", param, "invalid_value")


async def validation_error_handler(request: Request, exc: Exception) -> JSONBytes:
    assert isinstance(exc, RequestValidationError)
    return validation_error(exc.errors()).response()


async def http_error_handler(request: Request, exc: Exception) -> JSONBytes:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code if exc.status_code in ERROR_TYPES else 400
    return APIError(status, str(exc.detail), None, None).response()


async def api_error_handler(request: Request, exc: Exception) -> JSONBytes:
    assert isinstance(exc, APIError)
    return exc.response()
