"""The FastAPI application: routers, the JSON error handlers and the audit middleware."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from api.errors import install_error_handlers
from api.routes import admin, auth, datasets, health
from pdao import __version__, audit
from pdao.config import Settings
from pdao.db import make_engine

log = logging.getLogger("pdao.api")

API_PREFIX = "/api/v1"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    settings.ensure_home()
    app = FastAPI(
        title="pdao — public-data authorized-operation sandbox",
        description="公共数据授权运营沙箱。Metadata, scenes, queries and results; never raw rows.",
        version=__version__,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = make_engine(settings.database_url)
    install_error_handlers(app)
    for router in (health.router, auth.router, datasets.router, admin.router):
        app.include_router(router, prefix=API_PREFIX)

    @app.middleware("http")
    async def audit_every_request(request: Request, call_next) -> Response:  # noqa: ANN001
        request_id = request.headers.get("x-request-id", "")[:64] or uuid.uuid4().hex
        request.state.request_id = request_id
        try:
            response = await call_next(request)
        except Exception:
            await run_in_threadpool(_record, request, 500)
            raise
        await run_in_threadpool(_record, request, response.status_code)
        response.headers["X-Request-ID"] = request_id
        return response

    return app


def _record(request: Request, status: int) -> None:
    """One audit event per request, allowed or denied. Failure to audit is logged loudly."""
    state = request.state
    principal = getattr(state, "principal", None)
    decision = getattr(state, "decision", None)
    if status >= 500:
        decision = "error"
    elif decision is None or (decision == "allow" and status in (401, 403)):
        decision = "deny" if status in (401, 403, 404, 405) or status == 429 else "allow"
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
            decision=decision,
            status=status,
            reason=getattr(state, "reason", None) if status < 400 else getattr(state, "reason", None) or f"http_{status}",
            method=request.method,
            path=request.url.path[:400],
            client=request.client.host if request.client else None,
        )
    except Exception:  # noqa: BLE001 - the response is already decided; never hide an audit failure
        log.exception("AUDIT WRITE FAILED for request %s", state.request_id)


def _route_action(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "name", None) or "unknown_route"
