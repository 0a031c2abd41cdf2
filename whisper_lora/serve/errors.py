"""Errors as OpenAI's API returns them, so the official client raises its own exception classes."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import AudioError, UserError
from .service import Busy, UnknownModel

log = logging.getLogger("whisper_lora.serve")


class APIError(Exception):
    """An error to send as is: HTTP status, message, OpenAI's `type`, the offending `param`, a `code`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def as_api_error(exc: BaseException, upload_name: str | None = None) -> APIError:
    """The APIError for anything a request can raise; a bug becomes a 500 whose details stay in the log."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnknownModel):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, Busy):
        return APIError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": str(max(1, round(exc.retry_after)))})
    if isinstance(exc, AudioError):
        message = exc.args[0] if exc.args else str(exc)
        if exc.path and upload_name:  # the client knows its file by its own name, not our temporary one
            message = message.replace(exc.path, upload_name)
        return APIError(400, message, param="file", code="invalid_audio")
    if isinstance(exc, UserError):
        return APIError(400, str(exc), code="invalid_value")
    log.exception("request failed", exc_info=exc)
    return APIError(500, "internal error while transcribing (details are in the server log)", type="server_error")


def response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.type, error.param, error.code), status_code=error.status,
                        headers=error.headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = str(first.get("loc", ["", ""])[-1]) or None
        return response(APIError(400, f"invalid value for '{param}': {first.get('msg', 'invalid')}", param=param))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        kind = "not_found" if exc.status_code == 404 else None
        return response(APIError(exc.status_code, str(exc.detail), code=kind))

    # Registered by class, these are answered inside the app; a handler for Exception itself would run in
    # starlette's outermost middleware, which re-raises after answering and so drops the connection.
    @app.exception_handler(UserError)
    async def _user(request: Request, exc: UserError):
        return response(as_api_error(exc))

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy):
        return response(as_api_error(exc))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        return response(as_api_error(exc))
