"""The FastAPI application: routers, the JSON error handlers and the audit middleware."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api import console
from api.console.errors import error_page, internal_error_page, is_console
from api.errors import error_response, install_error_handlers, internal_error_response, nul_refusal
from api.limits import BodySizeLimit, limits_by_path
from api.refusals import AnonymousRefusals, Summary, proves_someone
from api.routes import admin, alerts, auth, budgets, datasets, health, queries, results, scenes, uploads
from api.routes import audit as audit_routes
from api.slow_clients import send_in_time
from pdao import __version__
from pdao.kernel import audit
from pdao.kernel.config import Settings
from pdao.kernel.db import make_engine
from pdao.kernel.errors import PdaoError, invalid
from policies.enforcer import SceneEnforcers

log = logging.getLogger("pdao.api")

API_PREFIX = "/api/v1"


class PdaoApp(FastAPI):
    """The application; it takes the server's `send` first, so that a client that stops reading
    any answer is cut off at the connection (`api/slow_clients.py`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            send = send_in_time(scope, send)
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    settings.ensure_home()
    settings.sweep_staging()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(_write_summaries, app, app.state.refusals.flush_all())

    app = PdaoApp(
        lifespan=lifespan,
        title="pdao — public-data authorized-operation sandbox",
        description="公共数据授权运营沙箱。Metadata, scenes, queries and results; never raw rows.",
        version=__version__,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = make_engine(settings.database_url)
    app.state.refusals = AnonymousRefusals(settings.anonymous_audited_per_minute,
                                           settings.anonymous_refusals_per_minute)
    app.state.refusals_checked = time.monotonic()
    install_error_handlers(app)
    app.state.scene_enforcers = SceneEnforcers(app.state.engine)
    for router in (health.router, auth.router, datasets.router, scenes.router, queries.router, results.router,
                   admin.router,
                   audit_routes.router, alerts.router, uploads.router,
                   budgets.router):
        app.include_router(router, prefix=API_PREFIX)
    console.install(app)  # /console: pages over the same services, auth, casbin and audit
    # Added before the audit middleware, so it runs inside it: a refused body is audited too.
    app.add_middleware(BodySizeLimit, limit_for=limits_by_path(DEFAULT_BODY_LIMIT, [
        # file uploads: the file itself is checked against max_upload_bytes by the route
        ("POST", rf"{API_PREFIX}/datasets/[^/]+/versions", settings.max_upload_bytes + MULTIPART_OVERHEAD),
        ("POST", rf"{API_PREFIX}/trace", 50 * 1024 * 1024 + MULTIPART_OVERHEAD),
        ("POST", rf"{API_PREFIX}/uploads", settings.max_tenant_upload_bytes + MULTIPART_OVERHEAD),
        # the console's forms for the same two (its other forms keep the default)
        ("POST", r"/console/trace", 50 * 1024 * 1024 + MULTIPART_OVERHEAD),
        ("POST", r"/console/uploads", settings.max_tenant_upload_bytes + MULTIPART_OVERHEAD),
    ]))

    @app.middleware("http")
    async def audit_every_request(request: Request, call_next) -> Response:  # noqa: ANN001
        request.state.request_id = uuid.uuid4().hex  # ours: unique; a client's own id goes in the detail
        refusals: AnonymousRefusals = request.app.state.refusals
        client = request.client.host if request.client else "unknown"
        # a flood from an address that names nobody is not even run (the token's signature is checked
        # only for an address past its refusals: admit is the cheap test)
        if not refusals.admit(client) and not proves_someone(request.headers, request.cookies,
                                                              request.app.state.settings.secret_key):
            refusals.refused(client, 429, request.url.path)
            err = PdaoError(429, "too_many_refused_requests",
                            "Too many refused requests from your address this minute; try again in a minute.",
                            "您的地址本分钟内被拒绝的请求过多，请一分钟后重试。", headers={"Retry-After": "60"})
            response = error_page(request, err) if is_console(request) else error_response(err)
            response.headers["X-Request-ID"] = request.state.request_id
            await _summaries_due(request.app)
            return response
        try:
            if _has_nul(request):
                # PostgreSQL refuses NUL in text: a clear 422 here, not a database error later
                err = invalid("invalid_characters", "The request's path or query contains a NUL character.",
                              "请求的路径或查询参数中含有 NUL 字符。")
                request.state.reason = "invalid_characters"
                response = error_page(request, err) if is_console(request) else error_response(err)
            else:
                response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - answered here, so the 500 is audited and carries its request id
            nul = nul_refusal(exc)
            if nul is not None:
                request.state.reason = nul.code
                response = error_page(request, nul) if is_console(request) else error_response(nul)
            else:
                response = internal_error_page(request) if is_console(request) else internal_error_response(request)
        one_by_one = True
        if response.status_code >= 400 and getattr(request.state, "principal", None) is None:
            # refused, and it named nobody (whatever it carried): counted per address and minute
            typed = (getattr(request.state, "audit_detail", None) or {}).get("attempted_username")
            one_by_one = refusals.refused(client, response.status_code, request.url.path,
                                          attempted_username=typed if isinstance(typed, str) else None)
        await _summaries_due(request.app)
        if one_by_one and not await run_in_threadpool(_record, request, response.status_code):
            # Fail closed: an answer that cannot be audited is not given.
            response = error_response(PdaoError(
                503, "audit_unavailable", "The audit log cannot be written; the request was not answered.",
                "审计日志无法写入，请求未予应答。", details={"request_id": request.state.request_id}))
        response.headers["X-Request-ID"] = request.state.request_id
        response.headers.setdefault("X-Content-Type-Options", "nosniff")   # downloads and errors included
        return response

    return app


DEFAULT_BODY_LIMIT = 1024 * 1024  # JSON, forms and descriptors
MULTIPART_OVERHEAD = 64 * 1024

# A client may name its request (to find it in the audit trail), but only with a plain token:
# anything else would be written into the audit log verbatim.
_CLIENT_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def _detail(request: Request, principal) -> dict | None:  # noqa: ANN001
    out = {}
    supplied = request.headers.get("x-request-id")
    if supplied and _CLIENT_REQUEST_ID_RE.fullmatch(supplied):
        out["client_request_id"] = supplied
    if principal is not None and principal.api_key_id is not None:
        out["api_key_id"] = principal.api_key_id
    out.update(getattr(request.state, "audit_detail", None) or {})  # a route's decision facts, never cells
    return out or None


def _has_nul(request: Request) -> bool:
    return "\x00" in request.url.path or b"%00" in request.scope.get("query_string", b"") \
        or b"\x00" in request.scope.get("query_string", b"")


def _decision(status: int) -> str:
    """The audit decision follows the answer: refused requests are denials whatever stage refused
    them (authentication, role, validation, state, tenant scope); server failures are errors."""
    if status >= 500:
        return "error"
    return "deny" if status >= 400 else "allow"


def _record(request: Request, status: int) -> bool:
    """One audit event per request, allowed or denied. False (and a loud log) if it cannot be written."""
    state = request.state
    principal = getattr(state, "principal", None)
    reason = getattr(state, "reason", None)
    if status >= 400 and not reason:
        reason = f"http_{status}"
    # A console redirect to the login page answers 303, but it refused the request.
    decision = getattr(state, "audit_decision", None) or _decision(status)
    try:
        audit.record(
            request.app.state.engine,
            request_id=state.request_id,
            actor=principal.username if principal else getattr(state, "attempted_actor", None),
            org=principal.org_code if principal else None,
            role=principal.role.value if principal else None,
            auth_method=principal.auth_method if principal else None,
            action=getattr(state, "action", None) or _route_action(request),
            object=getattr(state, "object", None),
            scene_id=getattr(state, "scene_id", None),
            decision=decision,
            status=status,
            reason=reason,
            method=request.method[:10],
            path=request.url.path[:400],
            client=request.client.host[:64] if request.client else None,
            detail=_detail(request, principal),
        )
    except Exception:  # noqa: BLE001 - never hide an audit failure
        log.exception("AUDIT WRITE FAILED for request %s", state.request_id)
        return False
    return True


SUMMARY_CHECK_SECONDS = 5.0


async def _summaries_due(app: FastAPI) -> None:
    """Write the summaries of anonymous refusals whose minute is over (looked at every few seconds)."""
    now = time.monotonic()
    if now - app.state.refusals_checked < SUMMARY_CHECK_SECONDS:
        return
    app.state.refusals_checked = now
    due = app.state.refusals.due()
    if due:
        await run_in_threadpool(_write_summaries, app, due)


def _write_summaries(app: FastAPI, summaries: list[Summary]) -> None:
    for s in summaries:
        try:
            audit.record(app.state.engine, request_id=uuid.uuid4().hex, **s.audit_fields())
        except Exception:  # noqa: BLE001 - never hide an audit failure
            log.exception("AUDIT WRITE FAILED for a summary of %s refusals from %s", s.count, s.client)


def _route_action(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "name", None) or "unknown_route"
