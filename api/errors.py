"""Every failure becomes the JSON error of API.md: {code, message, message_zh}. No stack traces."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.limits import BodyTooLarge
from pdao.kernel.errors import PdaoError, invalid

log = logging.getLogger("pdao.api")

_HTTP_CODES = {
    400: ("bad_request", "The request is malformed.", "请求格式错误。"),
    401: ("not_authenticated", "Missing or invalid credentials.", "缺少或无效的身份凭证。"),
    403: ("forbidden", "Not allowed.", "无权执行此操作。"),
    404: ("not_found", "No such endpoint.", "接口不存在。"),
    405: ("method_not_allowed", "This method is not allowed on this endpoint.", "该接口不支持此请求方法。"),
    413: ("too_large", "The request is too large.", "请求内容过大。"),
    415: ("unsupported_media_type", "Unsupported content type.", "不支持的内容类型。"),
    429: ("too_many_requests", "Too many requests.", "请求过于频繁。"),
}


def error_response(err: PdaoError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_details(exc: RequestValidationError) -> list[dict]:
    out = []
    for e in exc.errors():
        # Never echo the input back: it may hold personal data.
        out.append({"loc": [str(p) for p in e.get("loc", ())], "message": e.get("msg", ""), "type": e.get("type", "")})
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PdaoError)
    async def _pdao(request: Request, exc: PdaoError) -> JSONResponse:
        request.state.reason = exc.code  # the audit event names why
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        request.state.reason = "invalid_request"
        return error_response(PdaoError(422, "invalid_request", "The request is invalid; see details.",
                                        "请求参数无效，详见 details。", details=_validation_details(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BodyTooLarge):
            request.state.reason = exc.error.code
            return error_response(exc.error)
        code, msg, msg_zh = _HTTP_CODES.get(exc.status_code, ("http_error", "HTTP error.", "HTTP 错误。"))
        request.state.reason = code
        return error_response(PdaoError(exc.status_code, code, msg, msg_zh, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Normally the audit middleware answers unexpected errors itself (internal_error_response);
        # this is the last resort for anything raised outside it.
        return internal_error_response(request, exc)


def nul_refusal(exc: BaseException) -> PdaoError | None:
    """PostgreSQL refuses NUL in text: a NUL that got as far as the database (a form field, a JSON
    string) is the caller's bad input, answered 422 like one, not a 500. Nothing was committed."""
    if "cannot contain NUL (0x00)" in str(getattr(exc, "orig", exc)):
        return invalid("invalid_characters", "The request contains a NUL character.", "请求中含有 NUL 字符。")
    return None


def internal_error_response(request: Request, exc: BaseException | None = None) -> JSONResponse:
    """The 500 answer: logged with its traceback here, shown to the client without one."""
    request_id = getattr(request.state, "request_id", None)
    if exc is None:
        log.exception("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id or "-")
    else:
        log.error("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id or "-",
                  exc_info=(type(exc), exc, exc.__traceback__))
    request.state.reason = "internal_error"
    return error_response(PdaoError(500, "internal_error",
                                    "Internal error; nothing was changed. Quote the request id to the operator.",
                                    "内部错误，未做任何更改。请向运营方提供请求编号。",
                                    details={"request_id": request_id}))
