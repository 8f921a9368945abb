"""Console failures as pages: the API's JSON errors stay as they are; under /console the same error
becomes a friendly bilingual page (no stack traces), and a missing or expired session a redirect to
the login page — audited as a denial, whatever the redirect's status says."""

from __future__ import annotations

import logging
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.console.auth import PREFIX, SESSION_COOKIE
from api.console.render import finish, render, url
from api.errors import _HTTP_CODES, _validation_details
from api.limits import BodyTooLarge
from pdao.kernel.errors import PdaoError

log = logging.getLogger("pdao.console")


def is_console(request: Request) -> bool:
    path = request.url.path
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_page(request: Request, err: PdaoError) -> Response:
    request.state.reason = err.code
    if err.status == 401:
        # Not signed in, or the session expired: to the login page, and back here afterwards.
        request.state.audit_decision = "deny"
        back = request.url.path if request.method == "GET" else url("/")
        resp = RedirectResponse(url(f"/login?next={quote(back, safe='')}"), status_code=303)
        if request.cookies.get(SESSION_COOKIE):
            resp.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return finish(request, resp)
    details = _flat_details(err.details)
    return render(request, "error.html", http_status=err.status, err=err, details=details,
                  request_id=getattr(request.state, "request_id", None))


def _flat_details(details) -> list | None:  # noqa: ANN001
    """The problems to list: a list as it is; a refused upload's report ({"problems": [...],
    "findings": [...]}) item by item, each with where it is (the schema path or the column, and the
    lines); a refused release's failing checks ({"checks": [...]}: name and reason, only ever
    answered to the reviewer who tried) — what the API's JSON carries, never more."""
    if isinstance(details, list):
        return details
    if not isinstance(details, dict):
        return None
    out = []
    for key in ("problems", "findings", "checks"):
        for item in details.get(key) or []:
            if not isinstance(item, dict):
                continue
            where = item.get("path") or item.get("column") or item.get("check") or item.get("name") or ""
            lines = item.get("lines") or item.get("first_lines")
            if lines:
                where = f"{where} @ {', '.join(str(n) for n in lines[:10])}"
            msg = item.get("message") or item.get("reason")
            if msg is None and key == "findings":
                msg = f"{item.get('kind', '')} × {item.get('count', '')}"
            msg_zh = item.get("message_zh") or item.get("reason_zh") or msg
            out.append({"where": where, "message": msg or "", "message_zh": msg_zh or ""})
    return out or None


def internal_error_page(request: Request) -> Response:
    log.exception("unhandled console error on %s %s (request %s)", request.method, request.url.path,
                  getattr(request.state, "request_id", "-"))
    request.state.reason = "internal_error"
    err = PdaoError(500, "internal_error", "Internal error; nothing was changed. Quote the request id to the operator.",
                    "内部错误，未做任何更改。请向运营方提供请求编号。")
    try:
        return render(request, "error.html", http_status=500, err=err, details=None,
                      request_id=getattr(request.state, "request_id", None))
    except Exception:  # noqa: BLE001 - the page itself failed: plain text, still no trace
        return Response("500 internal error / 内部错误", status_code=500, media_type="text/plain; charset=utf-8")


def install_console_error_handlers(app: FastAPI) -> None:
    """Wrap the API's handlers (api/errors.py): console paths get pages, everything else the JSON."""
    api_pdao = app.exception_handlers[PdaoError]
    api_validation = app.exception_handlers[RequestValidationError]
    api_http = app.exception_handlers[StarletteHTTPException]

    async def on_pdao(request: Request, exc: PdaoError) -> Response:
        if is_console(request):
            return error_page(request, exc)
        return await api_pdao(request, exc)

    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        if is_console(request):
            return error_page(request, PdaoError(422, "invalid_request", "The form is invalid; see the problems below.",
                                                 "表单内容无效，详见下列问题。", details=_validation_details(exc)))
        return await api_validation(request, exc)

    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        if is_console(request):
            if isinstance(exc, BodyTooLarge):
                return error_page(request, exc.error)
            code, msg, msg_zh = _HTTP_CODES.get(exc.status_code, ("http_error", "HTTP error.", "HTTP 错误。"))
            if exc.status_code == 404:
                msg, msg_zh = "No such page.", "页面不存在。"
            return error_page(request, PdaoError(exc.status_code, code, msg, msg_zh))
        return await api_http(request, exc)

    app.add_exception_handler(PdaoError, on_pdao)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
