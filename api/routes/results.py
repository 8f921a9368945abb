"""Results, export review, downloads, lineage and trace: thin routes over `sandbox.results.export`.
Cells leave only as a dev (synthetic) answer to its own tenant, or once export review released a
prod answer; every file carries an export id and a keyed fingerprint."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Request, UploadFile
from fastapi import Query as QueryParam
from pydantic import BaseModel, ConfigDict, Field

from api.deps import SessionDep, SettingsDep, caller
from api.downloads import SpooledDownload, download_headers
from pdao.kernel.errors import PdaoError
from sandbox.queries import service as queries
from sandbox.results import export

router = APIRouter(tags=["results"])

MAX_TRACE_BYTES = 50 * 1024 * 1024
MAX_OFFSET = 2_147_483_647


class ReviewIn(BaseModel):
    """A reviewer's decision. `override`: a release of a result with a failing check (two distinct
    reviewers' overrides release it; their reasons are kept)."""

    model_config = ConfigDict(extra="forbid")
    decision: Literal["release", "reject"]
    reason: str = Field(min_length=1, max_length=4000)
    override: bool = False


class RevisionIn(BaseModel):
    """A reviewer's change that makes a new, checked version: suppress cells (by their key values,
    or "failing" for every cell a check did not pass), or round value columns to a base."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["suppress", "round"]
    reason: str = Field(min_length=1, max_length=4000)
    cells: list[dict[str, Any]] | Literal["failing"] | None = Field(default=None, max_length=10_000)
    columns: list[str] | None = Field(default=None, max_length=200)
    base: int | None = Field(default=None, ge=1, le=1_000_000)


def _on(request: Request, result_id: int, scene_id: int | None = None) -> None:
    request.state.object = f"result:{result_id}"
    if scene_id is not None:
        request.state.scene_id = scene_id


@router.get("/results", name="results.list")
def list_results(principal: caller("result", "read"), session: SessionDep, settings: SettingsDep,
                 status: Annotated[Literal["dev", "held", "released", "rejected", "superseded"] | None, QueryParam()] = None,
                 limit: Annotated[int, QueryParam(ge=1, le=500)] = 100) -> list[dict[str, Any]]:
    """Result metadata (own tenant's for companies); `status=held` is the review queue's superset."""
    return [queries.result_out(settings, principal, r, with_rows=False, session=session)
            for r in export.list_results(session, principal, status, limit)]


@router.get("/reviews/queue", name="results.review_queue")
def review_queue(principal: caller("result", "review"), session: SessionDep, settings: SettingsDep,
                 limit: Annotated[int, QueryParam(ge=1, le=500)] = 100) -> list[dict[str, Any]]:
    """Held results this reviewer may decide on (not their organization's, not yet decided by them)."""
    return [queries.result_out(settings, principal, r, with_rows=False, session=session)
            for r in export.review_queue(session, principal, limit)]


@router.get("/results/{result_id}", name="results.read")
def get_result(result_id: int, principal: caller("result", "read"), session: SessionDep, settings: SettingsDep,
               request: Request, offset: Annotated[int, QueryParam(ge=0, le=MAX_OFFSET)] = 0,
               limit: Annotated[int, QueryParam(ge=1, le=queries.MAX_PAGE_ROWS)] = queries.PAGE_ROWS) -> dict[str, Any]:
    """Metadata, noise, the disclosure-check report; the cells only for the tenant's own dev answers
    or released ones, and for a reviewer while the result waits for them: a page of `rows`, at most
    `limit` from `offset`, with `rows_total` and `next_offset` (null after the last page)."""
    _on(request, result_id)
    r = export.get_result(session, principal, result_id)
    _on(request, result_id, r.scene_id)
    return queries.result_out(settings, principal, r, session=session, offset=offset, limit=limit)


@router.post("/results/{result_id}/review", name="results.review")
def review_result(result_id: int, body: ReviewIn, principal: caller("result", "review"), session: SessionDep,
                  settings: SettingsDep, request: Request) -> dict[str, Any]:
    _on(request, result_id)
    request.state.audit_detail = {"decision": body.decision, "override": body.override}
    r = export.review(session, principal, result_id, body.decision, body.reason, request.state.request_id,
                      override=body.override, settings=settings)
    _on(request, result_id, r.scene_id)
    return queries.result_out(settings, principal, r, with_rows=False, session=session)


@router.post("/results/{result_id}/revisions", name="results.revise", status_code=201)
def revise_result(result_id: int, body: RevisionIn, principal: caller("result", "review"), session: SessionDep,
                  settings: SettingsDep, request: Request) -> dict[str, Any]:
    """Suppress or round: a new version of the result, checked again and held for review."""
    _on(request, result_id)
    request.state.audit_detail = {"action": body.action, "base": body.base, "columns": body.columns}
    new = export.revise(session, settings, principal, result_id, body.action, body.reason, cells=body.cells,
                        columns=body.columns, base=body.base, request_id=request.state.request_id)
    _on(request, result_id, new.scene_id)
    return queries.result_out(settings, principal, new, session=session)


@router.get("/results/{result_id}/download", name="results.download")
def download_result(result_id: int, principal: caller("result", "download"), session: SessionDep,
                    settings: SettingsDep, request: Request,
                    format: Annotated[Literal["csv", "parquet", "json"], QueryParam()] = "csv") -> SpooledDownload:
    """The stamped file (recorded before it is sent), streamed from the staging folder: the server
    holds a chunk of it at a time."""
    _on(request, result_id)
    f = export.export(session, settings, principal, result_id, format, request.state.request_id, spool=True)
    r = f.export
    request.state.audit_detail = {"export_id": r.export_id, "format": format, "sha256": r.sha256}
    return SpooledDownload(f, download_headers(f))


@router.get("/results/{result_id}/lineage", name="results.lineage")
def result_lineage(result_id: int, principal: caller("result", "read"), session: SessionDep,
                   request: Request) -> dict[str, Any]:
    """Result → query → scene → authorization → dataset versions, with reviews and exports."""
    _on(request, result_id)
    out = export.lineage(session, principal, result_id)
    _on(request, result_id, out["scene"]["id"])
    return out


@router.post("/trace", name="trace.create")
async def trace_file(principal: caller("trace", "create"), session: SessionDep, settings: SettingsDep,
                     request: Request, file: Annotated[UploadFile, File()]) -> dict[str, Any]:
    """A file found outside → its export, query, scene, datasets and versions, requester, reviewers."""
    data = await file.read(MAX_TRACE_BYTES + 1)
    if len(data) > MAX_TRACE_BYTES:
        raise PdaoError(413, "file_too_large", f"A traced file may be at most {MAX_TRACE_BYTES // 1024 // 1024} MB.",
                        f"待溯源文件不得超过 {MAX_TRACE_BYTES // 1024 // 1024} MB。")
    out = export.trace(session, settings, data, file.filename)
    request.state.audit_detail = {"matched": out["matched"], "match": out.get("match"),
                                  "export_id": out.get("export_id"), "result_id": out.get("result_id")}
    if out.get("result_id"):
        request.state.object = f"result:{out['result_id']}"
        request.state.scene_id = out.get("scene_id")
    return out
