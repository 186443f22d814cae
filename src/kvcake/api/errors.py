"""Errors answered in OpenAI's shape: ``{"error": {message, type, param, code}}``.

:meth:`ApiError.of` maps everything the app expects: validation (one 400 naming every bad
field), backend errors by their HTTP status hint (a 503 — an instance died or none is up — with
``Retry-After``), a rejection (429 with its reason as the code), and anything else (500,
details in the log only).
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from kvcake.api.responses import ErrorDetail, ErrorResponse
from kvcake.common.errors import KvcakeError, RequestRejectedError

RETRY_AFTER_S = 1  # a lost instance's requests go elsewhere at once; one second is plenty
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error"}


class ApiError(Exception):
    """An error answered in OpenAI's shape ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @classmethod
    def of(cls, exc: Exception) -> ApiError:
        """The answer for any error the app expects (validation, backend, routing)."""
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, RequestRejectedError):
            return cls(429, f"request rejected ({exc.reason}): {exc.detail}", code=exc.reason)
        if isinstance(exc, KvcakeError):
            return cls(exc.status, str(exc.args[0]), code=exc.code.name.lower())
        if isinstance(exc, RequestValidationError):
            return _validation_error(exc)
        if isinstance(exc, HTTPException):
            return cls(exc.status_code, f"{exc.detail}")
        return cls(500, f"internal error ({type(exc).__name__}); the server log has details")

    def body(self) -> ErrorResponse:
        kind = _ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "api_error")
        return ErrorResponse(error=ErrorDetail(message=self.message, type=kind, param=self.param,
                                               code=self.code))

    def response(self) -> JSONResponse:
        """The JSON answer; a 503 (no live instance for now) says when to come back."""
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=headers)


class ClientGoneError(Exception):
    """The client disconnected before its answer was ready; the work was cancelled."""


def _validation_error(exc: RequestValidationError) -> ApiError:
    """One 400 naming every bad field, ``param`` the first (``messages[0].content``)."""
    problems = list(exc.errors())
    if problems[0]["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {problems[0]['ctx']['error']}")
    if tuple(problems[0]["loc"]) == ("body",):  # not JSON at all, or not an object
        return ApiError(400, "the request body must be a JSON object, sent with "
                        "Content-Type: application/json", param="body")
    fields = [_field_path(problem["loc"]) for problem in problems]
    messages = [f"{field}: {_problem_text(problem)}"
                for field, problem in zip(fields, problems, strict=True)]
    return ApiError(400, "; ".join(messages), param=fields[0])


def _field_path(loc: tuple[int | str, ...]) -> str:
    """``("body", "messages", 0, "content")`` -> ``messages[0].content``."""
    path = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path or "body"


def _problem_text(problem: dict[str, Any]) -> str:
    if problem["type"] == "value_error":  # our own validators: their text, not pydantic's prefix
        return str(problem["ctx"]["error"])
    return str(problem["msg"])
