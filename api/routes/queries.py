"""Queries and results: thin routes over `sandbox.queries`. Cells leave only as a dev (synthetic)
answer to its own tenant, or once export review released a prod answer."""

from __future__ import annotations

import io
import json
from typing import Annotated, Any, Literal

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fastapi import APIRouter, Query as QueryParam, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from api.deps import SessionDep, SettingsDep, caller, scene_access
from pdao.errors import forbidden
from sandbox import queries
from sandbox.sql import MAX_SQL_CHARS

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
    """Check, authorize and queue a query (prod: its ε is reserved now), or answer a dev query at
    once on the synthetic twin. Poll `GET /queries/{id}`."""
    _note(request, body)
    q = queries.submit(session, settings, request.app.state.scene_enforcers, ctx.principal, ctx.scene,
                       body.sql, body.mode, body.epsilon)
    session.commit()
    request.state.object = f"query:{q.id}"
    return queries.query_out(q)


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
    return [queries.query_out(q) for q in queries.list_queries(session, ctx.principal, ctx.scene.id, limit)]


@router.get("/queries", name="queries.list")
def list_queries(principal: caller("query", "read"), session: SessionDep,
                 limit: Annotated[int, QueryParam(ge=1, le=500)] = 100) -> list[dict[str, Any]]:
    return [queries.query_out(q) for q in queries.list_queries(session, principal, None, limit)]


@router.get("/queries/{query_id}", name="queries.read")
def get_query(query_id: int, principal: caller("query", "read"), session: SessionDep, request: Request) -> dict[str, Any]:
    """Status (queued, running, held, done, released, rejected, failed, cancelled), progress, result id."""
    request.state.object = f"query:{query_id}"
    return queries.query_out(queries.get_query(session, principal, query_id))


@router.post("/queries/{query_id}/cancel", name="queries.cancel")
def cancel_query(query_id: int, principal: caller("query", "cancel"), session: SessionDep,
                 request: Request) -> dict[str, Any]:
    request.state.object = f"query:{query_id}"
    return queries.query_out(queries.cancel(session, principal, queries.get_query(session, principal, query_id)))


@router.get("/results/{result_id}", name="results.read")
def get_result(result_id: int, principal: caller("result", "read"), session: SessionDep, settings: SettingsDep,
               request: Request) -> dict[str, Any]:
    """Metadata, noise and error bounds; the cells only for the tenant's own dev answers or once released."""
    request.state.object = f"result:{result_id}"
    return queries.result_out(settings, principal, queries.get_result(session, principal, result_id))


@router.get("/results/{result_id}/download", name="results.download")
def download_result(result_id: int, principal: caller("result", "download"), session: SessionDep,
                    settings: SettingsDep, request: Request,
                    format: Annotated[Literal["csv", "parquet", "json"], QueryParam()] = "csv") -> Response:
    request.state.object = f"result:{result_id}"
    r = queries.get_result(session, principal, result_id)
    if not queries.cells_visible(principal, r):
        raise forbidden("result_not_released", "Only released results (or your own dev answers) can be downloaded.",
                        "只能下载已放行的结果（或本单位的开发模式结果）。")
    table = queries.read_table(settings, r)
    headers = {"X-Pdao-Result": str(r.id), "X-Pdao-Synthetic": "true" if r.synthetic else "false",
               "Content-Disposition": f'attachment; filename="result-{r.id}.{format}"'}
    if format == "parquet":
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata({b"pdao": json.dumps(
            {"result_id": r.id, "query_id": r.query_id, "synthetic": r.synthetic}).encode()}), buf)
        return Response(buf.getvalue(), media_type="application/vnd.apache.parquet", headers=headers)
    if format == "json":
        body = {"result_id": r.id, "query_id": r.query_id, "synthetic": r.synthetic, "noise": r.noise,
                "rows": queries.rows_of(table)}
        return Response(json.dumps(body, ensure_ascii=False, default=str), media_type="application/json",
                        headers=headers)
    buf = io.BytesIO()
    if r.synthetic:   # marked in the file itself, so a copy can never pass for real data
        buf.write(f"# pdao result {r.id}: synthetic (dev twin), not real data / 合成数据，并非真实数据\n".encode())
    pacsv.write_csv(table, buf)
    return Response(buf.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)
