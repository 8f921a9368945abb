"""Queries: thin routes over `sandbox.queries.service` (results and their review: `api/routes/results.py`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, status
from fastapi import Query as QueryParam
from pydantic import BaseModel, ConfigDict, Field

from api.deps import SessionDep, SettingsDep, caller, scene_access
from sandbox import worker
from sandbox.engine.sql import MAX_SQL_CHARS
from sandbox.queries import service as queries
from sandbox.templates import runs as template_runs

router = APIRouter(tags=["queries"])


class QueryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sql: str = Field(min_length=1, max_length=MAX_SQL_CHARS)
    mode: Literal["dev", "prod"]
    epsilon: float | None = Field(default=None, gt=0, le=100)


def _note(request: Request, body: QueryIn) -> None:
    # The audit detail holds the SQL text (never cells) and what was asked.
    request.state.audit_detail = {"sql": body.sql, "mode": body.mode, "epsilon": body.epsilon}


@router.post("/scenes/{scene_id}/queries", name="queries.submit", status_code=status.HTTP_202_ACCEPTED)
def submit_query(body: QueryIn, ctx: scene_access("query"), session: SessionDep, settings: SettingsDep,
                 request: Request) -> dict[str, Any]:
    """Check, authorize and queue a query (prod: its ε is reserved now); a dev query is answered by
    this request on the synthetic twin when it may (else it waits in the queue). Poll
    `GET /queries/{id}` until its status is final."""
    _note(request, body)
    q = worker.submit_query(session, request.app.state.engine, settings, request.app.state.scene_enforcers,
                            ctx.principal, ctx.scene, body.sql, body.mode, body.epsilon, request.state.request_id)
    request.state.object = f"query:{q.id}"
    return queries.query_out(q, ctx.principal, session)


@router.post("/scenes/{scene_id}/queries/preview", name="queries.preview")
def preview_query(body: QueryIn, ctx: scene_access("query"), session: SessionDep, settings: SettingsDep,
                  request: Request) -> dict[str, Any]:
    """The ε the query would cost and its expected error (95%), without running or spending anything."""
    _note(request, body)
    return queries.preview(session, settings, request.app.state.scene_enforcers, ctx.principal, ctx.scene,
                           body.sql, body.mode, body.epsilon)


@router.get("/scenes/{scene_id}/queries", name="queries.list_scene")
def list_scene_queries(ctx: scene_access("read"), session: SessionDep,
                       limit: Annotated[int, QueryParam(ge=1, le=500)] = 100) -> list[dict[str, Any]]:
    return [queries.query_out(q, ctx.principal, session)
            for q in queries.list_queries(session, ctx.principal, ctx.scene.id, limit)]


@router.get("/queries", name="queries.list")
def list_queries(principal: caller("query", "read"), session: SessionDep,
                 limit: Annotated[int, QueryParam(ge=1, le=500)] = 100) -> list[dict[str, Any]]:
    return [queries.query_out(q, principal, session) for q in queries.list_queries(session, principal, None, limit)]


@router.get("/queries/{query_id}", name="queries.read")
def get_query(query_id: int, principal: caller("query", "read"), session: SessionDep, request: Request) -> dict[str, Any]:
    """Status (queued, running, held, done, released, rejected, failed, cancelled), progress, result id."""
    request.state.object = f"query:{query_id}"
    return queries.query_out(queries.get_query(session, principal, query_id), principal, session)


@router.post("/queries/{query_id}/cancel", name="queries.cancel")
def cancel_query(query_id: int, principal: caller("query", "cancel"), session: SessionDep,
                 request: Request) -> dict[str, Any]:
    request.state.object = f"query:{query_id}"
    q = queries.cancel(session, principal, queries.get_query(session, principal, query_id), request.state.request_id)
    return queries.query_out(q, principal, session)


class TemplateRunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    upload: str = Field(min_length=1, max_length=63)     # the tenant's own table (its newest version)
    params: dict[str, Any] = Field(default_factory=dict, max_length=50)
    mode: Literal["dev", "prod"] = "prod"


@router.post("/scenes/{scene_id}/templates/{name}/runs", name="templates.run", status_code=status.HTTP_201_CREATED)
def run_template(name: str, body: TemplateRunIn, ctx: scene_access("query"), session: SessionDep,
                 settings: SettingsDep, request: Request) -> dict[str, Any]:
    """Run an approved analysis template on the tenant's own upload: one row per consented upload
    row, only the template's declared derived values; prod answers wait for export review."""
    request.state.audit_detail = {"template": name, "upload": body.upload, "mode": body.mode, "params": body.params}
    q = template_runs.run(session, settings, ctx.principal, ctx.scene, name, body.upload, body.params, body.mode,
                          request.state.request_id)
    request.state.object = f"query:{q.id}"
    return queries.query_out(q, ctx.principal, session)
